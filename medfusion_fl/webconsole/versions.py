"""Model versions (every checkpoint and export of a run) and the comparison of two of them.

A version's config is its checkpoint's own (read with torch.load(weights_only=True)) or its model card's;
its metrics are the metrics line of its round; its per-site table is that round's site rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from medfusion_fl.errors import ConfigError
from medfusion_fl.webconsole.db import RoundRow, RunRow, SiteRoundRow, VersionRow
from medfusion_fl.webconsole.views import summary

# what the console lets a browser download of an export (nothing else in a run folder, ever)
EXPORT_FILES = ("model.onnx", "model_card.json", "report/report.html", "report/evaluation.json")
DOWNLOADS = re.compile(r"^(exports/[A-Za-z0-9_.-]+/)?(" + "|".join(map(re.escape, EXPORT_FILES)) + ")$")


def version_config(version: VersionRow) -> dict[str, Any]:
    """The flat run config a version was trained with."""
    path = Path(version.path)
    try:
        if version.kind == "checkpoint":
            import torch  # only here: the console starts without torch (400 MB, 1.5 s)

            raw = torch.load(path, map_location="cpu", weights_only=True)
            return dict(raw["config"])
        card = json.loads((path.parent / "model_card.json").read_text(encoding="utf-8"))
        return dict(card["config"])
    except FileNotFoundError:
        raise ConfigError(f"version {version.name} of run {version.run_id}: {path} is gone (deleted since it was "
                          "indexed); GET /api/runs re-reads the folder") from None
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"version {version.name} of run {version.run_id}: {path} is unreadable "
                          f"({type(exc).__name__}: {exc})") from None


def find_version(db: Session, run_id: str, name: str) -> VersionRow:
    version = db.get(VersionRow, (run_id, name))
    if version is None:
        known = [v.name for v in db.scalars(select(VersionRow).where(VersionRow.run_id == run_id))]
        raise ConfigError(f"run {run_id!r} has no version {name!r}; " +
                          (f"its versions are {', '.join(known)}" if known else "it has no versions yet"))
    return version


def _side(db: Session, version: VersionRow) -> dict[str, Any]:
    run = db.get(RunRow, version.run_id)
    rounds = list(db.scalars(select(RoundRow).where(RoundRow.run_id == version.run_id).order_by(RoundRow.round)))
    upto = [r.record for r in rounds if version.round is None or r.round <= version.round]
    line = next((r.record for r in rounds if r.round == version.round), None)
    sites = db.scalars(select(SiteRoundRow).where(SiteRoundRow.run_id == version.run_id,
                                                  SiteRoundRow.round == version.round).order_by(SiteRoundRow.site))
    return {"run": version.run_id, "run_name": run.name if run else version.run_id, "version": version.name,
            "kind": version.kind, "round": version.round,
            "held_out": (line or {}).get("held_out", {}), "evaluate": (line or {}).get("evaluate", {}),
            "sites": [{"site": s.site, "status": s.status, "reason": s.reason, "epsilon": s.epsilon,
                       "budget": s.budget} for s in sites],
            "curves": [summary(x) for x in upto]}


def compare(db: Session, a: VersionRow, b: VersionRow) -> dict[str, Any]:
    """Config diff, metrics, per-site tables and curves of two versions (of one run or two)."""
    config_a, config_b = version_config(a), version_config(b)
    diff = [{"key": key, "a": config_a.get(key), "b": config_b.get(key)}
            for key in sorted(set(config_a) | set(config_b)) if config_a.get(key) != config_b.get(key)]
    return {"a": _side(db, a), "b": _side(db, b), "config_diff": diff}
