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
