"""Per-patient clipping exactness on any device: the bookkeeping engine's clipped sum (noise 0,
bound at 0.9 x the median per-patient norm) against a naive per-patient loop, per backbone family.

fp32: each patient alone through the model (the definition). bf16: each patient's own loss from
the same batched bf16 forward (bf16's rounding depends on batch shape), one backward per patient with
weight gradients kept in fp32 (weight_grads_in_fp32, as the engine keeps them); "stock_error" is the
error against stock autocast's loop, whose own per-patient weight gradients are rounded to bf16.
Norms and differences in fp64 (CPU fp32 norms of ~1e7 entries are off by up to 1e-3).
Prints JSON; tests/test_bookkeeping.py asserts the same on CPU in CI.

  python bench/dp_exactness.py --device cuda --out dp-exactness.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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
from medfusion_fl.training import autocast  # noqa: E402

DP_FAMILIES = [f for f in FAMILIES if f not in {"swin", "maxvit"}]


def family_model(family: str, checkpointing: bool, aggregation: str = "attention",
                 norm: str = "group") -> torch.nn.Module:
    flat = {**FAMILIES[family].ci_config(), "model.dropout": 0.0, "model.image-dim": 16,
            "model.tabular-hidden": 8, "model.checkpointing": checkpointing, "model.view-aggregation": aggregation,
            "model.norm": norm, "privacy.enabled": True}
    return build_model(RunConfig.from_flat(flat), seed=0).train()


def patients(model: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Four patients: both views, one missing view each way, no views (then tabular only)."""
    views, _, tabular = example_inputs(model.spec, batch=4)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    return tuple(t.to(device) for t in (torch.rand(views.shape, generator=g), mask,
                                        torch.randn(tabular.shape, generator=g), labels))


@contextmanager
def weight_grads_in_fp32() -> Iterator[None]:
    """Under autocast: F.linear / F.conv*d exactly as autocast runs them (bf16 inputs, output and input
    gradient) except that the weight and bias gradients are computed in fp32 from the same bf16 tensors.
    Stock autocast rounds each of them to bf16 (relative error up to 3.9e-3 in every patient's gradient),
    which is the reference's error, not the engine's; the engine keeps fp32 weight gradients. Patched as
    module attributes (not a TorchFunctionMode): checkpoints' recompute in backward must see them too."""
    originals = {name: getattr(F, name) for name in ("linear", "conv1d", "conv2d", "conv3d", "layer_norm")}

    def half(name: str, func: Any) -> Any:
        arg_names = ("bias", "stride", "padding", "dilation", "groups")

        def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not torch.is_autocast_enabled(x.device.type):
                return func(x, *args, **kwargs)
            if name == "layer_norm":  # CPU autocast keeps layer_norm in bf16 (CUDA's runs it in fp32)
                if x.device.type != "cpu" or x.dtype != torch.bfloat16:
                    return func(x, *args, **kwargs)
                names = ("normalized_shape", "weight", "bias", "eps")
                opts = {**dict(zip(names, args, strict=False)), **kwargs}
                return _HalfLayerNorm.apply(x, *(opts.get(k) for k in names[:3]), opts.get("eps", 1e-5))
            options = {**dict(zip(arg_names, args[1:], strict=False)), **kwargs}
            return _HalfOp.apply(func, name == "linear", x, args[0] if args else options.pop("weight"),
                                 options.pop("bias", None), options)
        return run

    try:
        for name, func in originals.items():
            setattr(F, name, half(name, func))
        yield
    finally:
        for name, func in originals.items():
            setattr(F, name, func)


class _HalfOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, func: Any, linear: bool, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                options: dict[str, Any]) -> torch.Tensor:
        half = torch.get_autocast_dtype(x.device.type)
        xh, wh = x.to(half), w.to(half)
        with torch.autocast(x.device.type, enabled=False):
            y = func(xh, wh, None if b is None else b.to(half), **options)
        ctx.save_for_backward(xh, wh)
        ctx.linear, ctx.options, ctx.x_dtype, ctx.has_bias = linear, options, x.dtype, b is not None
        return y

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        xh, wh = ctx.saved_tensors
        if ctx.linear:
            gx = gy @ wh
            flat, cols = gy.float().reshape(-1, wh.shape[0]), xh.float().reshape(-1, wh.shape[1])
            gw, gb = flat.t() @ cols, flat.sum(dim=0)
        else:
            dims = xh.dim() - 2
            opts = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **ctx.options}
            if isinstance(opts["padding"], str):
                raise ValueError(f"padding={opts['padding']!r}: give the reference explicit padding")
            conf = [list(v) if isinstance(v, tuple | list) else [v] * dims
                    for v in (opts["stride"], opts["padding"], opts["dilation"])]
            back = torch.ops.aten.convolution_backward
            gx = back(gy, xh, wh, None, *conf, False, [0] * dims, opts["groups"], [True, False, False])[0]
            gw = back(gy.float(), xh.float(), wh.float(), None, *conf, False, [0] * dims, opts["groups"],
                      [False, True, False])[1]
            gb = gy.float().sum(dim=[d for d in range(gy.dim()) if d != 1])
        return None, None, gx.to(ctx.x_dtype), gw, gb if ctx.has_bias else None, None


