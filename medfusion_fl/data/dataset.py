"""A site's patients as a torch Dataset: views (V, C, H, W), view_mask (V,), tabular (F,), label."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medfusion_fl.config import DataConfig
from medfusion_fl.data.images import load_view
from medfusion_fl.data.manifest import MASK_SUFFIX, PatientRecord, Problem, read_manifest
from medfusion_fl.data.masks import load_mask
from medfusion_fl.errors import DataError

Sample = dict[str, torch.Tensor]


def check_site(folder: Path, data: DataConfig) -> tuple[list[PatientRecord], list[Problem]]:
    """Validate the manifest and decode every view file and lesion mask; returns records and every problem."""
    records, problems = read_manifest(folder, data)
    valid = []
    for record in records:
        bad = False
        for name, path, mask in zip(data.views, record.views, record.masks, strict=True):
            if path is None:
                continue
            try:
                load_view(path, channels=data.channels, size=data.image_size, depth=data.depth,
                          max_side=data.source_side_limit)
            except DataError as exc:
                problems.append(Problem(record.row, name, str(exc)))
                bad = True
                continue
            if mask is not None:
                try:
                    load_mask(mask, image=path, size=data.image_size, max_side=data.source_side_limit,
                              depth=data.depth)
                except DataError as exc:
                    problems.append(Problem(record.row, name + MASK_SUFFIX, str(exc)))
                    bad = True
        if not bad:
            valid.append(record)
    return valid, sorted(problems, key=lambda p: p.row)


def is_validation(patient_id: str, fraction: float) -> bool:
    """Stable split: a patient is in the validation part by a hash of its id, at every run."""
    digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


class SiteDataset(Dataset[Sample]):
    """Patients of one site folder; views are decoded on access (the folder was checked first). With `masks`
    (attention supervision) a sample also holds each view's lesion mask, "masks" (V, H, W), and
    "mask_present" (V,): 1 where the view has a mask."""

    def __init__(self, records: list[PatientRecord], data: DataConfig, *, masks: bool = False) -> None:
        self.records = records
        self.data = data
        self.masks = masks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        data = self.data
        spatial = (data.depth, data.image_size, data.image_size) if data.depth else (data.image_size, data.image_size)
        views = np.zeros((len(data.views), data.channels, *spatial), np.float32)
        mask = np.zeros(len(data.views), np.float32)
        for v, path in enumerate(record.views):
            if path is not None:
                views[v] = load_view(path, channels=data.channels, size=data.image_size, depth=data.depth,
                                     max_side=data.source_side_limit)
                mask[v] = 1.0
        sample = {
            "views": torch.from_numpy(views),  # (V, C, H, W) or (V, C, D, H, W)
            "view_mask": torch.from_numpy(mask),  # (V,)
            "tabular": torch.from_numpy(record.tabular),  # (F,)
            "label": torch.tensor(record.label, dtype=torch.long),
        }
        if self.masks:
            sample |= self._masks(record)
        return sample

    def _masks(self, record: PatientRecord) -> Sample:
        data = self.data
        spatial = (data.depth, data.image_size, data.image_size) if data.depth else (data.image_size, data.image_size)
        masks = np.zeros((len(data.views), *spatial), np.float32)
        present = np.zeros(len(data.views), np.float32)
        for v, (image, path) in enumerate(zip(record.views, record.masks, strict=True)):
            if image is not None and path is not None:
                masks[v] = load_mask(path, image=image, size=data.image_size, max_side=data.source_side_limit,
                                     depth=data.depth)
                present[v] = 1.0
        return {"masks": torch.from_numpy(masks), "mask_present": torch.from_numpy(present)}  # (V, [D,] H, W), (V,)

    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def with_masks(self) -> SiteDataset:
        """The same patients with their lesion masks, when the folder has any (else this dataset)."""
        if self.masks or not any(any(r.masks) for r in self.records):
            return self
        return SiteDataset(self.records, self.data, masks=True)


@dataclass
class SiteData:
    """A checked site folder split into train and validation patients."""

    folder: Path
    train: SiteDataset
    val: SiteDataset


def load_site(folder: Path, data: DataConfig, *, masks: bool = False) -> SiteData:
    """Check a site folder and split it; any problem raises one DataError listing them all. `masks`: the
    training patients' samples carry their lesion masks (attention supervision)."""
    records, problems = check_site(folder, data)
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"Site folder {folder} has {len(problems)} problem(s):\n  {shown}{more}\n"
                        f"Run `medfusion-fl site check {folder}` for the full list.")
    train = [r for r in records if not is_validation(r.patient_id, data.val_fraction)]
    val = [r for r in records if is_validation(r.patient_id, data.val_fraction)]
    if not train:
        raise DataError(f"Site folder {folder}: no training patients after the validation split "
                        f"(data.val-fraction = {data.val_fraction}).")
    return SiteData(Path(folder), SiteDataset(train, data, masks=masks), SiteDataset(val, data))


def load_test_set(folder: Path, data: DataConfig) -> SiteDataset:
    """A held-out folder used whole for centralized evaluation."""
    records, problems = check_site(folder, data)
    if problems:
        raise DataError(f"Held-out folder {folder} has {len(problems)} problem(s), first: {problems[0]}")
    return SiteDataset(records, data)
