"""Every bad input gets a clear error naming the argument, before any work."""

import warnings

import pytest
import torch

import cossim_fast
from cases import make_bank

BANK, COUNTS = make_bank(3, 4, 5, counts=[4, 2, 0])
FEATURES = torch.randn(6, 5)
LABELS = torch.tensor([0, 1, 2, 255, 0, 1])


def call(features=FEATURES, labels=LABELS, bank=BANK, counts=COUNTS, **kwargs):
    return cossim_fast.max_cosine_similarity(features, labels, bank, counts, **kwargs)


def loss(threshold=0.5, **kwargs):
    return cossim_fast.cosine_similarity_loss(FEATURES, LABELS, BANK, COUNTS, threshold, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(features=FEATURES.numpy()), TypeError, "features must be a torch.Tensor"),
        (dict(features=FEATURES.int()), TypeError, "features must be float32"),
        (dict(features=torch.randn(2, 3, 5)), ValueError, "features must be N x C or B x C x H x W"),
        (dict(features=torch.randn(6, 4)), ValueError, "C = 4 channels .* but the dictionary stores C = 5"),
        # A transposed layout names the features, not the labels that fit them.
        (dict(features=torch.randn(2, 3, 4, 5), labels=torch.zeros(2, 3, 4, dtype=torch.long)), ValueError,
         r"C = 3 channels .* they look channels-last \(B x H x W x C\): pass features.permute\(0, 3, 1, 2\)"),
        (dict(features=FEATURES.T.contiguous()), ValueError, r"C = 6 channels .* they look C x N: pass features.T"),
        (dict(features=torch.randn(2, 5, 3, 4), labels=torch.zeros(2, 1, 3, 4, dtype=torch.long)), ValueError,
         r"got \(2, 1, 3, 4\); labels with a channel dimension .* Pass labels.squeeze\(1\)"),
        (dict(labels=LABELS.float()), TypeError, "labels must have an integer dtype"),
        (dict(labels=LABELS.bool()), TypeError, "labels must have an integer dtype"),
        (dict(labels=LABELS[:5]), ValueError, r"labels must have shape \(6,\)"),
        (dict(features=torch.randn(2, 5, 3, 4), labels=torch.zeros(2, 4, 3, dtype=torch.long)), ValueError, r"labels must have shape \(2, 3, 4\)"),
        (dict(features=torch.randn(2, 5, 3, 4), labels=torch.zeros(2, 24, 32, dtype=torch.long)), ValueError,
         r"got \(2, 24, 32\); labels at image resolution\? .*downsample_labels\(labels, \(3, 4\)\)"),
        (dict(bank=BANK[0]), ValueError, "bank must be K x M x C"),
        (dict(bank=BANK.int()), TypeError, "bank must be float32"),
        (dict(counts=COUNTS[:2]), ValueError, r"counts must have shape \(K,\) = \(3,\)"),
        (dict(counts=COUNTS.float()), TypeError, "counts must have an integer dtype"),
        (dict(counts=torch.tensor([5, 0, 0])), ValueError, r"counts must be in \[0, 4\], got 5 for class 0"),
        (dict(counts=torch.tensor([0, -1, 0])), ValueError, r"counts must be in \[0, 4\], got -1 for class 1"),
        (dict(labels=torch.tensor([0, 1, 3, 255, 0, 1])), ValueError, r"labels must be in \[0, 3\) or ignore_index=255, got 3 at row 2"),
        (dict(labels=torch.tensor([0, -1, 0, 0, 0, 0])), ValueError, "got -1 at row 1"),
        (dict(features=FEATURES.clone().index_fill_(0, torch.tensor([4]), float("nan"))), ValueError, "features contain NaN or inf .first at row 4"),
        (dict(features=FEATURES.clone().index_fill_(0, torch.tensor([2]), float("inf"))), ValueError, "NaN or inf .first at row 2"),
        (dict(features=FEATURES.clone().index_fill_(0, torch.tensor([3]), float("-inf"))), ValueError, "NaN or inf .first at row 3"),
        # Finite, but the fp32 norm of row 1 overflows (about 1.8e19 and up): its similarity would be 0 * inf.
        (dict(features=FEATURES.clone().index_fill_(0, torch.tensor([1]), 1e19)), ValueError,
         r"features row 1 has a norm that overflows float32 \(entries up to 1e\+19\)"),
        (dict(features=FEATURES.to(torch.bfloat16).index_fill_(0, torch.tensor([5]), -3e38)), ValueError,
         r"features row 5 has a norm that overflows float32"),
        (dict(bank=BANK * 3), ValueError, r"bank rows must have unit norm .*, got norm 3 at class 0, slot 0"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
        (dict(ignore_index=255.0), TypeError, "ignore_index must be an int"),
        (dict(ignore_index=2), ValueError, r"ignore_index must not be a class index in \[0, 3\), got 2"),
        (dict(ignore_index=0), ValueError, r"ignore_index must not be a class index in \[0, 3\), got 0"),
    ],
)
def test_bad_similarity_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        call(**kwargs)


