"""DP-SGD overhead: step time and peak memory of the fusion model with and without DP, same run.

Per backbone, these cases, each in a fresh subprocess (bench/stepbench.py):
  timm-baseline   the bare timm classifier on the B*V images of a step (plain torch training)
  non-dp          the MedFusion model, plain AdamW step
  non-dp-graphed  the same, forward and backward replayed as a CUDA graph (CUDA only; for a fair
                  comparison with the next case)
  dp-opacus       the model prepared for DP, Opacus hooks (privacy.engine = 'opacus')
  dp-bookkeeping  the model prepared for DP, our one-pass engine (privacy.engine = 'bookkeeping')
  dp-bookkeeping-graphed  the same engine replayed as CUDA graphs (privacy.cuda-graphs = true; CUDA only)
Every DP case: exact per-patient clipping (all views of a patient together) + Gaussian noise + AdamW.
Prints one JSON document (also written to --out).

  python bench/dp_overhead.py --device cpu --image-size 64 --batch 8 --views 2
  python bench/dp_overhead.py --device cuda --image-size 224 --batch 64 --views 2 --bf16 --out dp-gpu.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from stepbench import (  # noqa: E402
    build_case,
    child_settings,
    emit_report,
    parse_or_measure,
    ratios,
    run_child,
    time_steps,
)

log = logging.getLogger("bench.dp_overhead")
BACKBONES = ("resnet18", "efficientnet_b0", "convnext_tiny", "vit_tiny_patch16_224")


def measure(case: str, backbone: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process."""
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    model, inputs, labels = build_case(backbone, baseline=case == "timm-baseline", batch=args.batch,
                                       views=args.views, size=args.image_size, device=device,
                                       overrides={"privacy.enabled": case.startswith("dp")})
    model.train()
    optimizer: torch.optim.Optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    backward: Any = None
    if case == "dp-opacus":
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        from medfusion_fl.privacy.dp_sgd import per_patient_backward, set_view_folding

        set_view_folding(model, False)
        loader = DataLoader(TensorDataset(*inputs, labels), batch_size=args.batch)
        _, optimizer, _ = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, wrap_model=False)
        backward = per_patient_backward
    dp_step: Any = None
    if case.startswith("dp-bookkeeping"):
        from medfusion_fl.config import PrivacyConfig
        from medfusion_fl.privacy.dp_sgd import BookkeepingStep

        privacy = PrivacyConfig(enabled=True, cuda_graphs=case.endswith("graphed"))
        dp_step = BookkeepingStep(model, privacy, torch.Generator(device).manual_seed(0), expected=args.batch)
        batch = {"views": inputs[0], "view_mask": inputs[1], "tabular": inputs[2], "label": labels}

    graphed = _graphed_plain_step(model, inputs, labels, args.bf16) if case == "non-dp-graphed" else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if dp_step is not None:  # forward, clipped backward and noise in one
            dp_step(batch, device, "bf16" if args.bf16 else "fp32")
        elif graphed is not None:
            graphed()
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(*inputs)
            loss = F.cross_entropy(logits.float(), labels)
            with backward(model) if backward is not None else nullcontext():
                loss.backward()
        optimizer.step()

    timing = time_steps(step, device=device, warmup=args.warmup, steps=args.steps)
    held = {"held_for_norms": dp_step.clipper.last_bytes} if dp_step is not None else {}
    if args.profile and dp_step is not None:
        _profile(step, backbone, args.profile)
    return {"case": case, "backbone": backbone, **timing, **held}


def _graphed_plain_step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor,
                        bf16: bool) -> Any:
    """Plain forward + backward recorded as one CUDA graph (fixed inputs, as the timing loop uses);
    returns a function that replays it and hands the recorded gradients to the parameters."""
    if not torch.cuda.is_available():
        raise RuntimeError("non-dp-graphed records a CUDA graph: it needs a CUDA device")
    params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(*inputs)
        F.cross_entropy(logits.float(), labels).backward()

    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS/cuDNN set-up)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            forward_backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward_backward()
    grads = [p.grad for p in params]

    def replay() -> None:
        graph.replay()
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad

    return replay


def _profile(step: Any, backbone: str, path: Path) -> None:
    """Append one profiled step to `path`: its top operators by device time, then the time inside
    each of the engine's ranges (dp.forward/backward/noise, bookkeeping.<layer type>, bookkeeping.finish)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.key_averages()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    ranges = sorted((e for e in events if e.key.startswith(("dp.", "bookkeeping."))), key=lambda e: e.key)
    lines = [f"{e.key:40s} calls {e.count:5d}  cpu {e.cpu_time_total / 1e3:9.2f} ms  "
             f"device {getattr(e, 'device_time_total', 0.0) / 1e3:9.2f} ms" for e in ranges]
    with path.open("a") as out:
        out.write(f"== {backbone} dp-bookkeeping ==\n{events.table(sort_by=key, row_limit=30)}\n")
        out.write("\n".join(lines) + "\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--cases", default="timm-baseline,non-dp,dp-opacus,dp-bookkeeping")
    parser.add_argument("--profile", type=Path, help="append a profile of one dp-bookkeeping step here")
    args = parse_or_measure(parser, measure)
    if args is None:
        return
    settings = child_settings(args)
    rows = []
    for backbone in args.backbones.split(","):
        extra = ["--profile", str(args.profile)] if args.profile else []
        cases = {c: run_child(__file__, settings, ["--measure", c, "--backbone", backbone, *extra])
                 for c in args.cases.split(",")}
        row: dict[str, Any] = {"backbone": backbone, **cases}
        for dp in ("dp-opacus", "dp-bookkeeping", "dp-bookkeeping-graphed"):
            if dp in cases and "non-dp" in cases:
                row |= ratios(cases[dp], cases["non-dp"], dp.replace("-", "_"))
        if "dp-bookkeeping-graphed" in cases and "non-dp-graphed" in cases:
            row |= ratios(cases["dp-bookkeeping-graphed"], cases["non-dp-graphed"], "graphed_vs_graphed")
        log.info("%s: %s %s", backbone, {k: v for k, v in row.items() if "ratio" in k},
                 {c: (r.get("step_s"), r.get("peak_mem_mb"), r.get("error")) for c, r in cases.items()})
        rows.append(row)
    emit_report(args, rows)

if __name__ == "__main__":
    main()
