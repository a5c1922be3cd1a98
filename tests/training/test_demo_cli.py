"""cossim-fast demo and op-demo: options checked before any work, and what they report."""

import contextlib
import io
import json
import subprocess

import pytest
import torch

import cossim_fast.data
from cossim_fast import cli, op_demo
from cossim_fast.training import demo


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Neither demo may generate data or start a child process: a refusal must come first."""

    def refused(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cossim_fast.data, "generate_synthetic_uda", refused)
    monkeypatch.setattr(subprocess, "run", refused)


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("options, expected", [
    (["--iterations", "-1"], "argument --iterations: expected a positive number of iterations, got -1"),
    (["--iterations", "0"], "argument --iterations: expected a positive number of iterations, got 0"),
    (["--jobs", "0"], "argument --jobs: expected at least 1 run at once, got 0"),
    (["--seeds", "0", "0"], "argument --seeds: expected distinct values, got 0 more than once"),
    (["--seeds", "-1"], "argument --seeds: seed: expected in [0, 4294967295], got -1"),
    (["--variants", "minent", "minent"], "argument --variants: expected distinct values, got minent more than once"),
    (["--set", "seed=5"], "argument --set seed=5: the demo sets seed for each run; use --seeds"),
    (["--set", "output_dir=elsewhere"], "argument --set output_dir=elsewhere: the demo sets output_dir for each run; use --output"),
    (["--set", "train={threads: 2}"], "the demo sets train.threads for each run; use --jobs"),
])
def test_demo_refuses_bad_options_before_any_work(no_work, capsys, options, expected):
    assert expected in _refused(["demo", *options], capsys)


def test_demo_refuses_an_output_inside_a_file(no_work, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    assert "argument --output: expected a folder" in _refused(["demo", "--output", "notes.txt/demo"], capsys)


def test_demo_hands_every_run_its_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cossim_fast.data, "generate_synthetic_uda", lambda *args, **kwargs: {"source_val": "val"})
    jobs = []

    def launch(job: dict, log_dir) -> dict:
        jobs.append(job)
        return {**job, "target_miou": 40.0 + job["seed"], "source_miou": 60.0, "peak_mib": 1.0, "seconds": 1.0, "selected": None}

    monkeypatch.setattr(demo, "_launch", launch)
    argv = ["demo", "--seeds", "1", "2", "--variants", "source-only", "--iterations", "3", "--jobs", "1", "--set", "cosine.weight=0.05"]
    assert cli.main(argv) == 0
    assert sorted(job["seed"] for job in jobs) == [1, 2]
    for job in jobs:
        overrides = job["overrides"]
        assert overrides[:2] == ["cosine.weight=0.05", "train.iterations=3"]
        assert overrides[-3:] == [f"seed={job['seed']}", "train.threads=1", f"output_dir=runs/demo/source-only_seed{job['seed']}"]
    assert "| source-only | 41.5 ± 0.7 |" in capsys.readouterr().out


def test_a_failed_demo_run_is_one_line_with_its_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cossim_fast.data, "generate_synthetic_uda", lambda *args, **kwargs: {"source_val": "val"})

    def crash(command, stdout, stderr, **kwargs):
        stderr.write("Traceback ...\nDatasetError: cannot read image x.png\n")
        return subprocess.CompletedProcess(command, 1, stdout="")

    monkeypatch.setattr(demo.subprocess, "run", crash)
    assert cli.main(["demo", "--seeds", "0", "--variants", "source-only", "--iterations", "1"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("cossim-fast demo: error: run source-only seed 0 failed (DatasetError: cannot read image x.png); see ")
    assert err.rstrip().endswith("source-only_seed0.log") and "Traceback" not in err


@pytest.mark.parametrize("options, expected", [
    (["--classes", "0"], "argument --classes: expected a positive integer, got 0"),
    (["--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
    (["--threads", "-1"], "argument --threads: expected 0 (torch's default) or more, got -1"),
    (["--slots", "0"], "argument --slots: expected a positive integer, got 0"),
    (["--dim", "0"], "argument --dim: expected a positive integer, got 0"),
    (["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
    (["--rows", "-5"], "argument --rows: expected at least one row per image (--batch 2), got -5"),
    (["--rows", "0"], "argument --rows: expected at least one row per image (--batch 2), got 0"),
    (["--rows", "3", "--batch", "4"], "argument --rows: expected at least one row per image (--batch 4), got 3"),
    (["--threshold", "nan"], "argument --threshold: expected a cosine similarity"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**64), got -1"),
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:INDEX, got 'tpu'"),
    (["--device", "meta"], "argument --device: expected cpu, cuda or cuda:INDEX, got 'meta'"),
    (["--device", "cuda"], "argument --device: cuda is not available (torch sees no CUDA GPU); use --device cpu"),
])
def test_op_demo_refuses_bad_options_before_any_work(no_work, monkeypatch, capsys, options, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert expected in _refused(["op-demo", *options], capsys)


def _in_process(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """A backend's child run here (python -m cossim_fast.op_demo ARGS), for speed."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = op_demo.main(command[3:])
    return subprocess.CompletedProcess(command, code, stdout=stdout.getvalue(), stderr="")


def test_op_demo_reports_the_rows_it_used(monkeypatch, capsys):
    # 64 rows in 3 square maps: 3 x 5 x 5 = 75 rows are what runs.
    monkeypatch.setattr(op_demo.subprocess, "run", _in_process)
    monkeypatch.setattr(op_demo.cossim_fast, "available_backends", lambda device: ["reference"])
    small = ["--batch", "3", "--classes", "3", "--slots", "4", "--dim", "8", "--device", "cpu"]
    assert cli.main(["op-demo", "--rows", "64", *small]) == 0
    assert "problem: N=75 rows (--rows 64 rounded to 3 maps of 5 x 5), K=3" in capsys.readouterr().out
    child = _in_process(["python", "-m", "cossim_fast.op_demo", "--rows", "64", *small, "--backend", "reference"])
    assert json.loads(child.stdout)["rows"] == 75
    assert cli.main(["op-demo", "--rows", "12", *small]) == 0
    assert "problem: N=12 rows, K=3" in capsys.readouterr().out  # 3 maps of 2 x 2: no note


def test_op_demo_says_when_every_backend_failed(monkeypatch, capsys):
    monkeypatch.setattr(
        op_demo.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1, stdout="", stderr="boom")
    )
    assert cli.main(["op-demo", "--rows", "4", "--slots", "2", "--dim", "4", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "boom" in captured.out
    assert captured.err.strip() == "cossim-fast op-demo: error: every backend failed (their errors are above)"


def test_op_demo_names_the_backend_it_compares_with_when_reference_failed(monkeypatch, capsys):
    def run(command, **kwargs):
        if command[-1] == "reference":
            return subprocess.CompletedProcess(command, 1, stdout="", stderr="out of memory")
        return _in_process(command, **kwargs)

    monkeypatch.setattr(op_demo.subprocess, "run", run)
    monkeypatch.setattr(op_demo.cossim_fast, "available_backends", lambda device: ["reference", "torch"])
    small = ["--rows", "12", "--batch", "3", "--classes", "3", "--slots", "4", "--dim", "8", "--device", "cpu"]
    assert cli.main(["op-demo", *small]) == 0
    out = capsys.readouterr().out
    assert "memory vs torch" in out and "largest loss difference from torch" in out and "vs reference" not in out
