"""The thresholded loss in both modes and both reductions, against hand computation and the reference."""

import functools

import pytest
import torch

import cossim_fast
from cases import DTYPES, IGNORE, VALUE_ATOL, assert_close_gradient, fused_backends, make_bank, make_rows

BACKENDS = fused_backends("cpu")
MODES = ["max", "all"]
REDUCTIONS = ["mean", "class_mean"]


def by_hand(features, labels, bank, counts, threshold, mode, reduction):
    """METHOD.md 4 written out from the definitions, a row at a time in float64 (independent of
    every backend, the reference's similarity matrix included)."""
    row_sums, row_counts = [], []
    for row, k in zip(features.double(), labels.tolist()):
        if k == IGNORE or counts[k] == 0:
            row_sums.append(0.0), row_counts.append(0)
            continue
        sims = bank[k, : counts[k]].double() @ (row / max(row.norm().item(), 1e-12))
        if mode == "max":
            sims = sims.max()[None]
        chosen = sims[sims > threshold]
        row_sums.append((1 - chosen).sum().item()), row_counts.append(chosen.numel())
    if reduction == "mean":
        return torch.tensor(sum(row_sums) / max(sum(row_counts), 1), dtype=torch.float64)
    class_losses = []
    for k in range(bank.shape[0]):
        in_class = [i for i, label in enumerate(labels.tolist()) if label == k]
        selected = sum(row_counts[i] for i in in_class)
        if selected:
            class_losses.append(sum(row_sums[i] for i in in_class) / selected)
    return torch.tensor(sum(class_losses) / len(class_losses) if class_losses else 0.0, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.filterwarnings("ignore:threshold .* is above 1")  # on purpose: nothing selected
@pytest.mark.parametrize("threshold", [-2.0, 0.1, 0.5, 2.0])
def test_loss_matches_hand_computation(backend, mode, reduction, threshold):
    bank, counts = make_bank(5, 13, 11, counts=[13, 0, 4, 13, 1])
    features, labels = make_rows(67, 11, 5)
    loss = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, threshold, mode=mode, reduction=reduction, backend=backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    expected = by_hand(features, labels, bank, counts, threshold, mode, reduction)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    if threshold >= 2.0:
        assert loss.item() == 0.0  # nothing selected


@pytest.mark.filterwarnings("ignore:threshold .* is above 1")  # on purpose: nothing selected
@pytest.mark.parametrize("mode", MODES)
def test_nothing_selected_is_zero_and_connected(mode):
    bank, counts = make_bank(2, 4, 3, counts=[4, 4])
    features = torch.randn(5, 3, requires_grad=True)
    loss = cossim_fast.cosine_similarity_loss(features, torch.zeros(5, dtype=torch.long), bank, counts, 1.5, mode=mode)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_gradient_match_reference(backend, mode, dtype):
    bank, counts = make_bank(6, 21, 23, counts=[21, 21, 0, 5, 1, 20])
    features, labels = make_rows(83, 23, 6, dtype=dtype)

    def loss_and_grad(name):
        x = features.clone().requires_grad_(True)
        loss = cossim_fast.cosine_similarity_loss(x, labels, bank, counts, 0.05, mode=mode, reduction="class_mean", backend=name)
        loss.backward()
        return loss, x.grad

    loss, grad = loss_and_grad(backend)
    ref_loss, ref_grad = loss_and_grad("reference")
    torch.testing.assert_close(loss, ref_loss, atol=VALUE_ATOL[dtype], rtol=0)
    assert_close_gradient(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_negative_ignore_index_gives_the_loss_of_255(backend, mode, reduction):
    # class_mean groups the terms by label: an ignored label of -1 must not be a group index.
    bank, counts = make_bank(3, 6, 5, counts=[6, 4, 2], generator=torch.Generator().manual_seed(3))
    features, labels = make_rows(30, 5, 3, ignore_share=0.3)
    kwargs = dict(mode=mode, backend=backend, reduction=reduction)
    with_255 = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.1, **kwargs)
    minus_one = torch.where(labels == IGNORE, -1, labels)
    got = cossim_fast.cosine_similarity_loss(features, minus_one, bank, counts, 0.1, ignore_index=-1, **kwargs)
    torch.testing.assert_close(got, with_255)


def test_all_mode_gradcheck_float64():
    bank, counts = make_bank(2, 7, 4, counts=[7, 3], dtype=torch.float64)
    features = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, IGNORE, 1, 0])
    # A threshold below -1 keeps the selection fixed under the finite-difference steps.
    assert torch.autograd.gradcheck(
        lambda x: cossim_fast.cosine_similarity_loss(x, labels, bank, counts, -1.5, mode="all", backend="reference"),
        (features,),
    )


