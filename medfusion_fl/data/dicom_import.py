"""`medfusion-fl site import-dicom SRC --out SITE`: a DICOM tree (or a DICOMDIR) into a site folder.

Files are grouped by patient and series; each series is mapped to one of the run's view names
by rules on its header (ViewPosition, SeriesDescription, Modality, ... as regular expressions,
case-insensitive, full match); the first series (lowest SeriesNumber) per patient and view wins.
Pixels go through the modality LUT (rescale slope/intercept), the VOI window (WindowCenter/Width,
else the 0.5-99.5 percentile range) and MONOCHROME1 inversion, and are written as 16-bit PNG (2D)
or resampled .npy volumes (data.depth > 0; a multi-frame file or a series of slices). A patient's
DICOM Segmentation objects (Modality SEG, data/dicom_seg.py) give the lesion masks of the images they
annotate, written to the view's mask column (<view>-mask). Labels and clinical columns come from a
CSV joined on the original patient id. Every file that cannot be read or mapped is reported with its
reason; one bad file never aborts the import.

Rules (TOML), one table per view of data.view-names:

    [views.frontal]
    ViewPosition = ["AP", "PA"]        # a list: any of them
    [views.lateral]
    SeriesDescription = ".*lat.*"      # a string: one regular expression
"""

from __future__ import annotations

import io
import logging
import re
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medfusion_fl.config import DataConfig
from medfusion_fl.data.dicom_seg import Key, SegMasks
from medfusion_fl.data.importing import ImportProblem, PatientIds, finish_import, npy_bytes, read_clinical
from medfusion_fl.data.manifest import MASK_SUFFIX
from medfusion_fl.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    patients: int = 0
    views: dict[str, int] = field(default_factory=dict)
    masks: int = 0  # views that got a lesion mask from a DICOM SEG
    problems: list[ImportProblem] = field(default_factory=list)


