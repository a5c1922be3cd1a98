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

#: Workers end here. With torch 2.14, a gloo process group and a torch.library custom op in one
#: process abort at interpreter exit now and then ("terminate called without an active
#: exception", SIGABRT, after all work is done: gloo's threads release tensors during
#: finalization; pytorch/pytorch#179291). Reproduced here without cossim_fast (a custom op and
#: two all_gathers: 3 aborts in 20 runs), so the workers skip finalization once their results
#: are saved.
EXIT_WITHOUT_FINALIZATION = r"""
dist.destroy_process_group() if dist.is_initialized() else None
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""

WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from cossim_fast.training import Trainer, load_config
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
until = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "end" else None  # stop there, as a killed run would
resume = sys.argv[4] if len(sys.argv) > 4 else None
if resume == "auto-on-rank-0":  # as if the other ranks could not see rank 0's checkpoints
    resume = "auto" if os.environ["RANK"] == "0" else None
trainer = Trainer(load_config(None, overrides), resume=resume, progress=False)
allreduces = []
if dist.is_initialized():  # record the bucket of every gradient all-reduce
    def hook(state, bucket):
        allreduces.append(bucket.index())
        return allreduce_hook(dist.group.WORLD, bucket)
    trainer.net.register_comm_hook(None, hook)
result = trainer.train(until=until) or {}
rank = dist.get_rank() if dist.is_initialized() else 0
torch.save({"bank": trainer.dictionary.bank, "counts": trainer.dictionary.counts,
            "model": trainer.model.state_dict(), "pixels": result.get("pixels"), "allreduced_buckets": allreduces,
            "history": [json.dumps({k: v for k, v in row.items() if k not in ("it_per_s", "peak_mib")}) for row in trainer.history],
            "logged_ce": torch.tensor([row["loss_ce"] for row in trainer.history if "loss_ce" in row]),
            "logged_cos": torch.tensor([row["loss_cos"] for row in trainer.history if "loss_cos" in row])},
           f"{out}.rank{rank}.pt")
""" + EXIT_WITHOUT_FINALIZATION


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, overrides, processes, *worker_args):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"world{processes}"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), json.dumps(overrides), str(out), *worker_args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in range(processes)]


def test_two_ranks_match_one_process_on_the_combined_batch(tiny_data, tmp_path, capsys):
    # BN frozen (per-rank batch statistics would differ from the combined batch's) and no
    # pseudo-label class cap (it caps each rank's batch). The losses are normalized by the
    # counts of both ranks: a mean of per-rank means (of a thresholded selection, of the
    # labelled pixels) would not be the combined batch's mean.
    common = ["model.freeze_bn=true", "cosine.class_cap=null", "cosine.weight=1.0", "cosine.reduction=mean",
              "train.iterations=3", "train.eval_every=3", "train.log_every=1"]
    ddp_overrides = tiny_overrides(tiny_data, tmp_path / "ddp", *common)
    two = _run(tmp_path, ddp_overrides, 2)
    one = _run(tmp_path, tiny_overrides(tiny_data, tmp_path / "single", *common, "train.batch_size_source=4", "train.batch_size_target=4"), 1)
    assert two[0]["counts"].sum() > 0
    assert torch.equal(two[0]["bank"], two[1]["bank"]) and torch.equal(two[0]["counts"], two[1]["counts"])
    assert torch.equal(two[0]["counts"], one[0]["counts"])
    torch.testing.assert_close(two[0]["bank"], one[0]["bank"], atol=1e-5, rtol=0)
    for name, value in one[0]["model"].items():
        torch.testing.assert_close(two[0]["model"][name], value, atol=1e-5, rtol=1e-4, msg=name)
    # Evaluation shards the val images without duplicates: both score the same pixels.
    assert two[0]["pixels"] == one[0]["pixels"]
    # Logged losses are the ranks' mean, the same on every rank, and the combined batch's.
    assert len(two[0]["logged_cos"]) == 3 and (two[0]["logged_cos"] > 0).all()
    for name in ("logged_ce", "logged_cos"):
        assert torch.equal(two[0][name], two[1][name])
        torch.testing.assert_close(two[0][name], one[0][name], atol=1e-5, rtol=1e-4, msg=name)
    # Resuming the two-process run in one process: batch sizes are per process, so it says so,
    # unless the per-process batch doubles (the same global batch: the same samples).
    from cossim_fast.training import Trainer, load_config

    Trainer(load_config(None, ddp_overrides), progress=False)
    assert "global batches (source, target) of (4, 4), this run has (2, 2)" in capsys.readouterr().out
    Trainer(load_config(None, [*ddp_overrides, "train.batch_size_source=4", "train.batch_size_target=4"]), progress=False)
    assert "global batches" not in capsys.readouterr().out


