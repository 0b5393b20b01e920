"""Crash-safe file writes: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], *, mode: int | None = None) -> None:
    """Write `path` so that readers see either the old or the complete new content. The file is
    created with mode 0600 (mkstemp) unless `mode` is given; the mode is set before it appears."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Atomically replace `path` with `data` (mode as in write_atomic)."""

    def write(handle: IO[bytes]) -> None:
        handle.write(data)

    write_atomic(path, write, mode=mode)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically replace `path` with `obj` as indented JSON (NaN is refused: not JSON)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def write_jsonl_atomic(path: Path, objs: list[Any]) -> None:
    """Atomically replace `path` with one JSON line per object (NaN refused)."""
    text = "".join(json.dumps(obj, sort_keys=False, allow_nan=False) + "\n" for obj in objs)
    write_bytes_atomic(path, text.encode("utf-8"))


def append_jsonl_atomic(path: Path, obj: Any) -> None:
    """Append one JSON line; the file is rewritten atomically so no line is ever half written."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    line = json.dumps(obj, sort_keys=False, allow_nan=False) + "\n"
    write_bytes_atomic(path, old + line.encode("utf-8"))
