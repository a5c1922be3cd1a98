"""The class-wise dictionary of recent source features: a ring buffer per class (METHOD.md 5)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cossim_fast.backends import dispatch
from cossim_fast.contract import inputs
from cossim_fast.dictionary.distributed import gather_from_all_ranks, world_size
from cossim_fast.ops import custom_ops  # also registers torch.ops.cossim_fast.update_dictionary
from cossim_fast.ops.loss import cosine_similarity_loss, max_cosine_similarity


_BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _dense_int64_buffers(dictionary: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict(..., assign=True)`` may bring strided buffers or int32 counters; the
    in-place writes and the kernels take the dense int64 layout of a freshly built dictionary."""
    for name in ("bank", "counts", "ptr"):
        buffer = getattr(dictionary, name)
        if name != "bank":
            buffer = buffer.to(torch.int64)
        if not buffer.is_contiguous():
            buffer = buffer.contiguous()
        setattr(dictionary, name, buffer)


def check_loaded_state(bank: Tensor, counts: Tensor, ptr: Tensor, expected_dtype: torch.dtype) -> None:
    """A state that no sequence of updates produces would be written and read wrongly (a slot
    past ``counts`` written, a stale one read), so it is refused when loaded.

    Every update moves ``ptr`` and ``counts`` by the same number of rows from 0, so while a
    class's ring is not full its head is at its count.
    """
    if bank.dtype != expected_dtype:
        raise ValueError(
            f"bank in the state dict is {bank.dtype}, this dictionary stores {expected_dtype}: build the "
            f"FeatureDictionary with dtype={bank.dtype}, or convert the saved bank first"
        )
    for name, values in (("counts", counts), ("ptr", ptr)):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} in the state dict must have an integer dtype, got {values.dtype}")
    slots = bank.shape[1]
    inputs.check_slot_values("counts in the state dict", counts, 0, slots)
    inputs.check_slot_values("ptr in the state dict", ptr, 0, slots - 1)
    torn = (counts < slots) & (ptr != counts)
    if torn.any():
        k = int(torn.nonzero()[0, 0])
        raise ValueError(
            f"the state dict's class {k} has counts {int(counts[k])} < {slots} slots but ptr {int(ptr[k])}: "
            f"a ring that is not full has its head at its count (the state is corrupt or hand-made)"
        )


