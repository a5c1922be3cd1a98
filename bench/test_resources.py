"""Every kernel compiles for the GPUs we build for without register spills or too much shared memory.

The Triton tile space and the CUDA kernels are compiled here, with no GPU (``bench/resources.py``);
a tile or kernel change that starts to spill fails this test, not a benchmark on a GPU later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bench import resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PTXAS_OUTPUT = """\
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 29696 bytes smem, 400 bytes cmem[0]
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_parse_ptxas():
    parsed = resources.parse_ptxas(PTXAS_OUTPUT)
    assert parsed["_Z6kernelPf"] == {"stack": 16, "spill_stores": 8, "spill_loads": 12, "registers": 128, "shared": 29696}
    assert parsed["_Z5otherv"] == {"stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 40, "shared": 0}


def test_demangled_kernel_names():
    name = ("void cossim_fast::(anonymous namespace)::class_forward_kernel<(cossim_fast::(anonymous namespace)::Mode)1, "
            "(cossim_fast::(anonymous namespace)::Path)0, c10::BFloat16, float>(cossim_fast::(anonymous namespace)::"
            "ForwardParams<c10::BFloat16, float>)")
    assert resources._kernel_and_variant(name) == ("class_forward_kernel", "all, wmma-16bit, bf16, fp32")


def test_problems_name_spills_and_shared_memory():
    row = resources.Resources("triton", "k", "v", 80, 255, 8, 8, 200 * 1024, 16)
    found = resources.problems([row])
    assert "spills 8/8" in found[0] and "over the" in found[1]


def _run(tmp_path, *args: str) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.resources", *args, "--json", str(out)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_representative_dims_cover_every_regime():
    pytest.importorskip("triton")
    from cossim_fast.backends.triton import tiles

    def regime(mode, dim, sixteen_bit):  # the tile shapes; a resident BLOCK_C is C itself
        return tuple(dataclasses.replace(config, block_c=0 if config.c_resident else config.block_c)
                     for config in tiles.space(mode, dim, sixteen_bit))

    for (mode, sixteen_bit), dims in resources.TRITON_DIMS.items():
        covered = {regime(mode, dim, sixteen_bit) for dim in dims}
        every = {regime(mode, 2**power, sixteen_bit) for power in range(4, 13)}
        assert covered == every, f"{mode} {'16-bit' if sixteen_bit else 'fp32'}: a regime is not compiled"


def test_triton_tile_space_compiles_for_sm90_without_spills(tmp_path):
    pytest.importorskip("triton")
    from cossim_fast.backends.triton import backend, tiles

    rows = _run(tmp_path, "--only", "triton", "--arch", "90")
    kernels = {"max": "_max_forward_kernel", "all": "_thresholded_sum_kernel"}
    for (mode, sixteen_bit), dims in resources.TRITON_DIMS.items():
        compiled = {row["variant"] for row in rows if row["kernel"] == kernels[mode]}
        for dim in dims:
            for config in tiles.space(mode, dim, sixteen_bit):
                assert any(variant.startswith(f"C={dim} ") and variant.endswith(str(config)) for variant in compiled), (mode, dim, config)
            if sixteen_bit:  # the backend refuses GPUs with less shared memory than the defaults take
                default = next(row for row in rows if row["kernel"] == kernels[mode]
                               and row["variant"].startswith(f"C={dim} ") and row["variant"].endswith(str(tiles.space(mode, dim, True)[0])))
                assert default["shared_bytes"] <= backend.SIXTEEN_BIT_FORWARD_SHARED_BYTES, default
    assert {row["kernel"] for row in rows} == {
        *kernels.values(), "_merge_splits_kernel", "_row_gradient_kernel", "_ring_buffer_kernel",
    }
    wide = {(row["kernel"], row["variant"]) for row in rows if "int64 offsets" in row["variant"]}
    for case in ("C=256 bfloat16", "C=2048 bfloat16", "C=2048 float32"):  # every kernel's int64-offset variant
        name = f"{case} int64 offsets"
        for kernel, variant in ((kernels["max"], f"max {name}"), (kernels["all"], f"all {name}"),
                                ("_row_gradient_kernel", f"max {name}"), ("_row_gradient_kernel", f"all {name}"),
                                ("_ring_buffer_kernel", name)):
            assert (kernel, variant) in wide, (kernel, variant)


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                    reason="needs a CUDA build of torch and nvcc")
def test_cuda_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    for arch in ("80", "90"):
        rows = _run(tmp_path, "--only", "cuda", "--arch", arch, *(("--allow-spills", "ring_buffer_update_kernel:16") if arch == "80" else ()))
        assert {"class_forward_kernel", "row_gradient_kernel", "ring_buffer_update_kernel"} <= {row["kernel"] for row in rows}
