"""The coordinator's peak memory in one training round at 10, 30 and 100 sites of one model (issue 21, point 1).

The coordinator is the real one (server/rounds.run_round: the secure sum of server/secure_round.py, or the plain
round), over a grid whose sites run the real SecAgg+ stages (client/secagg_stages.py) on a synthetic
update instead of training: each site keeps only a seed between stages and builds its update when its masked input
is asked for. Peak memory is
tracemalloc's (numpy's buffers included) over the round, less what was allocated before it. The sites run in a
process of their own, their messages crossing as Flower's protobuf bytes, as Ray's actors do in a simulation.

Baseline, in the same run: the same round over a grid that has every reply ready before the coordinator pulls
the first, as Flower's send_and_receive handed them over before the coordinator summed them (the earlier design).

    python bench/coordinator_memory.py --out bench/results/coordinator-memory-cpu2.json
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
import tomllib
import tracemalloc
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

for _key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"):
    os.environ.setdefault(_key, "0" if _key == "FLWR_TELEMETRY_ENABLED" else "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.proto.message_pb2 import Message as ProtoMessage  # noqa: E402
from stepbench import write_report  # noqa: E402

from client import secagg_stages  # noqa: E402
from client.client_app import _secure_stage  # noqa: E402
from medfusion_fl.config import RunConfig  # noqa: E402
from medfusion_fl.console import ensure_logging  # noqa: E402
from medfusion_fl.models import build_model  # noqa: E402
from medfusion_fl.parameters import Weights, get_weights  # noqa: E402
from medfusion_fl.secagg.encoding import input_length  # noqa: E402
from medfusion_fl.site_config import SiteConfig  # noqa: E402
from server.rounds import run_round  # noqa: E402
from simulations.inprocess import InProcessGrid  # noqa: E402
from strategies import build_strategy  # noqa: E402

log = logging.getLogger("medfusion_fl.bench.coordinator_memory")
COHORT = 100  # each synthetic site's FedAvg weight


def _update(weights: Weights, seed: int) -> Weights:
    """A site's local weights: the global ones plus a small seeded step (what training would change)."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 1e-3, v.shape).astype(v.dtype)) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in weights.items()}


def synthetic_sites(weights: Weights) -> ClientApp:
    """Sites that answer the plain round and the four SecAgg+ stages over a seeded synthetic update."""
    app = ClientApp()

    def site_record(context: Context) -> tuple[RunConfig, SiteConfig]:
        run = RunConfig.from_flat(context.run_config)
        return run, SiteConfig.from_node_config(context.node_config, run)

    @app.train()
    def plain(msg: Message, context: Context) -> Message:
        _, site = site_record(context)
        local = _update(weights, int(context.node_config["partition-id"]))
        return Message(content=RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
            "metrics": MetricRecord({"num-examples": COHORT}),
            "site": ConfigRecord({"site-id": site.site_id})}), reply_to=msg)

    @app.train("secagg_advertise")
    def advertise(msg: Message, context: Context) -> Message:
        run, site = site_record(context)
        setup, party = secagg_stages.check_instruction(
            msg.content, context.state, run, length=input_length(weights, with_loss=not run.privacy.enabled),
            modulus=secagg_stages.training_modulus(run), policy=site.policy, site_id=site.site_id, work="train")
        keys = secagg_stages.start(context.state, setup, party, np.zeros(0, setup.dtype))
        del context.state[secagg_stages.INPUT]  # rebuilt from the seed at stage 3: only the coordinator accumulates
        return Message(content=RecordDict({"site": ConfigRecord({"site-id": site.site_id}), "secagg": keys}),
                       reply_to=msg)

    mask_stage = _secure_stage(secagg_stages.mask)

    @app.train("secagg_mask")
    def mask(msg: Message, context: Context) -> Message:
        run, _ = site_record(context)
        setup = secagg_stages.round_setup(context.state, msg.content)
        local = _update(weights, int(context.node_config["partition-id"]))
        vector = secagg_stages.training_input(run, setup, weights, local, weight=COHORT, loss=0.0)
        context.state[secagg_stages.INPUT] = ArrayRecord({"vector": Array(vector)})
        return mask_stage(msg, context)

    for name, stage in (("secagg_share", secagg_stages.share), ("secagg_unmask", secagg_stages.unmask)):
        app.train(name)(_secure_stage(stage))
    return app


def _serve_sites(conn: Connection, weights: Weights, run_flat: dict[str, Any], sites: int) -> None:
    """The sites' process: answers each serialized message with its serialized reply until told to stop."""
    grid = InProcessGrid(synthetic_sites(weights), run_flat, num_nodes=sites)
    while (data := conn.recv_bytes()) != b"stop":
        reply = grid._reply(message_from_proto(ProtoMessage.FromString(data)))
        conn.send_bytes(message_to_proto(reply).SerializeToString())