def test_value_checks_can_be_switched_off():
    bad_labels = torch.tensor([0, 1, 7, 255, 0, -1])  # 7 and -1 are neither classes nor ignore_index
    bad_counts = torch.tensor([4, 2, 9])  # 9 > M = 4
    nan_features = FEATURES.clone().fill_(float("nan"))
    for bad in (dict(counts=bad_counts), dict(labels=bad_labels), dict(features=nan_features)):
        with pytest.raises(ValueError):
            call(**bad)
        call(**bad, check_values=False)  # per call
    cossim_fast.set_value_checks(False)
    try:
        call(features=nan_features, labels=bad_labels, counts=bad_counts)
    finally:
        cossim_fast.set_value_checks(True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(threshold="0.5"), TypeError, "threshold must be a real number"),
        (dict(threshold=float("nan")), ValueError, "threshold must not be NaN"),
        (dict(mode="mean"), ValueError, "mode must be one of"),
        (dict(reduction="sum"), ValueError, "reduction must be one of"),
        (dict(check_values="no"), TypeError, r"check_values must be True, False or None .*got 'no'"),
    ],
)
def test_bad_loss_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        loss(**kwargs)


def test_a_threshold_above_one_warns_that_it_trains_nothing():
    with pytest.warns(UserWarning, match="threshold 90 is above 1: no cosine similarity exceeds it") as caught:
        assert loss(threshold=90).item() == 0.0
    assert caught[0].filename == __file__  # the warning names the caller's line
    with pytest.warns(UserWarning, match="threshold 1.5 is above 1"):
        cossim_fast.CosineSimilarityLoss(1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(threshold=1.0)
        loss(threshold=-3.0)  # below -1: every pair is selected, a valid choice
        cossim_fast.CosineSimilarityLoss(0.9)


def test_the_loss_module_takes_a_dictionary_not_a_bank():
    criterion = cossim_fast.CosineSimilarityLoss(0.5)
    with pytest.raises(TypeError, match="dictionary must be a FeatureDictionary .*got Tensor; .*cosine_similarity_loss"):
        criterion(FEATURES, LABELS, BANK)
    with pytest.raises(TypeError, match="dictionary must be a FeatureDictionary"):
        cossim_fast.CosineSimilarityLoss(0.5, dictionary=BANK)
    with pytest.raises(TypeError, match="check_values must be True, False or None"):
        cossim_fast.CosineSimilarityLoss(0.5, check_values=1)


@pytest.mark.gpu
def test_device_mismatch():
    with pytest.raises(ValueError, match="bank must be on the features' device"):
        call(features=FEATURES.cuda(), labels=LABELS.cuda())


def test_device_mismatch_on_meta():
    with pytest.raises(ValueError, match="labels must be on the features' device"):
        call(labels=LABELS.to("meta"))
    with pytest.raises(ValueError, match="counts must be on the features' device"):
        call(counts=COUNTS.to("meta"))


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0, 4, 5), {}, ValueError, "num_classes must be an int >= 1"),
        ((3, 0, 5), {}, ValueError, "slots_per_class must be an int >= 1"),
        ((3, 4, 2.0), {}, ValueError, "dim must be an int >= 1"),
        ((3, 4, 5), dict(dtype=torch.int32), TypeError, "dtype must be float32"),
    ],
)
def test_bad_dictionary_construction(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        cossim_fast.FeatureDictionary(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_per_class=0), ValueError, r"max_per_class must be None or an int in \[1, 2\*\*63\)"),
        (dict(max_per_class=2**63), ValueError, r"max_per_class must be None or an int in \[1, 2\*\*63\)"),
        (dict(generator=3), TypeError, "generator must be a torch.Generator"),
        (dict(features=torch.randn(6, 4)), ValueError, "C = 4 channels"),
        (dict(labels=torch.tensor([0, 1, 7, 0, 0, 0])), ValueError, "got 7 at row 2"),
        (dict(features=torch.full((6, 5), float("inf"))), ValueError, "NaN or inf"),
        (dict(features=FEATURES.to("meta"), labels=LABELS.to("meta")), ValueError, "features must be on the dictionary's device"),
        (dict(backend="cuda-fast"), ValueError, "backend must be one of"),
    ],
)
def test_bad_updates(kwargs, error, match):
    dictionary = cossim_fast.FeatureDictionary(3, 4, 5)
    arguments = dict(features=FEATURES, labels=LABELS) | kwargs
    with pytest.raises(error, match=match):
        dictionary.update(arguments.pop("features"), arguments.pop("labels"), **arguments)
    assert torch.count_nonzero(dictionary.bank) == 0 and dictionary.counts.sum() == 0


