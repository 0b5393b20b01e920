"""Per-patient gradient pieces of one layer call, from its input `a` and its output gradient `g`.

A layer call sees N = B * R rows, R consecutive rows per patient (R = 1, or the V views of a shared
backbone folded into the batch, patient-major). For each supported layer type this module gives:
  patient_grads(layer, a, g, B)   {param: (B, *param.shape)} fp32, each patient's gradient
  ghost_sq_norm(layer, a, g, B)   (B,) each patient's squared gradient norm without forming it
                                  (Linear / ungrouped Conv only: Gram matrices over positions)
  weighted_grads(layer, a, g, c)  {param: grad} = sum_i c_i * patient i's gradient, one matmul/conv
Every parameter of the layer gets a gradient (the caller drops frozen ones: during a clipped step
no parameter requires grad). Costs (flops, bytes) let the engine pick per call. Everything is computed
from the same `a` and `g` autograd would use, so the result is the exact per-patient gradient
(tests/test_bookkeeping.py, bench/dp_exactness.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.norm import LayerNorm2d
from torch import nn
from torch.nn.modules.conv import _ConvNd

from medfusion_fl.models.dp_form import LayerScale
from medfusion_fl.models.swin3d import RelativePositionBias

Grads = dict[torch.Tensor, torch.Tensor]  # parameter -> gradient


CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# device types whose depthwise per-image gradients use the forward form (_depthwise_as_forward): measured
# faster on CPU; CUDA keeps the weight-gradient kernel until a GPU session has timed both
FORWARD_FORM_DEVICES: tuple[str, ...] = ("cpu",)
SUPPORTED = (nn.Linear, *CONV, nn.GroupNorm, nn.LayerNorm, nn.Embedding, LayerScale, RelativePositionBias)


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why this layer's per-patient gradient cannot be computed here, or None."""
    if not isinstance(layer, SUPPORTED):
        return f"{type(layer).__name__} has no per-patient gradient rule"
    if isinstance(layer, CONV) and not isinstance(layer, Conv2dSame) and (
            not isinstance(layer.padding, tuple) or layer.padding_mode != "zeros"):
        return f"{type(layer).__name__} with padding={layer.padding!r}, padding_mode={layer.padding_mode!r}"
    if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.sparse):
        return "Embedding with max_norm or sparse gradients"
    return None


