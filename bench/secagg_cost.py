"""Secure aggregation cost: plain vs secure round time and bytes sent per site, same run.

For n sites and a model of D parameters, both rounds share the local training (measured: one local
epoch, `--steps` optimiser steps of the bare timm model of that size at batch 16 patients x 2 views,
64 px). On top of it:
  plain   each site serialises its float32 weights; the coordinator forms the weighted delta sum;
  secure  each site encodes its update and runs the four SecAgg+ stages (medfusion_fl.secagg, the
          code the round loop runs); the coordinator unmasks the sum and decodes it.
Sites run in parallel in a federation, so a round counts the slowest site's time per stage plus the
coordinator's. Bytes are what one site sends (payload, without Flower's framing, the same for both).
Network transfer time is not modelled (the bytes are reported instead).

  python bench/secagg_cost.py --sites 3 10 30 --params 1M 11M --out bench/results/results-secagg-cpu.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords  # noqa: E402
from stepbench import write_report  # noqa: E402

from medfusion_fl.console import ensure_logging  # noqa: E402
from medfusion_fl.secagg import (  # noqa: E402
    Encoding,
    MaskedSum,
    Setup,
    advertise,
    masked_input,
    modulus_dtype,
    reveal,
    share,
    unmask,
)
from medfusion_fl.secagg.encoding import EXTRA  # noqa: E402

log = logging.getLogger("medfusion_fl.bench.secagg_cost")
MODELS = {"1M": "mobilenetv3_small_075", "11M": "resnet18"}  # timm models of ~1.0M and ~11.2M parameters


def train_seconds(backbone: str, steps: int) -> tuple[float, int]:
    """Seconds of `steps` AdamW steps of the bare timm model (batch 16 patients x 2 views, 64 px)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False, num_classes=2, in_chans=1)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.rand(32, 1, 64, 64), torch.randint(0, 2, (32,))
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return time.perf_counter() - start, params


def plain_round(deltas: list[np.ndarray], weights: list[int]) -> dict[str, float]:
    site_s, sent = [], []
    for delta in deltas:
        start = time.perf_counter()
        payload = delta.astype(np.float32).tobytes()  # what a plain reply carries: the float32 weights
        site_s.append(time.perf_counter() - start)
        sent.append(len(payload) + 16)  # + num-examples and the loss
    start = time.perf_counter()
    replies = [RecordDict({"arrays": ArrayRecord({"w": Array(d.astype(np.float32))}),
                           "metrics": MetricRecord({"num-examples": n})}) for d, n in zip(deltas, weights, strict=True)]
    aggregate_arrayrecords(replies, "num-examples")  # the plain path's weighted mean (Flower's FedAvg)
    return {"site_s": max(site_s), "server_s": time.perf_counter() - start, "bytes_per_site": max(sent)}


def secure_round(deltas: list[np.ndarray], weights: list[int], *, threshold: int, neighbours: int,
                 bits: int, max_weight: int, clip: float) -> dict[str, float]:
    n, length = len(deltas), deltas[0].size + EXTRA
    dtype = modulus_dtype(num_sites=n, bits=bits, max_weight=max_weight)
    setup = Setup.new(n, threshold=threshold, neighbours=neighbours, length=length, dtype=dtype)
    encoding = Encoding(clip, bits, dtype)
    site_s = {p: 0.0 for p in setup.parties}
    sent = {p: len(setup.round_id) * 4 for p in setup.parties}  # the round id echoed in every reply

    def timed(party: int, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        site_s[party] += time.perf_counter() - start
        return out

    states, keys, inputs = {}, {}, {}
    for p, delta, w in zip(setup.parties, deltas, weights, strict=True):
        inputs[p] = timed(p, lambda d=delta, w=w: encoding.encode(d, weight=w, loss=0.5)[0])
        states[p], keys[p] = timed(p, advertise, setup, p)
        sent[p] += 64
    sealed = {}
    for p in setup.parties:
        sealed[p] = timed(p, share, states[p], setup, keys)
        sent[p] += sum(len(box) + 8 for box in sealed[p].values())
    masked = {}
    for p in setup.parties:
        inbox = {src: box[p] for src, box in sealed.items() if p in box}
        masked[p] = timed(p, masked_input, states[p], setup, keys, inbox, inputs[p])
        sent[p] += masked[p].nbytes
    revealed = {}
    for p in setup.parties:
        revealed[p] = timed(p, reveal, states[p], setup, list(setup.parties), [])
        sent[p] += sum(len(s) + 8 for s in revealed[p].values())
    start = time.perf_counter()
    summed = MaskedSum(setup)
    for p, y in masked.items():
        summed.add(p, y)
    total = unmask(setup, keys, list(setup.parties), summed, revealed)
    delta_sum, weight, _, _ = encoding.decode(total)
    server_s = time.perf_counter() - start
    expected = sum(w * d.astype(np.float64) for d, w in zip(deltas, weights, strict=True))
    error = float(np.abs(delta_sum - expected).max()) / weight  # in the averaged update
    return {"site_s": max(site_s.values()), "server_s": server_s, "bytes_per_site": max(sent.values()),
            "modulus_bits": np.dtype(dtype).itemsize * 8, "max_abs_error_of_mean": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 30])
    parser.add_argument("--params", nargs="+", default=["1M", "11M"], choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=6, help="local optimiser steps per round (one epoch)")
    parser.add_argument("--neighbours", type=int, default=0, help="secagg.neighbours (0 = complete graph)")
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--max-weight", type=int, default=4096)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ensure_logging()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.params:
        train_s, params = train_seconds(MODELS[size], args.steps)
        rng = np.random.default_rng(0)
        for n in args.sites:
            deltas = [rng.normal(0, 0.01, params).astype(np.float32) for _ in range(n)]
            weights = [int(w) for w in rng.integers(50, 500, n)]
            threshold = max(2, (2 * n + 2) // 3)  # two thirds of the sites
            k = args.neighbours if 0 < args.neighbours < n - 1 else 0
            plain = plain_round(deltas, weights)
            secure = secure_round(deltas, weights, threshold=threshold if not k else min(threshold, k + 1),
                                  neighbours=k, bits=args.bits, max_weight=args.max_weight, clip=args.clip)
            plain_total = train_s + plain["site_s"] + plain["server_s"]
            secure_total = train_s + secure["site_s"] + secure["server_s"]
            rows.append({"sites": n, "params": params, "model": MODELS[size], "local_training_s": round(train_s, 3),
                         "plain": {k2: round(v, 4) for k2, v in plain.items()},
                         "secure": {k2: round(v, 6) if isinstance(v, float) else v for k2, v in secure.items()},
                         "round_time_ratio": round(secure_total / plain_total, 3),
                         "bytes_ratio": round(secure["bytes_per_site"] / plain["bytes_per_site"], 4)})
            log.info("%d sites x %s: %s", n, size, {k2: v for k2, v in rows[-1].items() if 'ratio' in k2})
    report = {"device": "cpu", "threads": args.threads, "torch": torch.__version__, "bits": args.bits,
              "clip": args.clip, "neighbours": args.neighbours, "local_steps": args.steps, "results": rows}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
