"""Flower strategies on a non-IID federation, with DP-SGD and secure aggregation on: rounds to reach a held-out
AUROC, and the AUROC after the last round (issue 20). FedAvg is the baseline, in the same run.

Every strategy trains the same model (same seed) on the same synthetic sites (label skew: a Dirichlet share of
positives per site, synth.dirichlet-alpha) through the real ClientApp and the coordinator's round loop, over an
in-process grid (simulations/inprocess.py): the algorithms are measured, not Ray. The sites' privacy budget
(their policy's max-epsilon) is raised to what the rounds need; the epsilon reached is reported.

    python bench/strategies_noniid.py --out bench/results/strategies-noniid-cpu2.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"):
    os.environ.setdefault(_key, "0" if _key == "FLWR_TELEMETRY_ENABLED" else "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from stepbench import write_report  # noqa: E402

from client.client_app import app as client_app  # noqa: E402
from medfusion_fl.config import RunConfig  # noqa: E402
from medfusion_fl.console import ensure_logging  # noqa: E402
from medfusion_fl.data import write_federation  # noqa: E402
from server.federation import Federation  # noqa: E402
from simulations.inprocess import InProcessGrid  # noqa: E402

log = logging.getLogger("medfusion_fl.bench.strategies")
STRATEGIES: dict[str, dict[str, Any]] = {  # the arguments each runs with (Flower's defaults where not named)
    "fedavg": {},
    "fedprox": {"strategy.proximal-mu": 0.01},
    "fedavgm": {"strategy.server-momentum": 0.9, "strategy.server-learning-rate": 1.0},
    "fedadam": {"strategy.eta": 0.01},
    "fedyogi": {"strategy.eta": 0.01},
}


def base_config(root: Path, *, sites: int, alpha: float, rounds: int) -> dict[str, Any]:
    """The tiny-cpu preset's model and training (resnet10t, 32 px, DP-SGD noise 1.0), ten skewed sites."""
    return {"model.backbone": "resnet10t", "data.image-size": 32, "train.local-epochs": 1, "train.lr": 0.002,
            "synth.patients-per-site": 120, "synth.test-patients": 300, "synth.dirichlet-alpha": alpha,
            "rounds.num-server-rounds": rounds, "rounds.min-sites": min(sites, 3), "rounds.fraction-evaluate": 0.0,
            "report.enabled": False, "data.sites-root": str(root / "data"), "privacy.enabled": True,
            "secagg.enabled": True, "_sites": sites}


def run_strategy(name: str, base: dict[str, Any], root: Path, *, target: float, budget: float) -> dict[str, Any]:
    sites = base["_sites"]
    flat = {k: v for k, v in base.items() if k != "_sites"} | STRATEGIES[name] | {
        "strategy.name": name, "output.run-dir": str(root / name)}
    run = RunConfig.from_flat(flat)
    start = time.perf_counter()
    federation = Federation(run)
    grid = InProcessGrid(client_app, run.to_flat(), num_nodes=sites, node_config={"max-epsilon": budget})
    federation.run_rounds(grid)
    lines = federation.store.read_metrics()
    aurocs = [(line.get("held_out") or {}).get("auroc") for line in lines]
    reached = next((i + 1 for i, a in enumerate(aurocs) if a is not None and a >= target), None)
    epsilon = max((p["epsilon"] for p in (lines[-1].get("privacy") or {}).values()), default=None)
    result = {"arguments": STRATEGIES[name], "held_out_auroc": aurocs, f"rounds_to_auroc_{target:g}": reached,
              "auroc_last_round": aurocs[-1], "rounds": len(lines), "max_site_epsilon": epsilon,
              "wall_s": round(time.perf_counter() - start, 1)}
    log.info("%s: AUROC %s after %d rounds; %s rounds to %.2f; epsilon %s; %.0f s", name, aurocs[-1], len(lines),
             reached, target, epsilon, result["wall_s"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.3, help="synth.dirichlet-alpha: lower = more label skew")
    parser.add_argument("--target", type=float, default=0.9, help="held-out AUROC to reach")
    parser.add_argument("--budget", type=float, default=100.0, help="each site's policy max-epsilon")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ensure_logging()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = base_config(root, sites=args.sites, alpha=args.alpha, rounds=args.rounds)
        config = RunConfig.from_flat({k: v for k, v in base.items() if k != "_sites"})
        write_federation(root / "data", config, args.sites)
        results = {name: run_strategy(name, base, root, target=args.target, budget=args.budget)
                   for name in args.strategies.split(",")}
    baseline = results.get("fedavg")
    write_report({"benchmark": "strategies_noniid", "machine": "cpu", "sites": args.sites, "rounds": args.rounds,
                  "dirichlet_alpha": args.alpha, "target_auroc": args.target, "site_budget_epsilon": args.budget,
                  "config": {k: v for k, v in base.items() if k not in ("_sites", "data.sites-root")},
                  "baseline": "fedavg", "results": results,
                  "vs_baseline_auroc": {n: None if baseline is None or r["auroc_last_round"] is None else
                                        round(r["auroc_last_round"] - baseline["auroc_last_round"], 4)
                                        for n, r in results.items()}}, args.out)


if __name__ == "__main__":
    main()
