"""report.html: one self-contained page (inline CSS, PNGs as data: URIs, no script, no external request)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

from medfusion_fl.release.evaluation import pooled_noise_note
from medfusion_fl.report.metrics import format_interval

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1180px;color:#1d2330}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.15em;border-bottom:1px solid #d5d9e0;padding-bottom:3px;
margin-top:28px}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d5d9e0;padding:4px 9px;
text-align:right;font-size:.9em}th{background:#f1f3f6}td:first-child,th:first-child{text-align:left}
.meta{color:#5b6475;font-size:.9em}.figs{display:flex;flex-wrap:wrap;gap:14px}.figs img{max-width:100%;
border:1px solid #e4e7ec}.pointing{font-weight:600}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0}
.warn{background:#fdecea;border-left:4px solid #c62828;padding:6px 10px;margin:6px 0}.warn h2{margin-top:4px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    if name not in images:
        return ""
    data = base64.b64encode(images[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(n: dict[str, Any]) -> str:
    cal = n["calibration"]
    rows: list[list[Any]] = [["AUROC [95% CI]", format_interval(n["auroc"])],
                             ["AUPRC [95% CI]", format_interval(n["auprc"])]]
    for key, label in (("at_operating_threshold", "operating threshold"), ("at_0.5", "threshold 0.5"),
                       ("at_argmax", "argmax")):
        at = n.get(key)
        if at:
            where = f"at {label}" + (f" ({at['threshold']:.3f})" if key == "at_operating_threshold" else "")
            names = ("accuracy", "sensitivity", "specificity", "ppv", "npv") if "sensitivity" in at else ("accuracy",)
            rows += [[f"{FIGURE[name]} {where} [95% CI]", format_interval(at["intervals"][name])] for name in names]
            if "called_positive" in at:
                rows.append([f"called positive {where}", f"{at['called_positive']} of {at['patients']}"])
    rows += [["ECE before / after calibration", f"{cal['before']['ece']:.3f} / {cal['after']['ece']:.3f}"],
             ["Brier score before / after", f"{cal['before']['brier']:.3f} / {cal['after']['brier']:.3f}"],
             ["temperature", f"{cal['temperature']['value']:.4g}" + ("" if cal["temperature"]["fitted"]
                                                                      else " (not fitted)")]]
    return _table(["figure", "value"], rows)


FIGURE = {"accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
          "ppv": "PPV (positive predictive value)", "npv": "NPV (negative predictive value)"}


def _initial(init: dict[str, Any] | None) -> str:
    """The meta line of the initial weights' provenance ('' when the run did not record it)."""
    if not init:
        return ""
    extra = [f"{label} {_e(init[key])}" for key, label in (("licence", "licence"), ("file_sha256", "file sha256"),
                                                            ("weights_sha256", "weights sha256")) if init.get(key)]
    return f"initial weights: {_e(init.get('statement', ''))}{'; ' if extra else ''}{'; '.join(extra)}<br>"


def _warnings(warnings: list[str]) -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f"<div class='warn' id='warnings'><h2>Read this first</h2><ul>{items}</ul></div>"


def _sites(sites: dict[str, Any]) -> str:
    if sites.get("round") is None:
        return "<p>No completed federated evaluation in this run's metrics.</p>"
    shared = sites["shared"]
    out = [f"<p>Round {_e(sites['round'])}. Per-site figures exist only for sites whose privacy policy shares them "
           "in clear (share-metrics); the pooled figures above do not depend on them.</p>"]
    if shared:
        rows = [[site, f.get("eval-patients"), f.get("eval-auroc"), f.get("eval-sensitivity"),
                 f.get("eval-specificity"), f.get("eval-ece"), f.get("eval-threshold")] for site, f in shared.items()]
        out.append(_table(["site", "validation patients", "AUROC", "sensitivity", "specificity", "ECE",
                           "at threshold"], rows))
    out.append(f"<p>Did not share (their figures stay inside the secure sum): "
               f"{_e(', '.join(sites['not_shared']) or 'none')}.</p>")
    return "".join(out)


