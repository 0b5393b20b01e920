"""Shared benchmark harness: time training steps and their peak memory, one subprocess per case."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


Case = tuple[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor]


def build_case(backbone: str, *, baseline: bool, batch: int, views: int, size: int, device: torch.device,
               overrides: dict[str, Any] | None = None, depth: int = 0) -> Case:
    """Model, inputs and labels of one case: the bare timm classifier on the B*V images of a step
    (`baseline`), or the MedFusion model (with run-config `overrides`) on B patients of V views.
    `depth` > 0: volumes of depth x size x size, the baseline being the bare 3D backbone and a linear head."""
    import timm

    from medfusion_fl.config import RunConfig
    from medfusion_fl.models import build_model
    from medfusion_fl.models.backbone3d import create_backbone_3d

    torch.manual_seed(0)
    spatial = (depth, size, size) if depth else (size, size)
    if baseline and depth:
        bare = create_backbone_3d(backbone, in_chans=1)
        model = torch.nn.Sequential(bare, torch.nn.Linear(bare.num_features, 2)).to(device)
        return model, (torch.rand(batch * views, 1, *spatial, device=device),), \
            torch.randint(0, 2, (batch * views,), device=device)
    if baseline:
        kwargs = {"img_size": size} if any(k in backbone for k in ("vit", "swin", "maxvit")) else {}
        model = timm.create_model(backbone, pretrained=False, num_classes=2, in_chans=1, **kwargs).to(device)
        images = (torch.rand(batch * views, 1, size, size, device=device),)
        return model, images, torch.randint(0, 2, (batch * views,), device=device)
    run = RunConfig.from_flat({"model.backbone": backbone, "data.image-size": size, "data.depth": depth,
                               "data.view-names": ",".join(f"v{i}" for i in range(views)), **(overrides or {})})
    model = build_model(run, seed=0).to(device)
    inputs = (torch.rand(batch, views, 1, *spatial, device=device), torch.ones(batch, views, device=device),
              torch.rand(batch, len(run.data.columns), device=device))
    return model, inputs, torch.randint(0, 2, (batch,), device=device)


def time_steps(step: Callable[[], None], *, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Median seconds per step, and peak memory over the process state before the first step
    (CUDA: max_memory_allocated; CPU: peak RSS, hence one measurement per process)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb()
    return {"step_s": statistics.median(times), "peak_mem_mb": round(peak - base, 1)}


def run_child(script: str, settings: list[str], case: list[str]) -> dict[str, Any]:
    """Run `script settings case` in a fresh interpreter; its last stdout line is the JSON result."""
    done = subprocess.run([sys.executable, script, *settings, *case], capture_output=True, text=True, timeout=1800)
    if done.returncode:
        return {"case": case, "error": done.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments every step benchmark takes (and passes on to its measurement subprocesses)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)


def parse_or_measure(parser: argparse.ArgumentParser,
                     measure: Callable[[str, str, argparse.Namespace], dict[str, Any]]) -> argparse.Namespace | None:
    """Parse the options; in a measurement subprocess run `measure` and print its JSON (then None)."""
    add_common_args(parser)
    args = parser.parse_args()
    if args.measure:
        sys.stdout.write(json.dumps(measure(args.measure, args.backbone, args)) + "\n")
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return args


def child_settings(args: argparse.Namespace) -> list[str]:
    """The common arguments, for a measurement subprocess."""
    return ["--device", args.device, "--image-size", str(args.image_size), "--batch", str(args.batch),
            "--views", str(args.views), "--steps", str(args.steps), "--warmup", str(args.warmup),
            *(["--bf16"] if args.bf16 else [])]


def ratios(new: dict[str, Any], base: dict[str, Any], prefix: str) -> dict[str, float]:
    """Time and memory of `new` over `base`; empty when either case failed."""
    if "error" in new or "error" in base:
        return {}
    return {f"{prefix}_time_ratio": round(new["step_s"] / base["step_s"], 3),
            f"{prefix}_memory_ratio": round(new["peak_mem_mb"] / max(base["peak_mem_mb"], 1e-6), 3)}


def emit_report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Print the JSON report (and write it to --out)."""
    write_report({"device": device_name(args.device), "torch": torch.__version__, "image_size": args.image_size,
                  "batch": args.batch, "views": args.views, "bf16": args.bf16, "steps": args.steps,
                  "results": rows}, args.out)


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """Every benchmark's ending: the JSON report on stdout, and in `out` when given."""
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
