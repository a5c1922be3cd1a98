"""Activation checkpointing of the backbone: bitwise the same outputs, gradients and BatchNorm
buffers as a plain run on the CPU, and a third of the bytes kept for the backward."""

import copy

import pytest
import torch
from torch import nn

from cossim_fast.models import build_model, resnet

K = 5


def _pair(name: str = "deeplabv2_small", **kw) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = build_model(name, K, **kw).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.backbone.activation_checkpointing = True
    return plain, checkpointed


def _step(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(images)
    # Both outputs carry gradient, as in training (cross-entropy on logits, the cosine loss on features).
    (out.logits.square().mean() + out.features.sin().mean()).backward()
    return out.logits.detach(), out.features.detach()


@pytest.mark.parametrize("feature_point", ["backbone", "pre_activation"])
@pytest.mark.parametrize("freeze_bn", [False, True])
def test_same_outputs_gradients_and_batchnorm_buffers(feature_point, freeze_bn):
    plain, checkpointed = _pair(feature_point=feature_point, freeze_bn=freeze_bn)
    images = torch.randn(2, 3, 41, 57) * 2 + 0.5
    for _ in range(2):  # the second step starts from running statistics the first one updated
        expected = _step(plain, images)
        actual = _step(checkpointed, images)
        for e, a in zip(expected, actual):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    # Recomputation must not update the running statistics a second time.
    for (name, b), c in zip(plain.named_buffers(), checkpointed.named_buffers()):
        torch.testing.assert_close(c[1], b, rtol=0, atol=0, msg=name)


def test_a_retained_graph_recomputes_for_each_backward():
    plain, checkpointed = _pair()
    images = torch.randn(2, 3, 40, 56)
    for model in (plain, checkpointed):
        out = model(images)
        loss = out.logits.square().mean() + out.features.sin().mean()
        torch.autograd.grad(loss, list(model.parameters())[:1], retain_graph=True)  # first backward
        loss.backward()  # second backward through the same graph: recomputes again
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)
    for b, c in zip(plain.buffers(), checkpointed.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_bottleneck_blocks_and_bfloat16_autocast():
    plain, checkpointed = _pair("deeplabv2_resnet50", width=4)
    images = torch.randn(1, 3, 33, 47)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _step(plain, images)
        actual = _step(checkpointed, images)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)


def _saved_bytes(model: nn.Module, images: torch.Tensor) -> int:
    """Bytes of the distinct storages, parameters aside, autograd keeps for the backward of one forward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(images)
    del out
    return sum(storages.values())


def test_keeps_a_fraction_of_the_activations():
    plain, checkpointed = _pair("deeplabv2_resnet50", width=8)
    images = torch.randn(1, 3, 96, 96)
    plain_bytes = _saved_bytes(plain, images)
    checkpointed_bytes = _saved_bytes(checkpointed, images)
    # Measured: 31%. A bottleneck keeps its input (4 planes wide) instead of about 16 planes of
    # intermediates; the image and the head's input are kept either way.
    assert checkpointed_bytes < 0.4 * plain_bytes, (checkpointed_bytes, plain_bytes)


def test_off_without_gradients(monkeypatch):
    _, checkpointed = _pair()

    def fail(*args, **kwargs):
        raise AssertionError("checkpoint called with gradients off")

    monkeypatch.setattr(resnet, "checkpoint", fail)
    with torch.no_grad():
        out = checkpointed.eval()(torch.randn(1, 3, 32, 32))
    assert out.logits.grad_fn is None
    with pytest.raises(AssertionError, match="gradients off"):
        checkpointed(torch.randn(1, 3, 32, 32))  # the patch is live: with gradients it is called
