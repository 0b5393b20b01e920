"""Local training and evaluation: the FedProx term, learning, AUROC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset

from medfusion_fl.config import RunConfig
from medfusion_fl.data import load_site, load_test_set
from medfusion_fl.models import build_model
from medfusion_fl.training import auroc, evaluate, proximal_term, train_local
from tests.conftest import tiny_flat

CPU = torch.device("cpu")


def test_proximal_term_is_half_mu_squared_distance() -> None:
    model = torch.nn.Linear(3, 2)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(0.5)  # 6 entries moved by 0.5 -> ||d||^2 = 1.5
    assert float(proximal_term(model, reference, mu=0.2).detach()) == pytest.approx(0.5 * 0.2 * 1.5)


def test_fedprox_keeps_weights_closer_to_the_global_model(synth_root, tiny_run: RunConfig) -> None:
    site = load_site(synth_root / "data" / "site-0", tiny_run.data)
    distances = []
    for mu in (0.0, 5.0):
        model = build_model(tiny_run, seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        train_local(model, site.train, tiny_run.train, device=CPU, seed=1, proximal_mu=mu)
        moved = zip(model.parameters(), start, strict=True)
        distances.append(sum(float((p.detach() - s).pow(2).sum()) for p, s in moved))
    assert distances[1] < distances[0] * 0.9


def test_a_small_mu_moves_the_second_step_by_exactly_its_pull(synth_root: Path) -> None:
    """Plain SGD, full batches: FedProx's first step equals FedAvg's (the pull is 0 at the global model w0); its
    second differs by exactly -lr x mu x (w1 - w0), w1 the first step's weights. Measured 9.5e-4 relative
    (float32 rounding of the two nearly equal models); dropping the pull or counting it twice is 1.0 off."""
    lr, mu = 0.05, 0.3

    def trained(epochs: int, proximal_mu: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        run = RunConfig.from_flat(tiny_flat(synth_root, **{
            "model.dropout": 0.0, "train.optimizer": "sgd", "train.lr": lr, "train.weight-decay": 0.0,
            "train.batch-size": 1000, "train.local-epochs": epochs}))
        model = build_model(run, seed=0)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_local(model, load_site(synth_root / "data" / "site-0", run.data).train, run.train, device=CPU, seed=1,
                    proximal_mu=proximal_mu)
        return start, {n: p.detach().clone() for n, p in model.named_parameters()}

    w0, w1 = trained(1, 0.0)
    _, plain = trained(2, 0.0)
    _, pulled = trained(2, mu)
    got = torch.cat([(pulled[n] - plain[n]).flatten() for n in w0])
    expected = torch.cat([(-lr * mu * (w1[n] - w0[n])).flatten() for n in w0])
    assert float(expected.norm()) > 1e-4  # the pull is there to see
    assert float((got - expected).norm() / expected.norm()) < 2e-3


def test_training_learns_the_synthetic_signal(synth_root, tiny_run: RunConfig) -> None:
    run = RunConfig.from_flat({**tiny_run.to_flat(), "train.local-epochs": 4})
    model = build_model(run, seed=0)
    test = load_test_set(synth_root / "data" / "test", run.data)
    before = evaluate(model, test, batch_size=32, device=CPU)
    pooled = ConcatDataset([load_site(synth_root / "data" / f"site-{s}", run.data).train for s in range(3)])
    train_local(model, pooled, run.train, device=CPU, seed=0)
    after = evaluate(model, test, batch_size=32, device=CPU)
    assert after.auroc is not None and after.auroc > 0.7  # 40 held-out patients: chance is 0.5
    assert after.loss < before.loss


def test_auroc_binary_multiclass_and_undefined() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    assert auroc(labels, probs) == 1.0
    assert auroc(np.array([1, 1]), probs[:2]) is None
    three = np.eye(3)[[0, 1, 2, 0]] * 0.7 + 0.1
    assert auroc(np.array([0, 1, 2, 0]), three) == 1.0


def test_precision_bf16_trains_and_fp16_is_refused_where_unsafe(synth_root, plain_run: RunConfig) -> None:
    from medfusion_fl.errors import ConfigError

    run = RunConfig.from_flat({**plain_run.to_flat(), "train.precision": "bf16"})
    site = load_site(synth_root / "data" / "site-1", run.data)
    result = train_local(build_model(run, seed=0), site.train, run.train, device=CPU, seed=0)
    assert np.isfinite(result.loss) and result.steps > 0
    fp16 = RunConfig.from_flat({**plain_run.to_flat(), "train.precision": "fp16"})
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train_local(build_model(fp16, seed=0), site.train, fp16.train, device=CPU, seed=0)
    with pytest.raises(ConfigError, match="Opacus would clip at max-grad-norm / scale"):
        RunConfig.from_flat({"train.precision": "fp16", "privacy.enabled": True})
