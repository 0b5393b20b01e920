"""Attention supervision under per-patient DP: each patient's whole loss (classification + attention) is what
the bookkeeping engine clips. Its clipped sum (noise 0, bound at 0.9 x the median norm) equals the per-patient
loop of tests/attention/reference.py, where the attention loss is an ordinary term of each patient's loss,
for one CNN, one ConvNeXt and one transformer, every method, with reentrant checkpointing off and on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medfusion_fl.attention.supervise import supervise
from medfusion_fl.config import RunConfig
from medfusion_fl.models import MedFusionModel
from medfusion_fl.privacy.bookkeeping import PerPatientClipper
from tests.attention.reference import BASE, batch_of_four, per_patient_grads, supervised_model

FAMILIES = {"resnet": "resnet18", "convnext": "convnext_atto", "vit": "vit_tiny_patch16_224"}
METHODS = ["mask", "cam", "consistency"]


def _engine(model: MedFusionModel, batch: dict[str, torch.Tensor], method: str, bound: float,
            supervised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's clipped sum and per-patient norms of one supervised step."""
    config = RunConfig.from_flat({**BASE, "attention.method": method if supervised else "none"}).attention
    clipper = PerPatientClipper(model, max_grad_norm=bound)
    try:
        with supervise(model, batch, config, scale=1.0):  # forward and backward: the gates add their gradient
            with clipper.forward(len(batch["label"])):
                logits = model(batch["views"], batch["view_mask"], batch["tabular"])
            norms = clipper.clip_backward(F.cross_entropy(logits, batch["label"], reduction="none"))
    finally:
        clipper.detach()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]), norms  # type: ignore[union-attr]


def _compare(model: MedFusionModel, reference: MedFusionModel, method: str) -> dict[str, float]:
    batch = batch_of_four(model)
    per = per_patient_grads(reference, batch, method, weight=BASE["attention.weight"])
    norms = torch.stack([g.double().norm() for g in per])
    bound = 0.9 * float(norms.median())
    expected = sum(g.double() * min(1.0, bound / (float(n) + 1e-6)) for g, n in zip(per, norms, strict=True))
    got, got_norms = _engine(model, batch, method, bound)
    return {"error": float((got.double() - expected).norm() / expected.norm()),  # type: ignore[union-attr]
            "norm_error": float(((got_norms.double() - norms).abs() / norms).max()),
            "clipped": int((norms > bound * 1.01).sum())}


def _pair(family: str, method: str, checkpointing: bool, shared: bool = True) -> tuple[MedFusionModel, MedFusionModel]:
    """The model the engine trains and its twin without checkpointing, same weights, for the loop."""
    model = supervised_model(FAMILIES[family], method, checkpointing=checkpointing, shared=shared)
    reference = supervised_model(FAMILIES[family], method, checkpointing=False, shared=shared)
    reference.load_state_dict(model.state_dict())
    return model, reference


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_clipped_sum_with_attention_equals_per_patient_loop(family: str, method: str, checkpointing: bool) -> None:
    result = _compare(*_pair(family, method, checkpointing), method)
    assert result["clipped"] >= 1, result
    assert result["error"] < 1e-5, result  # measured <= 2e-6 (CPU, 2026-12-07)
    assert result["norm_error"] < 1e-5, result


@pytest.mark.parametrize("method", ["mask", "consistency"])
def test_per_view_backbones_are_exact_too(method: str) -> None:
    result = _compare(*_pair("resnet", method, checkpointing=True, shared=False), method)
    assert result["error"] < 1e-5, result


@pytest.mark.parametrize("method", METHODS)
def test_the_attention_term_is_in_the_step(method: str) -> None:
    """The comparison above can fail: the same step without supervision is off the supervised loop by over 100
    times the tolerance (cam's term is the smallest here: 2e-3 of the gradient's norm)."""
    model, reference = _pair("resnet", method, checkpointing=False)
    batch = batch_of_four(model)
    per = per_patient_grads(reference, batch, method, weight=BASE["attention.weight"])
    expected = torch.stack(per).double().sum(dim=0)
    got, _ = _engine(model, batch, method, bound=1e9, supervised=False)
    assert float((got.double() - expected).norm() / expected.norm()) > 1e-3
    got, _ = _engine(model, batch, method, bound=1e9)
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5
