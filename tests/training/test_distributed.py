"""torchrun with 2 gloo processes on the CPU: identical banks on both ranks, and the same
training result as one process on the combined batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import tiny_overrides

WORKER = r"""
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from cossim_fast.training import Trainer, load_config
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
trainer = Trainer(load_config(None, overrides), resume=None, progress=False)
allreduces = []
if dist.is_initialized():  # record the bucket of every gradient all-reduce
    def hook(state, bucket):
        allreduces.append(bucket.index())
        return allreduce_hook(dist.group.WORLD, bucket)
    trainer.net.register_comm_hook(None, hook)
result = trainer.train()
rank = dist.get_rank() if dist.is_initialized() else 0
torch.save({"bank": trainer.dictionary.bank, "counts": trainer.dictionary.counts,
            "model": trainer.model.state_dict(), "pixels": result["pixels"], "allreduced_buckets": allreduces,
            "logged_ce": torch.tensor([row["loss_ce"] for row in trainer.history if "loss_ce" in row])},
           f"{out}.rank{rank}.pt")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, overrides, processes):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"world{processes}"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), json.dumps(overrides), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in range(processes)]


def test_two_ranks_match_one_process_on_the_combined_batch(tiny_data, tmp_path, capsys):
    # BN frozen (per-rank batch statistics would differ from the combined batch's) and the
    # cosine term kept at weight 0 after the dictionary updates (per-rank means of a
    # thresholded selection are not the global mean); the dictionary is what DDP must sync.
    common = ["model.freeze_bn=true", "cosine.warmup_iters=1000", "train.iterations=3", "train.eval_every=3"]
    ddp_overrides = tiny_overrides(tiny_data, tmp_path / "ddp", *common)
    two = _run(tmp_path, ddp_overrides, 2)
    one = _run(tmp_path, tiny_overrides(tiny_data, tmp_path / "single", *common, "train.batch_size_source=4", "train.batch_size_target=4"), 1)
    assert two[0]["counts"].sum() > 0  # the bank fills during the loss's warm-up
    assert torch.equal(two[0]["bank"], two[1]["bank"]) and torch.equal(two[0]["counts"], two[1]["counts"])
    assert torch.equal(two[0]["counts"], one[0]["counts"])
    torch.testing.assert_close(two[0]["bank"], one[0]["bank"], atol=1e-5, rtol=0)
    for name, value in one[0]["model"].items():
        torch.testing.assert_close(two[0]["model"][name], value, atol=1e-5, rtol=1e-4, msg=name)
    # Evaluation shards the val images without duplicates: both score the same pixels.
    assert two[0]["pixels"] == one[0]["pixels"]
    # Logged losses are the ranks' mean, the same on every rank (rank 0's alone before).
    assert len(two[0]["logged_ce"]) > 0 and torch.equal(two[0]["logged_ce"], two[1]["logged_ce"])
    # Resuming the two-process run in one process: batch sizes are per process, so it says so.
    from cossim_fast.training import Trainer, load_config

    Trainer(load_config(None, ddp_overrides), progress=False)
    assert "was trained by 2 process(es), this run has 1" in capsys.readouterr().out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_ranks_evaluate_the_same_batchnorm_statistics_and_sync_once_per_iteration(tiny_data, tmp_path, checkpointing):
    # Each rank updates its running statistics from its own batches; evaluation and the
    # checkpoint use rank 0's on every rank. With activation checkpointing too (DDP's hooks
    # then fire during the recomputing backward).
    common = ["model.freeze_bn=false", "train.iterations=2", "train.eval_every=2",
              f"model.activation_checkpointing={str(checkpointing).lower()}"]
    two = _run(tmp_path, tiny_overrides(tiny_data, tmp_path / "ddp", *common), 2)
    # Each iteration all-reduces each gradient bucket once, although it runs two backward passes.
    assert two[0]["allreduced_buckets"].count(0) == 2, two[0]["allreduced_buckets"]
    for name, value in two[0]["model"].items():
        assert torch.equal(two[1]["model"][name], value), name
