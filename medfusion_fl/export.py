"""ONNX export of the global model, an onnxruntime parity check, and the model card."""

from __future__ import annotations

import datetime as dt
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from medfusion_fl.config import RunConfig, privacy_warnings
from medfusion_fl.data import SiteDataset, load_test_set
from medfusion_fl.durable import write_bytes_atomic, write_json_atomic
from medfusion_fl.errors import ExportError
from medfusion_fl.models import MedFusionModel, build_model, example_inputs
from medfusion_fl.models.medfusion import view_shape
from medfusion_fl.parameters import set_weights
from medfusion_fl.report.calibration import Temperature, run_temperature, scale_threshold
from medfusion_fl.report.card import input_views
from medfusion_fl.report.run import ReportOutcome
from medfusion_fl.runfolder import read_init
from medfusion_fl.runstore import RunStore, load_checkpoint

log = logging.getLogger(__name__)
INPUTS = ("views", "view_mask", "tabular")
TOLERANCE = 1e-4
PARITY_SAMPLES = 64


@dataclass(frozen=True)
class ExportCheck:
    """How closely onnxruntime reproduces PyTorch on the check inputs."""

    max_abs_diff: float
    tolerance: float
    num_inputs: int
    input_source: str
    onnxruntime_version: str
    opset: int


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
# What a deployer reads first, in this order, right after the model's name
CARD_TOP = ("run_status", "read_first", "intended_use", "data", "initial_weights", "performance", "operating_threshold",
            "calibration", "limitations")


def calibration_card(final: dict[str, Any], run: RunConfig, temperature: Temperature) -> dict[str, Any]:
    """The card's calibration entry and the operating threshold on the calibrated scale."""
    out: dict[str, Any] = {"calibration": {**temperature.card(), "applied_in": "model.onnx: logits = the global "
                                           "model's logits / temperature (softmax gives calibrated probabilities)"}}
    threshold = (final.get("evaluate") or {}).get("threshold")
    if threshold is not None:  # class 1 when its calibrated probability >= value
        out["operating_threshold"] = {
            "value": round(scale_threshold(threshold, temperature.value), 6), "before_calibration": threshold,
            "class": run.data.class_names[1],
            "chosen_by": "maximum sensitivity + specificity (Youden) on the sites' pooled validation score "
                         "histograms of the last round, mapped through the temperature"}
    return out


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


def build_card(run: RunConfig, model: MedFusionModel, check: ExportCheck,
               extra: dict[str, Any]) -> dict[str, Any]:
    """The model card: what the model is, how it was trained, how well it did, what it guarantees."""
    spec = model.spec
    data = run.data
    top = {key: extra.pop(key) for key in CARD_TOP if key in extra}
    return {
        "model": "MedFusion",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **top,
        "inputs": {
            "views": f"float32 {['batch', spec.num_views, *view_shape(spec)]}, views {list(data.views)}: "
                     + input_views(run),
            "view_mask": f"float32 [batch, {spec.num_views}], 1 = view present, 0 = missing",
            "tabular": f"float32 [batch, {spec.num_tabular}], columns {[c.name for c in data.columns]}, "
                       "ranged columns scaled to [-1, 1]",
        },
        "outputs": {"logits": f"float32 [batch, {spec.num_classes}], classes {list(data.class_names)}; divided by "
                              "calibration.temperature (softmax of them: the calibrated probabilities)",
                    "weights": "model.safetensors beside model.onnx: the global model's tensors, before the "
                               "temperature (init.source = 'run' with init.path = this folder continues from them)"},
        "privacy": privacy_section(run, extra.pop("privacy_sites", {}), sharing_sites=extra.pop("sharing_sites", []),
                                   refusals=extra.pop("refused_by_site_policy", {})),
        "aggregation": aggregation_statement(run),
        "attention_supervision": attention_statement(run, model),
        "reproducibility": {"seed": run.train.seed, "secure_rng": run.privacy.secure_rng, "statement": (
            "the sites drew their DP noise, sampling and rounding from the OS CSPRNG: the run repeats up to them"
            if run.privacy.secure_rng else "privacy.secure-rng = false: every random draw came from train.seed; "
            "the same config and seed repeat this run bit for bit on one machine, and anyone with the config can "
            "recompute the sites' noise (a simulation, never a deployment)")},
        **extra,
        "export_check": asdict(check),
        "config": run.to_flat(),
    }


def attention_statement(run: RunConfig, model: MedFusionModel) -> str | dict[str, Any]:
    """How the model was taught where to look (attention.*), for the card."""
    from medfusion_fl.models.attention_gate import gates

    attention = run.attention
    found = gates(model)
    if not attention.enabled or not found:
        return "none: the model's attention was not supervised"
    what = {"mask": "its spatial attention pulled toward the sites' lesion masks",
            "cam": "the share of its spatial attention outside the sites' lesion masks penalised",
            "consistency": "its spatial attention kept the same under left-right mirroring (no masks)"}
    return {"method": attention.method, "weight": attention.weight,
            "gate": f"a spatial attention map of {found[0].side}x{found[0].side} cells after a backbone stage, "
                    "part of model.onnx", "what": what[attention.method]}


