"""The model card (`model_card.json`): what the model is and takes, how it was trained, what it guarantees, and
first the sections for whoever deploys it, after Mitchell et al. (2019) and radiology AI checklists (CLAIM): what
to read first, intended use, data provenance, performance with 95% intervals, the decision threshold and its
effect, limitations. Everything comes from the run's config, its metrics lines and the report's numbers
(evaluation.json); nothing here is a site's own figure."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfusion_fl.config import RunConfig, privacy_warnings
from medfusion_fl.models.medfusion import view_shape
from medfusion_fl.release.evaluation import pooled_noise_note

if TYPE_CHECKING:
    from medfusion_fl.models import MedFusionModel

# What a deployer reads first, in this order, right after the model's name
CARD_TOP = ("run_status", "read_first", "intended_use", "data", "initial_weights", "performance", "operating_threshold",
            "calibration", "limitations")

INTERVALS = ("AUROC and AUPRC: percentile bootstrap over the held-out patients (report.bootstrap resamples); "
             "accuracy, sensitivity, specificity, PPV and NPV: Wilson score 95% intervals")


@dataclass(frozen=True)
class ExportCheck:
    """How closely onnxruntime reproduces PyTorch on the check inputs."""

    max_abs_diff: float
    tolerance: float
    num_inputs: int
    input_source: str
    onnxruntime_version: str
    opset: int


def input_views(run: RunConfig) -> str:
    """How a view must be prepared for model.onnx: what the site folders' loader does to every image."""
    data = run.data
    size = f"{data.depth} x {data.image_size} x {data.image_size} (trilinear)" if data.depth else \
        f"{data.image_size} x {data.image_size} (bilinear, antialiased)"
    return (f"intensities in [0, 1] for PNG/JPEG files (8-bit / 255, 16-bit PNG / 65535); .npy arrays as stored "
            f"(float32, not rescaled); resized to {size}; RGB averaged to grey when data.channels = 1; a missing "
            "view is all zeros with view_mask 0")


def intended_use(run: RunConfig) -> dict[str, Any]:
    data = run.data
    task = (f"a {len(data.class_names)}-class classifier ({', '.join(data.class_names)}) from "
            f"{len(data.views)} image view(s) ({', '.join(data.views) or 'none'}) and {len(data.columns)} clinical "
            "column(s)")
    if run.report.intended_use:
        statement, given = run.report.intended_use, "report.intended-use"
    elif data.source == "synthetic":
        statement = (f"A demonstration of MedFusion-FL: {task}, trained on synthetic patients to test the software "
                     "and the federation. NOT for any clinical use.")
        given = "the default for data.source = synthetic"
    else:
        statement = (f"Research use: {task}, for patients like those of the sites that trained it. Not validated "
                     "for clinical use: evaluate it on the deploying hospital's own labelled patients (medfusion-fl "
                     "evaluate model.onnx --data FOLDER) and obtain the clearance clinical use requires.")
        given = "the default for data.source = folders (set report.intended-use to state yours)"
    return {"statement": statement, "stated_by": given, "out_of_scope": [
        "patients, scanners, views or populations unlike those of the training sites",
        "decisions without a clinician's review",
        "inputs prepared otherwise than 'inputs' below says"]}


