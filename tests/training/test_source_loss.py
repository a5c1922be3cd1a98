"""The banded source cross-entropy: the plain loss's value and gradient, a fraction of its memory."""

import pytest
import torch
import torch.nn.functional as F

from allocation_ledger import AllocationLedger
from cossim_fast.training.source_loss import upsampled_cross_entropy

IGNORE = 255


def _case(batch=2, classes=5, low=(5, 7), high=(37, 53), seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, *low, generator=gen) * 3
    labels = torch.randint(0, classes, (batch, *high), generator=gen)
    labels[torch.rand(batch, *high, generator=gen) < 0.2] = IGNORE
    return logits, labels


def _loss_and_grad(logits, labels, bands):
    x = logits.clone().requires_grad_(True)
    loss = upsampled_cross_entropy(x, labels, ignore_index=IGNORE, bands=bands)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("low, high", [((5, 7), (37, 53)), ((8, 16), (64, 128)), ((3, 3), (3, 3)), ((4, 6), (50, 20))])
@pytest.mark.parametrize("bands", [2, 3, 7, 1000])
def test_bands_give_the_plain_loss_and_gradient(low, high, bands):
    logits, labels = _case(low=low, high=high)
    plain = F.cross_entropy(
        F.interpolate(logits, size=high, mode="bilinear", align_corners=False), labels, ignore_index=IGNORE
    )
    assert torch.equal(_loss_and_grad(logits, labels, 1)[0], plain)  # one band is the plain loss, bitwise
    loss, grad = _loss_and_grad(logits, labels, bands)
    ref_loss, ref_grad = _loss_and_grad(logits, labels, 1)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_all_ignored_is_zero_with_zero_gradients_and_bad_bands_are_refused():
    # F.cross_entropy gives NaN there, and a NaN gradient would ruin every weight it reaches.
    logits, labels = _case()
    labels.fill_(IGNORE)
    for bands in (1, 4):
        loss, grad = _loss_and_grad(logits, labels, bands)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), bands
    with pytest.raises(ValueError, match="bands must be >= 1, got 0"):
        upsampled_cross_entropy(logits, labels, ignore_index=IGNORE, bands=0)


def test_bands_cut_the_peak_of_forward_and_backward():
    logits, labels = _case(batch=1, classes=19, low=(16, 32), high=(128, 256))

    def peak(bands):
        x = logits.clone().requires_grad_(True)
        with AllocationLedger() as ledger:
            upsampled_cross_entropy(x, labels, ignore_index=IGNORE, bands=bands).backward()
        return ledger.peak

    full_map = 19 * 128 * 256 * 4  # one fp32 B x K x H x W tensor
    plain, banded = peak(1), peak(8)
    assert plain >= 2 * full_map, plain  # the measurement sees the full-resolution tensors
    assert banded < 0.35 * plain, (banded, plain)