def privacy_section(run: RunConfig, sites: dict[str, Any], *, sharing_sites: list[str],
                    refusals: dict[str, str]) -> dict[str, Any]:
    """The model card's privacy statement: every kind of figure that left the sites with its protection,
    the mechanisms, and per site everything to recompute its epsilon (training and evaluation apart)."""
    from medfusion_fl.release.inventory import released

    dp = _dp_statement(run, sites)
    spent = ({site: {part: report[part]["epsilon"] for part in ("training", "evaluation")}
              for site, report in dp["sites"].items()} if isinstance(dp, dict) else None)
    section: dict[str, Any] = {
        "warnings": privacy_warnings(run),
        "differential_privacy": dp,
        "secure_aggregation": _secagg_statement(run),
        "released": released(run, sharing_sites=sharing_sites, epsilon=spent),
        "validation_patients": (
            f"covered: each evaluation release is a Gaussian mechanism (evaluation.noise-multiplier "
            f"{run.evaluation.noise_multiplier:g} x its sensitivity) charged to the site's ledger"
            if run.privacy.enabled else "NOT covered: privacy.enabled = false, their evaluation sums carry no noise"),
        "training_loss": ("not released: no accounted mechanism covers it under DP" if run.privacy.enabled
                          else "released inside the secure sum" if run.secagg.enabled else "not released"),
        "sites_sharing_figures_in_clear": sharing_sites or "none",
    }
    if refusals:
        section["refused_by_site_policy"] = refusals
    return section


def aggregation_statement(run: RunConfig) -> dict[str, Any]:
    """The model card's account of how the sites' updates became the model, and what bounds one site's pull."""
    cfg = run.strategy
    if run.secagg.enabled:
        saw = "only the example-weighted mean of the sites' updates (the secure sum), as one reply to the strategy"
    else:
        saw = "each site's update (secagg.enabled = false)" + (
            f"; {cfg.name} aggregated them one by one" if cfg.needs_individual_updates else "")
    return {"strategy": cfg.name, "arguments": cfg.arguments(), "coordinator_saw": saw,
            "update_norm_bound": f"each site scaled its update to L2 norm <= {run.secagg.update_norm_bound:g} "
                                 "before it left the site (secagg.update-norm-bound): one site's pull on the mean is "
                                 "at most its weight share of that bound. It bounds a site whose data or training "
                                 "went wrong, not a site whose software was altered."}


def _secagg_statement(run: RunConfig) -> str | dict[str, Any]:
    if not run.secagg.enabled:
        return "none: secagg.enabled = false, so the coordinator saw each site's update and evaluation release"
    sa = run.secagg
    return {"protocol": "SecAgg+ (Bell et al. 2020), honest-but-curious coordinator and sites",
            "coordinator_learned": "sums over sites only: of the example-weighted updates, of the cohort sizes and of "
                                   "the evaluation releases; which sites took part; never one site's input",
            "threshold": sa.threshold, "neighbours": sa.neighbours or "all", "clip": sa.clip, "bits": sa.bits,
            "sent_in_clear": "each site's id and, under DP, its privacy report (epsilon, delta, DP history)"}


