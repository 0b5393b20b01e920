"""Fuzz what a hospital's files can hold: manifest CSV text, image and .npy bytes, DICOM headers.

The property everywhere: a clear MedFusionError (DataError) or a listed problem naming row/file, never
another exception, a hang, or silently accepted bad data; files already there are never changed.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from medfusion_fl.config import RunConfig
from medfusion_fl.data import check_site
from medfusion_fl.data.images import load_view
from medfusion_fl.errors import DataError
from tests.data.test_hostile_inputs import npy_claiming, png_claiming

DATA = RunConfig.from_flat({"data.view-names": "frontal", "data.tabular-columns": "age:0:100,score",
                            "data.image-size": 16}).data
HEADER = ["patient_id", "label", "age", "score", "frontal"]

field = st.one_of(
    st.sampled_from(["", "p1", "negative", "positive", "50", "-1", "101", "nan", "inf", "1e308", "0x10",
                     "images/ok.png", "images/bad.png", "../outside.png", "/etc/passwd", "images/missing.png",
                     " positive ", "NEGATIVE", "\u00e9t\u00e9", "a\nb", '"quoted"', "\x00"]),
    st.text(max_size=12),
)
row = st.lists(field, min_size=0, max_size=7)


def _csv(rows: list[list[str]]) -> str:
    import csv

    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-site")
    (folder / "images").mkdir()
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(folder / "images" / "ok.png")
    (folder / "images" / "bad.png").write_bytes(png_claiming(90000, 3))
    return folder


def _accepted_rows_are_valid(records: list, folder: Path) -> None:
    ids = [r.patient_id for r in records]
    assert len(ids) == len(set(ids)) and all(ids)
    for record in records:
        assert record.label in (0, 1)
        assert np.isfinite(record.tabular).all() and -1.0 <= record.tabular[0] <= 1.0  # age is ranged
        for view in record.views:
            assert view is None or view.resolve().is_relative_to(folder.resolve())


@given(header=st.one_of(st.just(HEADER), st.permutations(HEADER), st.lists(st.sampled_from([*HEADER, "x"]),
                                                                            max_size=7)),
       rows=st.lists(row, max_size=6), bom=st.booleans(), raw=st.binary(max_size=40))
def test_any_manifest_gives_records_or_named_problems(site_folder: Path, header: list[str],
                                                      rows: list[list[str]], bom: bool, raw: bytes) -> None:
    text = _csv([header, *rows]).encode("utf-8")
    (site_folder / "manifest.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text + raw)
    images = {p.name: p.read_bytes() for p in (site_folder / "images").iterdir()}
    try:
        records, problems = check_site(site_folder, DATA)
    except DataError as exc:
        assert "manifest.csv" in str(exc)
        return
    assert all(p.row >= 1 and p.message for p in problems)
    if len(set(header)) != len(header):
        assert records == [] and any("appears" in p.message for p in problems)
    _accepted_rows_are_valid(records, site_folder)
    assert {p.name: p.read_bytes() for p in (site_folder / "images").iterdir()} == images  # read, never written


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 9), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _npy_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(seed).random((10, 11), dtype=np.float32))
    return buffer.getvalue()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


@given(kind=st.sampled_from(["png", "npy"]), seed=st.integers(0, 5),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       cut=st.none() | st.integers(0, 400))
def test_any_image_bytes_give_a_checked_view_or_a_data_error(tmp_path: Path, kind: str, seed: int,
                                                              edits: list[tuple[int, int]], cut: int | None) -> None:
    data = _png_bytes(seed) if kind == "png" else _npy_bytes(seed)
    path = tmp_path / f"view.{kind}"
    path.write_bytes(_mutate(data, edits, cut))
    try:
        view = load_view(path, channels=1, size=16, max_side=512)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    assert view.shape == (1, 16, 16) and view.dtype == np.float32 and np.isfinite(view).all()


@given(shape=st.lists(st.integers(0, 10**9), min_size=0, max_size=5), descr=st.sampled_from(
    ["<f4", "<f8", "|u1", "<i8", "|b1", "<c8", "|O", "<U3", "|V8", ">f4"]), payload=st.integers(0, 512))
def test_npy_headers_never_allocate_what_they_claim(tmp_path: Path, shape: list[int], descr: str,
                                                    payload: int) -> None:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    path = tmp_path / "claim.npy"
    path.write_bytes(buffer.getvalue() + bytes(payload))
    try:
        view = load_view(path, channels=1, size=8, max_side=256)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    assert view.shape == (1, 8, 8) and max(shape) <= 256  # only an honest, small header gets through


def test_lying_headers_are_refused_at_any_claimed_size(tmp_path: Path) -> None:
    for claim in ((4097, 2), (2, 10**6), (3, 2**31)):
        (tmp_path / "a.npy").write_bytes(npy_claiming(claim))
        (tmp_path / "a.png").write_bytes(png_claiming(*claim[:2]))
        for name in ("a.npy", "a.png"):
            with pytest.raises(DataError, match="max-source-side|not a readable"):
                load_view(tmp_path / name, channels=1, size=32)


pydicom = pytest.importorskip("pydicom")

DICOM_VALUES = st.one_of(st.none(), st.integers(-2**31, 2**32), st.sampled_from(
    ["", "abc", "1.2.3", "MONOCHROME1", "YBR_FULL", "PALETTE COLOR", "AP", "LL", "\x00\x01", "9" * 40]))
DICOM_FIELDS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "PhotometricInterpretation",
                "PixelRepresentation", "NumberOfFrames", "SeriesNumber", "InstanceNumber", "PatientID",
                "SeriesInstanceUID", "ViewPosition", "WindowCenter", "WindowWidth", "RescaleSlope", "PixelData"]


@given(edits=st.lists(st.tuples(st.sampled_from(DICOM_FIELDS), DICOM_VALUES), min_size=1, max_size=4))
def test_any_dicom_header_is_imported_or_reported(tmp_path_factory: pytest.TempPathFactory,
                                                  edits: list[tuple[str, object]]) -> None:
    from pydicom.data import get_testdata_file

    from medfusion_fl.data.dicom_import import import_dicom

    work = tmp_path_factory.mktemp("dicom")
    src = work / "src"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ViewPosition = "AP"
    for name, value in edits:
        try:
            if value is None:
                if name in ds:
                    delattr(ds, name)
            elif name == "PixelData":
                ds.PixelData = str(value).encode("latin-1", "replace")
            else:
                setattr(ds, name, value)
        except (ValueError, TypeError, OverflowError):
            continue  # pydicom refuses to even hold that value: not something a file can carry
    try:
        ds.save_as(src / "image.dcm", enforce_file_format=False)
    except (ValueError, TypeError, OverflowError, AttributeError, OSError, KeyError):
        return  # pydicom cannot write it either
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "intact.dcm")
    (work / "rules.toml").write_text('[views.frontal]\nViewPosition = ["AP"]\n')
    (work / "clinical.csv").write_text(f"PatientID,age,score,label\n{ds.get('PatientID', '')},50,1,positive\n")
    try:
        report = import_dicom(src, work / "site", DATA, rules_path=work / "rules.toml", clinical=work / "clinical.csv")
    except DataError as exc:  # names the file, the folder or the header field it could not take
        places = ["image.dcm", "intact.dcm", "clinical.csv", "rules.toml", str(src), *(name for name, _ in edits)]
        assert any(place in str(exc) for place in places), (str(exc), edits)
        return
    assert all(p.reason for p in report.problems)
    if (work / "site" / "manifest.csv").exists():
        _, problems = check_site(work / "site", DATA)
        assert problems == []  # the importer never writes a folder that fails its own check
