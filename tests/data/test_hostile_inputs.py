"""Site folders a careless export or an attacker could produce: images whose header lies about their size,
manifests with a duplicated column, a byte-order mark or short rows. Each is a row problem (or a header
problem) that `site check` lists with the others; nothing is decoded or allocated on a header's word."""

from __future__ import annotations

import csv
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from medfusion_fl.config import RunConfig
from medfusion_fl.data import check_site
from medfusion_fl.data.images import load_view
from medfusion_fl.errors import DataError


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (8-bit gray): a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def npy_claiming(shape: tuple[int, ...], payload: bytes = b"\0" * 64) -> bytes:
    """A .npy file whose header claims float32 `shape`, followed by a few bytes."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + payload


def _rows(folder: Path) -> tuple[list[str], list[list[str]]]:
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _write(folder: Path, header: list[str], rows: list[list[str]], *, encoding: str = "utf-8") -> None:
    with (folder / "manifest.csv").open("w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def site(synth_root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    shutil.copytree(synth_root / "data" / "site-0", folder)
    return folder


def test_images_whose_header_lies_are_row_problems_and_checking_goes_on(site: Path, tiny_run: RunConfig) -> None:
    header, rows = _rows(site)
    frontal = header.index("frontal")
    with_view = [r for r in rows if r[frontal]]
    (site / with_view[0][frontal]).write_bytes(png_claiming(60000, 60000))  # PIL's own bomb guard fires
    (site / with_view[1][frontal]).write_bytes(png_claiming(5000, 20))  # under PIL's guard, over ours
    (site / "images" / "huge.npy").write_bytes(npy_claiming((200000, 200000)))  # 149 GiB if believed
    (site / "images" / "lie.npy").write_bytes(npy_claiming((2000, 2000)))  # plausible size, 64 bytes of data
    with_view[2][frontal], with_view[3][frontal] = "images/huge.npy", "images/lie.npy"
    with_view[4][header.index("age")] = "130"  # an ordinary problem after them is still found
    _write(site, header, rows)
    records, problems = check_site(site, tiny_run.data)
    text = "\n".join(str(p) for p in problems)
    assert len(problems) == 5 and len(records) == len(rows) - 5
    assert text.count("data.max-source-side = 4096") == 3 and "refused before decoding" in text
    assert "5000 x 20 is larger than data.max-source-side" in text
    assert "200000 x 200000 is larger than" in text
    assert "header says float32[2000, 2000]" in text and "truncated or its header is wrong" in text
    assert "130 is outside the declared range" in text


def test_max_source_side_is_configurable(tmp_path: Path) -> None:
    np.save(tmp_path / "big.npy", np.zeros((600, 300), np.float32))
    assert load_view(tmp_path / "big.npy", channels=1, size=32).shape == (1, 32, 32)  # default: >= 4096
    with pytest.raises(DataError, match=r"600 x 300 is larger than data.max-source-side = 512"):
        load_view(tmp_path / "big.npy", channels=1, size=32, max_side=512)
    assert RunConfig.from_flat({"data.max-source-side": 512}).data.source_side_limit == 512
    assert RunConfig().data.source_side_limit == 4096
    assert RunConfig.from_flat({"data.image-size": 512}).data.source_side_limit == 8192


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((2, 3), dtype=np.complex64), "not a real number type"),
    (np.zeros((5, 8, 8), np.float32), "5 channels"),
    (np.zeros((2, 2, 2, 2), np.float32), "4 dimension"),
    (np.zeros((0, 8), np.float32), "is empty"),
])
def test_npy_headers_are_checked_before_loading(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(DataError, match=message):
        load_view(tmp_path / "x.npy", channels=1, size=8)


def test_npy_with_a_pickle_or_a_bad_header_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a real number type"):
        load_view(tmp_path / "obj.npy", channels=1, size=8)
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}    \n")
    with pytest.raises(DataError, match="not a readable .npy"):
        load_view(tmp_path / "bad.npy", channels=1, size=8)


def test_duplicated_column_names_both_positions(site: Path, tiny_run: RunConfig) -> None:
    header, rows = _rows(site)
    _write(site, [*header, "label"], [[*r, "positive"] for r in rows])
    records, problems = check_site(site, tiny_run.data)
    assert records == [] and len(problems) == 1 and problems[0].row == 1
    assert f"column 'label' appears 2 times (positions {header.index('label') + 1}, {len(header) + 1})" \
        in problems[0].message


def test_utf8_manifest_with_a_byte_order_mark_is_read(site: Path, tiny_run: RunConfig) -> None:
    header, rows = _rows(site)
    _write(site, header, rows, encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    assert (site / "manifest.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    records, problems = check_site(site, tiny_run.data)
    assert problems == [] and len(records) == len(rows)


def test_short_and_long_rows_are_both_errors_naming_the_row(site: Path, tiny_run: RunConfig) -> None:
    header, rows = _rows(site)
    assert header[-1] in ("frontal", "lateral") and rows[0][-1]  # the last field of row 2 is a view that exists
    rows[0] = rows[0][:-1]  # one field short: the view must not silently become "missing"
    rows[3] = [*rows[3], "surplus"]
    _write(site, header, rows)
    records, problems = check_site(site, tiny_run.data)
    assert [(p.row, p.where) for p in problems] == [(2, "row"), (5, "row")]
    assert f"{len(header) - 1} field(s), the header has {len(header)}" in problems[0].message
    assert f"{len(header) + 1} field(s)" in problems[1].message
    assert len(records) == len(rows) - 2