class FeatureDictionary(nn.Module):
    """``K`` ring buffers of ``M`` unit-norm, detached ``C``-dim source features.

    Buffers: ``bank`` (K x M x C), ``counts`` (valid slots per class) and ``ptr`` (next slot to
    write), all saved in the state dict. Under ``torch.distributed`` (and ``sync_distributed``),
    ``update`` gathers every rank's rows first so all ranks keep identical dictionaries; a
    ``generator`` must then be seeded alike on every rank (the trainer's are), or their random
    orders, and so their dictionaries, differ. The gather reads the ranks' row counts on the host
    (one synchronization per update; the single-process update has none with
    ``check_values=False``: the value checks read the data).
    """

    def __init__(
        self,
        num_classes: int,
        slots_per_class: int,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        sync_distributed: bool = True,
    ) -> None:
        super().__init__()
        _positive_int("num_classes", num_classes)
        _positive_int("slots_per_class", slots_per_class)
        _positive_int("dim", dim)
        if dtype not in _BANK_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16 (float64 for testing), got {dtype}")
        self.sync_distributed = sync_distributed
        self.register_buffer("bank", torch.zeros(num_classes, slots_per_class, dim, device=device, dtype=dtype))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64, device=device))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.int64, device=device))
        self.register_load_state_dict_post_hook(_dense_int64_buffers)

    @property
    def num_classes(self) -> int:
        return self.bank.shape[0]

    @property
    def slots_per_class(self) -> int:
        return self.bank.shape[1]

    @property
    def dim(self) -> int:
        return self.bank.shape[2]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, slots_per_class={self.slots_per_class}, dim={self.dim}, dtype={self.bank.dtype}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved = [state_dict.get(prefix + name) for name in ("bank", "counts", "ptr")]
        shapes_match = all(isinstance(t, Tensor) and t.shape == getattr(self, n).shape for t, n in zip(saved, ("bank", "counts", "ptr")))
        if shapes_match:  # otherwise torch's size-mismatch error names the key
            check_loaded_state(*saved, expected_dtype=self.bank.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @torch.no_grad()
    def update(
        self,
        features: Tensor,
        labels: Tensor,
        *,
        max_per_class: int | None = None,
        generator: torch.Generator | None = None,
        ignore_index: int = 255,
        backend: str = "auto",
        check_values: bool | None = None,
    ) -> None:
        """Write normalized source features into their classes' ring buffers, in place.

        ``features`` N x C with labels N, or B x C x H x W with labels B x H x W (ground truth
        downsampled by nearest neighbour to the feature resolution). With a ``generator`` the
        rows are visited in a random order drawn from it, so a ``max_per_class`` cap keeps a
        random subset; without one, rows go in increasing order. No host synchronization with
        ``check_values=False`` (the value checks read the data, one sync on GPU).
        """
        dispatch.check_backend_name(backend)
        cap = inputs.check_max_per_class(max_per_class)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        rows = inputs.rows_of(features, labels, self.dim, ignore_index)
        inputs.check_ignore_index(ignore_index, self.num_classes)
        if rows.features.device != self.bank.device:
            raise ValueError(f"features must be on the dictionary's device {self.bank.device}, got {rows.features.device}")
        source, source_labels = rows.features.detach(), rows.labels
        if self.sync_distributed and world_size() > 1:
            flat, source_labels = gather_from_all_ranks(source.reshape(-1, self.dim), source_labels, ignore_index)
            source = flat.unsqueeze(0)
        if inputs.value_checks_enabled(check_values):  # before the generator moves: a refused update changes nothing
            custom_ops.check_update_values(self.bank, self.counts, self.ptr, source, source_labels, ignore_index)
        if generator is None:
            self._write(source, source_labels, None, cap, ignore_index, backend)
            return
        state = generator.get_state()  # host-side for CPU and CUDA generators: no sync
        order = torch.randperm(source_labels.numel(), generator=generator, device=generator.device)
        try:
            if order.device.type == "cpu" and self.bank.is_cuda:  # a pageable copy would wait for the GPU
                order = order.pin_memory().to(self.bank.device, non_blocking=True)
            self._write(source, source_labels, order.to(self.bank.device), cap, ignore_index, backend)
        except BaseException:  # e.g. a backend refused in strict mode: a retry gets the same draw
            generator.set_state(state)
            raise

    def _write(
        self, source: Tensor, labels: Tensor, order: Tensor | None, cap: int, ignore_index: int, backend: str
    ) -> None:
        torch.ops.cossim_fast.update_dictionary(
            self.bank, self.counts, self.ptr, source, labels, order, cap, ignore_index, backend,
            False,  # checked by update
        )

    def lookup(
        self, features: Tensor, labels: Tensor, *, ignore_index: int = 255, backend: str = "auto",
        check_values: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(values, indices)`` of :func:`cossim_fast.max_cosine_similarity` against this dictionary."""
        return max_cosine_similarity(
            features, labels, self.bank, self.counts, ignore_index=ignore_index, backend=backend, check_values=check_values
        )

    def loss(
        self,
        features: Tensor,
        labels: Tensor,
        threshold: float,
        *,
        mode: str = "max",
        reduction: str = "mean",
        ignore_index: int = 255,
        backend: str = "auto",
        check_values: bool | None = None,
    ) -> Tensor:
        """:func:`cossim_fast.cosine_similarity_loss` of target features against this dictionary."""
        return cosine_similarity_loss(
            features, labels, self.bank, self.counts, threshold,
            mode=mode, reduction=reduction, ignore_index=ignore_index, backend=backend, check_values=check_values,
        )
