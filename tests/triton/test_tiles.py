"""The tile space of the Triton forward kernels: every candidate is right, and the autotuner.

Each candidate of every regime runs through the backend (Triton's interpreter on CPU, the GPU
when present) against the reference, on shapes that cut its tiles; that every candidate compiles
for sm_90 without spills is checked by ``bench/test_resources.py``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from cossim_fast.backends.reference import ReferenceBackend
from cossim_fast.backends.triton import backend as triton_backend
from cossim_fast.backends.triton import tiles
from triton_cases import DEVICES, IGNORE, TOLERANCES, assert_same_all, assert_same_max, make_case

TRITON, REFERENCE = triton_backend.TritonBackend(), ReferenceBackend()

#: (mode, 16-bit dots, C): one C per regime of ``tiles.space``.
REGIMES = [
    ("max", True, 100), ("max", True, 200), ("max", True, 300), ("max", False, 40), ("max", False, 300),
    ("all", True, 100), ("all", True, 300), ("all", False, 40), ("all", False, 300),
]
CANDIDATES = [
    pytest.param(mode, sixteen_bit, dim, config, id=f"{mode}-{'16bit' if sixteen_bit else 'fp32'}-C{dim}-{index}")
    for mode, sixteen_bit, dim in REGIMES
    for index, config in enumerate(tiles.space(mode, dim, sixteen_bit))
]


@pytest.fixture(autouse=True)
def _fresh_autotune():
    before = tiles.autotune_enabled()
    tiles.clear_autotune_choices()
    yield
    tiles.set_autotune(before)
    tiles.clear_autotune_choices()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("mode", "sixteen_bit", "dim", "config"), CANDIDATES)
def test_every_candidate_matches_reference(mode, sixteen_bit, dim, config, device, monkeypatch):
    # fp16 takes the native 16-bit dots in the interpreter too (bf16 is upcast there).
    dtype = torch.float16 if sixteen_bit else torch.float32
    assert (triton_backend.dot_precision(dtype, dtype) is None) == sixteen_bit
    monkeypatch.setattr(triton_backend, "forward_config", lambda *args: config)
    # Rows and slots not multiples of the tiles; an empty and a one-slot bucket.
    features, labels, bank, counts = make_case(4, 150, dim, [150, 0, 67, 1], 180, dtype=dtype, device=device, seed=3)
    if mode == "max":
        got = TRITON.max_forward(features, labels, bank, counts, IGNORE)
        want = REFERENCE.max_forward(features, labels, bank, counts, IGNORE)
        assert_same_max(features, labels, bank, counts, got, want, dtype)
    else:
        assert_same_all(features, labels, bank, counts, TRITON.all_forward(features, labels, bank, counts, 0.05, IGNORE), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_all_forward_repeated_launches_do_not_accumulate(device, monkeypatch):
    # What autotuning does: run other candidates into the same outputs before the chosen one.
    # The streamed regime adds into dsum, so each run must start from zero.
    first, second = tiles.space("all", 300, sixteen_bit=False)[:2]

    def tune(mode, features, bank, precision, run):
        run(first)
        run(second)
        return first  # launched a third time by the backend

    monkeypatch.setattr(triton_backend, "forward_config", tune)
    features, labels, bank, counts = make_case(3, 100, 300, [100, 40, 0], 150, dtype=torch.float32, device=device)
    got = TRITON.all_forward(features, labels, bank, counts, 0.05, IGNORE)
    assert_same_all(features, labels, bank, counts, got, torch.float32)


def test_space_defaults_and_fixed_reduction_chunk():
    for mode, sixteen_bit, dim in REGIMES:
        candidates = tiles.space(mode, dim, sixteen_bit)
        tile_shapes = {(c.block_m, c.block_n, c.block_c, c.num_warps, c.num_stages) for c in candidates}
        assert 1 <= len(tile_shapes) <= 6 and len(set(candidates)) == len(candidates)
        assert len({config.block_c for config in candidates}) == 1, "BLOCK_C must not depend on the candidate"
        assert len({config.c_resident for config in candidates}) == 1
        splits = [config for config in candidates if config.slot_splits > 1]
        assert all(replace(config, slot_splits=1, flatten=False) == candidates[0] for config in splits)  # the default's tiles
        assert {config.slot_splits for config in splits} == ({2, 4} if mode == "max" else set())
        # Flattened loops: the default's tiles, in the streamed "max" regime only, never the default.
        flattened = [config for config in candidates if config.flatten]
        assert not candidates[0].flatten
        assert all(replace(config, slot_splits=1, flatten=False) == candidates[0] for config in flattened)
        assert bool(flattened) == (mode == "max" and not candidates[0].c_resident)
        # A pipelined dsum loop: the default's tiles, in the streamed 16-bit "all" regime only.
        pipelined = [config for config in candidates if config.dsum_stages]
        assert all(replace(config, dsum_stages=0) == candidates[0] for config in pipelined)
        streamed_16bit_all = mode == "all" and sixteen_bit and not candidates[0].c_resident
        assert bool(pipelined) == streamed_16bit_all and not candidates[0].dsum_stages
    assert tiles.space("max", 256, True)[0].c_resident and not tiles.space("max", 257, True)[0].c_resident
    with pytest.raises(ValueError, match="mode must be 'max' or 'all'"):
        tiles.space("mean", 64, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_slot_splits_give_the_one_program_result_bit_for_bit(dtype, device, monkeypatch):
    # Splits that get no slots (a one-slot bucket over 4 splits), a tie across split boundaries,
    # an empty bucket: the merged winner is the single program's, value and slot.
    features, labels, bank, counts = make_case(4, 150, 40, [150, 0, 67, 1], 180, dtype=dtype, device=device, seed=5)
    bank[0, 140] = bank[0, 3]  # slots 3 and 140 fall in different splits: the lower one wins
    features[0, 0] = bank[0, 3].to(dtype) * 3
    labels.view(-1)[0] = 0
    base = tiles.interpreter_config(40)
    results = {}
    for splits in (1, 2, 3, 4):
        monkeypatch.setattr(triton_backend, "forward_config", lambda *args, splits=splits: replace(base, slot_splits=splits))
        results[splits] = TRITON.max_forward(features, labels, bank, counts, IGNORE)
    for splits in (2, 3, 4):
        assert torch.equal(results[splits][0], results[1][0]) and torch.equal(results[splits][1], results[1][1]), splits
    if dtype == torch.float32:  # the interpreter's fp16 dots differ in the last bit between slot tiles
        assert results[1][1].view(-1)[0] == 3


def test_without_autotune_the_default_is_used_and_nothing_runs():
    tiles.set_autotune(False)
    candidates = tiles.space("max", 2048, True)
    ran = []
    assert tiles.choose("key", candidates, ran.append, timer=lambda fn, repeats: fn()) == candidates[0]
    assert ran == [] and tiles.autotune_choices() == {}


def test_autotune_times_every_candidate_once_and_keeps_the_fastest():
    tiles.set_autotune(True)
    candidates = tiles.space("max", 2048, True)
    fastest = candidates[2]
    ran = []

    def timer(fn, repeats):
        fn()
        return 1.0 if ran[-1] == fastest else 2.0

    assert tiles.choose("shape-a", candidates, ran.append, timer=timer) == fastest
    assert ran == list(candidates)
    assert tiles.choose("shape-a", candidates, ran.append, timer=timer) == fastest  # cached: no new runs
    assert len(ran) == len(candidates)
    assert tiles.autotune_choices() == {"shape-a": fastest}
    tiles.choose("shape-b", candidates, ran.append, timer=timer)  # another shape class tunes anew
    assert len(ran) == 2 * len(candidates)


def test_autotune_skips_candidates_this_gpu_cannot_launch():
    from triton.runtime.errors import OutOfResources

    tiles.set_autotune(True)
    candidates = tiles.space("max", 256, True)

    def run(config):
        if config == candidates[1]:
            raise OutOfResources(300000, 232448, "shared memory")

    assert tiles.choose("k", candidates, run, timer=lambda fn, repeats: fn() or 1.0) == candidates[0]

    def default_fails(config):
        raise OutOfResources(300000, 232448, "shared memory")

    with pytest.raises(OutOfResources):  # the default must launch everywhere: never hidden
        tiles.choose("k2", candidates, default_fails, timer=lambda fn, repeats: fn() or 1.0)


def test_next_power_of_2_is_tritons():
    import triton

    for n in [0, 1, 2, 3, 4, 5, 16, 17, 255, 256, 257, 2**20 - 1, 2**20 + 1]:
        assert tiles.next_power_of_2(n) == triton.next_power_of_2(max(n, 1)), n


def test_shape_class_rounds_sizes():
    bank = torch.zeros(19, 3000, 256)
    key = tiles.shape_class("max", torch.zeros(2, 1000, 256), bank, None)
    assert key == tiles.shape_class("max", torch.zeros(2, 1020, 256), bank, None)
    assert key != tiles.shape_class("max", torch.zeros(2, 1100, 256), bank, None)
    assert key != tiles.shape_class("all", torch.zeros(2, 1000, 256), bank, None)


def test_autotune_env_switch_is_validated(monkeypatch):
    monkeypatch.setenv("COSSIM_FAST_TRITON_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="COSSIM_FAST_TRITON_AUTOTUNE must be 0 or 1"):
        tiles._env_flag("COSSIM_FAST_TRITON_AUTOTUNE")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_autotuned_forward_on_cuda_matches_reference(dtype):
    tiles.set_autotune(True)
    features, labels, bank, counts = make_case(19, 600, 256, [600] * 19, 5000, dtype=dtype, device="cuda")
    got = TRITON.max_forward(features, labels, bank, counts, IGNORE)
    assert len(tiles.autotune_choices()) == 1
    assert_same_max(features, labels, bank, counts, got, REFERENCE.max_forward(features, labels, bank, counts, IGNORE), dtype)
    count, _, dsum = TRITON.all_forward(features, labels, bank, counts, 0.05, IGNORE)
    ref_count, _, ref_dsum = REFERENCE.all_forward(features, labels, bank, counts, 0.05, IGNORE)
    assert len(tiles.autotune_choices()) == 2
    assert (count != ref_count).float().mean() < 1e-3
    torch.testing.assert_close(dsum[count == ref_count], ref_dsum[count == ref_count], atol=TOLERANCES[dtype]["dsum"], rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_tuning_inside_a_cuda_graph_capture():
    tiles.set_autotune(True)
    features, labels, bank, counts = make_case(3, 70, 64, [70, 5, 0], 300, dtype=torch.float16, device="cuda")
    TRITON.max_forward(features, labels, bank, counts, IGNORE)  # compile outside the capture
    tiles.clear_autotune_choices()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values, _ = TRITON.max_forward(features, labels, bank, counts, IGNORE)
    assert tiles.autotune_choices() == {}  # the default ran; nothing was timed
    graph.replay()
    torch.cuda.synchronize()
    tiles.set_autotune(False)  # the default config, as in the capture
    assert torch.equal(values, TRITON.max_forward(features, labels, bank, counts, IGNORE)[0])
