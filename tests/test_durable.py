"""Crash-safe writes: a failed write leaves the old file; metrics lines append whole."""

from __future__ import annotations

from pathlib import Path
from typing import IO

import pytest

from medfusion_fl.durable import append_jsonl_atomic, write_atomic, write_json_atomic
from medfusion_fl.runstore import RunStore


def test_failed_write_keeps_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    write_json_atomic(path, {"steps": 1})

    def crash(handle: IO[bytes]) -> None:
        handle.write(b'{"steps": 2')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, crash)
    assert path.read_text() == '{\n  "steps": 1\n}\n'
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_jsonl_append_and_nan_refused(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_jsonl_atomic(path, {"round": 1})
    append_jsonl_atomic(path, {"round": 2})
    assert path.read_text() == '{"round": 1}\n{"round": 2}\n'
    with pytest.raises(ValueError):
        append_jsonl_atomic(path, {"loss": float("nan")})
    assert path.read_text().count("\n") == 2


def test_interrupted_checkpoint_temp_files_are_ignored(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.checkpoints.mkdir(parents=True)
    (store.checkpoints / ".round-0003.pt.abc.tmp").write_bytes(b"half")
    assert store.latest_checkpoint() is None


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_umask_and_secrets_stay_private(tmp_path: Path, umask: int, expected: int) -> None:
    import os
    import stat

    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "model_card.json", {"rounds": 3})
        write_atomic(tmp_path / "ledger.jsonl", lambda handle: handle.write(b"{}\n"), mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model_card.json").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "ledger.jsonl").stat().st_mode) == 0o600
