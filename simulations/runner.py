"""Run the Flower app of a folder with Flower's in-process simulation engine (Ray).

This is what `flwr run .` does in its local SuperLink, without leaving a SuperLink running:
the ServerApp and the ClientApps are loaded from the app folder by their pyproject names and
receive the run config (pyproject defaults fused with our overrides) through their Context.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
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

log = logging.getLogger("medfusion_fl.simulate")


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
    _run_simulation(
        server_app_attr=components["serverapp"], client_app_attr=components["clientapp"],
        num_supernodes=num_sites, backend_name="ray", backend_config=backend_config,  # type: ignore[arg-type]
        app_dir=str(app_dir), run=run, server_app_context=context, is_app=True,
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
    )
