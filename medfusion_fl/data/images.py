"""Read one view file into float32: an image (PNG/JPEG/NPY) as (C, H, W), a volume (NPY) as (C, D, H, W)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from medfusion_fl.config import default_source_side
from medfusion_fl.errors import DataError

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
SUFFIXES = PIL_SUFFIXES | {".npy"}


def _too_large(path: Path, sides: tuple[int, ...], max_side: int) -> DataError:
    return DataError(f"{path}: {' x '.join(map(str, sides))} is larger than data.max-source-side = {max_side} "
                     "(refused before decoding). Downscale the file, or raise data.max-source-side if such "
                     "images are expected.")


def _read_pil(path: Path, max_side: int) -> np.ndarray:
    try:
        with Image.open(path) as opened:  # reads the header only
            if max(opened.size) > max_side:
                raise _too_large(path, opened.size, max_side)
            opened.load()
            img: Image.Image = opened
            if img.mode in {"I;16", "I;16B", "I;16L"}:
                return np.asarray(img, dtype=np.float32) / np.float32(65535.0)
            if img.mode not in {"L", "RGB"}:
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (H, W) or (H, W, 3)
    except Image.DecompressionBombError as exc:  # PIL's own guard fires in open() above 2 x its pixel limit
        raise DataError(f"{path}: its header claims an image far larger than data.max-source-side = {max_side} "
                        f"({exc}); refused before decoding. Downscale the file.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc}). Re-export the file or remove the view.") from None


def _npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """Shape, Fortran order, dtype and data offset from a .npy header, without reading the array."""
    fmt = np.lib.format
    try:
        with path.open("rb") as handle:
            version = fmt.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(handle)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = fmt.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            return tuple(int(n) for n in shape), bool(fortran), dtype, handle.tell()
    except Exception as exc:  # numpy parses the header with Python's tokenizer: many error types for bad bytes
        raise DataError(f"{path}: not a readable .npy array ({exc}).") from None


def _read_npy(path: Path, max_side: int, *, volume: bool) -> np.ndarray:
    """Check the header against the run (dtype, rank, sides, file length), then memory-map and convert."""
    shape, fortran, dtype, offset = _npy_header(path)
    if dtype.hasobject or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
                               or dtype == np.bool_):
        raise DataError(f"{path}: dtype {dtype} is not a real number type; save it as float32 or an integer type.")
    ranks = (3, 4) if volume else (2, 3)
    if len(shape) not in ranks:
        raise DataError(f"{path}: shape {shape} has {len(shape)} dimension(s); expected "
                        + ("(D, H, W) or (C, D, H, W)." if volume else "(H, W) or (C, H, W)."))
    if len(shape) == ranks[1] and shape[0] > 4:
        raise DataError(f"{path}: shape {shape} has {shape[0]} channels (first axis); at most 4 are supported.")
    if 0 in shape:
        raise DataError(f"{path}: shape {shape} is empty.")
    if max(shape) > max_side:
        raise _too_large(path, shape, max_side)
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise DataError(f"{path}: the header says {dtype}{list(shape)} ({expected} bytes with the header) but the "
                        f"file has {size} bytes; it is truncated or its header is wrong. Re-export it.")
    try:  # the header already parsed and checked: map the data it describes (no second parse)
        array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        return np.array(array, dtype=np.float32)  # a copy: the mapping is read-only and closes with the file
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc}).") from None


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


def _load_volume(path: Path, channels: int, size: int, depth: int, max_side: int) -> np.ndarray:
    if path.suffix.lower() != ".npy":
        raise DataError(f"{path}: a 3D view (data.depth = {depth}) must be a .npy volume (D, H, W) or (C, D, H, W).")
    array = _read_npy(path, max_side, volume=True)
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


def load_view(path: Path, *, channels: int, size: int, depth: int = 0, max_side: int = 0) -> np.ndarray:
    """Decode, check and resize one view to (C, size, size), or (C, depth, size, size) when depth > 0;
    raises DataError naming the file. A source side above max_side (0: DataConfig's default rule) is
    refused from the file's header, before anything is decoded."""
    max_side = max_side or default_source_side(size, depth)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(SUFFIXES)}.")
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    if depth:
        return _load_volume(path, channels, size, depth, max_side)
    pil = suffix in PIL_SUFFIXES
    raw = _read_pil(path, max_side) if pil else _read_npy(path, max_side, volume=False)
    array = _to_chw(raw, path, channels, pil)
    if min(array.shape[1:]) < 2:
        raise DataError(f"{path}: image of shape {array.shape} is too small.")
    if not np.isfinite(array).all():
        raise DataError(f"{path}: contains NaN or infinite pixel values.")
    if array.shape[1:] != (size, size):
        tensor = torch.from_numpy(np.ascontiguousarray(array))[None]
        array = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[0].numpy()
    return np.ascontiguousarray(array, dtype=np.float32)


def source_shape(path: Path, max_side: int) -> tuple[int, int]:
    """(H, W) of a 2D image file from its header (nothing decoded); DataError naming the file if unreadable."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        shape = _npy_header(path)[0]
        if len(shape) not in (2, 3):
            raise DataError(f"{path}: shape {shape} is not an image; expected (H, W) or (C, H, W).")
        return shape[-2], shape[-1]
    try:
        with Image.open(path) as opened:
            if max(opened.size) > max_side:
                raise _too_large(path, opened.size, max_side)
            return opened.size[1], opened.size[0]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({exc}). Re-export the file or remove the view.") from None
