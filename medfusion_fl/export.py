"""ONNX export of the global model, an onnxruntime parity check, and the model card."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from medfusion_fl.config import RunConfig
from medfusion_fl.data import SiteDataset, load_test_set
from medfusion_fl.durable import write_bytes_atomic, write_json_atomic
from medfusion_fl.errors import ExportError
from medfusion_fl.models import MedFusionModel, build_model, example_inputs
from medfusion_fl.models.medfusion import view_shape
from medfusion_fl.parameters import set_weights
from medfusion_fl.report.calibration import Temperature, run_temperature, scale_threshold
from medfusion_fl.report.card import ExportCheck, build_card, deployer_sections, run_status, stop_reason
from medfusion_fl.report.run import ReportOutcome
from medfusion_fl.runfolder import read_init
from medfusion_fl.runstore import RunStore, load_checkpoint

log = logging.getLogger(__name__)
INPUTS = ("views", "view_mask", "tabular")
TOLERANCE = 1e-4
PARITY_SAMPLES = 64


class TemperatureScaled(nn.Module):
    """The model as exported: the global model's logits divided by the calibration temperature."""

    def __init__(self, model: MedFusionModel, temperature: float) -> None:
        super().__init__()
        self.model, self.spec = model, model.spec
        self.temperature: torch.Tensor
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, views: torch.Tensor, view_mask: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(views, view_mask, tabular)
        return logits / self.temperature


Exported = MedFusionModel | TemperatureScaled


def calibration_card(final: dict[str, Any], run: RunConfig, temperature: Temperature) -> dict[str, Any]:
    """The card's calibration entry and the operating threshold on the calibrated scale."""
    out: dict[str, Any] = {"calibration": {**temperature.card(), "applied_in": "model.onnx: logits = the global "
                                           "model's logits / temperature (softmax gives calibrated probabilities)"}}
    threshold = (final.get("evaluate") or {}).get("threshold")
    if threshold is not None:  # class 1 when its calibrated probability >= value
        out["operating_threshold"] = {
            "value": round(scale_threshold(threshold, temperature.value), 6), "before_calibration": threshold,
            "class": run.data.class_names[1],
            "chosen_by": _chosen_by(run, (final.get("evaluate") or {}).get("released-at-round"))}
        target, pooled = run.evaluation.target_sensitivity, (final.get("evaluate") or {}).get("sensitivity")
        if target > 0 and pooled is not None:
            out["operating_threshold"]["target_sensitivity"] = {
                "target": target, "pooled_sensitivity": pooled, "reached": pooled >= target,
                "note": "the sites' pooled (noisy under DP) sensitivity at this threshold; the report gives the "
                        "held-out sensitivity with its interval" + ("" if pooled >= target else
                                                                    ": the target was NOT reached at any edge")}
    return out


def _chosen_by(run: RunConfig, released_at: int | None) -> str:
    target = run.evaluation.target_sensitivity
    rule = (f"the highest score bin edge whose pooled sensitivity reaches evaluation.target-sensitivity = {target:g}"
            + (" (less one standard error of the DP noise)" if run.privacy.enabled else "") if target > 0 else
            "maximum sensitivity + specificity (Youden" + ("; under DP the edge nearest 0.5 within one standard "
                                                          "error of the best, or when the noisy cells of a class sum "
                                                          "to nothing" if run.privacy.enabled else "") + ")")
    release = f"the release of round {released_at}" if released_at is not None else "the last round's release"
    return f"{rule} on the sites' pooled validation score histograms of {release}, mapped through the temperature"


def with_last_release(final: dict[str, Any], lines: list[dict[str, Any]]) -> dict[str, Any]:
    """`final` with the evaluation release the model is released under: its own, or where its round released
    none (evaluation.every, a run that ended early) the latest earlier one, marked with its round."""
    if (final.get("evaluate") or {}).get("status") == "ok":
        return final
    last = final.get("round", 0)
    released = [line for line in lines if line.get("status") == "ok" and line.get("round", 0) <= last
                and (line.get("evaluate") or {}).get("status") == "ok"]
    if not released:
        return final
    return {**final, "evaluate": {**released[-1]["evaluate"], "released-at-round": released[-1]["round"]}}


def _to_onnx_bytes(model: Exported) -> bytes:
    args = example_inputs(model.spec, batch=2)
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings():
            # all three inputs share the batch axis; torch notes that it merges their names
            warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
            program = torch.onnx.export(
                model, args, input_names=list(INPUTS), output_names=["logits"], dynamo=True,
                verbose=False, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}),
            )
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"ONNX export of the model failed: {exc}") from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return bytes(program.model_proto.SerializeToString())


def _check_inputs(model: Exported, held_out: SiteDataset | None,
                  seed: int) -> tuple[dict[str, np.ndarray], str]:
    spec = model.spec
    if held_out is not None and len(held_out) > 0:
        samples = [held_out[i] for i in range(min(PARITY_SAMPLES, len(held_out)))]
        inputs = {name: torch.stack([s[name] for s in samples]).numpy() for name in INPUTS}
        return inputs, f"held-out folder ({len(samples)} patients)"
    rng = np.random.default_rng(seed)
    n = 16
    views = rng.random((n, spec.num_views, *view_shape(spec)), np.float32)
    mask = (rng.random((n, spec.num_views)) < 0.8).astype(np.float32)
    tabular = rng.normal(size=(n, spec.num_tabular)).astype(np.float32)
    return {"views": views, "view_mask": mask, "tabular": tabular}, "random inputs (no held-out folder)"