def load_rules(path: Path, data: DataConfig) -> dict[str, dict[str, list[re.Pattern[str]]]]:
    """View rules from TOML; every view of the run needs a table, every value is a regex or a list."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"view rules {path}: {exc}") from None
    tables = doc.get("views", {})
    rules: dict[str, dict[str, list[re.Pattern[str]]]] = {}
    for view in data.views:
        if view not in tables or not tables[view]:
            raise ConfigError(f"view rules {path}: no [views.{view}] table; data.view-names is "
                              f"{list(data.views)} and each needs rules, e.g. ViewPosition = [\"AP\", \"PA\"]")
        rules[view] = {}
        for attr, value in tables[view].items():
            patterns = value if isinstance(value, list) else [value]
            try:
                rules[view][attr] = [re.compile(str(p), re.IGNORECASE) for p in patterns]
            except re.error as exc:
                raise ConfigError(f"view rules {path}: [views.{view}] {attr} = {value!r} is not a regex "
                                  f"({exc})") from None
    unknown = set(tables) - set(data.views)
    if unknown:
        raise ConfigError(f"view rules {path}: views {sorted(unknown)} are not in data.view-names {list(data.views)}")
    return rules


def _matching_view(header: Any, rules: dict[str, dict[str, list[re.Pattern[str]]]]) -> str | None:
    for view, attrs in rules.items():
        if all(any(p.fullmatch(str(header.get(attr, "") or "").strip()) for p in pats) for attr, pats in attrs.items()):
            return view
    return None


def _sides(header: Any) -> tuple[int, int] | None:
    """Rows and Columns from a header read without pixels (None when either is not a positive integer)."""
    try:
        rows, columns = int(header.get("Rows")), int(header.get("Columns"))
    except (TypeError, ValueError):
        return None
    return (rows, columns) if rows > 0 and columns > 0 else None


def _dicom_files(src: Path) -> Iterator[Path]:
    """The files of a DICOMDIR file-set, or every file under a folder."""
    import pydicom
    from pydicom.fileset import FileSet

    dicomdir = src if src.is_file() else src / "DICOMDIR"
    if dicomdir.is_file():
        for instance in FileSet(pydicom.dcmread(dicomdir)):
            yield Path(instance.path)
    else:
        yield from (p for p in sorted(src.rglob("*")) if p.is_file())


def _pixels(ds: Any) -> np.ndarray:
    """float32 in [0, 1], (H, W) or (frames, H, W) gray, or (..., 3) colour."""
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut, convert_color_space

    raw = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        values = apply_modality_lut(raw, ds).astype(np.float32)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            values = apply_voi_lut(values, ds).astype(np.float32)
        low, high = np.percentile(values, [0.5, 99.5])
        values = np.clip((values - low) / max(float(high - low), 1e-6), 0.0, 1.0)
        return np.asarray(1.0 - values if photometric == "MONOCHROME1" else values, dtype=np.float32)
    if photometric != "RGB":
        raw = convert_color_space(raw, photometric, "RGB")
    return np.asarray(raw, dtype=np.float32) / float(np.iinfo(raw.dtype).max if raw.dtype.kind == "u" else 255)


def _png16(image: np.ndarray, channels: int) -> bytes:
    if image.ndim == 3:  # colour
        image = image.mean(axis=2) if channels == 1 else image
    buffer = io.BytesIO()
    if image.ndim == 2:
        Image.fromarray((image * 65535).round().astype(np.uint16)).save(buffer, format="PNG")
    else:
        Image.fromarray((image * 255).round().astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _volume_npy(slices: np.ndarray, data: DataConfig) -> bytes:
    import torch
    import torch.nn.functional as F

    volume = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[None, None]  # (1, 1, D, H, W)
    volume = F.interpolate(volume, size=(data.depth, data.image_size, data.image_size), mode="trilinear",
                           align_corners=False)
    return npy_bytes(volume[0, 0].numpy().astype(np.float32))


@dataclass
class Payload:
    """A view's file and the source images (SOPInstanceUID, frame) it holds, in order: one for a 2D view, the
    slices of a volume."""

    suffix: str
    data: bytes
    sources: list[Key]
    shape: tuple[int, int]  # rows, columns of the source images


def _series_payload(files: list[tuple[Path, Any]], data: DataConfig) -> Payload:
    """Read a series' pixels: one 2D image (the middle slice/frame) or a resampled volume."""
    import pydicom

    ordered = sorted(files, key=lambda f: (int(f[1].get("InstanceNumber", 0) or 0), str(f[0])))
    stack, sources = [], []
    for path, header in ordered:  # the header read while scanning knows the frame count
        image = _pixels(pydicom.dcmread(path))
        frames = int(header.get("NumberOfFrames", 1) or 1)
        stack.extend(list(image) if frames > 1 else [image])
        sources += [(str(header.get("SOPInstanceUID", "")), k + 1) for k in range(frames)]
    shape = (int(stack[0].shape[0]), int(stack[0].shape[1]))
    if data.depth > 0:
        gray = [s.mean(axis=2) if s.ndim == 3 else s for s in stack]
        return Payload(".npy", _volume_npy(np.stack(gray), data), sources, shape)
    middle = len(stack) // 2
    return Payload(".png", _png16(stack[middle], data.channels), [sources[middle]], shape)


def _mask_payload(payload: Payload, segs: SegMasks, data: DataConfig) -> tuple[str, bytes] | None:
    """The lesion mask of a view's file from the patient's SEG objects, or None when none covers it: a 2D
    view's as a PNG (0/255; .npy fractions for a FRACTIONAL SEG), a volume's resampled as its volume."""
    found = [segs.mask(key, payload.shape) for key in payload.sources]
    if all(m is None for m in found):
        return None
    planes = np.stack([m if m is not None else np.zeros(payload.shape, np.float32) for m in found])
    if data.depth > 0:
        from medfusion_fl.data.masks import resize_shares  # torch: only where a volume gets a mask

        return ".npy", npy_bytes(resize_shares(planes, (data.depth, data.image_size, data.image_size)))
    if segs.fractional:
        return ".npy", npy_bytes(planes[0].astype(np.float32))
    buffer = io.BytesIO()
    Image.fromarray((planes[0] > 0).astype(np.uint8) * 255).save(buffer, format="PNG")
    return ".png", buffer.getvalue()


