"""Operators a DP step dispatches, at the GPU bench's real shapes, on a CPU in seconds.

The H200 profiles of the bookkeeping step (docs/benchmarks.md) showed resnet18 and vit_small
launch-bound: the GPU idled between kernels while the host dispatched them. Host time per operator
hardly depends on its size, so the number of operators a step dispatches tracks that overhead
without a GPU. Here the step runs under FakeTensorMode (shapes and dtypes only, no arithmetic) at the
real batch and image size, so the engine makes the same per-layer choices as on the GPU (the
bytes it held for norms match the H200 run's). A dispatch mode counts every operator that launches
work (views and metadata left out) and the bytes of its tensor arguments and results (roughly what
its kernel reads and writes: the other part of a small model's GPU time), per phase: the forward,
autograd's backward, the engine's hooks per layer type, and its finish.

Counted on CPU fake tensors, with the engine's CUDA choices (depthwise gradients by the weight-gradient
kernel). fp32 (the default) dispatches what CUDA does. --bf16 emulates CUDA's
autocast where CPU's differs: GroupNorm and LayerNorm run in fp32 (CPU autocast keeps them in bf16),
and the engine's fp32-result matmuls take half inputs directly (CPU casts them to fp32 first).

  python bench/dp_dispatch.py --backbones resnet18,vit_small_patch16_224 --out dispatch.json
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from stepbench import build_case, write_report  # noqa: E402

from medfusion_fl.privacy import bookkeeping, persample  # noqa: E402
from medfusion_fl.privacy.dp_sgd import _patient_losses  # noqa: E402

BACKBONES = ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224")
# operators that launch no kernel: views, metadata, allocation without fill, profiler ranges
FREE = {"view", "_unsafe_view", "reshape", "_reshape_alias", "transpose", "permute", "expand", "slice", "select",
        "unsqueeze", "squeeze", "squeeze_", "as_strided", "t", "detach", "alias", "split", "split_with_sizes",
        "unfold", "view_as", "flatten", "unbind", "chunk", "narrow", "diagonal", "lift_fresh", "lift_fresh_copy",
        "empty", "empty_like", "empty_strided", "new_empty", "device", "_record_function_enter_new",
        "_record_function_exit"}


class Tally(TorchDispatchMode):
    """Counts kernel-launching operators and the bytes they read and write, per `phase`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[str] = Counter()
        self.phase = "forward"

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in FREE:
            self.ops[(self.phase, name)] += 1
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes[self.phase] += sum(t.numel() * t.element_size() for t in tensors)
        return out

    def by_phase(self) -> dict[str, dict[str, float]]:
        ops: Counter[str] = Counter()
        for (phase, _), n in self.ops.items():
            ops[phase] += n
        return {phase: {"ops": n, "gb": round(self.bytes[phase] / 1e9, 2)} for phase, n in sorted(ops.items())}


def _phases(tally: Tally) -> Any:
    """Patch the engine so that its hooks count as `hooks.<layer type>` and its finish as `finish`."""
    on_grad, finish = bookkeeping.PerPatientClipper._on_grad, bookkeeping.PerPatientClipper._finish

    def counted_grad(self: Any, pending: Any, grad: torch.Tensor) -> None:
        before, tally.phase = tally.phase, f"hooks.{type(pending.layer).__name__}"
        try:
            on_grad(self, pending, grad)
        finally:
            tally.phase = before

    def counted_finish(self: Any, device: torch.device) -> torch.Tensor:
        tally.phase = "finish"
        return finish(self, device)  # type: ignore[no-any-return]

    bookkeeping.PerPatientClipper._on_grad = counted_grad  # type: ignore[method-assign]
    bookkeeping.PerPatientClipper._finish = counted_finish  # type: ignore[method-assign]
    return on_grad, finish


@contextmanager
def _cuda_autocast_rules() -> Iterator[None]:
    """What CUDA autocast does differently from CPU's, for --bf16 (module attributes, restored after)."""
    norms = {name: getattr(F, name) for name in ("group_norm", "layer_norm")}

    def fp32(func: Any) -> Any:
        def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            with torch.autocast("cpu", enabled=False):
                return func(x.float(), *args, **kwargs)
        return run

    def mm32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # _mm32's CUDA branch
        if x.dtype != torch.bfloat16:
            return x.float() @ y.float()
        return (torch.bmm if x.dim() == 3 else torch.mm)(x, y.to(x.dtype), out_dtype=torch.float32)

    original_mm32 = persample._mm32
    try:
        for name, func in norms.items():
            setattr(F, name, fp32(func))
        persample._mm32 = mm32
        yield
    finally:
        for name, func in norms.items():
            setattr(F, name, func)
        persample._mm32 = original_mm32


def count(backbone: str, dp: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One step of `backbone` (non-DP: forward + backward; DP: forward + clipped backward, no noise)."""
    cpu = torch.device("cpu")
    model, inputs, _ = build_case(backbone, baseline=False, batch=2, views=args.views, size=args.image_size,
                                  device=cpu, overrides={"privacy.enabled": dp})
    model.train()
    precision = "bf16" if args.bf16 else "fp32"
    fake, tally = FakeTensorMode(allow_non_fake_inputs=True), Tally()
    with fake:
        b, v, s = args.batch, args.views, args.image_size
        batch = {"views": torch.empty(b, v, 1, s, s), "view_mask": torch.ones(b, v),
                 "tabular": torch.empty(b, inputs[2].shape[1]), "label": torch.zeros(b, dtype=torch.long)}
    if not dp:
        with fake, tally:
            losses = _patient_losses(model, batch, cpu, precision)
            tally.phase = "backward"
            losses.mean().backward()  # type: ignore[no-untyped-call]
        return {"ops": sum(tally.ops.values()), "gb": round(sum(tally.bytes.values()) / 1e9, 2),
                "phases": tally.by_phase()}
    clipper = bookkeeping.PerPatientClipper(model, max_grad_norm=1.0)
    saved = _phases(tally)
    try:
        with fake, tally:
            with clipper.forward(b):
                losses = _patient_losses(model, batch, cpu, precision, cast_cache=False)
            tally.phase = "backward"
            clipper.clip_backward(losses)
    finally:
        bookkeeping.PerPatientClipper._on_grad, bookkeeping.PerPatientClipper._finish = saved  # type: ignore[method-assign]
    top: Counter[str] = Counter()
    for (phase, name), n in tally.ops.items():
        if phase.startswith(("hooks", "finish")):
            top[name] += n
    return {"ops": sum(tally.ops.values()), "gb": round(sum(tally.bytes.values()) / 1e9, 2),
            "phases": tally.by_phase(), "engine_top_ops": dict(top.most_common(10)),
            "held_for_norms": clipper.last_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, with CUDA's rules (see above)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    persample.FORWARD_FORM_DEVICES = ()  # CPU fake tensors, counted as the GPU runs them
    for backbone in args.backbones.split(","):
        with _cuda_autocast_rules() if args.bf16 else nullcontext():
            plain, dp = count(backbone, False, args), count(backbone, True, args)
        rows.append({"backbone": backbone, "non-dp": plain, "dp-bookkeeping": dp,
                     "dp_ops_ratio": round(dp["ops"] / plain["ops"], 2),
                     "dp_bytes_ratio": round(dp["gb"] / plain["gb"], 2)})
    write_report({"what": "operators dispatched and bytes they touch per step (FakeTensorMode, no arithmetic)",
                  "image_size": args.image_size, "batch": args.batch, "views": args.views, "bf16": args.bf16,
                  "results": rows}, args.out)


if __name__ == "__main__":
    main()