def test_module_holds_dictionary_and_reports_selection():
    dictionary = cossim_fast.FeatureDictionary(3, 8, 5)
    source, source_labels = make_rows(40, 5, 3, ignore_share=0.0)
    dictionary.update(source, source_labels)
    criterion = cossim_fast.CosineSimilarityLoss(0.2, mode="max", reduction="class_mean", dictionary=dictionary)
    features, labels = make_rows(30, 5, 3)
    loss = criterion(features, labels)
    expected = cossim_fast.cosine_similarity_loss(
        features, labels, dictionary.bank, dictionary.counts, 0.2, reduction="class_mean"
    )
    torch.testing.assert_close(loss, expected)
    values, _ = dictionary.lookup(features, labels)
    kept = labels != IGNORE
    torch.testing.assert_close(criterion.last_selected_fraction, (values[kept] > 0.2).float().mean())
    torch.testing.assert_close(dictionary.loss(features, labels, 0.2, reduction="class_mean"), expected)


def test_module_value_checks_follow_its_setting():
    dictionary = cossim_fast.FeatureDictionary(3, 4, 5)
    dictionary.update(*make_rows(12, 5, 3, ignore_share=0.0))
    features = torch.full((4, 5), float("nan"))
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="NaN or inf"):
        cossim_fast.CosineSimilarityLoss(0.5, dictionary=dictionary)(features, labels)
    cossim_fast.CosineSimilarityLoss(0.5, dictionary=dictionary, check_values=False)(features, labels)
    for call in (dictionary.lookup, functools.partial(dictionary.loss, threshold=0.5)):  # the dictionary's own
        with pytest.raises(ValueError, match="NaN or inf"):
            call(features, labels)
        call(features, labels, check_values=False)


@pytest.mark.parametrize("mode", MODES)
def test_torch_backend_split_into_many_chunks_matches_reference(mode, monkeypatch):
    # The default workspace never splits these buckets; chunks of 3 rows / slots cross every
    # chunk edge: ties across slot chunks, slot offsets, the chunked backward.
    from cossim_fast.backends import gradients, torch_chunked

    monkeypatch.setattr(torch_chunked, "chunk_length", lambda size, budget=None: 3)
    monkeypatch.setattr(gradients, "chunk_length", lambda size: 3)
    bank, counts = make_bank(4, 17, 9, counts=[17, 8, 0, 16])
    bank[0, 11] = bank[0, 2]  # an exact tie across slot chunks: the lower slot must win
    features, labels = make_rows(40, 9, 4)
    features[0], labels[0] = bank[0, 2] * 2, 0

    def run(name):
        x = features.clone().requires_grad_(True)
        loss = cossim_fast.cosine_similarity_loss(x, labels, bank, counts, 0.05, mode=mode, backend=name)
        loss.backward()
        values, indices = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=name)
        return loss, x.grad, values, indices

    loss, grad, values, indices = run("torch")
    ref_loss, ref_grad, ref_values, ref_indices = run("reference")
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    assert_close_gradient(grad, ref_grad, torch.float32)
    torch.testing.assert_close(values, ref_values, atol=1e-6, rtol=0)
    assert torch.equal(indices, ref_indices) and indices[0] == 2
    # With the value checks off, counts past M (here past several slot chunks) read as M.
    too_many = torch.tensor([3 * 17, 8, 0, 16])
    got = cossim_fast.max_cosine_similarity(features, labels, bank, too_many, backend="torch", check_values=False)
    want = cossim_fast.max_cosine_similarity(features, labels, bank, too_many.clamp(max=17), backend="reference")
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_a_callers_autocast_changes_nothing(backend, mode, feature_dtype, autocast_dtype):
    # Mixed-precision loops call the loss inside autocast: the ops still compute in their inputs'
    # dtypes with fp32 accumulation (it used to round the dots to 16 bits, or refuse in "all").
    bank, counts = make_bank(5, 17, 24, counts=[17, 3, 0, 17, 9])
    features, labels = make_rows(71, 24, 5, dtype=feature_dtype)

    def run():
        x = features.clone().requires_grad_(True)
        loss = cossim_fast.cosine_similarity_loss(x, labels, bank, counts, 0.05, mode=mode, reduction="class_mean", backend=backend)
        loss.backward()
        values, _ = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=backend)
        dictionary = cossim_fast.FeatureDictionary(5, 17, 24)
        dictionary.update(features, labels, backend=backend)
        return loss, x.grad, values, dictionary.bank.clone()

    plain = run()
    with torch.autocast("cpu", dtype=autocast_dtype):
        mixed = run()
    for expected, got in zip(plain, mixed, strict=True):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_similarity_just_above_tau_is_selected(backend, mode, dtype):
    # The row (1, 7, 3, 2, 1) has norm 8 and meets the slot e0 at exactly 1/8 in every 16-bit
    # dtype, and its fp32 similarity is exactly 0.125. tau = 0.125 - 1e-10 lies below it, so the
    # strict test S > tau selects it; the nearest float32 to tau is 0.125 itself, which would not.
    features = torch.tensor([[1.0, 7.0, 3.0, 2.0, 1.0]], dtype=dtype)
    bank = torch.zeros(1, 1, 5, dtype=dtype)
    bank[0, 0, 0] = 1.0
    labels, counts = torch.tensor([0]), torch.tensor([1])
    values, _ = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=backend)
    assert values.item() == 0.125
    tau = 0.125 - 1e-10
    assert float(torch.tensor(tau, dtype=torch.float32)) == 0.125
    loss = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, tau, mode=mode, backend=backend)
    assert loss.item() == 1 - 0.125