def data_provenance(run: RunConfig, final: dict[str, Any], numbers: dict[str, Any] | None) -> dict[str, Any]:
    data, synth = run.data, run.synth
    if data.source == "synthetic":
        statement = (f"SYNTHETIC: every patient was made by medfusion-fl's generator (synth.seed {synth.seed}, "
                     f"{synth.patients_per_site} patients per site, class mix Dirichlet({synth.dirichlet_alpha:g}), "
                     f"{100 * synth.missing_view_rate:.0f}% missing views). No real patient's data was used.")
    else:
        statement = ("each site's own data folder, checked by `medfusion-fl site check`; the coordinator never saw "
                     "it and knows only the sums the sites released")
    train = final.get("train") or {}
    pooled = final.get("evaluate") or {}
    out: dict[str, Any] = {
        "source": data.source, "statement": statement,
        "training_patients": f"{train.get('num-examples')} over all sites (the sum of their training cohort sizes, "
                             "from the secure sum)" if train.get("num-examples") is not None else "not known",
        "schema": {"views": list(data.views), "clinical_columns": [c.name for c in data.columns],
                   "classes": list(data.class_names), "image_size": data.image_size, "depth": data.depth,
                   "channels": data.channels, "label_column": data.label_column},
    }
    if pooled.get("num-examples") is not None:
        band = (pooled.get("dp-noise") or {}).get("num-examples")
        out["validation_patients"] = f"about {pooled['num-examples']:.0f} over the sites" + (
            f" (a DP-noised count: the noise alone spans {band[0]:.0f} to {band[1]:.0f})" if band else "")
    if numbers is not None:
        out["held_out"] = {**numbers["data"], "note": "the generator's held-out folder: other patients, no site "
                           "shift" if data.source == "synthetic" else "the coordinator's data.test-path"}
    return out


def performance(numbers: dict[str, Any] | None, final: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if numbers is not None:
        out |= {"evaluated_on": f"{numbers['data']['folder']}: {numbers['data']['patients']} patients "
                                f"({', '.join(f'{c} {v}' for c, v in numbers['data']['per_class'].items())})",
                "auroc": numbers["auroc"], "auprc": numbers["auprc"], "intervals": INTERVALS}
        for key in ("at_operating_threshold", "at_0.5", "at_argmax"):
            at = numbers.get(key)
            if at is not None:
                out[key] = {"threshold": at["threshold"], **at["intervals"],
                            **({"called_positive": f"{at['called_positive']} of {at['patients']}"}
                               if "called_positive" in at else {})}
        cal = numbers["calibration"]
        out["calibration"] = {"ece_before": cal["before"]["ece"], "ece_after": cal["after"]["ece"],
                              "brier_before": cal["before"]["brier"], "brier_after": cal["after"]["brier"]}
    pooled = final.get("evaluate") or {}
    if pooled.get("status") == "ok":
        noise = pooled.get("dp-noise")
        out["sites_pooled_validation"] = {
            "auroc": pooled.get("auroc"), "accuracy_at_0.5": pooled.get("accuracy"), "dp_noise": noise,
            "note": pooled_noise_note(noise) if noise else "read from the sites' summed validation release, no DP "
                                                           "noise (privacy.enabled = false)"}
    return out


def threshold_effect(numbers: dict[str, Any] | None, final: dict[str, Any]) -> dict[str, Any]:
    """What the released operating threshold does on the held-out folder, beside 0.5, and how far the DP noise
    on the release it was read from could have moved it."""
    out: dict[str, Any] = {}
    at, half = (numbers or {}).get("at_operating_threshold"), (numbers or {}).get("at_0.5")
    for name, entry in (("effect_on_held_out", at), ("at_0.5_instead", half)):
        if entry is not None and "sensitivity" in entry:
            out[name] = (f"{entry['called_positive']} of {entry['patients']} held-out patients called positive; "
                         f"sensitivity {entry['sensitivity']:.3f}, specificity {entry['specificity']:.3f}, "
                         f"PPV {_num(entry['ppv'])}, NPV {_num(entry['npv'])}")
    band = ((final.get("evaluate") or {}).get("dp-noise") or {}).get("threshold")
    if band:
        out["dp_noise"] = (f"the DP noise on the release it was read from alone would have put it anywhere from "
                           f"{band[0]:.2f} to {band[1]:.2f} (before calibration)")
    return out


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def limitations(run: RunConfig, numbers: dict[str, Any] | None, status: dict[str, Any],
                init: dict[str, Any] | None = None) -> list[str]:
    out = []
    if run.data.source == "synthetic":
        out.append("Trained and evaluated on synthetic patients only: no figure here describes real patients.")
    if status.get("status", "complete") != "complete":
        out.append(status["summary"])
    held = f"one held-out folder of {numbers['data']['patients']} patients" if numbers else "no held-out folder"
    out.append(f"Evaluated on {held}: no external validation, no subgroup analysis (age, sex, scanner, site), and "
               "no per-site figures unless a site's policy shared them.")
    if run.privacy.enabled:
        out.append(f"Trained with per-patient DP-SGD (noise multiplier {run.privacy.noise_multiplier:g}, clipping "
                   f"bound {run.privacy.max_grad_norm:g}): the noise trades accuracy for privacy. The operating "
                   "threshold and the calibration temperature come from the sites' DP-noised validation release, "
                   "so they may be far from the best ones (performance.sites_pooled_validation says how far).")
    else:
        out.append("No differential privacy (privacy.enabled = false): the patients have no DP guarantee.")
    out.append("Every clinical column must be present: missing values are refused, not imputed. Missing views are "
               "accepted (view_mask 0); performance with missing views was not measured apart.")
    statement = (init or {}).get("statement")
    out.append(f"Initial weights: {statement}." if statement else
               "Initial weights: not recorded (a run from before their provenance was kept).")
    return out


def read_first(run: RunConfig, numbers: dict[str, Any] | None, status: dict[str, Any]) -> list[str]:
    """The lines a deployer must read before anything else; [] when there is nothing to warn of."""
    out = [status["summary"]] if status.get("status", "complete") != "complete" else []
    if numbers is None:
        out.append("No held-out evaluation: run `medfusion-fl evaluate model.onnx --data FOLDER` on labelled patients "
                   "before any use.")
    else:
        out += numbers.get("warnings", [])
    if run.data.source == "synthetic":
        out.append("Synthetic data: this model is a demonstration, not for clinical use.")
    return out


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
                       "a ranged column (name:low:high) scaled to [-1, 1] as 2 (x - low) / (high - low) - 1, a "
                       "':log' one the same on log x, log low and log high; the ranges: data.tabular-columns = "
                       f"{data.tabular_columns!r}",
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
                     "noise_multiplier": p.noise_multiplier, "max_grad_norm": p.max_grad_norm,
                     **({"class_weights_after_clipping": dict(zip(run.data.class_names, run.train.weights,
                                                                  strict=True))} if run.train.weights else {}),
                     **({"not_trained_at_sites": list(run.train.frozen)} if run.train.frozen else {})},
        "evaluation": {"mechanism": "Gaussian mechanism on the sums of the validation patients' release (sample "
                                    "rate 1, one step per evaluation)",
                       "noise_multiplier": run.evaluation.noise_multiplier},
        "accountant": p.accountant, "sites": per_site,
        "how_to_recompute": "each site's epsilon is Opacus' accountant over its whole history (training and "
                            "evaluation events together, at the site's delta); 'training' and 'evaluation' give "
                            "each part alone",
    }


