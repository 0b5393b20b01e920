"""What a data folder says it is (`folder.json` beside its manifest): a site's patients, the held-out folder, or a
public folder a starting point may be pretrained on. The generator and the importers write it; `pretrain` reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "folder.json"
SITE = "site"  # a hospital's patients (site import-dicom / import-nifti, or a synthetic site)
HELD_OUT = "held-out"  # the coordinator's evaluation folder
PUBLIC = "public"  # data that may leave any hospital: a pretraining folder


def role_record(role: str, **info: Any) -> bytes:
    """folder.json's bytes: the role and what made the folder."""
    return (json.dumps({"role": role, **info}, indent=2, sort_keys=True) + "\n").encode()


def folder_role(folder: Path) -> dict[str, Any]:
    """The folder's folder.json ({} when it has none or it does not parse)."""
    try:
        doc = json.loads((Path(folder) / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
