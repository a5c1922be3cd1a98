"""cossim_fast: thresholded max cosine similarity against a class-wise source feature dictionary,
for unsupervised domain adaptation in semantic segmentation, without materializing N x M.

The contract is the project's internal METHOD.md (not shipped: the README and docs/ describe
what the code computes); ``reference`` is its materializing oracle, ``torch`` the chunked
pure-PyTorch path that runs everywhere, ``triton`` and ``cuda`` the fused GPU paths.
"""

from cossim_fast import _extension
from cossim_fast.backends import BACKEND_NAMES, BackendUnavailableError, available_backends, set_strict
from cossim_fast.contract import set_value_checks
from cossim_fast.dictionary import FeatureDictionary
from cossim_fast.ops import cosine_similarity_loss, max_cosine_similarity
from cossim_fast.ops.modules import CosineSimilarityLoss

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "CosineSimilarityLoss",
    "FeatureDictionary",
    "available_backends",
    "cosine_similarity_loss",
    "extension_status",
    "max_cosine_similarity",
    "set_strict",
    "set_value_checks",
]


def extension_status() -> str:
    """Whether the compiled extension ``cossim_fast._C`` is loaded and what it was built with
    (CUDA version, GPU architectures, torch), and if it is not loaded, why."""
    return _extension.describe()
