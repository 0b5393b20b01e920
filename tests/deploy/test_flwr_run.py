"""The coordinator's own entry point as the README gives it, in a clean checkout: `flwr run .` on Flower's
default 2 SuperNodes fails visibly, naming the fix; `flwr run . --federation-config num-supernodes=3 --stream`
runs the pyproject defaults through all their rounds and exports the model. The local SuperLink this test starts
(its own FLWR_HOME) is stopped at the end, also on failure."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.deployment
FLWR = str(Path(sys.executable).parent / "flwr")
LOCAL_SUPERLINK = "http://127.0.0.1:39091/health"  # where `flwr run` looks for (and starts) its local SuperLink


def _answers() -> bool:
    try:
        return httpx.get(LOCAL_SUPERLINK, timeout=1.0).is_success
    except httpx.HTTPError:
        return False


def _ours(home: Path) -> list[int]:
    """The processes started for this test's FLWR_HOME (the SuperLink names its log file there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(home) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    if _answers():
        pytest.fail("a local SuperLink that this test did not start answers on 127.0.0.1:39091; stop it "
                    "(`pkill -f flower-superlink`) and run the test again")
    app = tmp_path / "app"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (REPO / name).is_file():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            (app / name).write_bytes((REPO / name).read_bytes())
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
    try:
        yield app, env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _ours(home):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while _ours(home) and time.monotonic() < deadline:
                time.sleep(0.2)
        assert not _answers(), "the test's local SuperLink still answers after it was stopped"


def _flwr_run(app: Path, env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLWR, "run", ".", *args], cwd=app, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_flwr_run_as_the_readme_gives_it(checkout: tuple[Path, dict[str, str]]) -> None:
    app, env = checkout
    # Flower's default local federation: 2 SuperNodes for a run that needs 3 sites in every sum
    failed = _flwr_run(app, env, "--stream", "--run-config", "rounds.wait-for-sites=3", timeout=240)
    said = failed.stdout + failed.stderr
    assert "2 of the 3 sites a round needs are connected" in said
    assert "only 2 site(s) connected" in said and "--federation-config num-supernodes=3 --stream" in said

    done = _flwr_run(app, env, "--federation-config", "num-supernodes=3", "--stream", timeout=480)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert "round 3/3" in said and "run complete: 3 of 3 rounds" in said, said[-3000:]
    run_dir = app / "runs" / "flwr-run"  # relative to where the local SuperLink started: the app folder
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["run_status"] == {**card["run_status"], "status": "complete", "rounds": 3, "planned": 3}
    assert (run_dir / "model.onnx").stat().st_size > 0 and card["export_check"]["max_abs_diff"] <= 1e-4
    spent = card["privacy"]["differential_privacy"]["sites"]
    assert len(spent) == 3 and all(site["epsilon"] <= site["max-epsilon"] for site in spent.values())