class SiteProcessGrid(InProcessGrid):
    """The in-process grid's message flow, with the sites in a process of their own (as Ray's actors are in a
    simulation): messages and replies cross as Flower's protobuf bytes, and this process holds only the
    coordinator. No audit lists (they would keep every reply alive)."""

    def __init__(self, weights: Weights, run_flat: dict[str, Any], sites: int) -> None:
        super().__init__(ClientApp(), run_flat, num_nodes=sites)
        self.conn, child = mp.get_context("fork").Pipe()
        self.worker = mp.get_context("fork").Process(target=_serve_sites, args=(child, weights, run_flat, sites),
                                                     daemon=True)
        self.worker.start()

    def _reply(self, msg: Message) -> Message:
        self.sent.clear()
        self.received.clear()
        self.conn.send_bytes(message_to_proto(msg).SerializeToString())
        return message_from_proto(ProtoMessage.FromString(self.conn.recv_bytes()))

    def close(self) -> None:
        self.conn.send_bytes(b"stop")
        self.worker.join(timeout=30)


class AllAtOnceGrid(SiteProcessGrid):
    """Baseline: every reply of a stage exists before the coordinator pulls the first."""

    def push_messages(self, messages: Any) -> list[str]:
        ids = super().push_messages(messages)
        self.ready = {mid: self._reply(self.pending.pop(mid)) for mid in ids if mid in self.pending}
        return ids

    def pull_messages(self, message_ids: Any) -> list[Message]:
        mid = next((mid for mid in message_ids if mid in self.ready), None)
        return [] if mid is None else [self.ready.pop(mid)]

    def nothing_in_flight(self, message_ids: Any) -> bool:
        return not any(mid in self.ready for mid in message_ids)


def measure(run: RunConfig, weights: Weights, sites: int, grid_cls: type[SiteProcessGrid]) -> dict[str, Any]:
    tracemalloc.stop()  # the sites' process starts untraced
    grid = grid_cls(weights, run.to_flat(), sites)
    tracemalloc.start()
    strategy = build_strategy(run)
    gc.collect()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    result = run_round(grid, run, strategy, weights, 1, lambda _w, _t: None)
    wall = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - before
    moved = max(float(np.abs(result.weights[k].astype(np.float64) - weights[k]).max())
                for k in weights if np.issubdtype(weights[k].dtype, np.floating))
    if len(result.sites) != sites or not 0 < moved < 0.1:
        raise RuntimeError(f"{sites} sites: {len(result.sites)} in the sum, the model moved by {moved}")
    grid.close()
    del result, grid
    return {"peak_mb": round(peak / 2**20, 1), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="10,30,100")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ensure_logging(logging.WARNING)
    log.setLevel(logging.INFO)
    root = Path(tempfile.mkdtemp(prefix="coordinator-memory-"))
    preset = tomllib.loads((ROOT / "simulations/presets/tiny-cpu.toml").read_text())["config"]
    base = {**preset, "rounds.min-sites": 3, "rounds.fraction-evaluate": 0.0, "privacy.enabled": False,
            "data.sites-root": str(root / "data"), "output.run-dir": str(root / "run")}
    weights = get_weights(build_model(RunConfig.from_flat(base), seed=0))
    params = sum(v.size for v in weights.values())
    rows = []
    for mode in ("secure", "plain"):
        run = RunConfig.from_flat({**base, "secagg.enabled": mode == "secure"})
        for sites in (int(s) for s in args.sites.split(",")):
            row = {"mode": mode, "sites": sites, "neighbours": run.secagg.neighbours if mode == "secure" else None,
                   "streamed": measure(run, weights, sites, SiteProcessGrid),
                   "all_at_once": measure(run, weights, sites, AllAtOnceGrid)}
            rows.append(row)
            log.info("%s, %d sites: peak %.0f MB (all replies at once: %.0f MB); %.1f s", mode, sites,
                     row["streamed"]["peak_mb"], row["all_at_once"]["peak_mb"], row["streamed"]["wall_s"])
    for mode in ("secure", "plain"):
        ours = [r for r in rows if r["mode"] == mode]
        for r in ours:
            r["peak_vs_fewest_sites"] = round(r["streamed"]["peak_mb"] / ours[0]["streamed"]["peak_mb"], 3)
    report = {"what": "coordinator peak memory in one training round", "model": "tiny-cpu preset (resnet10t, 2 views)",
              "params": int(params), "model_mb": round(sum(v.nbytes for v in weights.values()) / 2**20, 1),
              "threads": os.cpu_count(), "results": rows}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
