"""Shared fixtures: tiny configs and synthetic site folders (32x32 images, 2 views, 2-3 sites)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Fuzz and property tests: "ci" keeps the whole fuzz tier under about two minutes on 2 cores;
# HYPOTHESIS_PROFILE=thorough runs 25x the examples for a longer hunt.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from medfusion_fl.config import RunConfig  # noqa: E402
from medfusion_fl.data import write_federation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# pytest-xdist (pyproject's addopts): the workers share the machine's cores instead of each taking all of them
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
TINY = {
    "model.backbone": "test_resnet",
    "synth.patients-per-site": 40,
    "synth.test-patients": 40,
    "train.local-epochs": 1,
    "rounds.wait-for-sites": 5.0,
    "rounds.reply-timeout": 120.0,
}


# The plain engine (no DP, no secure aggregation) for tests of what lies under them: explicit keys, as a user
# would set them, and a site policy that allows it (the defaults of both are the private setting).
PLAIN = {"privacy.enabled": False, "secagg.enabled": False, "rounds.min-sites": 2}
OPEN_POLICY = {"require-dp": False, "require-secure-aggregation": False, "min-sites": 2}


def tiny_flat(root: Path, **overrides: Any) -> dict[str, Any]:
    """A small run config (flat keys) whose sites and outputs live under `root`."""
    return {**TINY, "data.sites-root": str(root / "data"), "output.run-dir": str(root / "run"), **overrides}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic sites + a held-out folder, written once per test session."""
    root = tmp_path_factory.mktemp("federation")
    write_federation(root / "data", RunConfig.from_flat(tiny_flat(root)), 3)
    return root


@pytest.fixture
def tiny_run(synth_root: Path) -> RunConfig:
    return RunConfig.from_flat(tiny_flat(synth_root))


@pytest.fixture
def plain_run(synth_root: Path) -> RunConfig:
    return RunConfig.from_flat(tiny_flat(synth_root, **PLAIN))


@pytest.fixture
def package_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog that sees the package's records (INFO and up) even after a CLI test has set the package's logger
    not to propagate (console.configure_logging), whatever order the tests run in."""
    logger = logging.getLogger("medfusion_fl")
    caplog.set_level(logging.INFO, logger="medfusion_fl")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


SLOW_KINDS = ("simulation", "deployment", "browser")
# Over ~10 s each on a 2-core VM (pytest's slowest-durations list, 2026-12-07), beyond the kinds above: node ids,
# a prefix marking every parameter of a test (or every test of a module)
SLOW_TESTS = (
    "tests/models/test_contract.py::test_every_backbone_family[",
    "tests/models/test_contract.py::test_every_2d_family_takes_attention_supervision[",
    "tests/test_dp_sgd.py::test_clipped_gradient_equals_per_patient_loop[efficientnet",
    "tests/test_dp_sgd.py::test_clipped_gradient_equals_per_patient_loop[resnet-bf16]",
    "tests/server/test_volumes.py::",
    "tests/server/test_privacy_rounds.py::",
    "tests/server/test_pause.py::",
    "tests/server/test_evaluation_schedule.py::test_sites_release",
    "tests/server/test_evaluation_schedule.py::test_under_a_budget_split",
    "tests/server/test_federation.py::test_bad_site_is_recorded_and_the_federation_goes_on",
    "tests/release/test_outbound.py::test_what_left_the_sites_of_a_default_federation",
    "tests/test_multigpu.py::test_two_processes_train_the_one_process_round[",
    "tests/attention/test_training.py::test_the_gate_sits_on_the_deepest_stage",
    "tests/test_export.py::test_export_cli_redoes_export_from_a_checkpoint",
    "tests/test_tracking.py::test_a_run_writes_event_files_with_the_round_curves",
    # over 25 s in the fast tier's own run beside a benchmark (2026-12-07): ~12 s and more alone
    "tests/server/test_strategy_rounds.py::test_a_run_stopped_after_round_2_and_resumed",
    "tests/server/test_strategy_rounds.py::test_strategies_that_need_each_update_run_without_secure_aggregation",
    "tests/test_lint.py::test_mypy_clean_core",
    "tests/test_bookkeeping.py::test_clipped_sum_equals_per_patient_loop[efficientnet",
    "tests/test_bookkeeping.py::test_clipped_sum_equals_per_patient_loop[mobilenetv2-checkpointing]",
    "tests/explain/test_pointing_game.py::",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that opens a page (tests/browser.open_page) is a browser test; every simulation, deployment and
    browser test is slow: `-m 'not slow'` is the fast tier (README), CI runs everything."""
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and "open_page" in function.__code__.co_names:
            item.add_marker(pytest.mark.browser)
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS) or item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("simulation") or item.get_closest_marker("deployment"):
            item.add_marker(pytest.mark.xdist_group("processes"))  # one worker runs Ray/Flower tests in turn
