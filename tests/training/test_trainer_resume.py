"""Resuming with gradient accumulation, with the global RNGs and with the best score so far:
a resumed run goes on as the uninterrupted one would."""

import json
import random

import numpy as np
import pytest
import torch

from cossim_fast.training import Trainer, checkpoint


def _logged(trainer) -> list[str]:
    """The history without its timings, as JSON."""
    return [json.dumps({k: v for k, v in row.items() if k not in ("it_per_s", "peak_mib")}) for row in trainer.history]


def test_a_resume_with_gradient_accumulation_continues_the_uninterrupted_run(tiny_config):
    # With grad_accum=2 iteration i takes the streams' batches 2i and 2i + 1: a resume at
    # iteration 2 starts them at batch 4, and trains and logs as the uninterrupted run.
    settings = ("train.grad_accum=2", "train.log_every=1", "train.eval_every=100")
    straight = Trainer(tiny_config(*settings, output="straight"), progress=False)
    straight.train(until=4)
    Trainer(tiny_config(*settings, output="interrupted"), progress=False).train(until=2)
    resumed = Trainer(tiny_config(*settings, output="interrupted"), progress=False)
    assert resumed.iteration == 2
    resumed.train(until=4)
    assert len(resumed.history) == 4 and _logged(resumed) == _logged(straight)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert torch.equal(resumed.dictionary.bank, straight.dictionary.bank)


def _draws() -> tuple[list[float], list[float], float]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


@pytest.fixture
def global_rngs_restored():
    """Leaves the global generators as this test found them, for the tests after it."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


def test_a_resume_restores_the_global_random_generators(tiny_config, global_rngs_restored):
    # The checkpoint holds torch's, numpy's and Python's global RNG states: after a resume
    # they draw what the interrupted process would have drawn next, whatever they were
    # seeded with in the new process (the Trainer seeds only torch's, with config.seed).
    config = tiny_config("train.eval_every=100")
    first = Trainer(config, progress=False)
    _draws()  # moves every generator away from where seeding the next process leaves it
    first.train(until=2)  # ends with the checkpoint
    expected = _draws()
    np.random.seed(1234)
    random.seed(1234)
    resumed = Trainer(config, progress=False)
    assert resumed.iteration == 2
    assert _draws() == expected


def test_a_resume_keeps_the_best_score_so_far(tiny_config):
    # best.pt is the best evaluation of the whole run: a resumed run compares its evaluations
    # with those before the checkpoint, so a worse one after the resume does not replace it.
    config = tiny_config("train.eval_every=3")  # evaluations at 3 and 6, the stop at 4
    Trainer(config, progress=False).train(until=4)
    resumed = Trainer(config, progress=False)
    (before,) = [row["eval"]["mIoU19"] for row in resumed.history if "eval" in row]
    assert before > 0 and resumed.best_miou == before
    resumed.train()
    evals = {row["iteration"]: row["eval"]["mIoU19"] for row in resumed.history if "eval" in row}
    best = checkpoint.load(resumed.run_dir / "checkpoints" / "best.pt")
    assert best["iteration"] == max(evals, key=evals.get) and best["best_miou"] == max(evals.values())
