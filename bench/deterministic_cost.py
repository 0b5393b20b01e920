"""What torch.use_deterministic_algorithms(True) costs a site's step on this CPU, and whether a step repeats bit for
bit without it (issue 25, point 3).

The tiny-cpu preset's model (resnet10t, two 32 px views, the clinical columns; and a gated one under attention
supervision), a batch of 16 patients: the plain step (forward, mean loss, backward) and the DP step of the
bookkeeping engine (noise 0, so runs compare). Each is timed with the mode off (torch's default, the baseline)
and on, alternately, in one process; each also runs twice from the same weights to see whether its gradients
repeat bit for bit. An op with no deterministic CPU kernel would raise under the mode: the JSON says which.

    python bench/deterministic_cost.py --out bench/results/deterministic-cost-cpu2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from stepbench import write_report  # noqa: E402

from medfusion_fl.config import PrivacyConfig, RunConfig  # noqa: E402
from medfusion_fl.models import MedFusionModel, build_model, example_inputs  # noqa: E402
from medfusion_fl.privacy.dp_sgd import BookkeepingStep  # noqa: E402

Batch = dict[str, torch.Tensor]


def _batch(model: MedFusionModel) -> Batch:
    views, _, tabular = example_inputs(model.spec, batch=16)
    g = torch.Generator().manual_seed(0)
    return {"views": torch.rand(views.shape, generator=g), "view_mask": torch.ones(16, model.spec.num_views),
            "tabular": torch.randn(tabular.shape, generator=g), "label": torch.randint(0, 2, (16,), generator=g)}


def _plain(model: MedFusionModel, batch: Batch) -> None:
    logits = model(batch["views"], batch["view_mask"], batch["tabular"])
    F.cross_entropy(logits, batch["label"]).backward()


def _dp(model: MedFusionModel, batch: Batch) -> None:
    step = BookkeepingStep(model, PrivacyConfig(noise_multiplier=0.0, max_grad_norm=1.0),
                           torch.Generator().manual_seed(0), expected=16)
    try:
        step(batch, torch.device("cpu"), "fp32")
    finally:
        step.clipper.detach()


def _grads(model: MedFusionModel) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def measure(name: str, model: MedFusionModel, step: Callable[[MedFusionModel, Batch], None],
            repeats: int) -> dict[str, Any]:
    batch = _batch(model)
    times: dict[bool, list[float]] = {False: [], True: []}
    grads: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    refused = None
    for _ in range(repeats):
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            twin = copy.deepcopy(model).train()
            torch.manual_seed(0)  # dropout draws the same masks in every repeat (a site seeds it per round)
            start = time.perf_counter()
            try:
                step(twin, batch)
            except RuntimeError as exc:  # an op without a deterministic kernel
                refused = str(exc).splitlines()[0]
                continue
            finally:
                torch.use_deterministic_algorithms(False)
            times[deterministic].append(time.perf_counter() - start)
            grads[deterministic].append(_grads(twin))
    off, on = statistics.median(times[False][1:]), statistics.median(times[True][1:]) if times[True] else None
    return {"step": name, "median_s_default": round(off, 4),
            "median_s_deterministic": None if on is None else round(on, 4),
            "deterministic_vs_default": None if on is None else round(on / off, 3),
            "default_repeats_bit_for_bit": all(torch.equal(g, grads[False][0]) for g in grads[False]),
            "deterministic_equals_default": bool(grads[True]) and torch.equal(grads[True][0], grads[False][0]),
            "refused_by_deterministic_mode": refused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    plain = build_model(RunConfig.from_flat({"model.backbone": "resnet10t", "privacy.enabled": False}), seed=0)
    dp = build_model(RunConfig.from_flat({"model.backbone": "resnet10t"}), seed=0)
    gated = build_model(RunConfig.from_flat({"model.backbone": "resnet10t", "attention.method": "mask"}), seed=0)
    rows = [measure("plain step", plain, _plain, args.repeats), measure("DP step (bookkeeping)", dp, _dp, args.repeats),
            measure("DP step, gated model", gated, _dp, args.repeats)]
    for row in rows:
        sys.stderr.write(json.dumps(row) + "\n")
    write_report({"what": "torch.use_deterministic_algorithms on a site's CPU step (tiny-cpu model, 16 patients)",
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                  "results": rows}, args.out)


if __name__ == "__main__":
    main()
