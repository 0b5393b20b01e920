"""Where the demo's time goes (issue 21, point 4): `medfusion-fl simulate --preset tiny-cpu`, the README's main job,
timed phase by phase, against a baseline commit in the same run.

The baseline is checked out into a temporary git worktree and run from there (`python -m medfusion_fl.cli` in
its folder imports its own package and app). The two alternate, `--repeats` times each, so that a machine's
drift falls on both. Each phase ends with the log line that closes it, timed as the line arrives; the last
phase ends when the process exits. The phases and their closing lines:

    python bench/demo_time.py --baseline 2283330 --repeats 3 --out bench/results/demo-time-cpu2.json
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from stepbench import write_report  # noqa: E402

log = logging.getLogger("medfusion_fl.bench.demo_time")
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
# (phase, the text of the line that ends it); a phase's line is looked for after the previous phase's
PHASES = [
    ("cli, config and synthetic folders", "synthetic site"),
    ("site policies, Flower and Ray imports", "starting Flower simulation"),
    ("Ray's start, the ServerApp's imports and model", "strategy "),
    ("round 1 (the actors' start, then the round)", "round 1/"),
    ("the later rounds", "round(s) done"),
    ("evaluation report", "evaluation report"),
    ("ONNX export and its parity check", "exported "),
    ("explanation maps, Ray's shutdown", "simulation finished"),
]


def run_demo(app: Path, out: Path) -> dict[str, float]:
    """One demo from the tree in `app`; seconds per phase (and "exit", "total")."""
    cmd = [sys.executable, "-m", "medfusion_fl.cli", "simulate", "--preset", "tiny-cpu", "--out", str(out)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=app, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    arrivals: list[tuple[float, str]] = []
    for line in proc.stdout or []:
        arrivals.append((time.monotonic() - start, line))
    code = proc.wait()
    total = time.monotonic() - start
    text = "".join(line for _, line in arrivals)
    if code != 0:
        raise RuntimeError(f"the demo in {app} failed (exit {code}):\n{text[-4000:]}")
    phases: dict[str, float] = {}
    previous, index = 0.0, 0
    for name, marker in PHASES:
        # the last line that carries the marker from here on (three sites are ready, one line each)
        hits = [i for i in range(index, len(arrivals)) if marker in arrivals[i][1]]
        if not hits:
            raise RuntimeError(f"no line with {marker!r} in the demo's output of {app}:\n{text[-4000:]}")
        last = hits[-1] if marker == "synthetic site" else hits[0]
        phases[name] = round(arrivals[last][0] - previous, 2)
        previous, index = arrivals[last][0], last + 1
    phases["interpreter exit"] = round(total - previous, 2)
    phases["total"] = round(total, 2)
    return phases


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(statistics.median(run[name] for run in runs), 2) for name in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="2283330", help="the commit to compare with (default: before issue 21)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    scratch = Path(tempfile.mkdtemp(prefix="demo-time-"))
    baseline = scratch / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(baseline), args.baseline], cwd=ROOT, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this tree": []}
    try:
        for repeat in range(args.repeats):
            for label, app in (("baseline", baseline), ("this tree", ROOT)):
                phases = run_demo(app, scratch / f"{label.replace(' ', '-')}-{repeat}")
                runs[label].append(phases)
                log.info("%s, run %d of %d: %.1f s", label, repeat + 1, args.repeats, phases["total"])
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False)
    medians = {label: _median(found) for label, found in runs.items()}
    for name in medians["this tree"]:
        log.info("%-50s %6.2f s -> %6.2f s", name, medians["baseline"][name], medians["this tree"][name])
    write_report({"what": "medfusion-fl simulate --preset tiny-cpu (the README's demo), seconds per phase",
                  "cpus": os.cpu_count(), "baseline_commit": args.baseline, "commit": head,
                  "repeats": args.repeats, "median": medians, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
