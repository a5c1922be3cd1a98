"""Registered ops, their autograd wrappers and the functional API."""

from cossim_fast.ops.loss import cosine_similarity_loss, loss_terms, max_cosine_similarity, reduce_terms

__all__ = ["cosine_similarity_loss", "loss_terms", "max_cosine_similarity", "reduce_terms"]
