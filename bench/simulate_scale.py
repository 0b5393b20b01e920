"""`medfusion-fl simulate` at 10 and 100 sites on this machine (issue 21, point 2): wall time per site-round and the
peak memory of the whole process tree (the command, Ray's processes, its actors), in one run.

Each size runs the tiny-cpu preset with the private defaults (DP-SGD, secure aggregation of training and
evaluation, each site's default policy) on small synthetic sites, as a user would type it:

    medfusion-fl simulate --preset tiny-cpu --set simulation.num-sites=100 --set synth.patients-per-site=40 ...

Per site-round: a round's wall time (metrics.jsonl) over the sites in it; the comparison uses the last round,
whose Ray actors are warm (round 1 also pays their start: imports and first model builds, once per actor, not
per site). Memory: the sum of the resident set
sizes of the command and every process below it, sampled every 0.25 s (Ray's workers included).

    python bench/simulate_scale.py --out bench/results/simulate-scale-cpu2.json
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from stepbench import write_report  # noqa: E402

from simulations.processes import descendants  # noqa: E402

log = logging.getLogger("medfusion_fl.bench.simulate_scale")
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def run(sites: int, rounds: int, patients: int, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "medfusion_fl.cli", "simulate", "--preset", "tiny-cpu", "--out", str(out),
           "--set", f"simulation.num-sites={sites}", "--set", f"rounds.num-server-rounds={rounds}",
           "--set", f"synth.patients-per-site={patients}", "--set", "report.enabled=false"]
    log.info("%s", " ".join(cmd[2:]))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _rss(proc.pid) + sum(_rss(p) for p in descendants(proc.pid)))
        time.sleep(0.25)
    output = proc.stdout.read() if proc.stdout else ""
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"simulate with {sites} sites failed ({proc.returncode}):\n{output[-4000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_round = [{"round": line["round"], "wall_s": line["wall_time_s"],
                  "sites": line["secure_aggregation"]["sites"],
                  "per_site_round_s": round(line["wall_time_s"] / line["secure_aggregation"]["sites"], 3),
                  "held_out_auroc": (line.get("held_out") or {}).get("auroc")} for line in lines]
    return {"sites": sites, "rounds": rounds, "patients_per_site": patients, "wall_s": round(wall, 1),
            "peak_tree_rss_mb": round(peak / 2**20), "per_round": per_round,
            "per_site_round_s": round(sum(r["wall_s"] for r in per_round) / sum(r["sites"] for r in per_round), 3),
            "warm_per_site_round_s": per_round[-1]["per_site_round_s"],
            "evaluated_rounds": sum(1 for line in lines if line.get("evaluate") and line["evaluate"].get("summed"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="10,100")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--patients", type=int, default=40, help="synthetic patients per site")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(tempfile.mkdtemp(prefix="simulate-scale-"))
    rows = [run(int(n), args.rounds, args.patients, root / f"sites-{n}") for n in args.sites.split(",")]
    for row in rows:
        row["warm_vs_fewest"] = round(row["warm_per_site_round_s"] / rows[0]["warm_per_site_round_s"], 3)
        log.info("%d sites: %.2f s per site-round in the last round (%.2fx), %.2f s over all rounds, peak tree RSS "
                 "%d MB, %.0f s in all", row["sites"], row["warm_per_site_round_s"], row["warm_vs_fewest"],
                 row["per_site_round_s"], row["peak_tree_rss_mb"], row["wall_s"])
    write_report({"what": "medfusion-fl simulate, tiny-cpu preset, private defaults", "cpus": os.cpu_count(),
                  "results": rows}, args.out)


if __name__ == "__main__":
    main()
