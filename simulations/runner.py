"""Run the Flower app of a folder with Flower's in-process simulation engine (Ray).

This is what `flwr run .` does in its local SuperLink, without leaving a SuperLink running:
the ServerApp and the ClientApps are loaded from the app folder by their pyproject names and
receive the run config (pyproject defaults fused with our overrides) through their Context.

It fails fast and leaves nothing behind: SIGINT or SIGTERM, or Flower's runtime crashing (Ray not starting, no
actor fitting the requested resources), asks the coordinator to stop at its next poll (medfusion_fl.stopping),
waits a few seconds for its thread, stops every process the simulation started (simulations/processes.py) and
raises SimulationFailed (or RunStopped) with the cause. The run folder keeps its last complete round.
"""

from __future__ import annotations

import importlib
import logging
import random
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from medfusion_fl import stopping
from medfusion_fl.errors import MedFusionError, RunStopped, SimulationFailed
from medfusion_fl.randomness import derive
from simulations import processes

log = logging.getLogger("medfusion_fl.simulate")
GRACE_S = 2.0  # how long the coordinator's thread may take to reach its next poll once asked to stop
REDELIVER_S = 0.05  # when a signal whose exception was swallowed comes again
STOP_GRACE_S = 0.5  # how long Ray's processes may take to exit on SIGTERM once the run has been stopped


class _Signalled(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM (a KeyboardInterrupt, so Flower's own handlers let it
    through and stop the runtime on the way out)."""


@contextmanager
def _stop_on_signals(keep: set[int]) -> Iterator[None]:
    """SIGINT and SIGTERM stop the run: the coordinator at its next poll, and Ray's workers and helper processes
    (not its GCS and raylet, which the driver's disconnect still talks to; nor `keep`) at once, so that Ray's own
    shutdown, which stops its processes one after another with a second's grace each, finds them gone."""

    closing = threading.Event()  # set when the block is left: no signal is delivered again after it
    redeliveries: list[threading.Thread] = []

    def handle(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        stopping.request(f"{name} received")
        flower.setLevel(logging.CRITICAL)  # its tracebacks of the actors stopped here would bury the one line
        processes.signal_descendants(signal.SIGTERM, exclude=keep, spare=("gcs_server", "raylet"))
        raise _Signalled(name)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    flower = logging.getLogger("flwr")
    level = flower.level
    unraisable_hook = sys.unraisablehook

    def redeliver_swallowed(unraisable: Any) -> None:
        """Python runs a signal's handler wherever the main thread is, and some places swallow what it raises
        ("Exception ignored in"): an at-fork hook (logging's _releaseLock, after Ray forks a process), a __del__.
        The run would go on until Ray's start timed out, 30 s later. Such a _Signalled is delivered again."""
        if not isinstance(unraisable.exc_value, _Signalled):
            unraisable_hook(unraisable)
            return
        name = str(unraisable.exc_value)
        log.debug("%s's exception was swallowed in %r; delivering it again", name, unraisable.object)
        redelivery = threading.Thread(target=_redeliver, args=(signal.Signals[name], closing),
                                      name="signal-redelivery", daemon=True)
        redeliveries.append(redelivery)
        redelivery.start()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    sys.unraisablehook = redeliver_swallowed
    try:
        # ray.init sets its own SIGTERM handler (sys.exit), which would skip the stop of Ray's workers above
        with _replaced("ray._private.utils", "set_sigterm_handler", _keep_ours):
            yield
    finally:
        closing.set()
        for redelivery in redeliveries:  # none may send its signal once the default handlers are back
            redelivery.join()
        sys.unraisablehook = unraisable_hook
        for sig, old in previous.items():
            signal.signal(sig, old)
        flower.setLevel(level)


def _redeliver(signum: signal.Signals, closing: threading.Event) -> None:
    """Sends `signum` to the main thread REDELIVER_S from now (out of the place that swallowed it), unless the
    block has been left by then; a real signal, so that a blocking call in the main thread returns."""
    main = threading.main_thread().ident
    if main is not None and not closing.wait(REDELIVER_S):
        signal.pthread_kill(main, signum)


def _keep_ours(_handler: Any) -> None:
    """Stands in for Ray's set_sigterm_handler while a simulation runs: SIGTERM stays ours."""


@contextmanager
def _replaced(module_name: str, attribute: str, replacement: Any) -> Iterator[None]:
    """`module_name.attribute` is `replacement` inside; left alone where the module lacks it (another version)."""
    module = importlib.import_module(module_name)
    original = getattr(module, attribute, None)
    if original is None:
        yield
        return
    setattr(module, attribute, replacement)
    try:
        yield
    finally:
        setattr(module, attribute, original)


@contextmanager
def _seeded_node_ids(seed: int) -> Iterator[None]:
    """Flower gives each simulated SuperNode a random 64-bit id, and the coordinator knows nodes only by them: the
    sites a round samples (rounds.fraction-train < 1) would differ between two runs of one seed. While the
    simulation starts, its link state draws ids from a generator seeded by the run's seed instead (site k gets
    the same id in every run of that seed). Another Flower without that function keeps random ids (only a sampled
    round's choice of sites depends on them)."""
    rng = random.Random(derive(seed, "node-ids"))

    def seeded(num_bytes: int, exclude: set[int] | None = None) -> int:
        while True:
            value = rng.getrandbits(8 * num_bytes - 1) or 1
            if value not in (exclude or set()):
                return value

    with _replaced("flwr.server.superlink.linkstate.in_memory_linkstate", "generate_rand_int_from_bytes", seeded):
        yield


def _cancel_rays_abort_alarm() -> None:
    """Ray's driver installs abseil's failure signal handler for SIGTERM (among others): it prints "*** SIGTERM
    received ***", passes the signal on to Python's handler, and arms alarm(3) whose SIGALRM aborts the process
    (exit -6) in case the handling hangs; nothing disarms it. A stop that takes longer than 3 s (the coordinator
    inside an ONNX export, say) would end in that abort instead of our exit code. No code of ours uses alarm()."""
    if hasattr(signal, "alarm"):
        signal.alarm(0)


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _wait_for_coordinator(grace: float) -> bool:
    """Wait for the coordinator's thread (the ServerApp's main) to end, until `grace` seconds after the stop was
    requested (Flower's runtime shutdown, which ran since, counts); False if it is still running."""
    since = stopping.requested_at()
    deadline = (time.monotonic() if since is None else since) + grace
    return stopping.wait_idle(deadline - time.monotonic())


def run_app(app_dir: Path, overrides: dict[str, Any], *, num_sites: int, cpus_per_site: float,
            gpus_per_site: float) -> None:
    """Run the app in `app_dir` with `num_sites` simulated SuperNodes; raises on failure."""
    app_dir = Path(app_dir).resolve()
    components = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(overrides)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    fused = get_fused_config_from_dir(app_dir, run.override_config)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused)
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site},
        "init_args": {"logging_level": logging.WARNING, "log_to_driver": True},
    }
    log.info("starting Flower simulation: %d sites, app %s", num_sites, app_dir)
    stopping.clear()
    processes.adopt_orphans()  # Ray workers whose raylet went first come back to us, to be stopped
    before = set(processes.descendants())
    try:
        with _stop_on_signals(keep=before), _seeded_node_ids(int(fused.get("train.seed", 0))):
            _run_simulation(
                server_app_attr=components["serverapp"], client_app_attr=components["clientapp"],
                num_supernodes=num_sites, backend_name="ray", backend_config=backend_config,  # type: ignore[arg-type]
                app_dir=str(app_dir), run=run, server_app_context=context, is_app=True,
                exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
            )
    except BaseException as exc:  # a signal, Ray, Flower or our ServerApp: each ends the run here
        _cancel_rays_abort_alarm()
        stopping.request(f"{type(exc).__name__}: {exc}")  # the ServerApp thread leaves its wait at its next poll
        stopped = _wait_for_coordinator(GRACE_S)
        # Ray's GCS can sit on SIGTERM for seconds; it holds nothing of the run's, so it gets little grace here
        left = processes.stop_descendants(exclude=before, grace=STOP_GRACE_S)
        log.debug("stopped %d leftover process(es); coordinator thread %s", left,
                  "ended" if stopped else "still running")
        reported = _explain(exc, cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site)
        if reported is exc:
            raise
        raise reported from exc
    left = processes.stop_descendants(exclude=before)
    if left:
        log.debug("stopped %d process(es) Ray left running", left)


