"""Attention supervision against a site-specific shortcut (issue 22, point 4): held-out AUROC on a shortcut-free
test folder, and the pointing game, without supervision and with each method, DP-SGD and secure aggregation on.

The federation: three synthetic hospitals of image-only patients (one 32 px view pair each, no clinical columns,
so the images carry the whole signal), subtle lesions (synth.lesion-contrast 0.6), and at sites 0 and 1 a corner
marker drawn on exactly their positive patients' views (synth.shortcut-rate 1.0); lesion masks for 30% of
patients. The held-out test folder has no marker. Every configuration trains the same model (same seed, same
folders) through the real ClientApp and the coordinator's round loop over an in-process grid
(simulations/inprocess.py); the sites' budget is raised to what the rounds need and the epsilon reached is
reported. DP noise comes from the OS at every site (as deployed), so each configuration runs `--repeats` times.

Configurations: `none` (the plain model: the baseline), `gate` (the gated model, attention.weight 0: what the
gate alone does), `mask`, `cam`, `consistency` (attention.weight at its default). Pointing game: the share of
lesion-bearing views of the test folder's positive patients whose HiResCAM map (the report's) peaks inside
the lesion mask (medfusion_fl/explain/pointing.py).

    python bench/attention_shortcut.py --out bench/results/attention-shortcut-cpu2.json
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
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
from medfusion_fl.data import SiteDataset, check_site, write_federation  # noqa: E402
from medfusion_fl.explain.pointing import pointing_game  # noqa: E402
from server.federation import Federation  # noqa: E402
from simulations.inprocess import InProcessGrid  # noqa: E402

log = logging.getLogger("medfusion_fl.bench.attention")
CONFIGS: dict[str, dict[str, Any]] = {
    "none": {"attention.method": "none"},
    "gate": {"attention.method": "mask", "attention.weight": 0.0},
    "mask": {"attention.method": "mask"},
    "cam": {"attention.method": "cam"},
    "consistency": {"attention.method": "consistency"},
}


def base_config(root: Path, *, rounds: int) -> dict[str, Any]:
    return {"model.backbone": "resnet10t", "data.image-size": 32, "data.tabular-columns": "",
            "train.local-epochs": 1, "train.lr": 0.002, "synth.patients-per-site": 200, "synth.test-patients": 300,
            "synth.dirichlet-alpha": 10.0, "synth.mask-fraction": 0.3, "synth.shortcut-sites": "0,1",
            "synth.shortcut-rate": 1.0, "synth.lesion-contrast": 0.6, "rounds.num-server-rounds": rounds,
            "rounds.min-sites": 3, "rounds.fraction-evaluate": 0.0, "report.enabled": False,
            "data.sites-root": str(root / "data"), "privacy.enabled": True, "secagg.enabled": True}


def run_config(name: str, base: dict[str, Any], root: Path, repeat: int, *, budget: float) -> dict[str, Any]:
    run = RunConfig.from_flat(base | CONFIGS[name] | {"output.run-dir": str(root / f"{name}-{repeat}")})
    start = time.perf_counter()
    federation = Federation(run)
    grid = InProcessGrid(client_app, run.to_flat(), num_nodes=3, node_config={"max-epsilon": budget})
    federation.run_rounds(grid)
    lines = federation.store.read_metrics()
    aurocs = [(line.get("held_out") or {}).get("auroc") for line in lines]
    records, problems = check_site(root / "data" / "test", run.data)
    if problems:
        raise RuntimeError(f"the test folder has problems: {problems[:3]}")
    game = pointing_game(federation.model, SiteDataset(records, run.data, masks=True),
                         min_side=run.report.cam_min_side, method=run.report.cam_method)
    epsilon = max((p["epsilon"] for p in (lines[-1].get("privacy") or {}).values()), default=None)
    result = {"held_out_auroc": aurocs, "auroc_last_round": aurocs[-1], "pointing_game": game.summary(),
              "max_site_epsilon": epsilon, "wall_s": round(time.perf_counter() - start, 1)}
    log.info("%s, run %d: AUROC %.3f, pointing game %d/%d = %.3f, epsilon %.1f, %.0f s", name, repeat + 1,
             aurocs[-1], game.hits, game.views, game.share or 0.0, epsilon or 0.0, result["wall_s"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--budget", type=float, default=100.0, help="the sites' max-epsilon for this benchmark")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ensure_logging(logging.WARNING)
    logging.getLogger("medfusion_fl.bench").setLevel(logging.INFO)
    root = Path(tempfile.mkdtemp(prefix="attention-shortcut-"))
    base = base_config(root, rounds=args.rounds)
    write_federation(root / "data", RunConfig.from_flat(base), 3)
    names = args.configs.split(",")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for repeat in range(args.repeats):  # configurations alternate, so that a machine's drift falls on all
        for name in names:
            runs[name].append(run_config(name, base, root, repeat, budget=args.budget))
    summary = {}
    for name, found in runs.items():
        auroc = statistics.mean(r["auroc_last_round"] for r in found)
        share = statistics.mean(r["pointing_game"]["share"] for r in found)
        summary[name] = {"auroc_mean": round(auroc, 4), "pointing_game_mean": round(share, 4),
                         "auroc_runs": [round(r["auroc_last_round"], 4) for r in found],
                         "pointing_game_runs": [round(r["pointing_game"]["share"], 4) for r in found]}
    for name in names:
        row = summary[name]
        row["auroc_vs_none"] = round(row["auroc_mean"] - summary.get("none", row)["auroc_mean"], 4)
        log.info("%-12s AUROC %.3f (%+.3f vs none)  pointing game %.3f", name, row["auroc_mean"],
                 row["auroc_vs_none"], row["pointing_game_mean"])
    write_report({"what": "attention supervision vs a site shortcut: 3 sites (marker at 0 and 1), masks for 30% "
                  "of patients, DP-SGD + secure aggregation, held-out AUROC on a shortcut-free folder",
                  "cpus": os.cpu_count(), "rounds": args.rounds, "repeats": args.repeats, "config": base,
                  "configs": {n: CONFIGS[n] for n in names}, "summary": summary, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
