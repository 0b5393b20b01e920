"""What the console reads or serves from a run folder must lie in it: every path is resolved (links followed) and
refused when it lands outside its folder, and every run folder must resolve to a folder directly under the runs
root. A link to /etc/passwd named model_card.json, an exports/NAME link to another folder, a run folder that is a
link to a folder elsewhere: each is refused and logged, never read."""

from __future__ import annotations

import logging
from pathlib import Path

from medfusion_fl.errors import ConfigError

log = logging.getLogger(__name__)


class OutsideFolder(ConfigError):
    """A path that resolves outside the folder it was asked for in."""


def contained(folder: Path | str, relative: Path | str) -> Path:
    """`folder / relative` with every link followed, if it lies inside `folder`'s own real path; else OutsideFolder
    (logged: someone put a link there)."""
    base = Path(folder).resolve()
    path = (base / relative).resolve()
    if path != base and not path.is_relative_to(base):
        log.warning("refused %s under %s: it resolves to %s, outside that folder", relative, base, path)
        raise OutsideFolder(f"{relative} is a link out of its folder; it is not read or served")
    return path


def inside(folder: Path | str, relative: Path | str) -> Path | None:
    """contained(), or None for a path that resolves outside (for readers that skip what they may not read)."""
    try:
        return contained(folder, relative)
    except OutsideFolder:
        return None


def run_folder(root: Path | str, folder: Path | str) -> Path | None:
    """A run folder's real path when it resolves to a folder directly under the runs root `root`; None when it is
    a link to elsewhere (logged)."""
    real_root, real = Path(root).resolve(), Path(folder).resolve()
    if real.parent != real_root:
        log.warning("refused run folder %s: it resolves to %s, not a folder of %s", folder, real, real_root)
        return None
    return real
