"""Console under load: live viewers of a long, wide run's page.

A run folder holding a 1000-round x 100-site history (metrics lines as the coordinator writes them, about
17 kB each); the console (`medfusion-fl console`, its own process) indexes it; then V viewers open the run
page at once, as a browser does (the page, GET /api/runs/{id}, the live socket), and wait on the socket while
R more rounds are appended the way the coordinator appends (the whole file rewritten atomically). Measured:
time to first data (page request to the socket's first message: the newest 100 rounds' curve points and
10 rounds' site details, per viewer), time to all rounds (the older curve points, the second message),
live-update lag (the append
done to the new round received, per viewer and round), the console's resident and peak memory, and the
index times. The baseline, in the same run, is one viewer alone.

  python bench/console_load.py --rounds 1000 --sites 100 --viewers 50 --out bench/results/console-load-cpu2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from medfusion_fl.deploy.site_agent import FLOWER_ENV  # noqa: E402
from medfusion_fl.durable import append_jsonl_atomic, write_json_atomic  # noqa: E402

log = logging.getLogger("bench.console_load")
PASSWORD = "load-test-password"
ENV = {**os.environ, **FLOWER_ENV}


def metrics_line(number: int, sites: int) -> dict[str, Any]:
    """A round as server/rounds.py records it, with every site's privacy record and the pooled histograms."""
    names = [f"hospital-{k:03d}" for k in range(sites)]
    return {"round": number, "strategy": "fedavg",
            "train": {"loss": None, "num-examples": 95 * sites, "sites": {s: {} for s in names[1:]}},
            "secure_aggregation": {"sites": sites - 1, "overflow": 0, "stage_seconds": {
                "secagg_advertise": 1.2, "secagg_share": 0.4, "secagg_mask": 0.5, "secagg_unmask": 0.1}},
            "evaluate": {"num-examples": 21.0 * sites, "loss": 0.61, "accuracy": 0.74, "auroc": 0.8 + number / 1e4,
                         "threshold": 0.4, "auprc": 0.7, "sensitivity": 0.7, "specificity": 0.8, "status": "ok",
                         "summed": names[1:], "released": "secure sum, Gaussian noise", "overflow": 0, "sites": {},
                         "score-histogram": {"negative": [4.0] * 10, "positive": [2.0] * 10}},
            "privacy": {s: {"federation": "default", "delta": 1e-05, "epsilon": 0.007 * number + k / 1000,
                            "max-epsilon": 8.0, "accountant": "rdp"} for k, s in enumerate(names)},
            "held_out": {"loss": 0.5, "accuracy": 0.8, "auroc": 0.85 + number / 1e4, "auprc": 0.8,
                         "num-examples": 300, "threshold": 0.4, "sensitivity": 0.7, "specificity": 0.9},
            "failures": [{"node_id": 17, "site": names[0], "stage": "train", "reason": "reply timeout"}],
            "status": "ok", "wall_time_s": 12.5}


def make_history(folder: Path, rounds: int, sites: int) -> int:
    folder.mkdir(parents=True)
    write_json_atomic(folder / "run.json", {"format": "medfusion-fl-run/1", "run_id": "load", "created": "x"})
    with (folder / "metrics.jsonl").open("w", encoding="utf-8") as handle:
        for number in range(1, rounds + 1):
            handle.write(json.dumps(metrics_line(number, sites)) + "\n")
    return (folder / "metrics.jsonl").stat().st_size


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


async def viewer(base: str, client: httpx.AsyncClient, cookie: str, received: dict[int, float],
                 ready: asyncio.Event, times: dict[str, list[float]]) -> None:
    """Open the run page as run.js does (the page, then the live socket and GET /api/runs/{id} at once), note
    the time to first data and to all rounds, then record when each new round arrives."""
    began = time.perf_counter()
    (await client.get("/runs/load")).raise_for_status()

    async def details() -> None:
        (await client.get("/api/runs/load")).raise_for_status()
        times["run_request"].append(time.perf_counter() - began)

    request = asyncio.create_task(details())
    url = base.replace("http://", "ws://") + "/api/runs/load/live"
    async with websockets.connect(url, additional_headers={"Cookie": f"medfusion_session={cookie}",
                                                           "Origin": base}, max_size=2**27) as ws:
        first = json.loads(await ws.recv())
        times["first_data"].append(time.perf_counter() - began)
        if first.get("type") != "reset" or not first["summaries"]:
            raise RuntimeError(f"first message {str(first)[:200]}")
        if first["rounds"] > len(first["summaries"]):  # the older curve points follow
            history = json.loads(await ws.recv())
            if history.get("type") != "history" or len(history["summaries"]) + len(first["summaries"]) != \
                    first["rounds"]:
                raise RuntimeError(f"second message {str(history)[:200]}")
        times["all_rounds"].append(time.perf_counter() - began)
        await request
        ready.set()
        while True:
            message = json.loads(await ws.recv())
            for point in message.get("summaries", []):
                received[point["round"]] = time.perf_counter()


