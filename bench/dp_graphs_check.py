"""privacy.cuda-graphs on a GPU: the graphed DP step's clipped sums (noise 0) against the eager step's, for
a sequence of batch sizes that first runs a size eagerly, then records it, replays it, and pads smaller
batches into it. Prints JSON: the relative difference per step (0 up to float reordering; CI checks the
padding on CPU, tests/test_graphed.py).

  python bench/dp_graphs_check.py --backbones resnet18,vit_small_patch16_224 --out graphs-check.json
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from stepbench import build_case, device_name, write_report  # noqa: E402

from medfusion_fl.config import PrivacyConfig  # noqa: E402
from medfusion_fl.privacy.dp_sgd import BookkeepingStep  # noqa: E402

SIZES = (64, 64, 64, 61, 53, 53, 50, 64)  # eager, record, replay, pad into 64, eager 56, record 56, pad, replay


def check(backbone: str, args: argparse.Namespace, precision: str) -> dict[str, Any]:
    device = torch.device("cuda")
    model, inputs, labels = build_case(backbone, baseline=False, batch=max(SIZES), views=args.views,
                                       size=args.image_size, device=device, overrides={"privacy.enabled": True})
    model.train()
    quiet = PrivacyConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=0.5)
    eager = BookkeepingStep(model, quiet, torch.Generator(device).manual_seed(0), expected=1)
    graphed = BookkeepingStep(model, quiet.model_copy(update={"cuda_graphs": True}),
                              torch.Generator(device).manual_seed(0), expected=1)
    errors = []
    for size in SIZES:
        batch = {"views": inputs[0][:size], "view_mask": inputs[1][:size], "tabular": inputs[2][:size],
                 "label": labels[:size]}
        model.zero_grad(set_to_none=True)
        eager(batch, device, precision)
        want = torch.cat([p.grad.flatten() for p in eager.clipper.params]).double()  # type: ignore[union-attr]
        model.zero_grad(set_to_none=True)
        graphed(batch, device, precision)
        got = torch.cat([p.grad.flatten() for p in graphed.clipper.params]).double()  # type: ignore[union-attr]
        errors.append(float((got - want).norm() / want.norm()))
    eager.clipper.detach()
    graphed.clipper.detach()
    return {"sizes": list(SIZES), "relative_difference": errors, "max": max(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet18,efficientnet_b0,vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dp_graphs_check.py needs a CUDA GPU (the padding alone is tested on CPU: "
                         "tests/test_graphed.py)")
    warnings.filterwarnings("ignore")
    rows = []
    for backbone in args.backbones.split(","):
        for precision in ("fp32", "bf16"):
            try:
                rows.append({"backbone": backbone, "precision": precision, **check(backbone, args, precision)})
            except Exception as exc:  # report every backbone: one failing capture must not hide the others
                rows.append({"backbone": backbone, "precision": precision, "error": f"{type(exc).__name__}: {exc}"})
    write_report({"device": device_name("cuda"), "torch": torch.__version__, "results": rows}, args.out)


if __name__ == "__main__":
    main()
