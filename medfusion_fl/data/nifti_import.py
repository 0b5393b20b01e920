"""`medfusion-fl site import-nifti SRC --out SITE --view NAME`: NIfTI volumes into a 3D site folder.

SRC holds one `<patient id>.nii` or `.nii.gz` per patient. Each volume is reoriented to the closest
canonical orientation (RAS+, nibabel) and stored as a float32 .npy of shape (D, H, W) = the
(S, A, R) axes, i.e. axial slices from inferior to superior, resampled (trilinear) to
data.depth x data.image-size x data.image-size, intensities scaled by the 0.5-99.5 percentiles
to [0, 1]. A 4D file gives its first volume (reported). Labels and clinical columns come from a
CSV joined on the file's patient id; ids become salted pseudonyms as in the DICOM import. The
problem list (printed at the site, never written into the folder) names the original files.

Lesion masks: with `--labels DIR`, a label volume of the same name (`<patient id>.nii[.gz]`, the layout of
imagesTr/labelsTr collections) marks the lesion by its non-zero voxels; it must have its volume's voxel grid.
It goes through the same reorientation and is resampled by area averaging (each voxel: the lesion's share)
into the view's mask column (<view>-mask, a .npy of the volume's shape).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medfusion_fl.config import DataConfig
from medfusion_fl.data.importing import ImportProblem, PatientIds, finish_import, npy_bytes, read_clinical
from medfusion_fl.data.manifest import MASK_SUFFIX
from medfusion_fl.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _patient_id(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def _canonical(path: Path) -> tuple[np.ndarray, str | None]:
    """The file's voxels as (D, H, W) = its (S, A, R) axes after reorientation, and a note when a 4D file was cut."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))  # type: ignore[no-untyped-call]  # axes: R, A, S
    array = np.asarray(image.get_fdata(dtype=np.float32))
    note = None
    if array.ndim == 4:
        note = f"4D volume ({array.shape[3]} volumes): the first one is used"
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: {array.ndim}D data, expected a 3D volume")
    return np.ascontiguousarray(array.transpose(2, 1, 0)), note  # (R, A, S) -> (S, A, R) = (D, H, W)


def _resampled(volume: np.ndarray, data: DataConfig) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=(data.depth, data.image_size, data.image_size), mode="trilinear",
                        align_corners=False)
    return np.asarray(out[0, 0].numpy(), dtype=np.float32)


def canonical_volume(path: Path, data: DataConfig) -> tuple[np.ndarray, str | None]:
    """(D, H, W) float32 in [0, 1] at the configured shape, and a note when a 4D file was cut."""
    volume, note = _canonical(path)
    low, high = np.percentile(volume, [0.5, 99.5])
    volume = np.clip((volume - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    return _resampled(volume, data), note


def canonical_mask(path: Path, data: DataConfig, *, grid: tuple[int, ...]) -> np.ndarray:
    """A label volume's lesion (its non-zero voxels) as (D, H, W) float32 shares at the configured shape; its
    canonical voxel grid must be `grid`, that of its image."""
    labels, _ = _canonical(path)
    if labels.shape != grid:
        raise DataError(f"{path}: the label volume's grid {labels.shape} is not its image's {grid} (D, H, W after "
                        "reorientation); a label volume must share its image's voxels")
    from medfusion_fl.data.masks import resize_shares  # torch: only where a label volume is imported

    return resize_shares((labels != 0).astype(np.float32), (data.depth, data.image_size, data.image_size))


def import_nifti(src: Path, out: Path, data: DataConfig, *, view: str, clinical: Path, id_column: str = "PatientID",
                 salt_file: Path | None = None, labels: Path | None = None) -> tuple[int, list[ImportProblem]]:
    """Import every NIfTI file of `src` as view `view` of a new site folder, with the lesion masks of the label
    volumes in `labels` where there are some; (patients, problems)."""
    from medfusion_fl.console import progress

    if data.depth <= 0:
        raise ConfigError("NIfTI volumes need a 3D run: set data.depth > 0 (and a 3D backbone, e.g. resnet3d-10)")
    if view not in data.views:
        raise ConfigError(f"--view {view!r} is not in data.view-names {list(data.views)}")
    ids = PatientIds(salt_file or out.with_name(out.name + ".id-salt"))
    clinical_rows, problems = read_clinical(clinical, id_column, data)
    files = sorted(p for p in Path(src).rglob("*") if p.name.endswith((".nii", ".nii.gz")))
    rows, payloads = [], {}
    for path in progress(files, "converting NIfTI volumes"):
        pid = _patient_id(path)
        if pid not in clinical_rows:
            problems.append(ImportProblem(str(path), f"no row in the clinical CSV ({id_column}); left out (no label)"))
            continue
        try:
            volume, note = canonical_volume(path, data)
        except Exception as exc:  # nibabel raises many types for damaged files
            problems.append(ImportProblem(str(path), f"not a readable NIfTI volume ({exc})"))
            continue
        if note:
            problems.append(ImportProblem(str(path), note))
        row = {"patient_id": ids(pid), **clinical_rows.pop(pid), **{v: "" for v in data.views}}
        rel = f"volumes/{row['patient_id']}_{view}.npy"
        payloads[rel] = npy_bytes(volume)
        row[view] = rel
        if labels is not None:
            row[view + MASK_SUFFIX] = _label_mask(path, labels, data, payloads, rel, problems)
        rows.append(row)
    patients = finish_import(out, data, rows, payloads, unmatched=clinical_rows, ids=ids, problems=problems, src=src)
    return patients, problems


def _label_mask(path: Path, labels: Path, data: DataConfig, payloads: dict[str, bytes], rel: str,
                problems: list[ImportProblem]) -> str:
    """The manifest value of a volume's mask column: its label volume's mask, written next to it, or ''."""
    source = Path(labels) / path.name
    if not source.is_file():
        return ""
    try:
        grid = _canonical(path)[0].shape
        mask = canonical_mask(source, data, grid=grid)
    except Exception as exc:  # nibabel raises many types for damaged files
        problems.append(ImportProblem(str(source), f"label volume not used ({exc})"))
        return ""
    mask_rel = rel.removesuffix(".npy") + MASK_SUFFIX + ".npy"
    payloads[mask_rel] = npy_bytes(mask)
    return mask_rel
