"""From scratch against a pretrained start, under the private defaults (DP-SGD, a DP evaluation release each round,
secure aggregation, every site's default budget of epsilon 8 at delta 1e-5).

The starting point is trained by `medfusion-fl pretrain` on a public-style synthetic folder: other patients (its
own synth.seed) whose lesions look otherwise (their own synth.lesion-contrast), never a site's. Each federation
runs through the real ClientApp and the coordinator's round loop over an in-process grid
(simulations/inprocess.py). Per round: the held-out AUROC, and the accuracy and sensitivity at the operating
threshold the sites' noisy release gave; the starting point's own held-out AUROC (round 0); rounds to AUROC 0.9.

Scales: `demo` (3 sites x 120 patients, 32 px, 3 rounds: the README's demo) and `large` (4 sites x 1,000
patients, 64 px). `--batchnorm` adds a start pretrained with BatchNorm (model.norm = batch, allowed centrally),
converted for the DP federation by folding (exact) and by GroupNorm (scale and shift kept): round 0's AUROC shows
what each conversion costs before any training.

    python bench/pretrained_start.py --scale demo --out bench/results/pretrained-start-demo-cpu2.json
    python bench/pretrained_start.py --scale large --rounds 5 --out bench/results/pretrained-start-large-cpu2.json
    python bench/pretrained_start.py --scale large --plain --recipe --out bench/results/hospital-size-cpu2.json
    python bench/pretrained_start.py --scale large --plain --only scratch --set model.backbone=test_resnet  # a lever
"""

from __future__ import annotations

import argparse
import json
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
from medfusion_fl.data.synthetic import write_public  # noqa: E402
from medfusion_fl.parameters import get_weights  # noqa: E402
from medfusion_fl.pretrained.pretrain import pretrain  # noqa: E402
from server.federation import Federation  # noqa: E402
from simulations.inprocess import InProcessGrid  # noqa: E402

log = logging.getLogger("medfusion_fl.bench.pretrained_start")
SCALES: dict[str, dict[str, Any]] = {
    "demo": {"sites": 3, "rounds": 3, "public": 300, "flat": {}},
    "large": {"sites": 4, "rounds": 5, "public": 1000,
              "flat": {"synth.patients-per-site": 1000, "synth.test-patients": 500, "data.image-size": 64}},
}
PUBLIC = {"synth.seed": 99, "synth.lesion-contrast": 0.7}  # other patients, lesions that look otherwise
# --recipe: the demo preset's levers (simulations/presets/tiny-cpu.toml gives the reasons); class weights after
# clipping counter DP's drift to the majority class, so the plain arms go without them
RECIPE = {"pretrained": {"train.freeze": "image.backbones", "train.lr": 0.001}}
DP_RECIPE = {"train.class-weights": "0.5,1"}


