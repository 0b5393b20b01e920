"""Real patients through the CLI: scikit-learn's breast cancer set (569 patients, 30 measurements) over 4 simulated
hospitals, each arm one `medfusion-fl simulate` (the round loop, secure aggregation, the sites' DP ledgers, the
evaluation release and the threshold it gives, the export), DP and non-DP in the same run, and a pooled logistic
regression on the same split as the ceiling.

Per seed: a stratified 25% held-out folder; the rest over 4 hospitals with Dirichlet (alpha 0.5) label skew
(bench/real_tabular.py's split); class 1 (positive) is malignant. Each arm gets `--set` overrides on a common
config; the non-DP arm runs under a site policy that allows it. Read from each run: the held-out AUROC, accuracy,
sensitivity and specificity at the released threshold (the card's), ECE after calibration, each site's epsilon.

    python bench/real_cli.py --seeds 3 --out bench/results/real-cli-cpu2.json
    python bench/real_cli.py --seeds 1 --arm dp-lr05="train.lr=0.05" --out /tmp/lever.json   # try a lever
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from real_tabular import SITES, _split  # noqa: E402
from stepbench import write_report  # noqa: E402

log = logging.getLogger("medfusion_fl.bench.real_cli")
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
# What every arm shares: the sites' tabular folders, no image views, no public pretraining (none exists for
# these measurements), the recipe's levers (each a reason in docs/benchmarks.md, *Real patients*).
COMMON = {
    "data.source": "folders", "data.view-names": "", "data.classes": "benign,malignant", "data.val-fraction": 0.2,
    "model.tabular-hidden": 32, "model.dropout": 0.0, "train.freeze": "", "train.class-weights": "",
    "train.batch-size": 48, "train.lr": 0.03, "rounds.num-server-rounds": 15, "rounds.min-sites": 3,
    "privacy.noise-multiplier": 3.0, "evaluation.every": 15,
}
ARMS = {"no-dp": ["privacy.enabled=false"], "dp": []}
OPEN = "[policy]\nrequire-dp = false\n"


def _pooled_logistic(root: Path, classes: list[str]) -> dict[str, float]:
    """The ceiling: scikit-learn's logistic regression on every training patient, standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def read(folder: Path) -> tuple[np.ndarray, np.ndarray]:
        lines = (folder / "manifest.csv").read_text().splitlines()
        rows = [line.split(",") for line in lines[1:]]
        return np.array([[float(v) for v in r[2:]] for r in rows]), np.array([classes.index(r[1]) for r in rows])

    x, y = read(root / "pooled")
    xt, yt = read(root / "test")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x, y)
    p = model.predict_proba(xt)[:, 1]
    return {"auroc": float(roc_auc_score(yt, p)), "accuracy": float(((p >= 0.5) == yt).mean())}


def _arm(root: Path, config: Path, name: str, sets: list[str], out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "medfusion_fl.cli", "simulate", "--app", str(ROOT), "--config", str(config),
               "--out", str(out), "--sites", str(SITES), "--set", "simulation.public-patients=0",
               "--set", f"data.sites-root={root}", "--set", f"data.test-path={root / 'test'}"]
    for item in sets:
        command += ["--set", item]
    if "privacy.enabled=false" in sets:
        (root / "open.toml").write_text(OPEN)
        command += ["--site-policy", str(root / "open.toml")]
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"arm {name} failed:\n{done.stderr[-3000:]}")
    card = json.loads((out / "model_card.json").read_text())
    numbers = json.loads((out / "report" / "evaluation.json").read_text())
    at = numbers.get("at_operating_threshold") or {}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": round(time.monotonic() - start, 1), "rounds": card["run_status"]["rounds"],
            "auroc": numbers["auroc"]["value"], "threshold": at.get("threshold"), "accuracy": at.get("accuracy"),
            "sensitivity": at.get("sensitivity"), "specificity": at.get("specificity"),
            "ece_before": numbers["calibration"]["before"]["ece"], "ece_after": numbers["calibration"]["after"]["ece"],
            "temperature": numbers["calibration"]["temperature"]["value"],
            "held_out_loss_by_round": [round((line.get("held_out") or {}).get("loss", float("nan")), 4)
                                       for line in lines],
            "epsilon": {site: round(p["epsilon"], 3) for site, p in (lines[-1].get("privacy") or {}).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=KEY=VALUE[;KEY=VALUE...]",
                        help="an extra arm (DP unless it sets privacy.enabled=false)")
    parser.add_argument("--only", action="append", default=[], help="run only these arms")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    arms = dict(ARMS)
    for spec in args.arm:
        name, _, sets = spec.partition("=")
        arms[name] = [s for s in sets.split(";") if s]
    if args.only:
        arms = {k: v for k, v in arms.items() if k in args.only}
    runs: dict[str, list[dict[str, Any]]] = {"pooled-logistic": []}
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "data"
            run, _, _ = _split(seed, root)
            config = Path(tmp) / "run.toml"
            flat = {**COMMON, "data.tabular-columns": run.data.tabular_columns, "train.seed": seed}
            config.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in flat.items()))
            runs["pooled-logistic"].append(_pooled_logistic(root, ["benign", "malignant"]))
            for name, sets in arms.items():
                result = _arm(root, config, name, sets, Path(tmp) / name)
                log.info("seed %d %s: %s", seed, name, result)
                runs.setdefault(name, []).append(result)
    summary = {name: {key: round(float(np.mean([r[key] for r in rows if r.get(key) is not None])), 4)
                      for key in ("auroc", "accuracy", "sensitivity", "specificity", "ece_after") if
                      any(r.get(key) is not None for r in rows)} for name, rows in runs.items()}
    report = {"data": "sklearn breast cancer (569 patients, 30 features), positive = malignant", "sites": SITES,
              "common": COMMON, "arms": arms, "seeds": args.seeds, "machine": f"{os.cpu_count()} CPUs",
              "runs": runs, "mean": summary}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
