"""Crash-safe file writes: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside `path` (`.<name>.<random>.tmp`), created as open() would: 0666 less the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {path}")


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], *, mode: int | None = None) -> None:
    """Write `path` so that readers see either the old or the complete new content. The file gets the
    permissions of any new file (0666 less the umask, so colleagues can read a model or a report) unless
    `mode` is given (0600 for the privacy ledger, the audit log, salts and keys); it is set before the file
    appears."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temp(path)
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
