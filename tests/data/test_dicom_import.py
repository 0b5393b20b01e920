"""`site import-dicom` on pydicom's real test file-set (a cervical-spine X-ray study in three CR
views, CT and MR series): views mapped by rules, bad files reported, no identifier in the folder."""

from __future__ import annotations

import csv
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from medfusion_fl.config import RunConfig
from medfusion_fl.data import check_site
from medfusion_fl.data.dicom_import import import_dicom
from medfusion_fl.errors import ConfigError, DataError

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

SPINE, OTHER = "77654033", "98890234"
RULES = """
[views.frontal]
ViewPosition = ["AP", "PA"]
[views.lateral]
ViewPosition = ["LL", "RL", "LAT(ERAL)?"]
"""
COLUMNS = ["age", "marker-a", "marker-b", "marker-c", "noise-a", "noise-b"]


def _tree() -> Path:
    return Path(get_testdata_file("DICOMDIR")).parent


def _clinical(path: Path, ids: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["PatientID", *COLUMNS, "label"])
        for i, pid in enumerate(ids):
            writer.writerow([pid, 50 + i, 0.1, -0.2, 0.3, 0.0, 1.0, ["negative", "positive"][i % 2]])
    return path


def _setup(tmp_path: Path, ids: list[str] | None = None) -> tuple[RunConfig, Path, Path]:
    (tmp_path / "rules.toml").write_text(RULES)
    run = RunConfig.from_flat({"data.source": "folders"})
    return run, tmp_path / "rules.toml", _clinical(tmp_path / "clinical.csv", ids or [SPINE, OTHER, "X-999"])


def test_dicomdir_import_maps_views_and_keeps_identifiers_at_the_site(tmp_path: Path) -> None:
    run, rules, clinical = _setup(tmp_path)
    out = tmp_path / "site"
    report = import_dicom(_tree(), out, run.data, rules_path=rules, clinical=clinical)
    assert report.patients == 3 and report.views == {"frontal": 1, "lateral": 1}
    reasons = [p.reason for p in report.problems]
    assert any("second series for view 'frontal'" in r for r in reasons)  # OBLI 2, also AP
    assert sum("matches no view rule" in r for r in reasons) >= 5  # CT and MR series
    assert any("no images; kept" in r for r in reasons)  # clinical row only
    records, problems = check_site(out, run.data)
    assert problems == [] and len(records) == 3
    spine = next(r for r in records if r.views[0] is not None)
    assert spine.views[1] is not None and sum(v is None for r in records for v in r.views) == 4
    # identifiers: none of the source's ids, names or UIDs appear anywhere in the folder
    header = pydicom.dcmread(get_testdata_file("DICOMDIR"))
    secrets_ = {SPINE, OTHER, "Doe", "Archibald", "Peter", "X-999", *(
        str(r.get("StudyInstanceUID", "")) for r in header.DirectoryRecordSequence if "StudyInstanceUID" in r)}
    blob = b"".join(p.read_bytes() + str(p.relative_to(out)).encode() for p in out.rglob("*") if p.is_file())
    assert not [s for s in secrets_ if s and s.encode() in blob]
    salt = out.with_name("site.id-salt")
    assert salt.exists() and stat.S_IMODE(salt.stat().st_mode) == 0o600 and not (out / salt.name).exists()
    again = import_dicom(_tree(), tmp_path / "site-again", run.data, rules_path=rules, clinical=clinical,
                         salt_file=salt)  # the same salt gives the same pseudonyms
    ids = sorted(r.patient_id for r in records)
    assert ids == sorted(r.patient_id for r in check_site(tmp_path / "site-again", run.data)[0])
    assert all(i.startswith("p-") and len(i) == 18 for i in ids) and again.patients == 3


def test_monochrome1_is_inverted_and_bad_files_are_reported(tmp_path: Path) -> None:
    from medfusion_fl.data.dicom_import import _pixels

    cr = pydicom.dcmread(_tree() / SPINE / "CR1" / "6154")
    assert cr.PhotometricInterpretation == "MONOCHROME1"
    inverted = _pixels(cr)
    cr.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_allclose(inverted, 1.0 - _pixels(cr), atol=1e-6)

    tree = tmp_path / "tree"
    shutil.copytree(_tree() / SPINE, tree / SPINE)  # a plain folder walk (no DICOMDIR)
    (tree / SPINE / "junk.dcm").write_bytes(b"not dicom at all")
    run, rules, clinical = _setup(tmp_path, [SPINE])
    report = import_dicom(tree, tmp_path / "site", run.data, rules_path=rules, clinical=clinical)
    assert report.patients == 1 and report.views == {"frontal": 1, "lateral": 1}
    assert any("junk.dcm" in p.source and "not a readable DICOM" in p.reason for p in report.problems)
    with pytest.raises(DataError, match="never overwrites"):
        import_dicom(tree, tmp_path / "site", run.data, rules_path=rules, clinical=clinical)


