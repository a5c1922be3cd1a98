"""CUDA-only checks: every backend on GPU tensors, no host sync in the update, GPU peak memory.

Marked ``gpu``: skipped on machines without a CUDA device.
"""

import pytest
import torch

import cossim_fast
from cases import DTYPES, assert_same_max, make_bank, make_rows

pytestmark = pytest.mark.gpu

CUDA_BACKENDS = [b for b in ("torch", "triton", "cuda") if torch.cuda.is_available() and b in cossim_fast.available_backends("cuda")]


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_loss_on_cuda_match_reference(backend, dtype):
    bank, counts = make_bank(7, 37, 65, counts=[37, 0, 1, 20, 37, 5, 36], dtype=dtype, device="cuda")
    features, labels = make_rows(301, 65, 7, dtype=dtype, device="cuda")
    values, indices = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend=backend)
    ref_values, ref_indices = cossim_fast.max_cosine_similarity(features, labels, bank, counts, backend="reference")
    assert_same_max(features, labels, bank, counts, values, indices, ref_values, ref_indices, dtype)
    for mode in ("max", "all"):
        loss = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.05, mode=mode, backend=backend)
        ref = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.05, mode=mode, backend="reference")
        torch.testing.assert_close(loss, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["reference", *CUDA_BACKENDS])
