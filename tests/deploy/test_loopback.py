"""A real federation on 127.0.0.1, step by step as docs/deployment.md: a TLS SuperLink with SuperNode
authentication and a state database, three hospitals started with `medfusion-fl site run`, an
unregistered hospital refused, DP + secure aggregation, a hospital that has not approved the app
refusing round 1 and joining the resumed run after `site approve`, the coordinator killed after round 1
and resumed, that hospital killed in round 2 after it trained (the others' shares rebuild its masks),
and a tampered privacy ledger refused. Every process is stopped at the end, also on failure.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.deployment
BIN = Path(sys.executable).parent
SITES = ("H1", "H2", "H3")


class Processes:
    """Background processes, each in its own process group (so its children stop with it)."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env, self.running = logs, env, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.running[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.running.pop(name)
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def crash(self, name: str) -> None:
        """SIGKILL, as a power cut would: no goodbye to the SuperLink."""
        proc = self.running.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def count(self, name: str, text: str) -> int:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace").count(text) if path.exists() else 0

    def received(self, name: str, run_id: str, text: str) -> int:
        """How often `text` was logged for run `run_id` (a restarted SuperNode also logs stale messages of the
        run that was stopped, which it ignores)."""
        current, count = "", 0
        for line in self.tail(name, limit=None).splitlines():
            found = re.search(r"\[RUN (\d+)\]", line)
            if found:
                current = found.group(1)
            elif text in line and current == run_id:
                count += 1
        return count

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def tail(self, name: str, limit: int | None = 3000) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text[-limit:] if limit else text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(what: str, ready: Callable[[], bool], timeout: float, procs: Processes, log: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{procs.tail(log)}")
        time.sleep(1.0)


def _cold_start(env: dict[str, str]) -> float:
    """Seconds this machine takes now to start one ClientApp process (Python, torch, flwr, the site's code):
    the unit of every secure stage at a deployed site (a process per message), measured, not assumed."""
    code = "import flwr.clientapp, torch, medfusion_fl.site, client.client_app"
    times = []
    for _ in range(2):  # the second start has a warm page cache, like the SuperNodes' later messages
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=300)
        times.append(time.monotonic() - start)
    return max(times)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop_from_console(runs: Path, name: str, flwr_home: Path) -> dict[str, str]:
    """POST /api/jobs/NAME/stop to a console on `runs` that knows the SuperLink as the flwr connection
    "coordinator"; returns its answer."""
    from fastapi.testclient import TestClient

    from medfusion_fl.webconsole.app import create_app
    from medfusion_fl.webconsole.auth import add_user

    app = create_app(runs_dir=runs, app_dir=REPO, superlink="coordinator")
    with app.state.sessions() as session:
        add_user(session, "otto", "operator", "correct horse battery")
    client = TestClient(app)
    csrf = client.post("/api/login", json={"name": "otto", "password": "correct horse battery"}).json()["csrf"]
    old = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)  # where `flwr` finds the "coordinator" connection
    try:
        answer = client.post(f"/api/jobs/{name}/stop", headers={"X-CSRF-Token": csrf})
    finally:
        if old is None:
            os.environ.pop("FLWR_HOME")
        else:
            os.environ["FLWR_HOME"] = old
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_loopback_federation_with_tls_auth_loss_and_resume(tmp_path: Path) -> None:
    home, certs, data, run_dir = tmp_path / "flwr-home", tmp_path / "certs", tmp_path / "data", tmp_path / "run"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(home)}
    procs = Processes(tmp_path / "logs", env)

    def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done

    port = _free_port()
    superlink = [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.pem"),
                 "--ssl-certfile", str(certs / "superlink.pem"), "--ssl-keyfile", str(certs / "superlink.key"),
                 "--enable-supernode-auth", "--database", str(tmp_path / "superlink.db"),
                 "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
    # DP and secure aggregation are the defaults. Federated evaluation is off here: each secure stage costs a
    # deployed SuperNode 6-10 s (polling, a process per message), so its four stages would add ~150 s to CI;
    # the secure evaluation runs on Ray in tests/test_simulation.py and in-process in tests/release/.
    # The reply timeout decides only when the coordinator gives up on H3 (killed mid-round): it must outlast
    # every honest stage, about a dozen process starts on the slowest (train: start, load, DP-SGD, encode),
    # so it is derived from this machine's measured start-up; the other waits scale with it.
    startup = _cold_start(env)
    reply_timeout = max(60, round(12 * startup))
    slow = reply_timeout / 60
    logging.getLogger(__name__).info("ClientApp cold start %.1f s: rounds.reply-timeout = %d s", startup,
                                     reply_timeout)
    config = ('data.source="folders" data.test-path="{test}" output.run-dir="{run}" model.backbone="test_resnet" '
              'rounds.num-server-rounds=2 rounds.min-sites=2 rounds.wait-for-sites={wait} '
              'rounds.reply-timeout={reply} train.local-epochs=1 rounds.fraction-evaluate=0'
              ).format(test=data / "test", run=run_dir, wait=round(60 * slow), reply=reply_timeout)
    try:
        # 0. the app as the coordinator will ship it (`flwr run` builds the same bytes)
        from flwr.cli.build import build_fab_from_disk

        (tmp_path / "app.fab").write_bytes(build_fab_from_disk(REPO))
        # 1. key material and three synthetic hospitals (a fourth key is never registered)
        run(str(BIN / "medfusion-fl"), "certs", "--out", str(certs), "--host", "127.0.0.1", "--host", "localhost",
            *[a for s in (*SITES, "H4") for a in ("--site", s)])
        run(str(BIN / "medfusion-fl"), "synth", "--sites", "3", "--out", str(data),
            "--set", "synth.patients-per-site=30", "--set", "synth.test-patients=30")
        # 2. the coordinator: TLS, SuperNode authentication, a persistent state database
        procs.start("superlink", superlink)
        _wait("the SuperLink port", lambda: _port_open(port), 60, procs, "superlink")
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "coordinator"\n\n[superlink.coordinator]\n'
                                          f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.pem"}"\n')
        # 3. register each hospital's public key
        node_ids = {}
        for site in SITES:
            done = run(str(BIN / "flwr"), "supernode", "register", str(certs / "sites" / site / "auth_key.pub"),
                       "coordinator", "--name", site)
            node_ids[site] = int(re.search(r"SuperNode (\d+) registered", done.stdout).group(1))  # type: ignore[union-attr]
        # 4. each hospital checks its data and starts its SuperNode
        for k, site in enumerate(SITES):
            (tmp_path / f"{site}.toml").write_text(
                f'[site]\nsite-id = "{site}"\ndata-path = "data/site-{k}"\nstate-dir = "state/{site}"\n'
                f'federation = "loopback"\n\n[policy]\nmax-epsilon = 100.0\ndelta = 1e-5\nmin-sites = 2\n\n'
                f'[superlink]\naddress = "127.0.0.1:{port}"\nroot-certificates = "certs/ca.pem"\n'
                f'auth-key = "certs/sites/{site}/auth_key"\nruntime-port = {_free_port()}\n\n'
                f'[run]\nconfig = "{REPO / "pyproject.toml"}"\n')
            if site != "H3":  # H1 and H2 reviewed and approved the app; H3 has not yet
                run(str(BIN / "medfusion-fl"), "site", "approve", "app.fab", "--config", f"{site}.toml",
                    "--note", "reviewed")
            procs.start(site, [str(BIN / "medfusion-fl"), "site", "run", "--config", str(tmp_path / f"{site}.toml")])
        # an unregistered key is refused by the SuperLink
        stranger = procs.start("H4", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates",
            str(certs / "ca.pem"), "--auth-supernode-private-key", str(certs / "sites" / "H4" / "auth_key"),
            "--node-config", f'data-path="{data / "site-0"}"', "--port", str(_free_port()), "--max-retries", "1"])
        _wait("the unregistered SuperNode to give up", lambda: stranger.poll() is not None, 120, procs, "H4")
        assert stranger.returncode != 0 and procs.count("H4", "Failed to activate SuperNode") == 1
        procs.stop("H4")  # its helper processes
        # 5. the researcher starts 2 rounds; H3 refuses the unapproved app; after round 1 an operator stops the
        # run from the console (Flower's `flwr stop`) and the coordinator dies
        first_run = procs.start("run-1", [str(BIN / "flwr"), "run", str(REPO), "coordinator", "--stream",
                                          "--run-config", config])
        first = run_dir / "checkpoints" / "round-0001.pt"
        _wait("round 1's checkpoint", first.exists, 420 * slow, procs, "run-1")
        # the operator stops it from the console, which goes through Flower's own `flwr stop`
        stop = _stop_from_console(tmp_path, run_dir.name, home)
        assert "stop sent through flwr stop" in stop["status"], stop
        _wait("`flwr run` to see its run stopped", lambda: first_run.poll() is not None, 120, procs, "run-1")
        procs.stop("superlink")
        procs.stop("run-1")
        assert not (run_dir / "checkpoints" / "round-0002.pt").exists()
        # 6. H3's IT reviews the app by the hash in its refusal (the site kept the FAB, unopened) and approves it
        refusal = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["failures"]
        sha = re.search(r"app sha256:([0-9a-f]{12})\.\.\. is not approved at site H3", refusal[0]["reason"])
        assert sha and [f["code"] for f in refusal] == [4003], refusal
        kept = next((tmp_path / "state" / "H3" / "apps").glob(f"{sha.group(1)}*.fab"))
        review = run(str(BIN / "medfusion-fl"), "site", "review", kept.stem, "--config", "H3.toml").stdout
        assert "not approved at H3" in review and "client/client_app.py" in review, review
        run(str(BIN / "medfusion-fl"), "site", "approve", kept.stem, "--config", "H3.toml")
        # 7. the coordinator restarts on the same database; the run resumes with H3, which trains round 2 and
        # dies at its second secure stage
        procs.start("superlink", superlink)
        _wait("the restarted SuperLink", lambda: _port_open(port), 60, procs, "superlink")
        resumed = procs.start("run-2", [str(BIN / "flwr"), "run", str(REPO), "coordinator", "--stream",
                                         "--run-config", config + " output.resume=true"])
        started = re.compile(r"Successfully started run (\d+)")
        _wait("the resumed run's id", lambda: bool(started.search(procs.tail("run-2", limit=None))), 120, procs,
              "run-2")
        run_id = started.search(procs.tail("run-2", limit=None)).group(1)  # type: ignore[union-attr]
        _wait("H3 to receive round 2's key sharing", lambda: procs.received(
            "H3", run_id, "Receiving: train.secagg_share") >= 1, 400 * slow, procs, "H3")
        procs.crash("H3")
        _wait("the resumed run to finish", lambda: resumed.poll() is not None, 600 * slow, procs, "run-2")
        assert resumed.returncode == 0, procs.tail("run-2")
    finally:
        procs.stop_all()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2] and all(line["status"] == "ok" for line in lines)
    assert [sorted(line["train"]["sites"]) for line in lines] == [["H1", "H2"], ["H1", "H2"]]
    lost = lines[1]["failures"]  # H3's death is recorded under its own node id, at the stage it was lost
    assert {f["node_id"] for f in lost} == {node_ids["H3"]} and {f["stage"] for f in lost} <= {
        "secagg_share", "secagg_mask"} and 4003 not in {f["code"] for f in lost}, lost
    from medfusion_fl.privacy import PrivacyLedger

    # H3 joined: it trained round 2 of the resumed run. When the killed coordinator had already queued its own
    # round 2, the restarted SuperLink may still deliver that instruction to the now-approved H3, which trains
    # it (the reply is ignored: that run is no longer running); the ledger counts that spend too, as it must.
    trained = PrivacyLedger(tmp_path / "state" / "H3").entries("loopback")
    assert {entry.round for entry in trained} == {2} and 1 <= len(trained) <= 2, trained
    assert trained[-1].key.startswith(f"{run_id}/2/")
    assert all(line["secure_aggregation"]["sites"] >= 2 for line in lines)
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["rounds"] == 2 and card["export_check"]["max_abs_diff"] <= 1e-4
    refusals = card["privacy"]["refused_by_site_policy"]  # keyed by node id: an app refusal carries no site record
    assert [reason for reason in refusals.values() if "not approved at site H3" in reason], refusals
    assert (run_dir / "model.onnx").stat().st_size > 0
    assert "resuming from" in procs.tail("run-2")
    for site in ("H1", "H2"):  # every message a hospital sent is in its audit log, the chain intact
        audit = subprocess.run([str(BIN / "medfusion-fl"), "site", "audit", str(tmp_path / "state" / site)],
                               capture_output=True, text=True, timeout=60)
        assert audit.returncode == 0 and "hash chain intact" in audit.stdout, audit.stdout + audit.stderr
    # 8. a hospital's ledger loses the entry of round 2: the site refuses to start, its spend is not reset
    ledger = tmp_path / "state" / "H1" / "privacy_ledger.jsonl"
    ledger.write_bytes(ledger.read_bytes().splitlines(keepends=True)[0])
    refused = subprocess.run([str(BIN / "medfusion-fl"), "site", "run", "--config", str(tmp_path / "H1.toml"),
                              "--dry-run"], capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 1 and "failed its integrity check" in refused.stderr, refused.stderr
