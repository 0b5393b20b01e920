"""Per-patient clipping exactness on any device: the bookkeeping engine's clipped sum (noise 0,
bound at 0.9 x the median per-patient norm) against a naive per-patient loop, per backbone family.

fp32: each patient alone through the model (the definition). bf16: each patient's own loss from
the same batched bf16 forward, differentiated by autograd (bf16's rounding depends on batch shape).
Prints JSON; tests/test_bookkeeping.py asserts the same on CPU in CI.

  python bench/dp_exactness.py --device cuda --out dp-exactness.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medfusion_fl.config import RunConfig  # noqa: E402
from medfusion_fl.models import build_model, example_inputs  # noqa: E402
from medfusion_fl.models.backbone import FAMILIES  # noqa: E402
from medfusion_fl.privacy.bookkeeping import PerPatientClipper  # noqa: E402

DP_FAMILIES = [f for f in FAMILIES if f not in {"swin", "maxvit"}]


def family_model(family: str, checkpointing: bool, aggregation: str = "attention") -> torch.nn.Module:
    flat = {"model.backbone": FAMILIES[family].ci_name, "model.dropout": 0.0, "model.image-dim": 16,
            "model.tabular-hidden": 8, "model.checkpointing": checkpointing, "model.view-aggregation": aggregation,
            "privacy.enabled": True}
    if family == "resnet3d":
        flat |= {"data.depth": 8, "data.image-size": 16}
    return build_model(RunConfig.from_flat(flat), seed=0).train()


def patients(model: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Four patients: both views, one missing view each way, no views (then tabular only)."""
    views, _, tabular = example_inputs(model.spec, batch=4)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    return tuple(t.to(device) for t in (torch.rand(views.shape, generator=g), mask,
                                        torch.randn(tabular.shape, generator=g), labels))


def _flat(grads: list[torch.Tensor | None], params: list[torch.nn.Parameter]) -> torch.Tensor:
    pairs = zip(grads, params, strict=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in pairs])


def naive_per_patient(model: torch.nn.Module, data: tuple[torch.Tensor, ...], bf16: bool) -> list[torch.Tensor]:
    """Each patient's flat gradient, by autograd one patient at a time."""
    views, mask, tabular, labels = data
    params = [p for p in model.parameters() if p.requires_grad]
    device = views.device.type
    if bf16:
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(views, mask, tabular).float()
        return [_flat(list(torch.autograd.grad(F.cross_entropy(logits[i:i + 1], labels[i:i + 1]), params,
                                               retain_graph=True, allow_unused=True)), params) for i in range(4)]
    out = []
    for i in range(4):  # backward(), not autograd.grad: reentrant checkpointing supports only the former
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(views[i:i + 1], mask[i:i + 1], tabular[i:i + 1]), labels[i:i + 1]).backward()
        out.append(_flat([p.grad for p in params], params))
    model.zero_grad(set_to_none=True)
    return out


def clipped_error(model: torch.nn.Module, data: tuple[torch.Tensor, ...], bf16: bool) -> dict[str, float]:
    """Relative error of the engine's clipped sum, and of its per-patient norms, against the loop."""
    per = naive_per_patient(model, data, bf16)
    norms = torch.stack([g.norm() for g in per])
    bound = 0.9 * float(norms.median())  # at least the two largest norms are clipped
    expected = sum(g * min(1.0, bound / (float(g.norm()) + 1e-6)) for g in per)
    clipper = PerPatientClipper(model, max_grad_norm=bound)
    views, mask, tabular, labels = data
    try:
        with clipper.forward(4), torch.autocast(views.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(views, mask, tabular)
        got_norms = clipper.clip_backward(F.cross_entropy(logits.float(), labels, reduction="none"))
    finally:
        clipper.detach()
    got = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])  # type: ignore[union-attr]
    return {"error": float((got - expected).norm() / expected.norm()),  # type: ignore[union-attr]
            "norm_error": float(((got_norms - norms).abs() / norms).max()),
            "clipped": int((norms > bound * 1.01).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":  # exactness, not speed: no TF32 in the fp32 reference or ours
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows: list[dict[str, Any]] = []
    modes = {"fp32": (False, False), "checkpointing": (True, False), "bf16": (False, True)}
    for family in DP_FAMILIES:
        for mode, (ckpt, bf16) in modes.items():
            model = family_model(family, ckpt).to(device)
            rows.append({"family": family, "mode": mode, **clipped_error(model, patients(model, device), bf16)})
    text = json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "results": rows}, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