def _banded(value: Any, band: list[float] | None) -> str:
    return _num(value) + (f" [{band[0]:.2f}, {band[1]:.2f}]" if band else "")


def _rounds(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    sites = sorted({s for r in rows for s in r["epsilon"]})
    table = [[r["round"], r["held_out_loss"], r["held_out_auroc"], r["held_out_auprc"], r["pooled_loss"],
              _banded(r["pooled_auroc"], (r.get("pooled_dp_noise") or {}).get("auroc")),
              _banded(r.get("pooled_threshold"), (r.get("pooled_dp_noise") or {}).get("threshold")),
              _banded(r.get("pooled_patients"), (r.get("pooled_dp_noise") or {}).get("num-examples")),
              *(r["epsilon"].get(s) for s in sites)] for r in rows]
    out = _table(["round", "held-out loss", "held-out AUROC", "held-out AUPRC", "sites' pooled loss",
                  "sites' pooled AUROC", "sites' threshold", "sites' validation patients",
                  *(f"epsilon {s}" for s in sites)], table)
    noisy = next((r["pooled_dp_noise"] for r in reversed(rows) if r.get("pooled_dp_noise")), None)
    if noisy:
        out += f"<p class='note'>{_e(pooled_noise_note(noisy))}</p>"
    return out


def _pointing(game: dict[str, Any] | None) -> str:
    if not game:
        return ""
    share = "n/a" if game["share"] is None else f"{100 * game['share']:.1f}%"
    return (f"<p class='pointing'>Pointing game: {game['hits']} of {game['views']} lesion-bearing views of positive "
            f"patients ({share}) have their map's peak inside the lesion mask ({_e(game['maps'])}).</p>")


def render(n: dict[str, Any], images: dict[str, bytes], classes: Sequence[str]) -> str:
    data, cal = n["data"], n["calibration"]
    per_class = ", ".join(f"{_e(c)} {v}" for c, v in data["per_class"].items())
    explain = [name for name in images if name.startswith("explain")]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        f"<title>MedFusion-FL evaluation report</title><style>{STYLE}</style></head><body>",
        "<h1>MedFusion-FL evaluation report</h1>",
        f"<p class='meta'>model: {_e(n['model'])}<br>{_initial(n.get('initial_weights'))}data: "
        f"{_e(data['folder'])} ({data['patients']} patients: "
        f"{per_class})<br>written {_e(n['created'])}; probabilities {_e(n['probabilities'])}; bootstrap "
        f"{n['bootstrap']['resamples']} resamples</p>",
        _warnings(n.get("warnings", [])),
        *(f"<p class='note'>{_e(note)}</p>" for note in n["notes"]),
        "<h2>Summary</h2>", _summary(n),
        "<h2>Discrimination</h2><div class='figs'>", _img(images, "roc.png", "ROC curve"),
        _img(images, "pr.png", "precision-recall curve"), "</div>",
        "<h2>Confusion matrices</h2>", _img(images, "confusion.png", "confusion matrices"),
        "<h2>Calibration</h2>",
        f"<p>Temperature {cal['temperature']['value']:.4g}: {_e(cal['temperature']['method'])}.</p>",
        _img(images, "reliability.png", "reliability diagram"),
        "<h2>Rounds</h2>", _img(images, "rounds.png", "per-round curves"), _rounds(n["rounds"]),
        "<h2>Per-site results</h2>", _sites(n["sites"]),
    ]
    if explain or n.get("pointing_game"):
        parts += ["<h2>Explanation maps</h2><p>Class-activation maps (the method and backbone stage are named above "
                  "each figure; report.cam-method), overlaid on the view; missing views are blank; white outlines "
                  "are the folder's lesion masks, where it has them. View and modality weights are shown where the "
                  "model's aggregation or fusion has them.</p>", _pointing(n.get("pointing_game")),
                  *(_img(images, name, name) for name in explain)]
    parts.append(f"<p class='meta'>classes: {_e(', '.join(classes))}. Numbers: evaluation.json beside this page."
                 "</p></body></html>")
    return "\n".join(parts)