def _conv_input(layer: _ConvNd, a: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The zero-padded input the convolution really saw, and the padding still to apply (zeros)."""
    if isinstance(layer, Conv2dSame):  # pads inside forward, "same" as TensorFlow: replay that
        from timm.layers.padding import pad_same

        return pad_same(a, list(layer.kernel_size), list(layer.stride), list(layer.dilation)), (0, 0)
    return a, tuple(int(p) for p in layer.padding)


def _conv_weight_grad(layer: _ConvNd, x: torch.Tensor, g: torch.Tensor, padding: tuple[int, ...],
                      weight_shape: tuple[int, ...], groups: int) -> torch.Tensor:
    """Weight gradient of a convolution with `layer`'s stride and dilation (what torch.nn.grad does)."""
    weight = g.new_empty(1).expand(weight_shape)  # only its shape is read
    grads = torch.ops.aten.convolution_backward(g, x, weight, None, list(layer.stride), list(padding),
                                                list(layer.dilation), False, [0] * len(padding), groups,
                                                [False, True, False])
    out: torch.Tensor = grads[1]
    return out


def _rows(t: torch.Tensor, patients: int) -> torch.Tensor:
    """(N, ..., D) -> (B, R * positions, D): every position of a patient's rows in one axis."""
    return t.reshape(patients, -1, t.shape[-1])


def _half(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


def _mm32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y (2D, or batched per patient in 3D) with fp32 results. Half inputs stay half on CUDA
    (products of bf16 values are exact in the fp32 accumulator: the same numbers as fp32, at bf16
    speed); elsewhere in fp32."""
    if x.is_cuda and _half(x):
        return (torch.bmm if x.dim() == 3 else torch.mm)(x, y.to(x.dtype), out_dtype=torch.float32)
    return x.float() @ y.float()


def _common(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The input as autocast fed the layer: in g's precision when that is half (a is the module
    input, which autocast cast to bf16 for the matmul/conv), else fp32."""
    return a.to(g.dtype) if _half(g) else a.float()


def transient_bytes(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, patients: int, *, formed: bool) -> int:
    """Worst-case temporary bytes of patient_grads (`formed`) or ghost_sq_norm for this call: im2col,
    and a copy of g or each image's fp32 gradient (in g's precision when half, else fp32)."""
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        size = g.element_size() if _half(g) else 4
        columns = size * g.numel() // g.shape[1] * layer.weight.numel() // layer.out_channels
        if formed and _per_image(layer, g, patients):
            return columns + 4 * g.shape[0] * layer.weight.numel()
        return columns + size * g.numel()
    return 8 * (a.numel() + g.numel())


def _per_image(layer: nn.Conv2d, g: torch.Tensor, patients: int) -> bool:
    """Form a conv's gradients per image, then sum each patient's (writes 4 bytes per weight per
    image), rather than per patient over its images' rows at once (copies g to merge them): the
    former when there is one image per patient, or when an image's gradient is the smaller."""
    return g.shape[0] == patients or 4 * layer.weight.numel() * g.shape[0] <= g.numel() * g.element_size()


def _unfold(layer: nn.Conv2d, a: torch.Tensor, patients: int) -> torch.Tensor:
    """Conv2d input as im2col rows per patient: (B, R*T, C_in*kh*kw), one copy (a view for 1x1)."""
    x, padding = _conv_input(layer, a)
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    if layer.dilation != (1, 1):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
        return _rows(cols.transpose(1, 2), patients)
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    if (kh, kw) == (1, 1):  # (N, C, H, W) strided to the output grid: no im2col at all
        return _rows(x[:, :, ::sh, ::sw].flatten(2).transpose(1, 2), patients)
    windows = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, Ho, Wo, kh, kw), a view
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(patients, -1, x.shape[1] * kh * kw)  # one copy


def _image_columns(layer: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """Conv2d input as each image's im2col matrix, (N, T, C_in*kh*kw), as a transposed view of
    F.unfold's output (one copy, padding included; no copy for an unstrided 1x1 conv): a matmul
    reads it as it is."""
    x, padding = _conv_input(layer, a)
    if layer.kernel_size == (1, 1) and not any(padding):
        sh, sw = layer.stride
        return x[:, :, ::sh, ::sw].flatten(2).transpose(1, 2)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
    return cols.transpose(1, 2)


def _conv_out_rows(g: torch.Tensor, patients: int) -> torch.Tensor:
    return _rows(g.flatten(2).transpose(1, 2), patients)  # (N, C_out, *S) -> (B, R*T, C_out)


def _conv_out_cols(g: torch.Tensor, patients: int) -> torch.Tensor:
    """(N, C_out, *S) -> (B, C_out, R*T): a view when R = 1."""
    flat = g.flatten(2)  # (N, C_out, T)
    rows = flat.shape[0] // patients
    if rows == 1:
        return flat
    return flat.reshape(patients, rows, flat.shape[1], -1).transpose(1, 2).reshape(patients, flat.shape[1], -1)


def ghost_cost(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, patients: int) -> tuple[float, float]:
    """(flops of the Gram-matrix norm, flops of forming each patient's gradient) for this call."""
    if isinstance(layer, nn.Linear):
        positions = g.numel() / (patients * layer.out_features)
        d_in, d_out = layer.in_features, layer.out_features
    elif isinstance(layer, nn.Conv2d) and layer.groups == 1:
        positions = g.numel() / (g.shape[1] * patients)
        d_in, d_out = layer.weight.numel() // layer.out_channels, layer.out_channels
    else:
        return float("inf"), 0.0
    return patients * positions ** 2 * (d_in + d_out), patients * positions * d_in * d_out


def ghost_sq_norm(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, patients: int) -> torch.Tensor:
    """||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s) per patient, plus the bias term."""
    a = _common(a, g)
    if isinstance(layer, nn.Linear):
        x, dy = _rows(a, patients), _rows(g, patients)
    else:
        x, dy = _unfold(layer, a, patients), _conv_out_rows(g, patients)  # type: ignore[arg-type]
    sq = (_mm32(x, x.transpose(1, 2)) * _mm32(dy, dy.transpose(1, 2))).sum(dim=(1, 2))
    if layer.bias is not None:
        sq = sq + dy.sum(dim=1, dtype=torch.float32).square().sum(dim=1)
    return sq  # (B,)


def _per_image_conv(layer: _ConvNd, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-image weight gradient (N, C_out, C_in/groups, *k) of a grouped/depthwise convolution: the
    images become groups of one batch-1 convolution, so this is the same weight-gradient kernel plain
    training runs (cuDNN's depthwise kernel for groups = channels), with N times the groups."""
    x, padding = _conv_input(layer, a)
    x, g = _common(x, g).float(), g.float()  # the input as autocast fed it; fp32: no rounded result
    n, shape = x.shape[0], tuple(layer.weight.shape)
    if isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels and x.device.type in FORWARD_FORM_DEVICES:
        return _depthwise_as_forward(layer, x, g, padding).reshape(n, *shape)
    grad = _conv_weight_grad(layer, x.reshape(1, -1, *x.shape[2:]), g.reshape(1, -1, *g.shape[2:]), padding,
                             (n * shape[0], *shape[1:]), n * layer.groups)
    return grad.reshape(n, *shape)


def _depthwise_as_forward(layer: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
    """Per-image depthwise weight gradient as a forward convolution: grad[n, o, i, j] = sum over output
    positions t of g[n, o, t] * x_padded[n, o // m, stride * t + dilation * (i, j)], i.e. the padded
    input convolved with each image's output gradient as its kernel (taps `stride` apart, outputs
    `dilation` apart; rows past the kernel size, left by uneven strides, are dropped). On CPU this runs
    2.7-7x faster than the weight-gradient kernel (bench/conv_wgrad_variants.py); CUDA keeps the latter
    until a GPU session times both."""
    ph, pw = padding
    x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    n, c_in = x.shape[:2]
    grad = F.conv2d(x.reshape(1, n * c_in, *x.shape[2:]), g.reshape(-1, 1, *g.shape[2:]),
                    stride=layer.dilation, dilation=layer.stride, groups=n * c_in)  # (1, N*C_out, >=kh, >=kw)
    kh, kw = layer.kernel_size
    return grad[:, :, :kh, :kw]


def _per_patient(t: torch.Tensor, patients: int) -> torch.Tensor:
    """(N, *shape) per-image -> (B, *shape) per-patient sums (no kernel when N = B)."""
    if t.shape[0] == patients:
        return t
    return t.reshape(patients, -1, *t.shape[1:]).sum(dim=1)


def _patient_sum(t: torch.Tensor, patients: int, channels: tuple[int, ...]) -> torch.Tensor:
    """(N, ...) -> (B, *channel sizes): each patient's sum over its rows and every dimension but
    `channels`, in one reduction (splitting dimension 0 is a view for any strides)."""
    grouped = t.reshape(patients, -1, *t.shape[1:])  # (B, R, ...)
    return grouped.sum(dim=(1, *[d + 1 for d in range(1, t.dim()) if d not in channels]))


def _norm_affine(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The normalised input x_hat that a LayerNorm's weight multiplies, channels at dim 1 or last."""
    x = a.float()
    if isinstance(layer, LayerNorm2d):
        return F.layer_norm(x.permute(0, 2, 3, 1), layer.normalized_shape, eps=layer.eps).permute(0, 3, 1, 2)
    return F.layer_norm(x, layer.normalized_shape, eps=layer.eps)  # type: ignore[arg-type]


def _group_norm_grads(layer: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, patients: int,
                      stats: tuple[torch.Tensor, torch.Tensor] | None) -> Grads:
    """Per-image weight and bias gradients from one call of GroupNorm's own fused backward: the N
    images, each of C channels in G groups, are one image of N*C channels in N*G groups (no group
    spans two images, so every group's mean and rstd stay the same), whose "weight gradient" of
    N*C entries is each image's. Then summed per patient. `stats`: GroupNorm's saved (mean, rstd)
    per (image, group), if known. Half inputs (CPU autocast) are summed in fp32."""
    n, c = a.shape[:2]
    x, dy = (a.float(), g.float()) if _half(a) or _half(g) else (a, g.to(a.dtype))
    if stats is None:
        var, mean = torch.var_mean(x.reshape(n, layer.num_groups, -1), dim=2, unbiased=False)
        rstd = (var + layer.eps).rsqrt()
    else:
        mean, rstd = (t.to(x.dtype) for t in stats)
    want_weight, want_bias = isinstance(layer.weight, nn.Parameter), isinstance(layer.bias, nn.Parameter)
    size = x.numel() // (n * c)
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        dy.reshape(1, n * c, size), x.reshape(1, n * c, size), mean.reshape(1, -1), rstd.reshape(1, -1), None,
        1, n * c, size, n * layer.num_groups, [False, want_weight, want_bias])
    out: Grads = {}
    if want_weight:
        out[layer.weight] = _per_patient(weight.view(n, c), patients)
    if want_bias:
        out[layer.bias] = _per_patient(bias.view(n, c), patients)
    return out


def saved_node(layer: nn.Module, output: torch.Tensor) -> Any:
    """The autograd node that saved exactly the input this layer computed with (the bf16 cast under
    autocast for a conv; the fp32 input with mean and rstd for GroupNorm), or None. Reading the input
    from it holds no copy beyond what autograd keeps anyway."""
    node = output.grad_fn
    name = type(node).__name__
    if isinstance(layer, CONV) and not isinstance(layer, Conv2dSame) and name == "ConvolutionBackward0":
        return node
    if isinstance(layer, nn.GroupNorm) and name == "NativeGroupNormBackward0":
        return node
    return None


def from_node(layer: nn.Module, node: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(input, GroupNorm (mean, rstd) or None) from a saved_node, before that node runs."""
    stats = (node._saved_result1.detach(), node._saved_result2.detach()) if isinstance(layer, nn.GroupNorm) else None
    return node._saved_input.detach(), stats  # detached: an unpacked saved tensor references the graph


def patient_grads(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, patients: int,
                  stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> Grads:
    """Each patient's gradient of every trainable parameter of `layer`, (B, *shape) fp32.
    `stats`: GroupNorm's saved (mean, rstd) per (image, group), if known."""
    out: Grads = {}
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if isinstance(layer, nn.Linear):
        x, dy = _rows(_common(a, g), patients), _rows(g, patients)
        out[layer.weight] = _mm32(dy.transpose(1, 2), x)  # (B, d_out, d_in)
        bias_grad = dy.sum(dim=1, dtype=torch.float32)
    elif isinstance(layer, nn.Conv2d) and layer.groups == 1 and _per_image(layer, g, patients):
        x, dy = _image_columns(layer, _common(a, g)), g.flatten(2)  # (N, T, C_in*k*k), (N, C_out, T): no copy of g
        out[layer.weight] = _per_patient(_mm32(dy, x), patients).reshape(patients, *layer.weight.shape)
        bias_grad = _per_patient(dy.sum(dim=2, dtype=torch.float32), patients)
    elif isinstance(layer, nn.Conv2d) and layer.groups == 1:
        x, dy = _unfold(layer, _common(a, g), patients), _conv_out_cols(g, patients)  # (B, RT, Ck2), (B, Co, RT)
        out[layer.weight] = _mm32(dy, x).reshape(patients, *layer.weight.shape)
        bias_grad = dy.sum(dim=2, dtype=torch.float32)
    elif isinstance(layer, CONV):
        out[layer.weight] = _per_patient(_per_image_conv(layer, a, g), patients)
        bias_grad = _per_patient(g.flatten(2).sum(dim=2, dtype=torch.float32), patients)
    elif isinstance(layer, nn.GroupNorm):
        out.update(_group_norm_grads(layer, a, g, patients, stats))
        return out
    elif isinstance(layer, nn.LayerNorm):
        dy, x_hat = g.float(), _norm_affine(layer, a)
        normalized = len(layer.normalized_shape)  # type: ignore[arg-type]
        channels = (1,) if isinstance(layer, LayerNorm2d) else tuple(range(dy.dim() - normalized, dy.dim()))
        if isinstance(weight, nn.Parameter):
            out[weight] = _patient_sum(dy * x_hat, patients, channels)
        bias_grad = _patient_sum(dy, patients, channels)
    elif isinstance(layer, LayerScale):
        out[layer.gamma] = _patient_sum(g.float() * a.float(), patients, (layer.dim % g.dim(),))
        return out
    elif isinstance(layer, RelativePositionBias):  # g (B*windows, heads, N, N): each patient's windows summed
        n = g.shape[-1]
        per_pair = g.float().reshape(patients, -1, *g.shape[1:]).sum(dim=1).flatten(2).transpose(1, 2)  # (B, N*N, H)
        out[layer.table] = per_pair.new_zeros(patients, *layer.table.shape).index_add_(1, layer.offsets(n), per_pair)
        return out
    elif isinstance(layer, nn.Embedding):
        dy = _rows(g.float(), patients)  # (B, R*T, D)
        index = a.reshape(patients, -1)  # (B, R*T)
        grad = dy.new_zeros(patients, layer.num_embeddings, layer.embedding_dim)
        out[layer.weight] = grad.scatter_add_(1, index.unsqueeze(-1).expand_as(dy), dy)
        return out
    else:
        raise TypeError(f"no per-patient gradient rule for {type(layer).__name__}")
    if isinstance(bias, nn.Parameter):
        out[bias] = bias_grad
    return out


def _per_row(rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return rows.reshape(-1, *[1] * (t.dim() - 1))  # (N,) -> (N, 1, ...) against t (N, ...)


def _split_scaled(t: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows * t (t half precision, rows fp32) as hi - nlo, both in t's dtype: together the fp32
    product to ~2^-16, where rounding it to bf16 alone would err up to 2^-9 per entry. Two passes,
    each computing the product in fp32 and storing half: hi = round(t * w), nlo = round(hi - t * w)."""
    weights = _per_row(rows, t)
    hi = torch.mul(t, weights, out=torch.empty(t.shape, dtype=t.dtype, device=t.device))
    nlo = torch.addcmul(hi, t, weights, value=-1, out=torch.empty(t.shape, dtype=t.dtype, device=t.device))
    return hi, nlo


def _linear_weighted(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, rows: torch.Tensor) -> Grads:
    """sum_r w_r g_r a_r^T: the smaller of input and output gradient carries the weights (in half
    precision as hi - nlo: two half matmuls, where one fp32 matmul would take ~10x their time)."""
    x = _common(a, g)
    d_in, d_out = layer.in_features, layer.out_features
    if not _half(g):  # fp32: one matmul
        weight = (g * _per_row(rows, g)).reshape(-1, d_out).t() @ x.reshape(-1, d_in)
    elif d_in <= d_out:
        hi, nlo = (t.reshape(-1, d_in) for t in _split_scaled(x, rows))
        dy = g.reshape(-1, d_out).t()
        weight = _mm32(dy, hi) - _mm32(dy, nlo)
    else:
        hi, nlo = (t.reshape(-1, d_out).t() for t in _split_scaled(g, rows))
        flat_x = x.reshape(-1, d_in)
        weight = _mm32(hi, flat_x) - _mm32(nlo, flat_x)
    out: Grads = {layer.weight: weight}
    if isinstance(layer.bias, nn.Parameter):  # each row's summed output gradient, then weighted: fp32
        out[layer.bias] = rows @ g.reshape(g.shape[0], -1, d_out).sum(dim=1, dtype=torch.float32)
    return out


def weighted_grads(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, rows: torch.Tensor) -> Grads:
    """sum_i w_i * (patient i's gradient) for a Linear or Conv call, fp32 (from g's precision: no bf16
    rounding of the sum). rows: (N,) fp32, each row's patient weight w_i."""
    if isinstance(layer, nn.Linear):
        return _linear_weighted(layer, a, g, rows)
    conv: _ConvNd = layer  # type: ignore[assignment]
    dy = g.float() * _per_row(rows, g)  # (N, C_out, *S) fp32: cuDNN's half weight gradient is half
    x, padding = _conv_input(conv, a)
    out: Grads = {conv.weight: _conv_weight_grad(conv, _common(x, g).float(), dy, padding, tuple(conv.weight.shape),
                                                 conv.groups)}
    if isinstance(conv.bias, nn.Parameter):
        out[conv.bias] = dy.flatten(2).sum(dim=(0, 2))
    return out
