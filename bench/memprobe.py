"""Peak resident memory of one piece of CPU work, measured in a fresh process.

``ru_maxrss`` only grows, and the allocator keeps freed memory, so every CPU memory figure comes
from a process that ran nothing else before. Starting a Python that imports torch costs seconds,
so by default a server process imports torch, cossim_fast and the bench modules once, runs no
tensor work itself, and forks one child per request: the child is as fresh as a new interpreter
(clean heap, no earlier peaks) and reports its own peak. ``COSSIM_BENCH_MEMPROBE=spawn`` runs a
new interpreter per request instead (slower, for cross-checking).

The children run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so
every tensor of that size or more is its own mapping, unmapped when freed: the resident size then
follows the live tensors instead of the allocator's retained heap.

Inside the child the peak is read as the kernel's VmHWM after resetting it through
``/proc/self/clear_refs`` (Linux), so the figure covers only the measured call; where that reset
is refused it falls back to ``ru_maxrss`` differences (then a section's peak below an earlier
one in the same child would read as 0).

Requests are JSON: ``{"function": "module:name", "kwargs": {...}, "timeout": seconds,
"data_limit_bytes": optional}``; the function runs in the child and returns a JSON-able dict.
A benchmark case's shorthand is ``{"case": Case.to_dict(), "check_values": bool}``: the child
runs with the value checks the caller measures with (``harness.measure_peak`` sends its own).
``data_limit_bytes`` caps the child's data segment above its current size (RLIMIT_DATA), a safety
net so a probe that would eat the machine fails with an allocation error instead.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

DEFAULT_TIMEOUT = 600.0

# Every allocation of 64 KiB or more gets its own mapping, returned to the kernel when freed, so
# the resident size follows the live tensors. Without this glibc raises its mmap threshold after
# the first large free and serves later large blocks from its heap, whose freed parts it keeps
# resident: a peak then reads up to several freed blocks high, in some runs and not others.
LIVE_TENSOR_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


# ----------------------------------------------------------------------------- in the child


def _status_bytes() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:", "VmData:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0]) * 1024
    return values


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMeter:
    """``start()`` then ``stop()``: the peak resident memory in between, beyond the start."""

    def __init__(self, collect: bool = False) -> None:
        self.collect = collect  # a fresh child has little garbage, and collecting costs ~0.3 s

    def start(self) -> None:
        if self.collect:
            gc.collect()
        self.hwm = _reset_peak()
        self.before = _status_bytes()["VmRSS"] if self.hwm else _maxrss_bytes()

    def stop(self) -> int:
        after = _status_bytes()["VmHWM"] if self.hwm else _maxrss_bytes()
        return max(0, after - self.before)

    @property
    def method(self) -> str:
        return "VmHWM after a clear_refs reset minus VmRSS before" if self.hwm else "ru_maxrss difference"


def case_peak(case: dict, check_values: bool = False) -> dict:
    """One benchmark case: peak beyond its inputs (and beyond the forward, for ``bwd``), with the
    package's value checks as the measuring process has them (``check_values``: the checks read
    the data, so they can add memory; the reply says which setting ran)."""
    import dataclasses

    from bench import harness
    from cossim_fast.contract import inputs

    case = harness.Case.from_dict(case)
    harness.configure_for_benchmarks(check_values)
    # Warm up on a tiny copy so one-time costs (lazy library loads, op registration) are not
    # counted, and so little freed memory is left for the measured call to reuse.
    harness.call_once(harness.prepare(dataclasses.replace(case, N=min(case.N, 64), M=min(case.M, 16)), cached=False))
    prepared = harness.prepare(case, cached=False)
    args, kwargs = prepared.setup() if prepared.setup else ((), {})
    meter = PeakMeter()
    meter.start()
    prepared.target(*args, **kwargs)
    peak = meter.stop()
    return {"peak_mib": peak / 2**20, "method": meter.method, "value_checks": inputs.value_checks_enabled()}


def _set_data_limit(extra_bytes: int | None) -> None:
    if not extra_bytes:
        return
    current = _status_bytes().get("VmData", 0)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = current + int(extra_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def execute(request: dict) -> dict:
    """Run one request in this process; always returns a dict with ``ok``."""
    try:
        _set_data_limit(request.get("data_limit_bytes"))
        module_name, function_name = request["function"].split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        started = time.perf_counter()
        result = function(**request.get("kwargs", {}))
        return {"ok": True, "wall_s": time.perf_counter() - started, **result}
    except BaseException as error:  # noqa: BLE001 - reported to the parent, whatever it is
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def _fork_and_run(request: dict) -> dict:
    timeout = float(request.get("timeout") or DEFAULT_TIMEOUT)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing but this request, then exit without cleanup
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # stdout is the server's protocol channel
        reply = execute(request)
        try:
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(reply))
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, deadline, timed_out = [], time.monotonic() + timeout, False
    with os.fdopen(read_end, "rb") as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([pipe], [], [], left)
            if ready:
                chunk = os.read(pipe.fileno(), 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "timeout": True}
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        hint = " (likely the out-of-memory killer)" if number == signal.SIGKILL else ""
        return {"ok": False, "error": f"the probe process was killed by signal {number}{hint}"}
    try:
        return json.loads(b"".join(chunks).decode())
    except ValueError:
        return {"ok": False, "error": f"the probe process exited with status {os.WEXITSTATUS(status)} and no result"}


def _preload() -> None:
    """Import what the children need, without running any tensor op here (a thread pool started
    before fork would not survive into the children)."""
    import torch
    import torch._dynamo  # the custom ops import it on their first call

    from bench import baselines, harness
    from cossim_fast.backends import dispatch

    for name in dispatch.BACKEND_NAMES:
        dispatch.load_backend(name)
    del torch, baselines, harness


def serve() -> None:
    """The fork server: preload, then one forked child per request line on stdin."""
    _preload()

    for line in sys.stdin:
        if line.strip():
            sys.stdout.write(json.dumps(_fork_and_run(json.loads(line))) + "\n")
            sys.stdout.flush()


# ----------------------------------------------------------------------------- the client


class MemoryProbe:
    """Runs requests in fresh processes (``mode``: "fork" through a server, or "spawn")."""

    def __init__(self, mode: str | None = None) -> None:
        mode = mode or os.environ.get("COSSIM_BENCH_MEMPROBE") or ("fork" if hasattr(os, "fork") else "spawn")
        if mode not in ("fork", "spawn"):
            raise ValueError(f"COSSIM_BENCH_MEMPROBE must be 'fork' or 'spawn', got {mode!r}")
        self.mode = mode
        self.server: subprocess.Popen | None = None
        self.log_path = os.path.join(tempfile.gettempdir(), f"cossim_bench_memprobe_{os.getpid()}.log")

    def describe(self) -> str:
        return "fresh process per case (forked from a clean preloaded server)" if self.mode == "fork" else "fresh interpreter per case"

    def _env(self) -> dict:
        from bench import harness

        env = harness.python_path_env()
        env.setdefault("PYTHONUNBUFFERED", "1")
        for key, value in LIVE_TENSOR_MALLOC_ENV.items():
            env.setdefault(key, value)
        return env

    def _start(self) -> subprocess.Popen:
        if self.server is None or self.server.poll() is not None:
            from bench import harness

            log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the server's life
            self.server = subprocess.Popen(
                [sys.executable, "-m", "bench.memprobe", "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=harness.repo_root(),
                env=self._env(),
            )
            log.close()
        return self.server

    def run(self, request: dict) -> dict:
        request = dict(request)
        if "function" not in request:  # shorthand for a benchmark case (``check_values``: default off)
            kwargs = {"case": request["case"], "check_values": bool(request.get("check_values", False))}
            request = {"function": "bench.memprobe:case_peak", "kwargs": kwargs,
                       **{k: v for k, v in request.items() if k not in ("kind", "case", "check_values")}}
        timeout = float(request.setdefault("timeout", DEFAULT_TIMEOUT))
        if self.mode == "spawn":
            return self._run_spawned(request, timeout)
        server = self._start()
        try:
            server.stdin.write((json.dumps(request) + "\n").encode())
            server.stdin.flush()
            ready, _, _ = select.select([server.stdout], [], [], timeout + 120)
            line = server.stdout.readline() if ready else b""
        except (BrokenPipeError, OSError) as error:
            line, reason = b"", f"{type(error).__name__}: {error}"
        else:
            reason = "no reply in time" if not ready else "the probe server exited"
        if not line:
            self.close()
            return {"ok": False, "error": f"memory probe server failed ({reason}); see {self.log_path}"}
        return json.loads(line)

    def _run_spawned(self, request: dict, timeout: float) -> dict:
        from bench import harness

        try:
            done = subprocess.run(
                [sys.executable, "-m", "bench.memprobe", "--once"],
                input=json.dumps(request),
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=harness.repo_root(),
                env=self._env(),
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s", "timeout": True}
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            hint = " (likely the out-of-memory killer)" if done.returncode == -signal.SIGKILL else ""
            return {"ok": False, "error": f"probe exited with {done.returncode}{hint}: {done.stderr.strip()[-2000:]}"}
        return json.loads(lines[-1])

    def close(self) -> None:
        if self.server is not None:
            try:
                self.server.stdin.close()
                self.server.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.server.kill()
            self.server = None


_shared: MemoryProbe | None = None


def shared_probe() -> MemoryProbe:
    global _shared
    if _shared is None:
        _shared = MemoryProbe()
        atexit.register(_shared.close)
    return _shared


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:
        serve()
        return 0
    if argv == ["--once"]:
        print(json.dumps(execute(json.loads(sys.stdin.read()))))
        return 0
    print("usage: python -m bench.memprobe --serve | --once  (internal: used by the benchmarks)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
