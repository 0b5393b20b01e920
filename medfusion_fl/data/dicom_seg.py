"""DICOM Segmentation objects (Modality SEG) as lesion masks of the images they annotate (site import-dicom).

A SEG holds one frame per (segment, source image); each frame names its source image in its functional groups
(DerivationImageSequence > SourceImageSequence: ReferencedSOPInstanceUID, and ReferencedFrameNumber for a frame
of a multi-frame image), per frame or shared by all. The mask of an image (or of one of its frames) is the
union over the segments that cover it: BINARY frames as 0/1, FRACTIONAL ones as their value over
MaximumFractionalValue (the largest share wins where segments overlap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Key = tuple[str, int]  # (SOPInstanceUID, frame number from 1) of a source image


@dataclass
class SegMasks:
    """The masks one patient's SEG objects give, by source image, and what could not be used."""

    masks: dict[Key, np.ndarray] = field(default_factory=dict)  # (rows, cols) float32 in [0, 1]
    fractional: bool = False  # any FRACTIONAL segmentation (the masks are not all binary)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def add(self, path: Path) -> None:
        """Read one SEG file into the masks; a file that cannot be used is a problem, not an error."""
        import pydicom

        try:
            ds = pydicom.dcmread(path)
            frames = np.asarray(ds.pixel_array, dtype=np.float32)
        except Exception as exc:  # pydicom raises many types for damaged files and pixel data
            self.problems.append((str(path), f"DICOM SEG not readable ({exc})"))
            return
        frames = frames[None] if frames.ndim == 2 else frames  # (frames, rows, cols)
        if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
            frames = frames / float(ds.get("MaximumFractionalValue", 255) or 255)
            self.fractional = True
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        shared = ds.get("SharedFunctionalGroupsSequence")
        shared_refs = _sources(shared[0]) if shared else []
        unnamed = 0
        for i, frame in enumerate(frames):
            refs = (_sources(per_frame[i]) if per_frame is not None and i < len(per_frame) else []) or shared_refs
            unnamed += not refs
            for key in refs:
                old = self.masks.get(key)
                if old is not None and old.shape != frame.shape:
                    self.problems.append((str(path), f"a SEG frame of {frame.shape[0]} x {frame.shape[1]} for an image "
                                          f"another SEG covers at {old.shape[0]} x {old.shape[1]}; left out"))
                    continue
                self.masks[key] = frame if old is None else np.maximum(old, frame)
        if unnamed:
            self.problems.append((str(path), f"{unnamed} SEG frame(s) name no source image "
                                  "(DerivationImageSequence); they are left out"))

    def mask(self, key: Key, shape: tuple[int, int]) -> np.ndarray | None:
        """The mask of one source image (frame), None when no SEG covers it; ValueError on another size."""
        found = self.masks.get(key)
        if found is not None and found.shape != shape:
            raise ValueError(f"the SEG frames of this image are {found.shape[0]} x {found.shape[1]}, the image "
                             f"{shape[0]} x {shape[1]}")
        return found


def _sources(group: Any) -> list[Key]:
    """The (SOPInstanceUID, frame) source images a functional group names."""
    from pydicom.multival import MultiValue

    keys = []
    for derivation in group.get("DerivationImageSequence", None) or []:
        for source in derivation.get("SourceImageSequence", None) or []:
            uid = str(source.get("ReferencedSOPInstanceUID", "") or "")
            if not uid:
                continue
            frames = source.get("ReferencedFrameNumber", None)
            if frames is None or frames == "":
                keys.append((uid, 1))  # a single-frame image
            else:
                keys += [(uid, int(f)) for f in (frames if isinstance(frames, MultiValue) else [frames])]
    return keys
