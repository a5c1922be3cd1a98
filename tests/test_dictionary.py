"""The ring-buffer dictionary against a plain Python model, across backends, and its hazards."""

import pytest
import torch

import cossim_fast
from cases import IGNORE, fused_backends, make_rows

UPDATE_BACKENDS = ["torch"] + [b for b in fused_backends("cpu") if b not in ("torch",)]


class SlotModel:
    """The slow obvious ring buffer: one list of M slots and a pointer per class."""

    def __init__(self, num_classes, slots):
        self.slots = [[None] * slots for _ in range(num_classes)]
        self.ptr = [0] * num_classes
        self.count = [0] * num_classes

    def update(self, features, labels, order, cap):
        taken = [0] * len(self.slots)
        for row in order:
            k = int(labels[row])
            if k == IGNORE or (cap is not None and taken[k] >= cap):
                continue
            taken[k] += 1
            size = len(self.slots[k])
            self.slots[k][self.ptr[k]] = torch.nn.functional.normalize(features[row].double(), dim=0)
            self.ptr[k] = (self.ptr[k] + 1) % size
            self.count[k] = min(size, self.count[k] + 1)

    def check(self, dictionary, atol):
        assert dictionary.ptr.tolist() == self.ptr and dictionary.counts.tolist() == self.count
        for k, slots in enumerate(self.slots):
            for s, expected in enumerate(slots):
                if expected is None:
                    assert torch.count_nonzero(dictionary.bank[k, s]) == 0
                else:
                    torch.testing.assert_close(dictionary.bank[k, s].double(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("cap", [None, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_updates_match_the_slot_model(backend, cap, shuffle):
    num_classes, slots, dim = 4, 5, 7
    dictionary = cossim_fast.FeatureDictionary(num_classes, slots, dim)
    model = SlotModel(num_classes, slots)
    generator = torch.Generator().manual_seed(3) if shuffle else None
    # Batches of 0, 1, a few and many (n > M) rows per class exercise wrap-around and overflow.
    for num_rows in [3, 0, 1, 17, 40, 6]:
        features, labels = make_rows(num_rows, dim, num_classes, ignore_share=0.2)
        labels[: num_rows // 2] = 2  # class 2 gets n > M in the large batches
        if generator is not None:
            order = torch.randperm(num_rows, generator=generator.clone_state()).tolist()
        else:
            order = range(num_rows)
        dictionary.update(features, labels, max_per_class=cap, generator=generator, backend=backend)
        model.update(features, labels, order, cap)
        model.check(dictionary, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_backend_writes_the_same_bits(dtype):
    banks = []
    for backend in ["reference", *UPDATE_BACKENDS]:
        torch.manual_seed(1)
        dictionary = cossim_fast.FeatureDictionary(5, 9, 13, dtype=dtype)
        generator = torch.Generator().manual_seed(7)
        for num_rows in [11, 50, 2]:
            features, labels = make_rows(num_rows, 13, 5)
            dictionary.update(features.to(dtype), labels, max_per_class=12, generator=generator, backend=backend)
        banks.append(dictionary.state_dict())
    for other in banks[1:]:
        for name in ("bank", "counts", "ptr"):
            assert torch.equal(banks[0][name], other[name]), name


def test_feature_maps_update_in_row_order():
    dictionary = cossim_fast.FeatureDictionary(3, 50, 4)
    maps = torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 3, (2, 3, 5))
    dictionary.update(maps, labels)
    flat = cossim_fast.FeatureDictionary(3, 50, 4)
    flat.update(maps.permute(0, 2, 3, 1).reshape(-1, 4), labels.reshape(-1))
    assert torch.equal(dictionary.bank, flat.bank) and torch.equal(dictionary.counts, flat.counts)


def test_state_dict_round_trip():
    dictionary = cossim_fast.FeatureDictionary(3, 6, 5, dtype=torch.bfloat16)
    features, labels = make_rows(20, 5, 3)
    dictionary.update(features, labels)
    restored = cossim_fast.FeatureDictionary(3, 6, 5, dtype=torch.bfloat16)
    restored.load_state_dict(dictionary.state_dict())
    for name in ("bank", "counts", "ptr"):
        assert torch.equal(getattr(restored, name), getattr(dictionary, name))
    features, labels = make_rows(9, 5, 3)
    dictionary.update(features, labels)
    restored.update(features, labels)
    assert torch.equal(restored.bank, dictionary.bank) and torch.equal(restored.ptr, dictionary.ptr)


def _filled_dictionary_and_loss(mode: str, features: torch.Tensor):
    dictionary = cossim_fast.FeatureDictionary(2, 4, 3)
    dictionary.update(*make_rows(10, 3, 2, ignore_share=0.0))
    return dictionary, dictionary.loss(features, torch.zeros(6, dtype=torch.long), -1.0, mode=mode)


@pytest.mark.parametrize("mode", ["max", "all"])
def test_update_between_forward_and_backward_raises(mode):
    dictionary, loss = _filled_dictionary_and_loss(mode, torch.randn(6, 3, requires_grad=True))
    dictionary.update(*make_rows(10, 3, 2, ignore_share=0.0))
    with pytest.raises(RuntimeError, match="dictionary bank was modified"):
        loss.backward()


@pytest.mark.parametrize("mode", ["max", "all"])
def test_features_modified_in_place_keep_torchs_own_message(mode):
    features = torch.randn(6, 3, requires_grad=True) * 1.0  # not a leaf: may change in place
    _, loss = _filled_dictionary_and_loss(mode, features)
    with torch.no_grad():
        features.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as raised:
        loss.backward()
    assert "dictionary bank" not in str(raised.value)


@pytest.mark.parametrize("mode", ["max", "all"])
def test_double_backward_is_refused_clearly(mode):
    features = torch.randn(6, 3, requires_grad=True)
    _, loss = _filled_dictionary_and_loss(mode, features)
    (grad,) = torch.autograd.grad(loss, features, create_graph=True)  # first order: fine
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.sum().backward()


def test_update_after_backward_is_fine():
    dictionary = cossim_fast.FeatureDictionary(2, 4, 3)
    dictionary.update(*make_rows(10, 3, 2, ignore_share=0.0))
    features = torch.randn(6, 3, requires_grad=True)
    dictionary.loss(features, torch.zeros(6, dtype=torch.long), -1.0).backward()
    dictionary.update(*make_rows(10, 3, 2, ignore_share=0.0))
    assert features.grad is not None


def test_stored_entries_are_unit_norm_and_detached():
    dictionary = cossim_fast.FeatureDictionary(2, 8, 6)
    features = (torch.randn(12, 6) * 10).requires_grad_(True)
    dictionary.update(features, torch.tensor([0, 1] * 6))
    assert not dictionary.bank.requires_grad
    torch.testing.assert_close(dictionary.bank[:, :6].norm(dim=2), torch.ones(2, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_shape_and_compact_writes_agree_bitwise(dtype):
    """The GPU path (every slot rewritten, no sync) checked on the CPU against the CPU path."""
    from cossim_fast.backends import ring_buffer

    bank = torch.randn(4, 6, 9).to(dtype)
    ptr = torch.tensor([0, 5, 3, 1])
    features, labels = make_rows(40, 9, 4)
    labels[:20] = 1  # n_k > M for class 1
    order = torch.randperm(40)
    denom = features.norm(dim=1).clamp_min(1e-12)
    plan = ring_buffer.plan_visits(labels, order, 4, 8)
    static, compact = bank.clone(), bank.clone()
    ring_buffer._write_every_slot(static, ptr, features.unsqueeze(0), denom, plan)
    ring_buffer._write_surviving_rows(compact, ptr, features.unsqueeze(0), denom, plan)
    assert torch.equal(static, compact) and not torch.equal(static, bank)


@pytest.mark.parametrize("backend", ["torch", *fused_backends()])
def test_update_with_strided_labels(backend):
    features, labels = make_rows(40, 8, 3)
    strided = torch.stack([labels, torch.zeros_like(labels)], dim=1)[:, 0]
    plain, viewed = cossim_fast.FeatureDictionary(3, 5, 8), cossim_fast.FeatureDictionary(3, 5, 8)
    plain.update(features, labels, backend=backend)
    viewed.update(features, strided, backend=backend)
    assert torch.equal(plain.bank, viewed.bank) and torch.equal(plain.counts, viewed.counts)


def test_a_refused_update_leaves_the_generator_as_it_was():
    # Value checks run before the visiting order is drawn: a caller may fix the input and retry
    # with the same draw.
    dictionary = cossim_fast.FeatureDictionary(3, 4, 5)
    features, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 7])
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    with pytest.raises(ValueError, match="labels must be in"):
        dictionary.update(features, labels, generator=generator)
    assert torch.equal(generator.get_state(), before) and dictionary.counts.sum() == 0


def test_a_backend_refused_in_strict_mode_leaves_the_generator_as_it_was(monkeypatch):
    # The refusal comes from the dispatcher, after the visiting order is drawn: the draw is undone.
    monkeypatch.setattr(cossim_fast.backends.dispatch, "_strict", True)  # restored after the test
    dictionary = cossim_fast.FeatureDictionary(3, 4, 5)
    features, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    with pytest.raises(cossim_fast.BackendUnavailableError, match="strict mode"):
        dictionary.update(features, labels, generator=generator, backend="cuda")
    assert torch.equal(generator.get_state(), before) and dictionary.counts.sum() == 0
    dictionary.update(features, labels, generator=generator)  # the retry draws what the first try drew
    reference = cossim_fast.FeatureDictionary(3, 4, 5)
    reference.update(features, labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dictionary.bank, reference.bank)


def test_float64_features_update_a_float64_dictionary():
    # float64 (for testing) rows are normalized in float64, as the reference backend's forward does.
    dictionary = cossim_fast.FeatureDictionary(2, 3, 4, dtype=torch.float64)
    features = torch.randn(5, 4, dtype=torch.float64)
    dictionary.update(features, torch.tensor([0, 1, 0, 1, 0]))
    expected = torch.nn.functional.normalize(features[[0, 2, 4]], dim=1)
    torch.testing.assert_close(dictionary.bank[0], expected, atol=1e-15, rtol=0)


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_a_strided_bank_loaded_with_assign_is_updated_like_a_dense_one(backend):
    dense, loaded = cossim_fast.FeatureDictionary(3, 4, 5), cossim_fast.FeatureDictionary(3, 4, 5)
    state = {name: tensor.clone() for name, tensor in dense.state_dict().items()}
    state["bank"] = torch.zeros(3, 8, 5)[:, :4]  # a slice of a larger buffer
    loaded.load_state_dict(state, assign=True)
    features, labels = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    dense.update(features, labels, backend=backend)
    loaded.update(features, labels, backend=backend)
    assert torch.equal(loaded.bank, dense.bank) and torch.equal(loaded.counts, dense.counts)


def _saved_state(**changes):
    dictionary = cossim_fast.FeatureDictionary(3, 4, 5)
    features, labels = make_rows(10, 5, 3)
    dictionary.update(features, labels)  # counts and ptr are non-zero, some classes wrapped
    state = {name: tensor.clone() for name, tensor in dictionary.state_dict().items()}
    state.update(changes)
    return state


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(counts=torch.tensor([1, 0, 0]), ptr=torch.tensor([3, 0, 0])), ValueError,
         r"class 0 has counts 1 < 4 slots but ptr 3"),
        (dict(counts=torch.tensor([3, 0, 0]), ptr=torch.tensor([1, 0, 0])), ValueError,
         r"class 0 has counts 3 < 4 slots but ptr 1"),  # one short of full: still torn
        (dict(counts=torch.tensor([2.7, 0.0, 0.0])), TypeError, "counts in the state dict must have an integer dtype, got torch.float32"),
        (dict(counts=torch.tensor([9, 0, 0])), ValueError, r"counts in the state dict must be in \[0, 4\], got 9 for class 0"),
        (dict(ptr=torch.tensor([0, -1, 0])), ValueError, r"ptr in the state dict must be in \[0, 3\], got -1 for class 1"),
        (dict(bank=torch.zeros(3, 4, 5, dtype=torch.bfloat16)), ValueError,
         r"bank in the state dict is torch.bfloat16, this dictionary stores torch.float32"),
    ],
)
@pytest.mark.parametrize("assign", [False, True])
def test_a_state_no_update_could_produce_is_refused_on_load(changes, error, match, assign):
    dictionary = cossim_fast.FeatureDictionary(3, 4, 5)
    before = {name: tensor.clone() for name, tensor in dictionary.state_dict().items()}
    with pytest.raises(error, match=match):
        dictionary.load_state_dict(_saved_state(**changes), assign=assign)
    for name, tensor in dictionary.state_dict().items():
        assert torch.equal(tensor, before[name]) and tensor.dtype == before[name].dtype, name


def test_states_next_to_a_torn_one_load():
    # 3 rows into 4 slots leave counts 3 with the head at 3; 5 rows fill the ring and wrap its
    # head to 1. Both are what updates produce, on either side of the torn (3, 1) refused above.
    dictionary = cossim_fast.FeatureDictionary(3, 4, 5)
    dictionary.update(torch.randn(8, 5), torch.tensor([0, 1, 0, 1, 1, 0, 1, 1]))
    assert dictionary.counts.tolist() == [3, 4, 0] and dictionary.ptr.tolist() == [3, 1, 0]
    restored = cossim_fast.FeatureDictionary(3, 4, 5)
    restored.load_state_dict(dictionary.state_dict())
    for name in ("bank", "counts", "ptr"):
        assert torch.equal(getattr(restored, name), getattr(dictionary, name)), name


def test_int32_counters_load_as_int64():
    state = _saved_state()
    expected = {name: tensor.clone() for name, tensor in state.items()}
    state["counts"], state["ptr"] = state["counts"].int(), state["ptr"].int()
    for assign in (False, True):
        dictionary = cossim_fast.FeatureDictionary(3, 4, 5)
        dictionary.load_state_dict({name: tensor.clone() for name, tensor in state.items()}, assign=assign)
        for name, tensor in dictionary.state_dict().items():
            assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), (name, assign)


def test_a_dictionary_of_another_size_gets_torchs_size_mismatch():
    with pytest.raises(RuntimeError, match="size mismatch for bank"):
        cossim_fast.FeatureDictionary(3, 6, 5).load_state_dict(_saved_state())
