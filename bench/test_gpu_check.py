"""gpu_check.sh's own logic, without a GPU: a rerun of some steps reports only those steps."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_a_rerun_of_named_steps_reports_only_them(tmp_path):
    # An earlier run's logs in the folder must not reach this run's summary.
    (tmp_path / "triton_tests.log").write_text("99 passed in 1.0s\n")
    (tmp_path / "sanitizer.log").write_text("========= ERROR SUMMARY: 7 errors\n")
    env = {"PATH": "/usr/bin:/bin", "GPU_CHECK_STEPS": "env", "PYTHON": shutil.which("python") or "python3"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = (tmp_path / "summary.txt").read_text()
    steps = [line.split()[0] for line in summary.splitlines() if line.endswith(".log")]
    assert steps == ["env"]
    assert "99 passed" not in summary and "7 errors" not in summary