def _dp_statement(run: RunConfig, sites: dict[str, Any]) -> str | dict[str, Any]:
    if not run.privacy.enabled:
        return ("none: privacy.enabled = false, so this model carries NO differential-privacy guarantee for the "
                "patients it was trained or evaluated on")
    from medfusion_fl.privacy.accountant import DPStep, epsilon

    p = run.privacy
    per_site = {}
    for site, report in sites.items():
        history = report.get("history", [])
        parts = {}
        for kind, name in (("train", "training"), ("evaluate", "evaluation")):
            events = [h for h in history if h.get("kind", "train") == kind]  # older reports: training only
            steps = [DPStep(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in events]
            parts[name] = {"epsilon": epsilon(steps, delta=report["delta"], accountant=report["accountant"]),
                           "history": events}
        per_site[site] = {k: v for k, v in report.items() if k != "history"} | parts
    return {
        "unit": "patient (all views and clinical features of one patient form one sample)",
        "training": {"mechanism": "DP-SGD: Poisson sampling, per-patient gradient clipping, Gaussian noise",
                     "noise_multiplier": p.noise_multiplier, "max_grad_norm": p.max_grad_norm},
        "evaluation": {"mechanism": "Gaussian mechanism on the sums of the validation patients' release (sample "
                                    "rate 1, one step per evaluation)",
                       "noise_multiplier": run.evaluation.noise_multiplier},
        "accountant": p.accountant, "sites": per_site,
        "how_to_recompute": "each site's epsilon is Opacus' accountant over its whole history (training and "
                            "evaluation events together, at the site's delta); 'training' and 'evaluation' give "
                            "each part alone",
    }


def export_run(model: MedFusionModel, run: RunConfig, out_dir: Path, *, held_out: SiteDataset | None,
               final: dict[str, Any], lines: list[dict[str, Any]], card: dict[str, Any], label: str,
               predictions: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[ExportCheck, ReportOutcome]:
    """The end of a run: the temperature of its last metrics line, the evaluation report, then model.onnx
    and the card (with the calibration, the operating threshold and the report's place)."""
    from medfusion_fl.report.run import report_for_model

    temperature = run_temperature(final, run)
    card = {**card, **calibration_card(final, run, temperature)}
    outcome = report_for_model(model, run, Path(out_dir), held_out=held_out, data=str(resolve_test_path(run)),
                               initial=card.get("initial_weights"),
                               temperature=temperature, threshold=(final.get("evaluate") or {}).get("threshold"),
                               lines=lines, label=label, predictions=predictions)
    card["report"] = outcome.card()
    card |= deployer_sections(run, card, final, outcome.numbers)
    return export_model(model, run, out_dir, held_out=held_out, card=card, temperature=temperature.value), outcome


def deployer_sections(run: RunConfig, card: dict[str, Any], final: dict[str, Any],
                      numbers: dict[str, Any] | None) -> dict[str, Any]:
    """The card's sections for a deployer (medfusion_fl/report/card.py), from the report's numbers."""
    from medfusion_fl.report import card as sections

    status = card.get("run_status") or {}
    out: dict[str, Any] = {
        "read_first": sections.read_first(run, numbers, status), "intended_use": sections.intended_use(run),
        "data": sections.data_provenance(run, final, numbers), "performance": sections.performance(numbers, final),
        "limitations": sections.limitations(run, numbers, status, card.get("initial_weights") or {})}
    if "operating_threshold" in card:
        out["operating_threshold"] = {**card["operating_threshold"], **sections.threshold_effect(numbers, final)}
    return out


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
    card = {"run_status": run_status(run, ckpt.round, _stop_reason(every, ckpt.round), checkpoint=checkpoint,
                                     went_on=went_on),
            "initial_weights": read_init(Path(checkpoint).parent.parent),
            "rounds": ckpt.round, "sites": ckpt.sites, "final_metrics": ckpt.metrics,
            "source_checkpoint": str(checkpoint), "privacy_sites": ckpt.privacy,
            "sharing_sites": ckpt.release.get("sharing_sites", []),
            "refused_by_site_policy": ckpt.release.get("refusals", {})}
    check, _ = export_run(model, run, out_dir, held_out=held_out, final=ckpt.metrics, card=card,
                          lines=lines, label=f"checkpoint {checkpoint} (round {ckpt.round})")
    return check


def run_status(run: RunConfig, rounds: int, reason: str = "", *, checkpoint: Path | None = None,
               went_on: int = 0) -> dict[str, Any]:
    """How the run behind a model ended: every configured round, or fewer (and why), for the card's top and the
    run's last log line. `went_on`: for a checkpoint, the last round the run completed after it."""
    planned = run.rounds.num_server_rounds
    source = f"the checkpoint of round {rounds}" if checkpoint is not None else f"the global model after round {rounds}"
    if rounds >= planned:
        return {"status": "complete", "rounds": rounds, "planned": planned,
                "summary": f"run complete: {rounds} of {planned} rounds; the model is {source}"}
    if went_on > rounds:
        return {"status": "intermediate", "rounds": rounds, "planned": planned,
                "summary": f"an INTERMEDIATE model: the checkpoint of round {rounds}; the run went on to round "
                           f"{went_on} of {planned} (export its last checkpoint for the final model)"}
    why = reason or ("its metrics end here: it was stopped, or is still running" if checkpoint is not None
                     else "the run stopped early")
    return {"status": "ended early", "rounds": rounds, "planned": planned, "reason": why,
            "summary": f"run ENDED EARLY: {rounds} of {planned} rounds ({why}); the model is {source}"}


def _stop_reason(lines: list[dict[str, Any]], last: int) -> str:
    """Why a run did not go past round `last`, from the metrics line of the round after it (if it failed)."""
    after = next((line for line in lines if line.get("round") == last + 1 and line.get("status") != "ok"), None)
    if after is None:
        return ""
    failures = after.get("failures") or []
    first = f": {failures[0].get('reason')}" if failures else ""
    if after.get("status") == "budget-exhausted":
        return f"round {last + 1} was declined: the sites' privacy budgets are spent{first}"
    return f"round {last + 1} {after.get('status')}{first}"


def resolve_test_path(run: RunConfig) -> Path | None:
    """The held-out folder of a run: data.test-path, else <sites-root>/test for synthetic data."""
    if run.data.test_path:
        return Path(run.data.test_path)
    if run.data.source == "synthetic":
        return Path(run.data.sites_root) / "test"
    return None