def deployer_sections(run: RunConfig, card: dict[str, Any], final: dict[str, Any],
                      numbers: dict[str, Any] | None) -> dict[str, Any]:
    """The card's sections for a deployer (medfusion_fl/report/card.py), from the report's numbers."""
    status = card.get("run_status") or {}
    out: dict[str, Any] = {
        "read_first": read_first(run, numbers, status), "intended_use": intended_use(run),
        "data": data_provenance(run, final, numbers), "performance": performance(numbers, final),
        "limitations": limitations(run, numbers, status, card.get("initial_weights") or {})}
    if "operating_threshold" in card:
        out["operating_threshold"] = {**card["operating_threshold"], **threshold_effect(numbers, final)}
    return out


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


def stop_reason(lines: list[dict[str, Any]], last: int) -> str:
    """Why a run did not go past round `last`, from the metrics line of the round after it (if it failed)."""
    after = next((line for line in lines if line.get("round") == last + 1 and line.get("status") != "ok"), None)
    if after is None:
        return ""
    failures = after.get("failures") or []
    first = f": {failures[0].get('reason')}" if failures else ""
    if after.get("status") == "budget-exhausted":
        return f"round {last + 1} was declined: the sites' privacy budgets are spent{first}"
    return f"round {last + 1} {after.get('status')}{first}"
