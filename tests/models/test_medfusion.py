"""The MedFusion model: shapes, missing views, image-/tabular-only, GroupNorm, registries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ConfigError, ModelError
from medfusion_fl.models import build_model, example_inputs, list_aggregations, list_fusions

SMALL = {"model.backbone": "test_resnet", "data.image-size": 32, "privacy.enabled": False}  # the model without DP


def _model(**overrides: object) -> nn.Module:
    return build_model(RunConfig.from_flat({**SMALL, **overrides}), seed=0).eval()


def test_forward_shapes_and_backward() -> None:
    model = _model()
    views, mask, tabular = example_inputs(model.spec, batch=3)
    logits = model(torch.randn_like(views), mask, torch.randn_like(tabular))
    assert logits.shape == (3, 2)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_masked_view_pixels_do_not_change_the_output() -> None:
    model = _model()
    views, _, tabular = example_inputs(model.spec, batch=2)
    views, tabular = torch.randn_like(views), torch.randn_like(tabular)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    changed = views.clone()
    changed[0, 1] = 100.0  # patient 0's missing lateral view
    changed[1, 0] = -50.0  # patient 1's missing frontal view
    torch.testing.assert_close(model(views, mask, tabular), model(changed, mask, tabular))


def test_patient_without_views_is_scored_from_tabular() -> None:
    model = _model()
    views, _, tabular = example_inputs(model.spec, batch=2)
    mask = torch.zeros(2, 2)
    tabular = torch.randn_like(tabular)
    out = model(torch.randn_like(views), mask, tabular)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # different features, different scores
    torch.testing.assert_close(out, model(torch.randn_like(views), mask, tabular))  # images ignored


def test_image_only_and_tabular_only_models() -> None:
    image_only = _model(**{"data.tabular-columns": ""})
    views, mask, tabular = example_inputs(image_only.spec, batch=2)
    assert tabular.shape == (2, 0) and image_only(views, mask, tabular).shape == (2, 2)
    tabular_only = _model(**{"data.view-names": ""})
    assert tabular_only.image is None
    views, mask, tabular = example_inputs(tabular_only.spec, batch=4)
    assert tabular_only(views, mask, torch.randn_like(tabular)).shape == (4, 2)


def test_group_norm_replaces_every_batchnorm() -> None:
    grouped = _model(**{"model.backbone": "resnet10t"})
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in grouped.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in grouped.modules())
    batch = _model(**{"model.backbone": "resnet10t", "model.norm": "batch"})
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())


def test_unknown_parts_list_close_matches() -> None:
    with pytest.raises(ModelError, match="not a timm model.*resnet18"):
        _model(**{"model.backbone": "resnet1"})
    with pytest.raises(ConfigError, match="Unknown view aggregation 'maen'.*Closest: mean"):
        _model(**{"model.view-aggregation": "maen"})
    with pytest.raises(ConfigError, match="Unknown fusion 'concat'.*concatenate"):
        _model(**{"model.fusion": "concat"})
    assert "mean" in list_aggregations() and "concatenate" in list_fusions()


def test_seeded_builds_are_identical() -> None:
    a, b = _model(), _model()
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