class _HalfLayerNorm(torch.autograd.Function):
    """CPU autocast's bf16 layer_norm, with weight and bias gradients in fp32 from the same input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shape: Any, w: torch.Tensor | None = None,
                b: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, list(shape), w, b, eps)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.shape = list(shape)
        return y

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, w, b, mean, rstd = ctx.saved_tensors
        gx = torch.ops.aten.native_layer_norm_backward(gy, x, ctx.shape, mean, rstd, w, b, [True, False, False])[0]
        lead = list(range(x.dim() - len(ctx.shape)))
        x_hat = (x.float() - mean.float()) * rstd.float()
        gw = None if w is None else (gy.float() * x_hat).sum(dim=lead)
        gb = None if b is None else gy.float().sum(dim=lead)
        return gx, None, gw, gb, None


def _flat(grads: list[torch.Tensor | None], params: list[torch.nn.Parameter]) -> torch.Tensor:
    pairs = zip(grads, params, strict=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in pairs])


def naive_per_patient(model: torch.nn.Module, data: tuple[torch.Tensor, ...], bf16: bool,
                      precise: bool = True) -> list[torch.Tensor]:
    """Each patient's flat gradient, by autograd one patient at a time (bf16: weight gradients in fp32
    unless not `precise`, stock autocast)."""
    views, mask, tabular, labels = data
    params = [p for p in model.parameters() if p.requires_grad]
    device = views.device.type
    if bf16:  # one batched forward (bf16 rounding depends on batch shape), one backward per patient
        out = []
        with weight_grads_in_fp32() if precise else nullcontext():  # also for checkpoints' recompute
            with torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False):  # as the DP step
                logits = model(views, mask, tabular).float()
            for i in range(4):  # backward(), not autograd.grad: reentrant checkpointing supports only the former
                model.zero_grad(set_to_none=True)
                F.cross_entropy(logits[i:i + 1], labels[i:i + 1]).backward(retain_graph=i < 3)
                out.append(_flat([p.grad for p in params], params))
        model.zero_grad(set_to_none=True)
        return out
    out = []
    for i in range(4):  # backward(), not autograd.grad: reentrant checkpointing supports only the former
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(views[i:i + 1], mask[i:i + 1], tabular[i:i + 1]), labels[i:i + 1]).backward()
        out.append(_flat([p.grad for p in params], params))
    model.zero_grad(set_to_none=True)
    return out


def clipped_error(model: torch.nn.Module, data: tuple[torch.Tensor, ...], bf16: bool,
                  precise: bool = True) -> dict[str, float]:
    """Relative error of the engine's clipped sum, and of its per-patient norms, against the loop.
    CPU oneDNN's bf16 Conv3d backward is nondeterministic (now and then inf) in the reference loop;
    those cases run on PyTorch's own kernels (our engine's result did not change across runs)."""
    exact_kernels = bf16 and data[0].device.type == "cpu" and any(
        isinstance(m, torch.nn.Conv3d) for m in model.modules())
    with torch.backends.mkldnn.flags(enabled=False) if exact_kernels else nullcontext():
        return _clipped_error(model, data, bf16, precise)


def _clipped_error(model: torch.nn.Module, data: tuple[torch.Tensor, ...], bf16: bool,
                   precise: bool) -> dict[str, float]:
    per = naive_per_patient(model, data, bf16, precise)
    norms = torch.stack([g.double().norm() for g in per]).float()  # CPU fp32 norms of ~1e7 entries err ~1e-3
    bound = 0.9 * float(norms.median())  # at least the two largest norms are clipped
    expected = sum(g * min(1.0, bound / (float(n) + 1e-6)) for g, n in zip(per, norms, strict=True))
    clipper = PerPatientClipper(model, max_grad_norm=bound)
    views, mask, tabular, labels = data
    try:
        # the DP step's autocast: no cast cache (privacy/dp_sgd.py, BookkeepingStep says why)
        with clipper.forward(4), autocast("bf16" if bf16 else "fp32", views.device, cache=False):
            logits = model(views, mask, tabular)
        got_norms = clipper.clip_backward(F.cross_entropy(logits.float(), labels, reduction="none"))
    finally:
        clipper.detach()
    got = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])  # type: ignore[union-attr]
    diff = (got.double() - expected.double()).norm() / expected.double().norm()  # type: ignore[union-attr]
    return {"error": float(diff),
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
    modes = {"fp32": (False, False), "checkpointing": (True, False), "bf16": (False, True),
             "checkpointing-bf16": (True, True)}
    for family in DP_FAMILIES:
        for mode, (ckpt, bf16) in modes.items():
            model = family_model(family, ckpt).to(device)
            row = {"family": family, "mode": mode, **clipped_error(model, patients(model, device), bf16)}
            if bf16:
                row["stock_error"] = clipped_error(model, patients(model, device), bf16, precise=False)["error"]
            rows.append(row)
    text = json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "results": rows}, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
