"""The model card's sections for whoever deploys the model, after Mitchell et al. (2019) and radiology AI
checklists (CLAIM): what to read first, intended use, data provenance, performance with 95% intervals, the
decision threshold and its effect, limitations. Everything comes from the run's config, its last metrics line
and the report's numbers (evaluation.json); nothing here is a site's own figure."""

from __future__ import annotations

from typing import Any

from medfusion_fl.config import RunConfig
from medfusion_fl.release.evaluation import pooled_noise_note

INTERVALS = ("AUROC and AUPRC: percentile bootstrap over the held-out patients (report.bootstrap resamples); "
             "accuracy, sensitivity, specificity, PPV and NPV: Wilson score 95% intervals")


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
