"""`medfusion-fl pretrain FOLDER --out FILE`: a starting point trained centrally, without DP, on a public folder.

The folder must not hold any site's patients: one whose folder.json says it is a site's (or the held-out folder),
that lies under the run's sites-root, or that shares patients with a site folder this machine can see is refused.
The weights are written in the plain form (safetensors) with a small card beside them (`<FILE>.card.json`);
`init.source = 'file'` with `init.path = FILE` starts a federation from them (the whole model when the schema is
the run's, else `init.part = 'backbone'`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from medfusion_fl.config import RunConfig
from medfusion_fl.console import progress
from medfusion_fl.data import load_site
from medfusion_fl.data.folder_role import HELD_OUT, PUBLIC, SITE, folder_role
from medfusion_fl.data.manifest import MANIFEST, read_manifest
from medfusion_fl.durable import write_bytes_atomic, write_json_atomic
from medfusion_fl.errors import DataError
from medfusion_fl.models import build_model
from medfusion_fl.models.dp_form import plain_state
from medfusion_fl.pretrained.start import weights_sha256
from medfusion_fl.pretrained.weights import file_sha256
from medfusion_fl.training import predict, score, train_local

log = logging.getLogger("medfusion_fl.pretrain")


def refuse_patient_folders(folder: Path, run: RunConfig) -> dict[str, Any]:
    """The folder's role record, when it may be pretrained on; else DataError saying whose patients it holds."""
    role = folder_role(folder)
    if role.get("role") == SITE:
        who = f" ({role['site']})" if role.get("site") else ""
        raise DataError(f"{folder}: its folder.json says it holds the patients of a site{who}; a starting point is "
                        "trained centrally, so it is trained on public data only (a folder whose folder.json says "
                        f"role '{PUBLIC}', e.g. `medfusion-fl synth --public N`).")
    if role.get("role") == HELD_OUT:
        raise DataError(f"{folder}: its folder.json says it is the held-out folder; training on it would make every "
                        "later evaluation on it optimistic. Pretrain on a public folder of other patients.")
    root = Path(run.data.sites_root).resolve()
    if Path(folder).resolve().is_relative_to(root):
        raise DataError(f"{folder} lies under data.sites-root ({root}), where the sites' folders are; pretrain on a "
                        "public folder elsewhere.")
    ids = {r.patient_id for r in read_manifest(folder, run.data)[0]}
    for site in sorted(root.glob("site-*")) if root.is_dir() else []:
        if (site / MANIFEST).is_file():
            shared = ids & {r.patient_id for r in read_manifest(site, run.data)[0]}
            if shared:
                raise DataError(f"{folder}: {len(shared)} of its patients (e.g. {sorted(shared)[0]!r}) are patients "
                                f"of {site}; pretrain on a public folder of other patients.")
    return role


def pretrain(folder: Path, out: Path, run: RunConfig, *, epochs: int, seed: int) -> dict[str, Any]:
    """Train the run's model on `folder` (its train split; AUROC on its validation split each epoch), write the
    weights to `out` and the card beside them; returns the card."""
    if out.suffix != ".safetensors":
        raise DataError(f"--out {out}: write a .safetensors file (init.path reads it without unpickling anything)")
    role = refuse_patient_folders(folder, run)
    plain = RunConfig.from_flat({**run.to_flat(), "privacy.enabled": False, "secagg.enabled": False,
                                 "init.source": "random", "init.path": "", "init.sha256": "",
                                 "train.freeze": "", "train.class-weights": ""})  # the federation's levers, not its
    data = load_site(folder, plain.data)
    model = build_model(plain, seed=seed)
    cfg = plain.train.model_copy(update={"local_epochs": 1})  # an epoch at a time: its AUROC logged
    history = []
    for epoch in progress(range(epochs), "pretraining"):
        result = train_local(model, data.train, cfg, device=torch.device("cpu"), seed=seed * 1000 + epoch)
        scored = score(*predict(model, data.val, batch_size=64, device=torch.device("cpu"))) if len(data.val) else None
        history.append({"epoch": epoch + 1, "train_loss": result.loss,
                        "val_auroc": scored.auroc if scored else None, "val_loss": scored.loss if scored else None})
        log.info("epoch %d/%d: training loss %.4f, validation AUROC %s", epoch + 1, epochs, result.loss,
                 "n/a" if scored is None or scored.auroc is None else f"{scored.auroc:.3f}")
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in plain_state(model).items()}
    write_bytes_atomic(out, save(state))
    manifest = hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()
    what = "a starting point trained centrally without DP on a public folder (medfusion-fl pretrain); no site's " \
           "patient is in it"
    card: dict[str, Any] = {
            "what": what, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "folder": str(folder), "folder_role": role or "none (no folder.json): public by the user's word",
            "manifest_sha256": manifest, "patients": {"train": len(data.train), "validation": len(data.val)},
            "epochs": epochs, "seed": seed, "history": history, "file": out.name, "file_sha256": file_sha256(out),
            "weights_sha256": weights_sha256(state), "form": "plain (medfusion_fl.models.dp_form.plain_names)",
            "use": f"init.source = 'file', init.path = {str(out)!r} (the whole model when the schema is the run's; "
                   "init.part = 'backbone' for its backbone only)",
            "config": {k: v for k, v in plain.to_flat().items() if k.split(".")[0] in ("data", "model", "train")}}
    write_json_atomic(out.with_suffix(".card.json"), card)
    log.info("wrote %s (sha256 %s) and %s", out, card["file_sha256"][:16], out.with_suffix(".card.json"))
    return card
