"""The demo (`medfusion-fl simulate --preset tiny-cpu`) at a baseline commit and at the working tree,
alternating, in one process: wall time, held-out AUROC and accuracy at the sites' threshold, epsilon.

    python bench/demo_compare.py --baseline 1a345b5 --runs 2 > bench/results/demo-compare.json
    python bench/demo_compare.py --baseline fe3392f --runs 5 > bench/results/demo-compare-recipe-cpu2.json

The baseline runs from a temporary `git worktree` of the ref (its own code, imported from its folder).
Prints one JSON object: every run, and per side the median wall time; `wall_time_ratio` = current /
baseline median.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
log = logging.getLogger("demo_compare")


def _demo(code: Path, out: Path) -> dict[str, Any]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "medfusion_fl.cli", "simulate", "--preset", "tiny-cpu", "--out",
                           str(out)], cwd=code, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"the demo at {code} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    held = last["held_out"] or {}
    return {"wall_s": round(seconds, 1), "held_out_auroc": held.get("auroc"),
            "accuracy_at_threshold": held.get("accuracy-at-threshold"), "threshold": held.get("threshold"),
            "sensitivity": held.get("sensitivity"), "specificity": held.get("specificity"),
            "held_out_loss_by_round": [round((line["held_out"] or {}).get("loss", float("nan")), 4) for line in lines],
            "site_eval_auroc": (last["evaluate"] or {}).get("auroc"),
            "epsilon": {site: round(p["epsilon"], 3) for site, p in (last.get("privacy") or {}).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git ref of the code to compare against")
    parser.add_argument("--runs", type=int, default=2, help="demo runs per side, alternating")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), commit], cwd=REPO, check=True,
                       capture_output=True)
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
        try:
            for k in range(args.runs):
                for side, code in (("baseline", base), ("current", REPO)):
                    result = _demo(code, Path(tmp) / f"{side}-{k}")
                    log.info("%s run %d: %s", side, k + 1, result)
                    runs[side].append(result)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    median = {side: statistics.median(r["wall_s"] for r in rs) for side, rs in runs.items()}
    json.dump({"baseline": commit, "machine": f"{os.cpu_count()} CPUs", "runs": runs, "median_wall_s": median,
               "wall_time_ratio": round(median["current"] / median["baseline"], 3)}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
