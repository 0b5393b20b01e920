"""Read one view file into float32: an image (PNG/JPEG/NPY) as (C, H, W), a volume (NPY) as (C, D, H, W)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from medfusion_fl.errors import DataError

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
SUFFIXES = PIL_SUFFIXES | {".npy"}


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as opened:
            opened.load()
            img: Image.Image = opened
            if img.mode in {"I;16", "I;16B", "I;16L"}:
                return np.asarray(img, dtype=np.float32) / np.float32(65535.0)
            if img.mode not in {"L", "RGB"}:
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (H, W) or (H, W, 3)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable image ({exc}). Re-export the file or remove the view.") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc}).") from None
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{path}: dtype {array.dtype} is not numeric.")
    return np.asarray(array, dtype=np.float32)


def _to_chw(array: np.ndarray, path: Path, channels: int, pil: bool) -> np.ndarray:
    if array.ndim == 2:
        array = array[None]  # (1, H, W)
    elif array.ndim == 3 and pil:
        array = array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    elif array.ndim != 3:
        raise DataError(f"{path}: shape {array.shape} is not an image; expected (H, W) or (C, H, W).")
    if array.shape[0] == channels:
        return array
    if channels == 1 and array.shape[0] == 3:
        return np.asarray(array.mean(axis=0, keepdims=True), dtype=np.float32)  # RGB -> gray
    if channels == 3 and array.shape[0] == 1:
        return np.repeat(array, 3, axis=0)
    raise DataError(f"{path}: {array.shape[0]} channels, but data.channels = {channels}.")


def _load_volume(path: Path, channels: int, size: int, depth: int) -> np.ndarray:
    if path.suffix.lower() != ".npy":
        raise DataError(f"{path}: a 3D view (data.depth = {depth}) must be a .npy volume (D, H, W) or (C, D, H, W).")
    array = _read_npy(path)
    if array.ndim == 3:
        array = array[None]  # (1, D, H, W)
    if array.ndim != 4 or array.shape[0] != channels:
        raise DataError(f"{path}: shape {array.shape} is not a volume with data.channels = {channels}; "
                        "expected (D, H, W) or (C, D, H, W).")
    if not np.isfinite(array).all():
        raise DataError(f"{path}: contains NaN or infinite voxel values.")
    if array.shape[1:] != (depth, size, size):
        tensor = torch.from_numpy(np.ascontiguousarray(array))[None]
        array = F.interpolate(tensor, size=(depth, size, size), mode="trilinear", align_corners=False)[0].numpy()
    return np.ascontiguousarray(array, dtype=np.float32)


def load_view(path: Path, *, channels: int, size: int, depth: int = 0) -> np.ndarray:
    """Decode, check and resize one view to (C, size, size), or (C, depth, size, size) when depth > 0;
    raises DataError naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(SUFFIXES)}.")
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    if depth:
        return _load_volume(path, channels, size, depth)
    pil = suffix in PIL_SUFFIXES
    array = _to_chw(_read_pil(path) if pil else _read_npy(path), path, channels, pil)
    if min(array.shape[1:]) < 2:
        raise DataError(f"{path}: image of shape {array.shape} is too small.")
    if not np.isfinite(array).all():
        raise DataError(f"{path}: contains NaN or infinite pixel values.")
    if array.shape[1:] != (size, size):
        tensor = torch.from_numpy(np.ascontiguousarray(array))[None]
        array = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[0].numpy()
    return np.ascontiguousarray(array, dtype=np.float32)
