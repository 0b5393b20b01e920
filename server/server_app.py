"""ServerApp of the coordinator: runs the configured federation and exports the global model."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfusion_fl import stopping
from medfusion_fl.config import RunConfig
from medfusion_fl.console import ensure_logging
from server.federation import Federation

log = logging.getLogger("medfusion_fl.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    ensure_logging()
    with stopping.coordinating():  # a stopping simulation waits for this, and only this, thread
        _run(grid, context)


def _run(grid: Grid, context: Context) -> None:
    # 1. parse the run config once (pyproject defaults + --run-config overrides)
    run = RunConfig.from_flat(context.run_config)
    log.info("run %s: %s, %d rounds, backbone %s", run.output.run_dir, run.strategy.name,
             run.rounds.num_server_rounds, run.model.backbone)
    # 2. build the global model and the held-out set
    federation = Federation(run)
    federation.folder.record_flower_run(context.run_id)  # `flwr stop <id>` stops it (the console uses that)
    # 3. rounds: train -> aggregate -> evaluate -> checkpoint -> metrics
    final = federation.run_rounds(grid)
    if federation.paused:  # paused after a round: resumed later with output.resume = true
        return
    # 4. export model.onnx + model_card.json next to the metrics
    federation.export(final)