async def session(base: str, cookie: str, viewers: int, folder: Path, start: int, appends: int, sites: int,
                  gap_s: float) -> dict[str, Any]:
    receipts: list[dict[int, float]] = [{} for _ in range(viewers)]
    readies = [asyncio.Event() for _ in range(viewers)]
    times: dict[str, list[float]] = {"first_data": [], "all_rounds": [], "run_request": []}
    client = httpx.AsyncClient(base_url=base, cookies={"medfusion_session": cookie}, timeout=60,
                               limits=httpx.Limits(max_connections=viewers + 5))  # one client: one browser each
    tasks = [asyncio.create_task(viewer(base, client, cookie, receipts[k], readies[k], times))
             for k in range(viewers)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), timeout=300)
    written: dict[int, float] = {}
    for number in range(start, start + appends):
        await asyncio.sleep(gap_s)
        await asyncio.to_thread(append_jsonl_atomic, folder / "metrics.jsonl", metrics_line(number, sites))
        written[number] = time.perf_counter()
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and not all(len(r) >= appends for r in receipts):
        await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    failed = [r for r in await asyncio.gather(*tasks, return_exceptions=True)
              if not isinstance(r, asyncio.CancelledError) and r is not None]
    await client.aclose()
    if failed:
        raise RuntimeError(f"{len(failed)} viewers failed: {failed[0]!r}")
    lags = [r[n] - written[n] for r in receipts for n in written if n in r]
    missed = sum(1 for r in receipts for n in written if n not in r)
    return {"viewers": viewers, **{f"{name}_s": _stats(values) for name, values in times.items()},
            "lag_s": _stats(lags), "updates_missed": missed}


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 4),
            "p95": round(ordered[min(math.ceil(0.95 * len(ordered)) - 1, len(ordered) - 1)], 4),
            "max": round(ordered[-1], 4), "n": len(ordered)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--viewers", type=int, default=50)
    parser.add_argument("--appends", type=int, default=5, help="rounds appended while the viewers watch")
    parser.add_argument("--gap", type=float, default=2.0, help="seconds between appended rounds")
    parser.add_argument("--work", default="/tmp/console-load")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = Path(args.work)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    runs = work / "runs"
    size = make_history(runs / "load", args.rounds, args.sites)
    log.info("history: %d rounds x %d sites, metrics.jsonl %.1f MB", args.rounds, args.sites, size / 1e6)
    subprocess.run([sys.executable, "-m", "medfusion_fl.cli", "console", "add-user", "load", "--role", "viewer",
                    "--runs", str(runs), "--password-stdin"], input=PASSWORD + "\n", text=True, check=True, env=ENV,
                   capture_output=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "medfusion_fl.cli", "console", "--runs", str(runs), "--port",
                               str(port)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=(work / "console.log").open("wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(base + "/login", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        idle = memory_kib(server.pid)
        login = httpx.post(base + "/api/login", json={"name": "load", "password": PASSWORD})
        login.raise_for_status()
        cookie = login.cookies["medfusion_session"]
        began = time.perf_counter()
        httpx.get(base + "/api/runs", cookies={"medfusion_session": cookie}, timeout=600).raise_for_status()
        first_index = time.perf_counter() - began
        began = time.perf_counter()
        httpx.get(base + "/api/runs", cookies={"medfusion_session": cookie}, timeout=600).raise_for_status()
        again = time.perf_counter() - began
        log.info("index: first %.2f s, unchanged %.3f s", first_index, again)
        alone = asyncio.run(session(base, cookie, 1, runs / "load", args.rounds + 1, args.appends, args.sites,
                                    args.gap))
        log.info("1 viewer: %s", alone)
        crowd = asyncio.run(session(base, cookie, args.viewers, runs / "load", args.rounds + 1 + args.appends,
                                    args.appends, args.sites, args.gap))
        log.info("%d viewers: %s", args.viewers, crowd)
        memory = memory_kib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {"bench": "console_load", "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "rounds": args.rounds, "sites": args.sites, "metrics_mb": round(size / 1e6, 1),
              "index_first_s": round(first_index, 3), "index_unchanged_s": round(again, 4),
              "baseline_one_viewer": alone, "load": crowd,
              "console_memory_mb": {"idle_rss": round(idle["VmRSS"] / 1024, 1),
                                    "rss_after": round(memory["VmRSS"] / 1024, 1),
                                    "peak": round(memory["VmHWM"] / 1024, 1)},
              "goals": {"first_data_s": 1.0, "lag_s": 2.0}}
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