def check_parity(model: Exported, onnx_bytes: bytes, inputs: dict[str, np.ndarray]) -> float:
    """Max |onnxruntime - PyTorch| over the logits of the given inputs."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], inputs)
    model.eval()
    with torch.no_grad():
        torch_logits = model(*(torch.from_numpy(inputs[name]) for name in INPUTS)).numpy()
    return float(np.abs(onnx_logits - torch_logits).max())


def export_model(model: MedFusionModel, run: RunConfig, out_dir: Path, *, held_out: SiteDataset | None,
                 card: dict[str, Any], temperature: float = 1.0) -> ExportCheck:
    """Write `model.onnx` (logits / temperature) and `model_card.json` to out_dir; refuse an export that
    fails parity."""
    out_dir = Path(out_dir)
    base = model.cpu().eval()
    exported: Exported = TemperatureScaled(base, temperature).eval() if temperature != 1.0 else base
    onnx_bytes = _to_onnx_bytes(exported)
    inputs, source = _check_inputs(exported, held_out, seed=run.train.seed)
    diff = check_parity(exported, onnx_bytes, inputs)
    import onnx  # local: only needed to read the opset back

    opset = int(next(o.version for o in onnx.load_from_string(onnx_bytes).opset_import if o.domain == ""))
    check = ExportCheck(diff, TOLERANCE, len(inputs["views"]), source, ort.__version__, opset)
    if not diff <= TOLERANCE:
        raise ExportError(f"onnxruntime differs from PyTorch by {diff:.3g} (> {TOLERANCE}); "
                          "model.onnx was not written.")
    write_bytes_atomic(out_dir / "model.onnx", onnx_bytes)
    from safetensors.torch import save

    from medfusion_fl.models.dp_form import plain_state

    # the global model's own tensors (before the temperature), named in the plain form whether or not the run
    # trained under DP: init.source = 'run' starts a federation from them
    write_bytes_atomic(out_dir / "model.safetensors", save({k: v.contiguous() for k, v in plain_state(base).items()}))
    write_json_atomic(out_dir / "model_card.json", build_card(run, base, check, card))
    log.info("exported %s (onnxruntime max |diff| %.2e on %s)", out_dir / "model.onnx", diff, source)
    return check


def export_run(model: MedFusionModel, run: RunConfig, out_dir: Path, *, held_out: SiteDataset | None,
               final: dict[str, Any], lines: list[dict[str, Any]], card: dict[str, Any], label: str,
               predictions: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[ExportCheck, ReportOutcome]:
    """The end of a run: the temperature of its last metrics line, the evaluation report, then model.onnx
    and the card (with the calibration, the operating threshold and the report's place)."""
    from medfusion_fl.report.run import report_for_model

    final = with_last_release(final, lines)
    temperature = run_temperature(final, run)
    card = {**card, **calibration_card(final, run, temperature)}
    outcome = report_for_model(model, run, Path(out_dir), held_out=held_out, data=str(resolve_test_path(run)),
                               initial=card.get("initial_weights"),
                               temperature=temperature, threshold=(final.get("evaluate") or {}).get("threshold"),
                               lines=lines, label=label, predictions=predictions)
    card["report"] = outcome.card()
    card |= deployer_sections(run, card, final, outcome.numbers)
    return export_model(model, run, out_dir, held_out=held_out, card=card, temperature=temperature.value), outcome


def export_checkpoint(checkpoint: Path, out_dir: Path) -> ExportCheck:
    """Redo the export of a run from one of its checkpoints (`medfusion-fl export`), with its report."""
    ckpt = load_checkpoint(checkpoint)
    run = ckpt.config
    model = build_model(run)
    set_weights(model, ckpt.weights)
    test_path = resolve_test_path(run)
    held_out = load_test_set(test_path, run.data) if test_path is not None else None
    every = RunStore(Path(checkpoint).parent.parent).read_metrics()
    lines = [line for line in every if int(line.get("round", 0)) <= ckpt.round]
    went_on = max((int(line["round"]) for line in every if line.get("status") == "ok"), default=0)
    card = {"run_status": run_status(run, ckpt.round, stop_reason(every, ckpt.round), checkpoint=checkpoint,
                                     went_on=went_on),
            "initial_weights": read_init(Path(checkpoint).parent.parent),
            "rounds": ckpt.round, "sites": ckpt.sites, "final_metrics": ckpt.metrics,
            "source_checkpoint": str(checkpoint), "privacy_sites": ckpt.privacy,
            "sharing_sites": ckpt.release.get("sharing_sites", []),
            "refused_by_site_policy": ckpt.release.get("refusals", {})}
    # a folder of other things (a run folder) gets the files written into it; a new folder appears whole:
    # written beside it under a dot name, then renamed, so that a reader (the console's index) never lists an
    # export without its card, and an interrupted export leaves no version
    out_dir = Path(out_dir)
    staging = None if out_dir.exists() else out_dir.parent / f".{out_dir.name}.partial"
    if staging is not None and staging.exists():
        shutil.rmtree(staging)  # an earlier export that was interrupted
    try:
        check, _ = export_run(model, run, staging or out_dir, held_out=held_out, final=ckpt.metrics, card=card,
                              lines=lines, label=f"checkpoint {checkpoint} (round {ckpt.round})")
        if staging is not None:
            os.replace(staging, out_dir)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return check


def resolve_test_path(run: RunConfig) -> Path | None:
    """The held-out folder of a run: data.test-path, else <sites-root>/test for synthetic data."""
    if run.data.test_path:
        return Path(run.data.test_path)
    if run.data.source == "synthetic":
        return Path(run.data.sites_root) / "test"
    return None
