"""One contract over everything registered (timm's habit), on tiny CPU inputs.

Every view aggregation x fusion pair, and every tested backbone family (2D and 3D, shared and
per-view backbones): output shapes, backward, masking of missing views, patients without views,
gradient checkpointing giving the same gradients, ONNX export with onnxruntime parity. The export (8-15 s
each on 2 cores) runs for every family and for a set of pairs that holds every aggregation and every
fusion once; aggregation and fusion are separate modules, the one's output the other's input.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from medfusion_fl.config import RunConfig
from medfusion_fl.export import TOLERANCE, _to_onnx_bytes
from medfusion_fl.models import MedFusionModel, build_model, example_inputs, list_aggregations, list_fusions
from medfusion_fl.models.backbone import FAMILIES

PAIRS = list(itertools.product(list_aggregations(), list_fusions()))
EXPORTED = set(zip(list_aggregations(), list_fusions(), strict=True))  # each aggregation and fusion once


def _build(**flat: Any) -> MedFusionModel:
    base = {"model.backbone": "test_resnet", "data.image-size": 32, "model.dropout": 0.0,
            "model.image-dim": 16, "model.fusion-dim": 16, "model.tabular-hidden": 8,
            "privacy.enabled": False}  # the model as built; its DP form: tests/test_dp_sgd.py, test_bookkeeping.py
    return build_model(RunConfig.from_flat({**base, **flat}), seed=0)


def _inputs(model: MedFusionModel, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    views, _, tabular = example_inputs(model.spec, batch)
    generator = torch.Generator().manual_seed(1)
    views = torch.rand(views.shape, generator=generator)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])[:batch]  # last: no views
    return views, mask, torch.randn(tabular.shape, generator=generator)


def check_contract(model: MedFusionModel) -> None:
    views, mask, tabular = _inputs(model)
    model.train()
    logits = model(views, mask, tabular)
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        base = model(views, mask, tabular)
        changed = views.clone()
        changed[1, 1] = 7.0  # patient 1's missing view
        changed[3] = -3.0  # patient 3 has no views at all
        torch.testing.assert_close(model(changed, mask, tabular), base, rtol=1e-5, atol=1e-5)


def check_onnx(model: MedFusionModel) -> None:
    model.eval()
    session = ort.InferenceSession(_to_onnx_bytes(model), providers=["CPUExecutionProvider"])
    views, mask, tabular = _inputs(model, batch=3)  # export traced batch 2: the axis is dynamic
    (onnx_out,) = session.run(None, {"views": views.numpy(), "view_mask": mask.numpy(), "tabular": tabular.numpy()})
    with torch.no_grad():
        diff = np.abs(onnx_out - model(views, mask, tabular).numpy()).max()
    assert diff <= TOLERANCE


@pytest.mark.parametrize(("aggregation", "fusion"), PAIRS)
def test_every_aggregation_and_fusion(aggregation: str, fusion: str) -> None:
    model = _build(**{"model.view-aggregation": aggregation, "model.fusion": fusion})
    check_contract(model)
    if (aggregation, fusion) in EXPORTED:
        check_onnx(model)


def _family_config(family: str, **extra: Any) -> dict[str, Any]:
    return {**FAMILIES[family].ci_config(), "model.view-aggregation": "attention", **extra}


def _checkpointed(output: torch.Tensor) -> bool:
    """True when the autograd graph contains a reentrant checkpoint node."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CheckpointFunction" in type(node).__name__:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_backbone_family(family: str) -> None:
    check_contract(_build(**_family_config(family)))
    check_contract(_build(**_family_config(family, **{"model.shared-backbone": False})))
    check_onnx(_build(**_family_config(family, **{"model.checkpointing": True})))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpointing_gives_the_same_gradients(family: str) -> None:
    grads = []
    for on in (False, True):
        model = _build(**_family_config(family, **{"model.checkpointing": on})).train()
        views, mask, tabular = _inputs(model)
        out = model(views, mask, tabular)
        assert _checkpointed(out) == on
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


FAMILIES_2D = [f for f in FAMILIES if not FAMILIES[f].is_3d]
LAYOUTS = {"resnet": "nchw", "swin": "nhwc", "vit": "tokens"}  # ONNX export of a gated model, once per layout


def _supervised_step(model: MedFusionModel, method: str) -> None:
    """One training step under attention supervision; every gate's score gets a finite, nonzero gradient."""
    from medfusion_fl.attention.supervise import supervise
    from medfusion_fl.models.attention_gate import gates

    views, mask, tabular = _inputs(model)
    size = model.spec.image_size
    batch = {"view_mask": mask, "masks": (torch.rand(4, 2, size, size) > 0.8).float(), "mask_present": torch.ones(4, 2)}
    config = RunConfig.from_flat({"attention.method": method}).attention
    model.train()
    with supervise(model, batch, config, scale=0.25):
        model(views, mask, tabular).sum().backward()
    for gate in gates(model):
        assert gate.score.weight.grad is not None and torch.isfinite(gate.score.weight.grad).all()
        assert float(gate.score.weight.grad.abs().sum()) > 0
        assert gate.supervision is None  # cleared after the step


@pytest.mark.parametrize("family", FAMILIES_2D)
def test_every_2d_family_takes_attention_supervision(family: str) -> None:
    """Shared (mask, checkpointed) and per-view backbones (consistency); the gated model keeps the contract."""
    shared = _build(**_family_config(family, **{"attention.method": "mask", "model.checkpointing": True}))
    _supervised_step(shared, "mask")
    per_view = _build(**_family_config(family, **{"attention.method": "consistency",
                                                  "model.shared-backbone": False}))
    _supervised_step(per_view, "consistency")
    check_contract(per_view)
    if family in LAYOUTS:
        check_onnx(shared)
