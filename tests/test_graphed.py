"""privacy.cuda-graphs pads every batch with empty patients to a fixed size; the padded step must be the
unpadded step. The padding runs here on CPU without graphs (CI has no GPU), and the eager/record/replay
flow with a stand-in for the graph; real CUDA graphs are checked against eager steps by
bench/dp_graphs_check.py on a GPU."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from dp_exactness import family_model, patients

from medfusion_fl.config import PrivacyConfig, RunConfig
from medfusion_fl.errors import ConfigError
from medfusion_fl.privacy.bookkeeping import PerPatientClipper
from medfusion_fl.privacy.dp_sgd import BookkeepingStep, _patient_losses
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


def _losses(model: torch.nn.Module, precision: str) -> Any:
    """The DP step's per-patient losses, as BookkeepingStep hands them to the padded step."""
    return lambda batch: _patient_losses(model, batch, CPU, precision, cast_cache=False)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padded_step_equals_the_unpadded_step(precision: str) -> None:
    model = family_model("resnet", checkpointing=False)
    views, mask, tabular, labels = patients(model, CPU)
    clipper = PerPatientClipper(model, max_grad_norm=1.0)
    four = {"views": views, "view_mask": mask, "tabular": tabular, "label": labels}
    _, norms = _eager(model, clipper, four, precision)
    clipper.max_grad_norm = float(norms.median())  # clipping active for some patients, not all
    padded = PaddedClippedStep(clipper, _losses(model, precision), device=CPU, multiple=8, graphs=False)
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
        PaddedClippedStep(step.clipper, _losses(model, "fp32"), device=CPU, multiple=8, graphs=True)
    step.clipper.detach()


def test_cuda_graphs_refuse_checkpointing_and_opacus() -> None:
    for extra in ({"model.checkpointing": True}, {"privacy.engine": "opacus"}):
        with pytest.raises(ConfigError, match="privacy.cuda-graphs"):
            RunConfig.from_flat({"privacy.enabled": True, "privacy.cuda-graphs": True, **extra})


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: replay re-runs the recorded step and writes its results
    into the tensors the recording produced, as a replay writes into the same memory."""

    def __init__(self) -> None:
        self.replay_fn: Any = None

    def pool(self) -> str:
        return "shared-pool"

    def replay(self) -> None:
        self.replay_fn()


def test_graph_bookkeeping_first_eager_then_record_then_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The record/replay flow of PaddedClippedStep, with a CPU stand-in for the CUDA graph: each padded
    size runs eagerly once, is recorded the next time, replayed after; every step's p.grad equals the
    unpadded eager step's, also after the noise is added in place into the recorded gradients."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: SimpleNamespace(wait_stream=lambda s: None))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(wait_stream=lambda s: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    recorded_sizes: list[int] = []
    record = PaddedClippedStep._record

    def record_and_wire(self: PaddedClippedStep, static: dict[str, torch.Tensor], size: int) -> Any:
        recorded_sizes.append(size)
        rec = record(self, static, size)

        def replay() -> None:
            losses = self._run(static, size)
            for p, grad in zip(self.clipper.params, rec.grads, strict=True):
                grad.copy_(p.grad)  # type: ignore[arg-type]
                p.grad = None  # a real replay writes the recorded tensors only
            rec.losses.copy_(losses)

        rec.graph.replay_fn = replay
        return rec

    monkeypatch.setattr(PaddedClippedStep, "_record", record_and_wire)
    model = family_model("resnet", checkpointing=False)
    views, mask, tabular, labels = patients(model, CPU)
    clipper = PerPatientClipper(model, max_grad_norm=0.5)
    step = PaddedClippedStep(clipper, _losses(model, "fp32"), device=CPU, multiple=2, graphs=False)
    step.graphs = True  # the graph path, with the stand-ins above
    full = {"views": views, "view_mask": mask, "tabular": tabular, "label": labels}
    for rows in (4, 4, 3, 4, 2, 1, 2):  # padded sizes 4 (eager, record, replay x2), 2 (eager, record, replay)
        batch = {key: t[:rows] for key, t in full.items()}
        want, _ = _eager(model, clipper, batch, "fp32")
        step(batch)
        got = torch.cat([p.grad.flatten() for p in clipper.params]).double()  # type: ignore[union-attr]
        assert float((got - want).norm() / want.norm()) < 1e-6, rows
        for p in clipper.params:  # what BookkeepingStep does next: noise added in place
            p.grad.add_(1.0)  # type: ignore[union-attr]
    assert recorded_sizes == [4, 2]
    clipper.detach()
