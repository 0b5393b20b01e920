"""The private recipe's levers: train.class-weights (a weight per class on each patient's clipped gradient) and
train.freeze (parameters the sites do not train). Both keep DP-SGD exact: the clipped sum equals a naive
per-patient loop, no patient moves it by more than max-grad-norm, and frozen weights leave a site unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from dp_exactness import family_model, naive_per_patient, patients

from medfusion_fl.config import RunConfig
from medfusion_fl.data import load_site
from medfusion_fl.errors import ConfigError
from medfusion_fl.models import build_model
from medfusion_fl.models.medfusion import freeze
from medfusion_fl.parameters import get_weights
from medfusion_fl.privacy.bookkeeping import PerPatientClipper
from medfusion_fl.training import train_local

CPU = torch.device("cpu")
WEIGHTS = torch.tensor([0.3, 1.0])  # negative, positive


def _engine_sum(model: torch.nn.Module, data: tuple[torch.Tensor, ...], bound: float,
                weights: torch.Tensor | None) -> torch.Tensor:
    views, mask, tabular, labels = data
    clipper = PerPatientClipper(model, max_grad_norm=bound)
    try:
        with clipper.forward(4):
            logits = model(views, mask, tabular)
        clipper.clip_backward(F.cross_entropy(logits, labels, reduction="none"),
                              None if weights is None else weights[labels])
    finally:
        clipper.detach()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])  # type: ignore[union-attr]


@pytest.mark.parametrize("frozen", [(), ("image.backbones",)], ids=["all-trained", "backbone-frozen"])
def test_class_weights_scale_each_clipped_gradient_as_a_naive_loop_does(frozen: tuple[str, ...]) -> None:
    model = family_model("resnet", checkpointing=False)
    freeze(model, frozen)
    data = patients(model, CPU)
    per = naive_per_patient(model, data, bf16=False)  # over the trained parameters only
    norms = torch.stack([g.double().norm() for g in per]).float()
    bound = 0.9 * float(norms.median())
    labels = data[3]
    expected = sum(float(WEIGHTS[y]) * g * min(1.0, bound / (float(n) + 1e-6))
                   for g, n, y in zip(per, norms, labels.tolist(), strict=True))
    got = _engine_sum(model, data, bound, WEIGHTS)
    error = float((got.double() - expected.double()).norm() / expected.double().norm())  # type: ignore[union-attr]
    assert error < 5e-5, error  # measured 1e-7 (fp32)
    unweighted = _engine_sum(model, data, bound, None)
    # the weights really act: the unweighted sum is far from the weighted one
    assert float((unweighted - got).norm() / got.norm()) > 0.1
    if frozen:
        assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("image.backbones"))
        assert got.numel() == sum(p.numel() for n, p in model.named_parameters()
                                  if not n.startswith("image.backbones"))


def test_no_patient_moves_the_weighted_sum_by_more_than_the_bound() -> None:
    """Removing one patient changes sum_i w_i clip(g_i) by w_i * min(|g_i|, C) <= C: the sensitivity the
    noise is calibrated to is unchanged."""
    model = family_model("resnet", checkpointing=False)
    data = patients(model, CPU)
    bound = 0.5
    full = _engine_sum(model, data, bound, WEIGHTS)
    for drop in range(4):
        keep = [i for i in range(4) if i != drop]
        views, mask, tabular, labels = data
        clipper = PerPatientClipper(model, max_grad_norm=bound)
        try:
            with clipper.forward(3):
                logits = model(views[keep], mask[keep], tabular[keep])
            clipper.clip_backward(F.cross_entropy(logits, labels[keep], reduction="none"), WEIGHTS[labels[keep]])
        finally:
            clipper.detach()
        rest = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])  # type: ignore[union-attr]
        moved = float((full - rest).norm())
        assert moved <= float(WEIGHTS[labels[drop]]) * bound * (1 + 1e-4), (drop, moved)


def test_weights_outside_0_1_or_of_the_wrong_shape_are_refused_and_parameters_restored() -> None:
    model = family_model("resnet", checkpointing=False)
    views, mask, tabular, labels = patients(model, CPU)
    clipper = PerPatientClipper(model, max_grad_norm=1.0)
    for weights in (torch.tensor([1.0, 2.0, 1.0, 1.0]), torch.tensor([-0.1, 1.0, 1.0, 1.0]), torch.ones(3)):
        with clipper.forward(4):
            logits = model(views, mask, tabular)
        with pytest.raises(ValueError, match="weight"):
            clipper.clip_backward(F.cross_entropy(logits, labels, reduction="none"), weights)
        assert all(p.requires_grad for p in clipper.params)
    clipper.detach()


def test_a_weighted_step_is_refused_where_it_would_run_unweighted() -> None:
    """The CUDA-graphs step clips without weights: the step itself refuses class weights there, not only
    RunConfig."""
    from medfusion_fl.config import PrivacyConfig
    from medfusion_fl.privacy.dp_sgd import BookkeepingStep

    model = family_model("resnet", checkpointing=False)
    with pytest.raises(ConfigError, match="eager step only"):
        BookkeepingStep(model, PrivacyConfig(cuda_graphs=True), torch.Generator(), expected=4, class_weights=(0.5, 1))


def test_frozen_parameters_leave_a_dp_site_and_a_plain_site_unchanged(synth_root: Path, tiny_run: RunConfig) -> None:
    from medfusion_fl.privacy.dp_sgd import train_local_dp

    site = load_site(synth_root / "data" / "site-0", tiny_run.data)
    for private in (True, False):
        run = RunConfig.from_flat({**tiny_run.to_flat(), "train.freeze": "image.backbones,tabular",
                                   "train.class-weights": "0.5,1", "privacy.enabled": private})
        model = build_model(run, seed=0)
        before = get_weights(model)
        if private:
            train_local_dp(model, site.train, run.train, run.privacy, device=CPU, seed=1, seeded=1)
        else:
            train_local(model, site.train, run.train, device=CPU, seed=1)
        after = get_weights(model)
        moved = {name for name in before if not (before[name] == after[name]).all()}
        assert moved and all(name.startswith(("head", "image.project")) for name in moved), sorted(moved)


def test_a_plain_site_weighs_each_patients_loss_by_its_class(synth_root: Path, tiny_run: RunConfig) -> None:
    """Without DP the weight multiplies the patient's loss: one SGD step (momentum's first step is the gradient,
    no weight decay, no dropout) moves the weights by -lr x the weighted mean gradient."""
    site = load_site(synth_root / "data" / "site-0", tiny_run.data)
    flat = {**tiny_run.to_flat(), "privacy.enabled": False, "train.optimizer": "sgd", "train.lr": 1.0,
            "train.weight-decay": 0.0, "train.batch-size": len(site.train), "model.dropout": 0.0,
            "train.class-weights": "0.25,1"}
    run = RunConfig.from_flat(flat)
    model = build_model(run, seed=0)
    reference = build_model(run, seed=0)
    train_local(model, site.train, run.train, device=CPU, seed=1)
    batch = [site.train[i] for i in range(len(site.train))]
    views, mask = torch.stack([b["views"] for b in batch]), torch.stack([b["view_mask"] for b in batch])
    tabular, labels = torch.stack([b["tabular"] for b in batch]), torch.tensor([int(b["label"]) for b in batch])
    reference.train()
    losses = F.cross_entropy(reference(views, mask, tabular), labels, reduction="none")
    (losses * torch.tensor([0.25, 1.0])[labels]).sum().div(len(labels)).backward()
    for (name, trained), start in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert start.grad is not None
        torch.testing.assert_close(trained.detach(), start.detach() - start.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_freeze_prefixes_that_name_nothing_or_everything_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"'imag' names no parameter.*'image\.backbones'"):
        build_model(RunConfig.from_flat({"model.backbone": "test_resnet", "train.freeze": "imag"}))
    with pytest.raises(ConfigError, match="freezes every parameter"):
        build_model(RunConfig.from_flat({"model.backbone": "test_resnet", "train.freeze": "image,tabular,head"}))


@pytest.mark.parametrize(("flat", "message"), [
    ({"train.class-weights": "0.5"}, "gives 1 weights for 2 classes"),
    ({"train.class-weights": "1.5,1"}, r"must lie in \(0, 1\]"),
    ({"train.class-weights": "0,1"}, r"must lie in \(0, 1\]"),
    ({"train.class-weights": "a,b"}, "one number per class"),
    ({"train.class-weights": "0.5,1", "privacy.engine": "opacus"}, "bookkeeping engine's eager step"),
    ({"train.freeze": "image/backbones"}, "parameter-name prefixes"),
])
def test_bad_lever_values_name_the_key_and_the_fix(flat: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        RunConfig.from_flat(flat)
    assert "train." in str(caught.value)