def import_dicom(src: Path, out: Path, data: DataConfig, *, rules_path: Path, clinical: Path | None,
                 id_column: str = "PatientID", salt_file: Path | None = None) -> ImportReport:
    """Import `src` into a new site folder `out`; returns counts and every problem met."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medfusion_fl.console import progress

    rules = load_rules(rules_path, data)
    ids = PatientIds(salt_file or out.with_name(out.name + ".id-salt"))
    clinical_rows, problems = read_clinical(clinical, id_column, data)
    series: dict[str, dict[str, list[tuple[Path, Any]]]] = defaultdict(lambda: defaultdict(list))
    segs: dict[str, SegMasks] = defaultdict(SegMasks)
    files = list(_dicom_files(Path(src)))
    for path in progress(files, "reading DICOM headers"):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            problems.append(ImportProblem(str(path), f"not a readable DICOM file ({exc})"))
            continue
        if not header.get("PatientID"):
            problems.append(ImportProblem(str(path), "no PatientID"))
            continue
        if str(header.get("Modality", "")) == "SEG":  # a segmentation: masks of images, not a view
            segs[str(header.PatientID)].add(path)
            continue
        if not header.get("SeriesInstanceUID"):
            problems.append(ImportProblem(str(path), "no SeriesInstanceUID"))
            continue
        series[str(header.PatientID)][str(header.SeriesInstanceUID)].append((path, header))
    problems += [ImportProblem(file, reason) for masks in segs.values() for file, reason in masks.problems]
    report = ImportReport(problems=problems)
    rows, payloads = [], {}
    for pid, by_series in progress(sorted(series.items()), "converting series"):
        if pid not in clinical_rows:
            problems.append(ImportProblem(f"patient {pid}", f"no row in the clinical CSV ({id_column}); "
                                          "its images are left out (no label)"))
            continue
        row: dict[str, str] = {"patient_id": ids(pid), **clinical_rows.pop(pid)}
        chosen: dict[str, tuple[Any, list[tuple[Path, Any]]]] = {}
        for uid, members in sorted(by_series.items(), key=lambda kv: int(kv[1][0][1].get("SeriesNumber", 0) or 0)):
            header = members[0][1]
            if "Rows" not in header:  # headers are read without pixels: an image has Rows
                problems.append(ImportProblem(str(members[0][0]), "series without images (no Rows)"))
                continue
            sides = _sides(header)
            if sides is None or max(sides) > data.source_side_limit:
                problems.append(ImportProblem(str(members[0][0]), f"Rows x Columns {sides or 'unreadable'} is not "
                                              f"an image of at most data.max-source-side = {data.source_side_limit}"))
                continue
            view = _matching_view(header, rules)
            if view is None:
                problems.append(ImportProblem(str(members[0][0]), f"series ({header.get('Modality', '?')}, "
                                              f"{header.get('SeriesDescription', '')!r}) matches no view rule"))
            elif view in chosen:
                problems.append(ImportProblem(str(members[0][0]), f"a second series for view {view!r}; the first "
                                              "(lowest SeriesNumber) is kept"))
            else:
                chosen[view] = (uid, members)
        for view in data.views:
            row[view] = ""
            if view not in chosen:
                continue
            try:
                payload = _series_payload(chosen[view][1], data)
            except Exception as exc:  # pydicom/numpy raise many types for undecodable pixel data
                problems.append(ImportProblem(str(chosen[view][1][0][0]), f"pixel data not decodable ({exc})"))
                continue
            rel = f"images/{row['patient_id']}_{view}{payload.suffix}"
            payloads[rel] = payload.data
            row[view] = rel
            report.views[view] = report.views.get(view, 0) + 1
            if pid in segs:
                row[view + MASK_SUFFIX] = _view_mask(payload, segs[pid], data, rel, payloads, problems,
                                                     str(chosen[view][1][0][0]))
        rows.append(row)
    report.patients = finish_import(out, data, rows, payloads, unmatched=clinical_rows, ids=ids,
                                    problems=problems, src=src)
    report.masks = sum(1 for row in rows for view in data.views if row.get(view + MASK_SUFFIX))
    return report


def _view_mask(payload: Payload, segs: SegMasks, data: DataConfig, rel: str, payloads: dict[str, bytes],
               problems: list[ImportProblem], source: str) -> str:
    """The manifest value of a view's mask column: the SEG mask written next to its image, or ''."""
    try:
        mask = _mask_payload(payload, segs, data)
    except ValueError as exc:
        problems.append(ImportProblem(source, f"its DICOM SEG is not used: {exc}"))
        return ""
    if mask is None:
        return ""
    mask_rel = rel.rsplit(".", 1)[0] + MASK_SUFFIX + mask[0]
    payloads[mask_rel] = mask[1]
    return mask_rel
