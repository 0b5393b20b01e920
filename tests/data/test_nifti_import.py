"""`site import-nifti` on nibabel's real test volumes: canonical orientation, the configured shape,
4D and damaged files reported, pseudonymous ids."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from medfusion_fl.config import RunConfig
from medfusion_fl.data import check_site
from medfusion_fl.data.nifti_import import canonical_volume, import_nifti

nib = pytest.importorskip("nibabel")
from nibabel.testing import data_path  # noqa: E402

RUN = {"data.source": "folders", "data.view-names": "mri", "data.depth": 8, "data.image-size": 16,
       "model.backbone": "resnet3d-10"}


def test_volumes_are_reoriented_to_canonical_axes(tmp_path: Path) -> None:
    data = RunConfig.from_flat(RUN).data
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32)[:, None, None], (20, 12, 10)).copy()  # grows with i
    out = {}
    for name, affine in (("ras", np.eye(4)), ("las", np.diag([-1.0, 1.0, 1.0, 1.0]))):
        nib.save(nib.Nifti1Image(ramp, affine), str(tmp_path / f"{name}.nii"))
        out[name], note = canonical_volume(tmp_path / f"{name}.nii", data)
        assert note is None and out[name].shape == (8, 16, 16)
    # voxel index i runs towards R (RAS) or towards L (LAS): after canonicalisation W runs towards R
    assert np.all(np.diff(out["ras"][4, 8, :]) >= 0) and np.all(np.diff(out["las"][4, 8, :]) <= 0)
    assert out["ras"][4, 8, -1] > out["ras"][4, 8, 0]


def test_import_real_volumes_with_4d_and_damaged_files_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(Path(data_path) / "anatomical.nii", src / "A1.nii")
    shutil.copy(Path(data_path) / "standard.nii.gz", src / "A2.nii.gz")
    shutil.copy(Path(data_path) / "example4d.nii.gz", src / "A3.nii.gz")
    (src / "A4.nii").write_bytes(b"truncated")
    clinical = tmp_path / "clinical.csv"
    with clinical.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["PatientID", "age", "marker-a", "marker-b", "marker-c", "noise-a", "noise-b", "label"])
        for i, pid in enumerate(["A1", "A2", "A3", "A4"]):
            writer.writerow([pid, 40 + i, 0, 0, 0, 0, 0, ["negative", "positive"][i % 2]])
    run = RunConfig.from_flat(RUN)
    patients, problems = import_nifti(src, tmp_path / "site", run.data, view="mri", clinical=clinical)
    assert patients == 4
    text = "\n".join(map(str, problems))
    assert "A3.nii.gz: 4D volume" in text and "A4.nii: not a readable NIfTI volume" in text
    records, site_problems = check_site(tmp_path / "site", run.data)
    assert site_problems == [] and sum(r.views[0] is not None for r in records) == 3
    for record in records:
        assert record.patient_id.startswith("p-") and "A1" not in record.patient_id
        if record.views[0] is not None:
            volume = np.load(record.views[0])
            assert volume.shape == (8, 16, 16) and volume.min() >= 0.0 and volume.max() <= 1.0


def test_label_volumes_become_the_views_lesion_masks(tmp_path: Path) -> None:
    """A label volume beside each volume (labelsTr style): its non-zero voxels, reoriented and resampled with the
    volume, are the mask (each voxel the lesion's share); a label volume on another grid is reported, not used."""
    src, labels = tmp_path / "src", tmp_path / "labels"
    src.mkdir()
    labels.mkdir()
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])  # LAS: the reorientation must flip the label volume too
    image = np.random.default_rng(0).random((16, 12, 8)).astype(np.float32)
    lesion = np.zeros((16, 12, 8), np.int16)
    lesion[0:4, 0:6, 0:8] = 2  # a label value, not 1: any non-zero voxel is lesion
    for pid in ("B1", "B2"):
        nib.save(nib.Nifti1Image(image, affine), str(src / f"{pid}.nii.gz"))
    nib.save(nib.Nifti1Image(lesion, affine), str(labels / "B1.nii.gz"))
    nib.save(nib.Nifti1Image(lesion[:8], affine), str(labels / "B2.nii.gz"))  # another grid
    clinical = tmp_path / "clinical.csv"
    clinical.write_text("PatientID,age,marker-a,marker-b,marker-c,noise-a,noise-b,label\n"
                        "B1,40,0,0,0,0,0,positive\nB2,41,0,0,0,0,0,negative\n")
    run = RunConfig.from_flat({**RUN, "data.depth": 4, "data.image-size": 8})
    patients, problems = import_nifti(src, tmp_path / "site", run.data, view="mri", clinical=clinical,
                                      labels=labels)
    assert patients == 2 and len(problems) == 1 and "B2.nii.gz: label volume not used" in str(problems[0])
    records, site_problems = check_site(tmp_path / "site", run.data)
    assert site_problems == []
    masked = [r for r in records if r.masks[0] is not None]
    assert len(masked) == 1
    mask = np.load(masked[0].masks[0])
    assert mask.shape == (4, 8, 8) and mask.min() >= 0.0 and mask.max() == 1.0
    # the lesion fills the first quarter of voxel axis i, which runs towards L: after reorientation the last
    # quarter of W (towards R), the first half of H (A), all of D (S)
    assert float(mask[:, :4, 6:].mean()) == 1.0 and float(mask[:, :, :6].sum()) == 0.0
    assert float(mask[:, 4:, :].sum()) == 0.0