def test_a_two_rank_resume_between_logged_rows_logs_what_an_uninterrupted_run_logs(tiny_data, tmp_path):
    # Each rank restores its own unlogged sums: restoring their mean on every rank gave the
    # same row up to rounding only (loss_ce 2.741403102874756 against 2.741403341293335).
    settings = ["train.log_every=4", "train.checkpoint_every=100", "train.iterations=6", "train.eval_every=6"]
    straight = _run(tmp_path, tiny_overrides(tiny_data, tmp_path / "straight", *settings), 2)
    interrupted = tiny_overrides(tiny_data, tmp_path / "interrupted", *settings)
    _run(tmp_path, interrupted, 2, "2")
    resumed = _run(tmp_path, interrupted, 2, "end", "auto")
    for rank in range(2):
        assert len(straight[rank]["history"]) >= 2
        assert resumed[rank]["history"] == straight[rank]["history"], rank
        for name, value in straight[rank]["model"].items():
            assert torch.equal(resumed[rank]["model"][name], value), name


def test_ranks_that_disagree_on_the_checkpoint_stop_with_an_error_on_every_rank(tiny_data, tmp_path):
    # On several machines without a shared output_dir rank 0 would resume while the others
    # started afresh: a hang, or ranks training different runs.
    overrides = tiny_overrides(tiny_data, tmp_path / "run", "train.iterations=2")
    _run(tmp_path, overrides, 2, "1")
    with pytest.raises(AssertionError) as failed:
        _run(tmp_path, overrides, 2, "end", "auto-on-rank-0")
    message = str(failed.value)
    assert "the ranks disagree on the checkpoint to resume from" in message
    assert "(found); rank 1: none" in message


@pytest.mark.parametrize(("checkpointing", "grad_accum"), [(False, 1), (True, 1), (False, 2)])
def test_ranks_evaluate_the_same_batchnorm_statistics_and_sync_once_per_iteration(tiny_data, tmp_path, checkpointing, grad_accum):
    # Each rank updates its running statistics from its own batches; evaluation and the
    # checkpoint use rank 0's on every rank. With activation checkpointing too (DDP's hooks
    # then fire during the recomputing backward), and with accumulation (only the last pass's
    # backward may sync: a sync on the first leaves the last pass's gradients per rank, and the
    # ranks' weights apart).
    common = ["model.freeze_bn=false", "train.iterations=2", "train.eval_every=2",
              f"model.activation_checkpointing={str(checkpointing).lower()}", f"train.grad_accum={grad_accum}"]
    two = _run(tmp_path, tiny_overrides(tiny_data, tmp_path / "ddp", *common), 2)
    # Each iteration all-reduces each gradient bucket once, although it runs 2 x grad_accum backward passes.
    assert two[0]["allreduced_buckets"].count(0) == 2, two[0]["allreduced_buckets"]
    for name, value in two[0]["model"].items():
        assert torch.equal(two[1]["model"][name], value), name


GATHER_WORKER = r"""
import os, sys
import torch
import torch.distributed as dist
from cossim_fast import FeatureDictionary

dist.init_process_group("gloo")
rank = dist.get_rank()
gen = torch.Generator().manual_seed(rank)
dictionary = FeatureDictionary(3, 4, 5)
for step in range(2):  # ranks hold 3 and 4 rows: the shorter one is padded
    dictionary.update(torch.randn(3 + rank, 5, generator=gen), torch.randint(0, 3, (3 + rank,), generator=gen))
torch.save({"bank": dictionary.bank, "counts": dictionary.counts, "ptr": dictionary.ptr}, f"{sys.argv[1]}.rank{rank}.pt")
""" + EXIT_WITHOUT_FINALIZATION


def test_ranks_with_different_row_counts_keep_the_combined_dictionary(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_WORKER)
    out = tmp_path / "gather"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(script), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in range(2)]
    # One process fed both ranks' rows in rank order, step by step, writes the same dictionary.
    from cossim_fast import FeatureDictionary

    gens = [torch.Generator().manual_seed(r) for r in range(2)]
    alone = FeatureDictionary(3, 4, 5)
    for step in range(2):
        rows = [(torch.randn(3 + r, 5, generator=gens[r]), torch.randint(0, 3, (3 + r,), generator=gens[r])) for r in range(2)]
        alone.update(torch.cat([f for f, _ in rows]), torch.cat([y for _, y in rows]))
    for state in ranks:
        assert torch.equal(state["bank"], alone.bank)
        assert torch.equal(state["counts"], alone.counts) and torch.equal(state["ptr"], alone.ptr)
