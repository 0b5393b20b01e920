"""Lesion masks of views (manifest column <view>-mask), read and checked for attention supervision.

A mask is a PNG (or another single-channel image PIL reads) or a .npy array (H, W), of the same size as its
view's image file; a volume's mask (data.depth > 0) is a .npy (D, H, W) of its volume's shape. Values: binary
(0/1, or 0 and the type's maximum: 255 for 8 bits, 65535 for 16), or fractions in [0, 1] (floating point). It
is resized to the run's image (or volume) size by area averaging, so a pixel of the result is the share of its
area that is lesion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from medfusion_fl.data.images import PIL_SUFFIXES, _npy_header, _read_npy, source_shape
from medfusion_fl.errors import DataError

SUFFIXES = PIL_SUFFIXES | {".npy"}
_FULL = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


def _raw(path: Path, max_side: int, volume: bool) -> np.ndarray:
    """The mask's values as stored, (H, W) or (D, H, W)."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES or (volume and suffix != ".npy"):
        raise DataError(f"{path}: unsupported mask file type {suffix!r}; use "
                        + ("a .npy (D, H, W) for a volume." if volume else "PNG or .npy."))
    if not path.is_file():
        raise DataError(f"{path}: mask file not found.")
    if suffix == ".npy":
        array = np.asarray(_read_npy(path, max_side, volume=volume))
        if array.ndim != (3 if volume else 2):
            raise DataError(f"{path}: a mask has shape {'(D, H, W)' if volume else '(H, W)'}; this one has shape "
                            f"{array.shape}.")
        stored = _npy_header(path)[2]
        return array.astype(stored) if stored.kind in "biu" else array  # integer masks judged as stored
    source_shape(path, max_side)  # the header's size checked before decoding
    try:
        with Image.open(path) as image:
            if image.mode not in {"1", "L", "P", "I;16", "I;16B", "I;16L", "I", "F"}:
                raise DataError(f"{path}: a mask has one channel; this image is {image.mode}. Save it as an "
                                "8-bit grayscale PNG (0 = background, 255 or 1 = lesion).")
            return np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable mask image ({exc}).") from None


def _fraction(values: np.ndarray, path: Path) -> np.ndarray:
    """Stored values -> lesion share in [0, 1]; DataError for anything else."""
    if values.dtype == np.bool_:
        return values.astype(np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{path}: the mask holds NaN or infinite values.")
    found = np.unique(values)
    if np.issubdtype(values.dtype, np.integer) or np.array_equal(found, np.round(found)):
        full = _FULL.get(values.dtype, 1)
        if set(found.tolist()) <= {0, 1}:
            return values.astype(np.float32)
        if full > 1 and set(found.tolist()) <= {0, full}:
            return (values / full).astype(np.float32)
    elif found.min() >= 0.0 and found.max() <= 1.0:
        return values.astype(np.float32)
    shown = ", ".join(f"{v:g}" for v in found[:6]) + (", ..." if len(found) > 6 else "")
    raise DataError(f"{path}: mask values {shown} are neither binary (0/1, or 0/255 in an 8-bit image) nor "
                    "fractions in [0, 1]. Save the lesion as 1 (or 255) and the background as 0.")


def _image_shape(image: Path, max_side: int, volume: bool) -> tuple[int, ...]:
    if not volume:
        return source_shape(image, max_side)
    shape = _npy_header(image)[0]
    return shape[-3:]  # (D, H, W) of (D, H, W) or (C, D, H, W)


def resize_shares(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A mask of lesion shares (H, W) or (D, H, W) brought to `shape` by area averaging, float32 in [0, 1]."""
    if mask.shape != shape:
        mask = F.interpolate(torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None], size=shape,
                             mode="area")[0, 0].numpy()
    return np.ascontiguousarray(np.clip(mask, 0.0, 1.0), dtype=np.float32)


def load_mask(path: Path, *, image: Path, size: int, max_side: int, depth: int = 0) -> np.ndarray:
    """The mask of the view in `image`, checked (readable, same size as the image, binary or in [0, 1]) and
    resized to (size, size), or (depth, size, size) for a volume, float32 in [0, 1]; DataError naming the
    file otherwise."""
    path = Path(path)
    values = _raw(path, max_side, volume=depth > 0)
    expected = _image_shape(image, max_side, volume=depth > 0)
    if values.shape != expected:
        axes = "D x H x W" if depth else "H x W"
        raise DataError(f"{path}: the mask is {' x '.join(map(str, values.shape))} but its image {image.name} is "
                        f"{' x '.join(map(str, expected))} ({axes}); a mask must cover its image pixel for pixel.")
    return resize_shares(_fraction(values, path), (depth, size, size) if depth else (size, size))