def federate(run: RunConfig, sites: int) -> dict[str, Any]:
    """One federation (exported, with its report when report.enabled); its per-round figures."""
    start = time.perf_counter()
    federation = Federation(run)
    before = federation.held_out_eval(get_weights(federation.model))  # the starting point itself
    node = {} if run.privacy.enabled else {"require-dp": False}  # a site policy that allows the plain arm
    final = federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=sites, node_config=node))
    if run.report.enabled:
        federation.export(final)
    lines = federation.store.read_metrics()
    rows = [{"round": line["round"], "status": line["status"],
             "held_out_auroc": (line.get("held_out") or {}).get("auroc"),
             "threshold": (line.get("held_out") or {}).get("threshold"),
             "accuracy_at_threshold": (line.get("held_out") or {}).get("accuracy-at-threshold"),
             "sensitivity_at_threshold": (line.get("held_out") or {}).get("sensitivity"),
             "specificity_at_threshold": (line.get("held_out") or {}).get("specificity"),
             "max_site_epsilon": max((p["epsilon"] for p in (line.get("privacy") or {}).values()), default=None)}
            for line in lines]
    done = [r for r in rows if r["status"] == "ok"]
    to_09 = next((r["round"] for r in done if (r["held_out_auroc"] or 0) >= 0.9), None)
    result = {"round_0_auroc": before["auroc"] if before else None, "rounds": rows, "rounds_to_auroc_0.9": to_09,
              "last": done[-1] if done else None, "wall_s": round(time.perf_counter() - start, 1)}
    report = Path(run.output.run_dir) / "report" / "evaluation.json"
    if report.is_file():  # ECE of the held-out patients before and after the released calibration
        calibration = json.loads(report.read_text())["calibration"]
        result |= {"ece_before": calibration["before"]["ece"], "ece_after": calibration["after"]["ece"],
                   "temperature": calibration["temperature"]["value"]}
    last = result["last"] or {}
    log.info("  AUROC %s -> %s, accuracy %s, sensitivity %s at the released threshold %s, epsilon %s, %.0f s",
             _f(result["round_0_auroc"]), _f(last.get("held_out_auroc")), _f(last.get("accuracy_at_threshold")),
             _f(last.get("sensitivity_at_threshold")), _f(last.get("threshold")), _f(last.get("max_site_epsilon")),
             result["wall_s"])
    return result


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pairs(items: list[str]) -> dict[str, str]:
    """--set KEY=VALUE items as run config overrides (RunConfig.from_flat parses the values)."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. train.batch-size=128")
        pairs[key.strip()] = value.strip()
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="demo")
    parser.add_argument("--rounds", type=int, help="default: the scale's")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="federations per start (DP noise from the OS)")
    parser.add_argument("--batchnorm", action="store_true", help="also a start pretrained with BatchNorm "
                        "(model.norm = batch), converted for DP by folding and by GroupNorm: the conversions' cost")
    parser.add_argument("--plain", action="store_true", help="also each start without DP (privacy.enabled = false, "
                        "the sites' policy allowing it; secure aggregation stays), in the same run")
    parser.add_argument("--recipe", action="store_true", help="DP arms: the demo preset's recipe (class weights "
                        "0.5,1; a pretrained start trains all but its backbone at lr 0.001) and a report with "
                        "the calibrated ECE per arm")
    parser.add_argument("--only", action="append", default=[], choices=["scratch", "pretrained"],
                        help="these starts only (the public folder is pretrained on only for 'pretrained')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="a run config key for every arm of the chosen starts, DP and plain (a recipe lever)")
    parser.add_argument("--dp-set", action="append", default=[], metavar="KEY=VALUE", dest="dp_sets",
                        help="a run config key for the DP arms only (e.g. train.class-weights=)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ensure_logging(logging.WARNING)
    logging.getLogger("medfusion_fl.bench").setLevel(logging.INFO)
    scale = SCALES[args.scale]
    rounds = args.rounds or scale["rounds"]
    root = Path(tempfile.mkdtemp(prefix=f"pretrained-start-{args.scale}-"))
    base = {**scale["flat"], "data.sites-root": str(root / "data"), "rounds.num-server-rounds": rounds,
            "report.enabled": args.recipe}
    write_federation(root / "data", RunConfig.from_flat(base), scale["sites"])
    levers, dp_levers = _pairs(args.sets), _pairs(args.dp_sets)
    starts: dict[str, dict[str, Any]] = {"scratch": {"init.source": "random"}}
    card: dict[str, Any] = {"history": []}
    pretrain_s = 0.0
    if not args.only or "pretrained" in args.only:
        public_run = RunConfig.from_flat({**base, **PUBLIC, **levers})
        folder = write_public(root / "public", public_run, scale["public"])
        began = time.perf_counter()
        card = pretrain(folder, root / "start.safetensors", public_run, epochs=args.pretrain_epochs, seed=1)
        pretrain_s = round(time.perf_counter() - began, 1)
        starts["pretrained"] = {"init.source": "file", "init.path": str(root / "start.safetensors"),
                                "init.sha256": card["file_sha256"]}
    if args.only:
        starts = {name: init for name, init in starts.items() if name in args.only}
    if args.batchnorm:
        bn_run = RunConfig.from_flat({**base, **PUBLIC, "model.norm": "batch"})
        bn_card = pretrain(folder, root / "start-bn.safetensors", bn_run, epochs=args.pretrain_epochs, seed=1)
        bn = {"init.source": "file", "init.path": str(root / "start-bn.safetensors"),
              "init.sha256": bn_card["file_sha256"]}
        starts |= {"batchnorm-fold": {**bn, "model.norm": "fold"}, "batchnorm-group": {**bn, "model.norm": "group"}}
    arms: dict[str, dict[str, Any]] = {}
    for name, init in starts.items():
        recipe = {**(RECIPE.get(name, {}) if args.recipe else {}), **levers}
        arms[name] = {**init, **recipe, **(DP_RECIPE if args.recipe else {}), **dp_levers}
        if args.plain:
            arms[f"{name}-no-dp"] = {**init, **recipe, "privacy.enabled": False}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        for name, arm in arms.items():
            log.info("%s, %s, run %d", args.scale, name, repeat + 1)
            run = RunConfig.from_flat({**base, **arm, "output.run-dir": str(root / f"{name}-{repeat}")})
            runs[name].append(federate(run, scale["sites"]))
    write_report({"what": "held-out AUROC and decisions at the released threshold, from scratch and from a start "
                  "pretrained on a public-style synthetic folder, under the private defaults",
                  "cpus": os.cpu_count(), "scale": args.scale, "sites": scale["sites"], "rounds": rounds,
                  "config": base, "arms": arms, "public_folder": {**PUBLIC, "patients": scale["public"],
                                                    "pretrain_epochs": args.pretrain_epochs,
                                                    "pretrain_s": pretrain_s, "history": card["history"]},
                  "runs": runs}, args.out)


if __name__ == "__main__":
    main()