def test_series_become_volumes_for_3d_runs(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text('[views.ct]\nModality = "CT"\nSeriesDescription = "Routine Brain"\n')
    run = RunConfig.from_flat({"data.source": "folders", "data.view-names": "ct", "data.depth": 8,
                               "data.image-size": 16, "model.backbone": "resnet3d-10"})
    clinical = _clinical(tmp_path / "clinical.csv", [SPINE])
    import_dicom(_tree(), tmp_path / "site", run.data, rules_path=tmp_path / "rules.toml", clinical=clinical)
    records, problems = check_site(tmp_path / "site", run.data)
    assert problems == [] and records[0].views[0] is not None
    volume = np.load(records[0].views[0])
    assert volume.shape == (8, 16, 16) and volume.min() >= 0.0 and volume.max() <= 1.0


def test_rules_must_cover_every_view(tmp_path: Path) -> None:
    run, _, clinical = _setup(tmp_path)
    (tmp_path / "partial.toml").write_text('[views.frontal]\nViewPosition = "AP"\n')
    with pytest.raises(ConfigError, match=r"no \[views.lateral\] table"):
        import_dicom(_tree(), tmp_path / "x", run.data, rules_path=tmp_path / "partial.toml", clinical=clinical)


def test_multiframe_colour_file_gives_a_gray_image_or_a_volume(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(get_testdata_file("SC_rgb_rle_2frame.dcm"), src / "a.dcm")  # RGB, RLE, 2 frames, PatientID ID1
    (tmp_path / "rules.toml").write_text('[views.frontal]\nModality = "OT"\n[views.lateral]\nModality = "none"\n')
    clinical = _clinical(tmp_path / "clinical.csv", ["ID1"])
    flat_2d = {"data.source": "folders"}
    run = RunConfig.from_flat(flat_2d)
    import_dicom(src, tmp_path / "site2d", run.data, rules_path=tmp_path / "rules.toml", clinical=clinical)
    records, problems = check_site(tmp_path / "site2d", run.data)
    assert problems == [] and records[0].views[0] is not None and records[0].views[0].suffix == ".png"
    (tmp_path / "rules3d.toml").write_text('[views.ct]\nModality = "OT"\n')
    run3d = RunConfig.from_flat({**flat_2d, "data.view-names": "ct", "data.depth": 4, "data.image-size": 8,
                                 "model.backbone": "resnet3d-10"})
    import_dicom(src, tmp_path / "site3d", run3d.data, rules_path=tmp_path / "rules3d.toml", clinical=clinical)
    volume = np.load(check_site(tmp_path / "site3d", run3d.data)[0][0].views[0])
    assert volume.shape == (4, 8, 8)  # the 2 frames, resampled to the configured depth


def _seg(image: Path, out: Path, box: tuple[slice, slice], *, rows: int | None = None) -> None:
    """A BINARY DICOM SEG of one segment on `image` (the real CR file), lesion = `box`, written to `out`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    source = pydicom.dcmread(image, stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "SEG", source.PatientID, source.StudyInstanceUID
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), 100
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows or source.Rows, source.Columns, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.SegmentationType = "BINARY"
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    derivation, group, segment = Dataset(), Dataset(), Dataset()
    derivation.SourceImageSequence = [reference]
    segment.ReferencedSegmentNumber = 1
    group.DerivationImageSequence, group.SegmentIdentificationSequence = [derivation], [segment]
    ds.PerFrameFunctionalGroupsSequence = [group]
    mask = np.zeros((ds.Rows, ds.Columns), np.uint8)
    mask[box] = 1
    ds.PixelData = pack_bits(mask)
    ds.save_as(out, enforce_file_format=True)


def test_dicom_seg_objects_become_the_lesion_masks_of_the_images_they_annotate(tmp_path: Path) -> None:
    """SEGs on the spine study's frontal (AP, series 2) and lateral (LL) images: their masks land beside the
    images, pixel for pixel; a SEG of the wrong size and one on the unused AP series are not used."""
    tree = tmp_path / "tree"
    shutil.copytree(_tree() / SPINE, tree / SPINE)
    _seg(tree / SPINE / "CR2" / "6247", tree / SPINE / "seg-frontal.dcm", (slice(2, 6), slice(4, 12)))
    _seg(tree / SPINE / "CR1" / "6154", tree / SPINE / "seg-lateral.dcm", (slice(0, 16), slice(0, 3)), rows=8)
    _seg(tree / SPINE / "CR3" / "6278", tree / SPINE / "seg-other.dcm", (slice(0, 1), slice(0, 1)))
    run, rules, clinical = _setup(tmp_path, [SPINE])
    report = import_dicom(tree, tmp_path / "site", run.data, rules_path=rules, clinical=clinical)
    assert report.views == {"frontal": 1, "lateral": 1} and report.masks == 1
    assert any("SEG is not used" in p.reason and "8 x 16" in p.reason for p in report.problems)
    assert not any("seg-" in p.source and "matches no view rule" in p.reason for p in report.problems)
    records, problems = check_site(tmp_path / "site", run.data)
    assert problems == []
    (record,) = records
    assert record.masks[1] is None and record.masks[0] is not None
    from PIL import Image

    mask = np.asarray(Image.open(record.masks[0]))
    expected = np.zeros((16, 16), np.uint8)
    expected[2:6, 4:12] = 255
    assert np.array_equal(mask, expected)
