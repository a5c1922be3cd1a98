"""``CosineSimilarityLoss``: the loss as an ``nn.Module`` holding its settings (and a dictionary)."""

from __future__ import annotations

from torch import Tensor, nn

from cossim_fast.backends import dispatch
from cossim_fast.contract import inputs
from cossim_fast.ops.distributed import distributed_world
from cossim_fast.ops.loss import loss_terms, reduce_terms


class CosineSimilarityLoss(nn.Module):
    """Pull target features toward their most similar same-class source features.

    ``loss = criterion(features, labels)`` uses the dictionary given at construction;
    ``criterion(features, labels, dictionary)`` uses another. After each call,
    ``last_selected_fraction`` holds the fraction of non-ignored target rows whose terms passed
    the threshold (a tensor, so reading it costs no sync until you print it).

    ``sync_distributed=True`` (under ``torch.distributed``, every rank calling in step): the loss
    is normalized by the selected counts of all ranks and scaled by the world size, so DDP's
    gradient average is the gradient of the loss over the global batch (one all-reduce of the
    counts per call); by default each rank's loss is its own rows' mean, as in a plain DDP loss.
    """

    def __init__(
        self,
        threshold: float,
        *,
        mode: str = "max",
        reduction: str = "mean",
        backend: str = "auto",
        ignore_index: int = 255,
        dictionary: nn.Module | None = None,
        check_values: bool | None = None,
        sync_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.threshold = inputs.check_threshold(threshold)
        inputs.warn_if_threshold_selects_nothing(self.threshold)
        self.mode = inputs.check_choice("mode", mode, inputs.MODES)
        self.reduction = inputs.check_choice("reduction", reduction, inputs.REDUCTIONS)
        dispatch.check_backend_name(backend)
        self.backend = backend
        self.ignore_index = ignore_index
        self.dictionary = _check_dictionary(dictionary)
        inputs.value_checks_enabled(check_values)  # a bad value fails here, not at the first call
        self.check_values = check_values  # None: the global setting (set_value_checks)
        if not isinstance(sync_distributed, bool):
            raise TypeError(f"sync_distributed must be True or False, got {sync_distributed!r}")
        self.sync_distributed = sync_distributed
        self.last_selected_fraction: Tensor | None = None

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, mode={self.mode!r}, reduction={self.reduction!r}, backend={self.backend!r}"

    def forward(self, features: Tensor, labels: Tensor, dictionary: nn.Module | None = None) -> Tensor:
        dictionary = _check_dictionary(dictionary) if dictionary is not None else self.dictionary
        if dictionary is None:
            raise ValueError("dictionary must be given, at construction or in the call (a FeatureDictionary)")
        loss_sum, selected, flat_labels = loss_terms(
            features, labels, dictionary.bank, dictionary.counts, self.threshold,
            mode=self.mode, ignore_index=self.ignore_index, backend=self.backend, check_values=self.check_values,
        )
        rows_used = (flat_labels != self.ignore_index).sum().clamp(min=1)
        self.last_selected_fraction = ((selected > 0).sum() / rows_used).detach()
        return reduce_terms(
            loss_sum, selected, flat_labels, dictionary.bank.shape[0], self.reduction,
            world=distributed_world(self.sync_distributed),
        )


def _check_dictionary(dictionary: object) -> nn.Module | None:
    """A dictionary is an object with ``bank`` and ``counts`` (a FeatureDictionary), not a bank."""
    if dictionary is not None and not (hasattr(dictionary, "bank") and hasattr(dictionary, "counts")):
        raise TypeError(
            f"dictionary must be a FeatureDictionary (with bank and counts), got {type(dictionary).__name__}; "
            "for a bare K x M x C bank and its counts call cossim_fast.cosine_similarity_loss"
        )
    return dictionary
