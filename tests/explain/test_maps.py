"""The map and weight contract over every tested 2D backbone family, and the fusion weights."""

from __future__ import annotations

import pytest
import torch

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import FeatureNotAvailable
from medfusion_fl.explain.gradcam import ViewCam, _Tapped
from medfusion_fl.explain.weights import fusion_weights
from medfusion_fl.models import MedFusionModel, build_model
from medfusion_fl.models.backbone import FAMILIES

FAMILIES_2D = [f for f in FAMILIES if not FAMILIES[f].is_3d]


def _build(**flat: object) -> MedFusionModel:
    base = {"data.image-size": 32, "model.image-dim": 16, "model.fusion-dim": 16, "model.tabular-hidden": 8,
            "privacy.enabled": False}
    return build_model(RunConfig.from_flat({**base, **flat}), seed=0)


def _patient(model: MedFusionModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    views = torch.rand(2, 1, 32, 32, generator=g)
    return views, torch.tensor([1.0, 0.0]), torch.randn(model.spec.num_tabular, generator=g)


@pytest.mark.parametrize("family", FAMILIES_2D)
@pytest.mark.parametrize("shared", [True, False])
def test_every_family_gives_a_map_per_present_view(family: str, shared: bool) -> None:
    model = _build(**{"model.backbone": FAMILIES[family].ci_name, "model.shared-backbone": shared})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cam = ViewCam(model, min_side=2)
    views, mask, tabular = _patient(model)
    maps = cam.maps(views, mask, tabular, target=1)
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()
    assert float(maps[0].min()) >= 0 and float(maps[0].max()) <= 1 and float(maps[1].abs().max()) == 0  # view 2 missing
    assert cam.stage.side >= 1 and cam.stage.layout in {"nchw", "nhwc", "tokens"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model itself untouched
    assert not any(isinstance(m, _Tapped) for m in model.modules())  # the taps live on a private copy
    assert sum(isinstance(m, _Tapped) for m in cam.model.modules()) == (1 if shared else 2)


def test_3d_models_are_refused_by_name() -> None:
    model = _build(**{"model.backbone": "resnet3d-10", "data.depth": 8, "data.image-size": 16})
    with pytest.raises(FeatureNotAvailable, match="3D volumes"):
        ViewCam(model, min_side=2)


def test_view_and_modality_weights_where_the_model_has_them() -> None:
    for aggregation, fusion in (("attention", "gated"), ("gated", "attention")):
        model = _build(**{"model.backbone": "test_resnet", "model.view-aggregation": aggregation,
                          "model.fusion": fusion})
        views, mask, tabular = _patient(model)
        weights = fusion_weights(model, views, mask, tabular, ["frontal", "lateral"])
        assert weights["views"]["frontal"] == pytest.approx(1.0) and weights["views"]["lateral"] == 0.0  # missing
        modalities = weights["modalities"]
        assert 0 < modalities["image"] < 1 and modalities["image"] + modalities["clinical"] == pytest.approx(1.0)
    plain = _build(**{"model.backbone": "test_resnet"})  # mean aggregation, concatenation: no weights to show
    assert fusion_weights(plain, *_patient(plain), ["frontal", "lateral"]) == {}
