"""Step time and peak memory per backbone family: bare timm vs MedFusion, with/without checkpointing.

For each family (its first tested name) three training steps are measured in the same run:
  timm-baseline   the bare timm classifier on the B*V images a step of ours sees (no fusion model);
                  for 3D families (--depth D: volumes D x size x size) the bare 3D backbone and a linear head
  medfusion       our model: backbone per view, aggregation, tabular MLP, fusion, head
  medfusion+ckpt  the same with model.checkpointing = true
Each measurement runs in a fresh subprocess, so peak memory is its own: on CUDA
torch.cuda.max_memory_allocated, on CPU the rise of peak RSS over the process after building
model and batch. Prints one JSON document (also written to --out).

  python bench/model_memory.py --device cpu --image-size 64 --batch 8 --views 2
  python bench/model_memory.py --device cuda --image-size 224 --batch 32 --views 2 --out gpu.json
  python bench/model_memory.py --device cpu --depth 64 --image-size 64 --batch 2 --views 1 --families 3d
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from stepbench import build_case, child_settings, emit_report, parse_or_measure, ratios, run_child, time_steps  # noqa: E402

log = logging.getLogger("bench.model_memory")


def measure(mode: str, backbone: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process: median step time and peak memory of `mode`."""
    device = torch.device(args.device)
    model, inputs, labels = build_case(backbone, baseline=mode == "timm-baseline", batch=args.batch,
                                       views=args.views, size=args.image_size, device=device,
                                       overrides={"model.checkpointing": mode == "medfusion+ckpt"}, depth=args.depth)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(model(*inputs).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    timing = time_steps(step, device=device, warmup=args.warmup, steps=args.steps)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"mode": mode, "backbone": backbone, **timing, "params_m": round(params, 2)}


def _child(mode: str, backbone: str, args: argparse.Namespace) -> dict[str, Any]:
    return run_child(__file__, [*child_settings(args), "--depth", str(args.depth)],
                     ["--measure", mode, "--backbone", backbone])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="", help="comma-separated families, or '3d' for every 3D family "
                        "(default: all 2D; 3D families need --depth)")
    parser.add_argument("--depth", type=int, default=0, help="volume depth D for the 3D families (0: 2D images)")
    args = parse_or_measure(parser, measure)
    if args is None:
        return
    from medfusion_fl.models.backbone import FAMILIES

    if args.families == "3d":
        families = [f for f in FAMILIES if FAMILIES[f].is_3d]
    else:
        families = args.families.split(",") if args.families else [f for f in FAMILIES if not FAMILIES[f].is_3d]
    if any(FAMILIES[f].is_3d for f in families) != (args.depth > 0):
        parser.error("3D families run on volumes and 2D ones on images: give --depth D > 0 exactly with 3D families")
    rows = []
    for family in families:
        backbone = FAMILIES[family].names[0]
        results = {mode: _child(mode, backbone, args) for mode in ("timm-baseline", "medfusion", "medfusion+ckpt")}
        row: dict[str, Any] = {"family": family, "backbone": backbone, "depth": args.depth, **results,
                               **ratios(results["medfusion+ckpt"], results["medfusion"], "ckpt")}
        log.info("%s: %s", family, {k: v for k, v in row.items() if "ratio" in k})
        rows.append(row)
    emit_report(args, rows)

if __name__ == "__main__":
    main()
