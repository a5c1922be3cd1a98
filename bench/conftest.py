"""pytest options and parametrization of the benchmark suite (``python -m pytest bench/ --benchmark-only``).

Options (each also settable by environment variable, see ``bench/README.md``):
``--bench-grid cpu|gpu|full``, ``--bench-device cpu|cuda``, ``--bench-ops``, ``--bench-impls``,
``--bench-check-values``, ``--bench-no-memory``.

``--benchmark-json`` files also get bench.run's ``skipped`` (``{"case", "reason"}``) and
``errors`` (``{"case", "error"}``) lists, which pytest-benchmark leaves out, so that
``bench.report`` and ``bench.targets`` can say why a case has no result.
"""

from __future__ import annotations

import importlib.util

import pytest

from bench import harness


def pytest_addoption(parser):
    group = parser.getgroup("cossim_fast benchmarks")
    group.addoption(
        "--bench-grid",
        choices=tuple(harness.GRIDS),
        default=None,
        help="sizes to benchmark: cpu (default without a GPU), gpu (reduced, default with one) or full "
        "(N up to 131072, M up to 4096, C in {256, 2048}); COSSIM_BENCH_N/M/C/DTYPES override its lists",
    )
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    group.addoption("--bench-ops", default=None, help=f"comma-separated subset of {','.join(harness.OPS)}")
    group.addoption("--bench-impls", default=None, help=f"comma-separated subset of {','.join(harness.IMPLS)}")
    group.addoption(
        "--bench-check-values", action="store_true", help="keep the package's data-reading value checks on (default: off)"
    )
    group.addoption("--bench-no-memory", action="store_true", help="do not measure peak memory (faster)")


#: The cases of this session without a result: {"skipped": [...], "errors": [...]}.
_UNMEASURED = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    case = getattr(item, "callspec", None) and item.callspec.params.get("bench_case")
    if not isinstance(case, harness.Case) or not (report.skipped or report.failed):
        return
    unmeasured = item.config.stash.setdefault(_UNMEASURED, {"skipped": [], "errors": []})
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        unmeasured["skipped"].append({"case": case.id, "reason": reason.removeprefix("Skipped: ")})
    elif call.excinfo is not None:
        error = f"{call.excinfo.typename}: {call.excinfo.value}"
        unmeasured["errors"].append({"case": case.id, "error": error[:2000], "traceback": report.longreprtext[-3000:]})


def _split(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        config = metafunc.config
        cases = harness.grid_cases(
            config.getoption("bench_grid"),
            config.getoption("bench_device"),
            ops=_split(config.getoption("bench_ops")),
            impls=_split(config.getoption("bench_impls")),
        )
        metafunc.parametrize("bench_case", cases, ids=[case.id for case in cases])


@pytest.fixture(scope="session")
def bench_settings(pytestconfig):
    harness.configure_for_benchmarks(pytestconfig.getoption("bench_check_values"))
    yield {"measure_memory": not pytestconfig.getoption("bench_no_memory")}
    harness.clear_cache()


if importlib.util.find_spec("pytest_benchmark") is not None:

    def pytest_benchmark_update_machine_info(config, machine_info):
        machine_info["cossim_fast_bench"] = harness.machine()

    def pytest_benchmark_update_json(config, benchmarks, output_json):
        output_json.update(config.stash.get(_UNMEASURED, {"skipped": [], "errors": []}))
