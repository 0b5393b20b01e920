"""The pointing game: does the model look at the lesion? The share of lesion-bearing views of positive patients
whose class-activation map (the report's, explain/gradcam.py) peaks inside the lesion mask.

Views count when they are present, belong to a patient of the positive class (binary tasks: class 1; otherwise
the map explains the patient's true class) and have a mask with some lesion in it: a view without a lesion has
nothing to point at. The mask is the one the manifest gives (<view>-mask), at data.image-size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfusion_fl.data import SiteDataset
from medfusion_fl.explain.gradcam import ViewCam
from medfusion_fl.models import MedFusionModel


@dataclass(frozen=True)
class PointingGame:
    hits: int  # views whose map peaks inside the lesion
    views: int  # views counted
    stage: str  # what made the maps

    @property
    def share(self) -> float | None:
        return self.hits / self.views if self.views else None

    def summary(self) -> dict[str, object]:
        return {"hits": self.hits, "views": self.views, "share": self.share, "maps": self.stage}


def pointing_game(model: MedFusionModel, dataset: SiteDataset, *, min_side: int,
                  method: str = "hirescam") -> PointingGame:
    """Play the pointing game on every positive patient of `dataset` (built with masks=True)."""
    if not dataset.masks:
        raise ValueError("the pointing game needs the dataset's lesion masks: SiteDataset(..., masks=True)")
    cam = ViewCam(model, min_side=min_side, method=method)
    binary = model.spec.num_classes == 2
    hits = views = 0
    for index, record in enumerate(dataset.records):
        if binary and record.label != 1:
            continue
        sample = dataset[index]
        lesions = [v for v in range(len(record.views))
                   if sample["view_mask"][v] > 0 and sample["mask_present"][v] > 0 and sample["masks"][v].max() > 0]
        if not lesions:
            continue
        maps = cam.maps(sample["views"], sample["view_mask"], sample["tabular"], 1 if binary else record.label)
        for v in lesions:
            peak = np.unravel_index(int(maps[v].argmax()), tuple(maps[v].shape))
            hits += bool(maps[v].max() > 0 and sample["masks"][v][peak] > 0)
            views += 1
    return PointingGame(hits, views, cam.described)


def localisation(model: MedFusionModel, dataset: SiteDataset, *, min_side: int,
                 method: str = "hirescam") -> dict[str, object] | None:
    """The pointing game's summary on a folder with lesion masks (<view>-mask), for the report; None when the
    folder has no masks or the model no 2D map to explain."""
    from medfusion_fl.errors import FeatureNotAvailable

    masked = dataset.with_masks()
    if not masked.masks:
        return None
    try:
        return pointing_game(model, masked, min_side=min_side, method=method).summary()
    except FeatureNotAvailable:
        return None