def test_corrupt_dictionary_state_is_reported():
    dictionary = cossim_fast.FeatureDictionary(3, 4, 5)
    dictionary.ptr[1] = 4
    with pytest.raises(ValueError, match=r"ptr must be in \[0, 3\], got 4 for class 1"):
        dictionary.update(FEATURES, LABELS)


def test_loss_module_needs_a_dictionary():
    with pytest.raises(ValueError, match="dictionary must be given"):
        cossim_fast.CosineSimilarityLoss(0.5)(FEATURES, LABELS)


def test_the_registered_ops_refuse_a_class_as_ignore_index():
    """Called directly (as torch.compile or a user may), the ops check ignore_index themselves:
    the CUDA update skipped such a class while the torch path wrote it."""
    labels = torch.tensor([0, 1, 2, 0, 0, 1])
    ops = torch.ops.cossim_fast
    match = r"ignore_index must not be a class index in \[0, 3\), got 0"
    with pytest.raises(ValueError, match=match):
        ops.max_cosine_forward(FEATURES[None], labels, BANK, COUNTS, 0, "torch", False)
    with pytest.raises(ValueError, match=match):
        ops.thresholded_cosine_forward(FEATURES[None], labels, BANK, COUNTS, 0.5, 0, "torch", False)
    bank, counts, ptr = BANK.clone(), COUNTS.clone(), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        ops.update_dictionary(bank, counts, ptr, FEATURES[None], labels, None, -1, 0, "torch", False)
    assert torch.equal(bank, BANK) and torch.equal(counts, COUNTS)


def test_the_update_op_refuses_an_order_outside_the_rows():
    bank, counts, ptr = BANK.clone(), COUNTS.clone(), torch.zeros(3, dtype=torch.long)
    for bad in (-1, 6):
        order = torch.tensor([0, 1, 2, 3, 4, bad])
        with pytest.raises(ValueError, match=rf"order must hold row indices in \[0, 6\), got {bad} at position 5"):
            torch.ops.cossim_fast.update_dictionary(bank, counts, ptr, FEATURES[None], LABELS, order, -1, 255, "torch", True)
    assert torch.equal(bank, BANK) and torch.equal(counts, COUNTS)


def test_a_large_row_whose_norm_fits_float32_passes_the_value_checks():
    # 1e19 alone: the bound (entry x sqrt(C)) asks for the norms, which are finite (1e19).
    features = torch.zeros(6, 5)
    features[1, 0] = 1e19
    values, _ = call(features=features, labels=torch.tensor([0, 0, 1, 255, 0, 1]))
    torch.testing.assert_close(values[1], BANK[0, :4, 0].max(), atol=1e-6, rtol=0)
