"""Per-patient convolution weight gradients, formulated several ways, on the shapes of the GPU bench:
which is fastest on this device? Every variant is checked against the engine's own rule
(persample.patient_grads) before it is timed. Prints JSON; for a GPU session (bench/gpu_session.sh),
which then decides what the engine should use. On CPU it runs at a reduced size (--scale).

  depthwise (ConvNeXt's 7x7, groups = channels):
    engine     the images as groups of one batch-1 weight-gradient convolution (cuDNN), fp32
    unfold     each image's im2col (F.unfold) times its output gradient: a batched matrix-vector product
    as-conv    the output gradient as the kernel of a forward convolution over the padded input
  dense 3x3 (ResNet's early layers, groups = 1):
    engine     F.unfold's im2col as a transposed view, one batched matmul per image (fp32 results)
    grouped    the images as groups of one batch-1 weight-gradient convolution (cuDNN), fp32

  python bench/conv_wgrad_variants.py --out conv-variants.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from stepbench import device_name, write_report  # noqa: E402

from medfusion_fl.privacy import persample  # noqa: E402

# (name, channels in, channels out, groups, kernel, padding, spatial size): 64 patients x 2 views at 224 px
SHAPES = [("convnext stage 1 dw", 96, 96, 96, 7, 3, 56), ("convnext stage 3 dw", 384, 384, 384, 7, 3, 14),
          ("resnet layer 1 3x3", 64, 64, 1, 3, 1, 56), ("resnet layer 2 3x3", 128, 128, 1, 3, 1, 28)]


def _depthwise_unfold(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, patients: int) -> torch.Tensor:
    n, c = a.shape[:2]
    k = layer.kernel_size[0] * layer.kernel_size[1]
    cols = F.unfold(a.float(), layer.kernel_size, padding=layer.padding, stride=layer.stride)  # (N, C*k, T)
    per_image = torch.bmm(cols.view(n * c, k, -1), g.float().reshape(n * c, -1, 1))  # (N*C, k, 1)
    return per_image.view(patients, -1, c, 1, *layer.kernel_size).sum(dim=1)


def _depthwise_as_conv(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, patients: int) -> torch.Tensor:
    n, c = a.shape[:2]
    ph, pw = layer.padding  # type: ignore[misc]
    x = F.pad(a.float(), (pw, pw, ph, ph)).reshape(1, n * c, a.shape[2] + 2 * ph, a.shape[3] + 2 * pw)
    per_image = F.conv2d(x, g.float().reshape(n * c, 1, *g.shape[2:]), groups=n * c)  # (1, N*C, kh, kw)
    return per_image.view(patients, -1, c, 1, *layer.kernel_size).sum(dim=1)


def _dense_grouped(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, patients: int) -> torch.Tensor:
    n = a.shape[0]
    shape = (n * layer.out_channels, layer.in_channels, *layer.kernel_size)
    grad = persample._conv_weight_grad(layer, a.float().reshape(1, -1, *a.shape[2:]),
                                       g.float().reshape(1, -1, *g.shape[2:]), tuple(layer.padding), shape, n)  # type: ignore[arg-type]
    return grad.view(patients, -1, *layer.weight.shape).sum(dim=1)


def _time(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(shape: tuple[Any, ...], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    name, c_in, c_out, groups, kernel, padding, size = shape
    size = max(kernel, size // args.scale)
    patients, views = args.patients, args.views
    layer = nn.Conv2d(c_in, c_out, kernel, padding=padding, groups=groups, bias=False).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(patients * views, c_in, size, size, device=device, dtype=dtype)
    g = torch.randn(patients * views, c_out, size, size, device=device, dtype=dtype)
    want = persample.patient_grads(layer, a, g, patients)[layer.weight]
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "engine": lambda: persample.patient_grads(layer, a, g, patients)[layer.weight]}
    if groups > 1:
        variants["unfold"] = lambda: _depthwise_unfold(layer, a, g, patients)
        variants["as-conv"] = lambda: _depthwise_as_conv(layer, a, g, patients)
    else:
        variants["grouped"] = lambda: _dense_grouped(layer, a, g, patients)
    row: dict[str, Any] = {"layer": name, "size": size, "patients": patients, "views": views, "dtype": str(dtype)}
    for label, fn in variants.items():
        try:
            got = fn()
            error = float((got.double() - want.double()).norm() / want.double().norm())
            row[label] = {"ms": round(_time(fn, device, args.repeat), 3), "relative_difference": error}
        except Exception as exc:  # one failing variant must not hide the others' figures
            row[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--scale", type=int, default=1, help="divide spatial sizes by this (CPU: try 4)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [measure(shape, args, device) for shape in SHAPES]
    write_report({"device": device_name(args.device), "torch": torch.__version__, "results": rows}, args.out)


if __name__ == "__main__":
    main()