def _explain(exc: BaseException, *, cpus_per_site: float, gpus_per_site: float) -> BaseException:
    """The error `simulate` reports: the first cause, and what to do about it."""
    if isinstance(exc, MedFusionError):  # the coordinator's own (a failed round, a bad checkpoint): as it is
        return exc
    if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:  # ray.init's own SIGTERM handler replaces ours
        exc = _Signalled(signal.SIGTERM.name)
    if isinstance(exc, _Signalled):
        return RunStopped(f"simulation stopped by {exc}; the run folder keeps its last complete round "
                          "(resume with --set output.resume=true)", exit_code=128 + signal.Signals[str(exc)].value)
    if isinstance(exc, KeyboardInterrupt):
        return RunStopped("simulation interrupted; the run folder keeps its last complete round "
                          "(resume with --set output.resume=true)")
    cause = _root_cause(exc)
    if isinstance(cause, RunStopped | SimulationFailed):
        return cause
    text = f"{type(cause).__name__}: {cause}"
    if "ActorPool is empty" in text:
        hint = (f"no simulated site fits this machine's resources (simulation.cpus-per-site = {cpus_per_site:g}, "
                f"simulation.gpus-per-site = {gpus_per_site:g}); lower them, e.g. --set simulation.cpus-per-site=1")
    elif "ray" in type(cause).__module__.lower() or "gcs" in text.lower() or "raylet" in text.lower():
        hint = ("Ray could not start or lost its processes (a loaded machine can overload its GCS); run again, "
                "stop other Ray clusters (`ray stop`), or give the simulation fewer sites per CPU")
    else:
        hint = "see the traceback above; the run folder keeps its last complete round"
    return SimulationFailed(f"the Flower simulation failed ({text}). {hint[:1].upper()}{hint[1:]}.")
