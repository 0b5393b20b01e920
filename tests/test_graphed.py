"""privacy.cuda-graphs pads every batch with empty patients to a fixed size; the padded step must be the
unpadded step. The padding runs here on CPU without graphs (CI has no GPU); the graphs themselves are
checked against eager steps by bench/dp_graphs_check.py on a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from dp_exactness import family_model, patients

from medfusion_fl.config import PrivacyConfig, RunConfig
from medfusion_fl.errors import ConfigError
from medfusion_fl.privacy.bookkeeping import PerPatientClipper
from medfusion_fl.privacy.dp_sgd import BookkeepingStep
from medfusion_fl.privacy.graphed import PaddedClippedStep
from medfusion_fl.training import autocast

CPU = torch.device("cpu")


def _eager(model: torch.nn.Module, clipper: PerPatientClipper, batch: dict[str, torch.Tensor],
           precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpadded step: (clipped sum of every parameter, per-patient norms)."""
    with clipper.forward(len(batch["label"])), autocast(precision, CPU, cache=False):
        logits = model(batch["views"], batch["view_mask"], batch["tabular"])
    norms = clipper.clip_backward(F.cross_entropy(logits.float(), batch["label"], reduction="none"))
    return torch.cat([p.grad.flatten() for p in clipper.params]).double(), norms  # type: ignore[union-attr]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padded_step_equals_the_unpadded_step(precision: str) -> None:
    model = family_model("resnet", checkpointing=False)
    views, mask, tabular, labels = patients(model, CPU)
    clipper = PerPatientClipper(model, max_grad_norm=1.0)
    four = {"views": views, "view_mask": mask, "tabular": tabular, "label": labels}
    _, norms = _eager(model, clipper, four, precision)
    clipper.max_grad_norm = float(norms.median())  # clipping active for some patients, not all
    padded = PaddedClippedStep(model, clipper, device=CPU, precision=precision, multiple=8, graphs=False)
    three = {key: t[1:] for key, t in four.items()}  # then a smaller batch in the same padded buffers
    for batch in (four, three, four):
        want, _ = _eager(model, clipper, batch, precision)
        losses = padded(batch)
        got = torch.cat([p.grad.flatten() for p in clipper.params]).double()  # type: ignore[union-attr]
        assert losses.shape == (len(batch["label"]),)
        assert float((got - want).norm() / want.norm()) < 1e-6
    clipper.detach()


def test_cuda_graphs_on_a_cpu_site_is_a_clear_error() -> None:
    model = family_model("resnet", checkpointing=False)
    views, mask, tabular, labels = patients(model, CPU)
    step = BookkeepingStep(model, PrivacyConfig(enabled=True, cuda_graphs=True), torch.Generator().manual_seed(0),
                           expected=4)
    with pytest.raises(ConfigError, match="privacy.cuda-graphs = false"):
        step({"views": views, "view_mask": mask, "tabular": tabular, "label": labels}, CPU, "fp32")
    with pytest.raises(ValueError, match="CUDA device"):
        PaddedClippedStep(model, step.clipper, device=CPU, precision="fp32", multiple=8, graphs=True)
    step.clipper.detach()


def test_cuda_graphs_refuse_checkpointing_and_opacus() -> None:
    for extra in ({"model.checkpointing": True}, {"privacy.engine": "opacus"}):
        with pytest.raises(ConfigError, match="privacy.cuda-graphs"):
            RunConfig.from_flat({"privacy.enabled": True, "privacy.cuda-graphs": True, **extra})