@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16])
def test_a_callers_autocast_changes_nothing_on_cuda(backend, feature_dtype):
    bank, counts = make_bank(5, 17, 24, counts=[17, 3, 0, 17, 9], device="cuda")
    features, labels = make_rows(71, 24, 5, dtype=feature_dtype, device="cuda")

    def run():
        x = features.clone().requires_grad_(True)
        losses = [cossim_fast.cosine_similarity_loss(x, labels, bank, counts, 0.05, mode=mode, backend=backend) for mode in ("max", "all")]
        sum(losses).backward()
        dictionary = cossim_fast.FeatureDictionary(5, 17, 24, device="cuda")
        dictionary.update(features, labels, backend=backend)
        return (*losses, x.grad, dictionary.bank)

    plain = run()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = run()
    for expected, got in zip(plain, mixed, strict=True):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_strided_labels_on_cuda(backend):
    bank, counts = make_bank(3, 11, 9, counts=[11, 0, 6], device="cuda")
    features, labels = make_rows(45, 9, 3, device="cuda")
    strided = torch.stack([labels, torch.zeros_like(labels)], dim=1)[:, 0]
    for mode in ("max", "all"):
        loss = cossim_fast.cosine_similarity_loss(features, strided, bank, counts, 0.05, mode=mode, backend=backend)
        ref = cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.05, mode=mode, backend="reference")
        torch.testing.assert_close(loss, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_update_has_no_host_sync_and_matches_cpu(backend):
    cpu = cossim_fast.FeatureDictionary(5, 9, 33)
    gpu = cossim_fast.FeatureDictionary(5, 9, 33, device="cuda")
    for num_rows in (7, 60, 1):
        features, labels = make_rows(num_rows, 33, 5)
        gpu_features, gpu_labels = features.cuda(), labels.cuda()  # a pageable copy syncs: not measured
        order_generator = torch.Generator(device="cuda").manual_seed(num_rows)
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu.update(gpu_features, gpu_labels, max_per_class=11, generator=order_generator, backend=backend, check_values=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        order_generator = torch.Generator(device="cuda").manual_seed(num_rows)
        order = torch.randperm(num_rows, generator=order_generator, device="cuda").cpu()
        # The CPU dictionary visits the same order: permute the rows themselves.
        cpu.update(features[order], labels[order], max_per_class=11, backend="torch")
    assert torch.equal(gpu.counts.cpu(), cpu.counts) and torch.equal(gpu.ptr.cpu(), cpu.ptr)
    torch.testing.assert_close(gpu.bank.cpu(), cpu.bank, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_update_with_a_cpu_generator_has_no_host_sync(backend):
    # The order drawn on the CPU reaches the GPU through pinned memory, not a waiting copy.
    gpu = cossim_fast.FeatureDictionary(5, 9, 33, device="cuda")
    cpu = cossim_fast.FeatureDictionary(5, 9, 33)
    features, labels = make_rows(40, 33, 5)
    gpu_features, gpu_labels = features.cuda(), labels.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu.update(gpu_features, gpu_labels, generator=torch.Generator().manual_seed(3), backend=backend, check_values=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu.update(features, labels, generator=torch.Generator().manual_seed(3), backend="torch")
    assert torch.equal(gpu.counts.cpu(), cpu.counts) and torch.equal(gpu.ptr.cpu(), cpu.ptr)
    torch.testing.assert_close(gpu.bank.cpu(), cpu.bank, atol=1e-6, rtol=0)


FUSED_CUDA_BACKENDS = [b for b in CUDA_BACKENDS if b != "torch"]  # torch reads the histogram on the host


@pytest.mark.parametrize("backend", FUSED_CUDA_BACKENDS)
@pytest.mark.parametrize("mode", ["max", "all"])
def test_loss_step_replays_in_a_cuda_graph(backend, mode):
    # A training step's share of the package (loss, backward, dictionary update) has no host
    # sync, so it can be captured once and replayed (what bench.run --timing graph and
    # torch.compile's "reduce-overhead" rely on); each replay matches an eager step.
    features, labels = make_rows(257, 33, 5, device="cuda")
    features.requires_grad_(True)
    dictionary = cossim_fast.FeatureDictionary(5, 40, 33, device="cuda")
    source, source_labels = make_rows(90, 33, 5, device="cuda")

    def step():  # the loss reads what the previous step's update wrote
        features.grad = None
        loss = cossim_fast.cosine_similarity_loss(
            features, labels, dictionary.bank, dictionary.counts, 0.05, mode=mode, backend=backend, check_values=False
        )
        loss.backward()
        dictionary.update(source, source_labels, max_per_class=8, backend=backend, check_values=False)
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compiles, allocates, fills part of the dictionary
            step()
    torch.cuda.current_stream().wait_stream(side)
    start_bank, start_counts, start_ptr = (t.clone() for t in (dictionary.bank, dictionary.counts, dictionary.ptr))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()  # recorded, not run: the dictionary is still at start_*
    graph.replay()
    graph.replay()  # two steps: the update's ring-buffer pointers move on device
    replayed = (loss.clone(), features.grad.clone(), dictionary.bank.clone(), dictionary.counts.clone(), dictionary.ptr.clone())
    for t, start in zip((dictionary.bank, dictionary.counts, dictionary.ptr), (start_bank, start_counts, start_ptr)):
        t.copy_(start)
    for _ in range(2):
        eager = step()
    torch.testing.assert_close(replayed[0], eager.detach(), atol=0, rtol=0)
    torch.testing.assert_close(replayed[1], features.grad, atol=0, rtol=0)
    for got, want in zip(replayed[2:], (dictionary.bank, dictionary.counts, dictionary.ptr)):
        assert torch.equal(got, want)


def test_torch_backend_gpu_memory_does_not_grow_with_n_times_m():
    num_classes, slots, dim = 19, 2048, 128
    bank, counts = make_bank(num_classes, slots, dim, counts=[slots] * num_classes, device="cuda")
    for backend, num_rows in (("torch", 32768), ("reference", 8192)):
        features, labels = make_rows(num_rows, dim, num_classes, device="cuda")
        features.requires_grad_(True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        cossim_fast.cosine_similarity_loss(features, labels, bank, counts, 0.0, backend=backend).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        dense = num_rows * num_classes * slots * 4
        if backend == "reference":
            assert extra > dense
        else:
            assert extra < 2 * 64 * 2**20 + 8 * num_rows * dim * 4, f"{extra / 2**20:.0f} MiB"


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_activation_checkpointing_on_cuda_keeps_gradients_and_lowers_peak(amp):
    import copy

    from cossim_fast.models import build_model

    torch.manual_seed(0)
    plain = build_model("deeplabv2_resnet50", 19, width=16).cuda().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.backbone.activation_checkpointing = True
    images = torch.randn(2, 3, 256, 512, device="cuda")
    peaks = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            out = model(images)
            loss = out.logits.float().square().mean() + out.features.float().sin().mean()
        loss.backward()
        peaks[name] = torch.cuda.max_memory_allocated() - before
    tolerance = dict(rtol=2e-2, atol=1e-5) if amp else dict(rtol=1e-4, atol=1e-6)  # cuDNN may pick other algorithms
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name, **tolerance)
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(c, b, msg=name, **tolerance)
    assert peaks["checkpointed"] < 0.7 * peaks["plain"], peaks
