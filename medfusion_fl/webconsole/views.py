"""What the pages are sent of a metrics line: a compact per-round summary (the curves) and a per-site detail
(the round timeline and the sites' table).

A metrics line of a 100-site round is about 17 kB (each site's privacy record, the pooled histograms, the
stage timings); a 1000-round history of them would be 17 MB per viewer. The summary keeps what a curve
plots (about 300 bytes a round whatever the site count: per-site epsilon curves only up to
PER_SITE_CURVES sites, else the lowest, median and highest epsilon), the detail keeps each site's status,
reason and epsilon against its budget, and only the newest RECENT rounds' details go to a page that opens.
"""

from __future__ import annotations

import statistics
from typing import Any

METRICS = ("auroc", "auprc", "loss", "accuracy", "sensitivity", "specificity")
PER_SITE_CURVES = 8
RECENT = 10  # round details a page gets when it opens (it keeps the last 30 as they come; all: .../rounds)
OPENING = 100  # rounds of curve points in a page's first message; the earlier ones follow in a second


def _number(value: Any) -> float | None:
    """A figure to 6 significant digits (what a curve or a table shows; a third fewer bytes on the wire)."""
    return float(f"{value:.6g}") if isinstance(value, int | float) and not isinstance(value, bool) else None


def _metrics(block: Any) -> dict[str, float | None]:
    block = block if isinstance(block, dict) else {}
    if "status" in block and block["status"] != "ok":  # a round without its evaluation release: nothing to plot
        block = {}
    return {key: _number(block.get(key)) for key in METRICS}


def _block(line: dict[str, Any], key: str) -> dict[str, Any]:
    value = line.get(key)
    return value if isinstance(value, dict) else {}


def _band(line: dict[str, Any], key: str) -> list[float] | None:
    """The 95% range the DP noise alone gives a pooled figure (`dp-noise` of the evaluate entry), if any."""
    band = _block(_block(line, "evaluate"), "dp-noise").get(key)
    if isinstance(band, list) and len(band) == 2 and all(_number(b) is not None for b in band):
        return [float(_number(b) or 0.0) for b in band]
    return None


def _privacy(line: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    privacy = line.get("privacy")
    if not isinstance(privacy, dict):
        return {}
    return {str(site): (_number(p.get("epsilon")), _number(p.get("max-epsilon")))
            for site, p in privacy.items() if isinstance(p, dict)}


def summary(line: dict[str, Any]) -> dict[str, Any]:
    """One point per curve for this round."""
    train = _block(line, "train")
    spent = _privacy(line)
    epsilons = sorted(e for e, _ in spent.values() if e is not None)
    budgets = sorted({b for _, b in spent.values() if b is not None})
    out: dict[str, Any] = {
        "round": line["round"], "status": str(line.get("status", "unknown")),
        "wall_time_s": _number(line.get("wall_time_s")), "train_loss": _number(train.get("loss")),
        "held_out": _metrics(line.get("held_out")), "evaluate": _metrics(line.get("evaluate")),
        "sites": len(train.get("sites") or {}) if isinstance(train.get("sites"), dict) else 0,
        "failed": len(line.get("failures") or []) if isinstance(line.get("failures"), list) else 0,
        "budgets": budgets, "dp_noise": _band(line, "auroc") is not None,
    }
    if len(spent) <= PER_SITE_CURVES:
        out["epsilon"] = {site: e for site, (e, _) in sorted(spent.items())}
    elif epsilons:
        out["epsilon"] = {"lowest": epsilons[0], "median": _number(statistics.median(epsilons)),
                          "highest": epsilons[-1]}
    else:
        out["epsilon"] = {}
    return out


def _failure_status(stage: str) -> str:
    return "dropped from secure aggregation" if stage.startswith("secagg") else f"failed ({stage})"


def detail(line: dict[str, Any]) -> dict[str, Any]:
    """Each site's status this round (trained, failed with its reason, dropped from secure aggregation) and
    its epsilon against its budget."""
    train = _block(line, "train")
    sites: dict[str, dict[str, Any]] = {}
    for site in train.get("sites") or {} if isinstance(train.get("sites"), dict) else {}:
        sites[str(site)] = {"status": "trained", "reason": ""}
    summed = _block(line, "evaluate").get("summed")
    for site in summed if isinstance(summed, list) else []:
        sites.setdefault(str(site), {"status": "evaluated", "reason": ""})
    for failure in line.get("failures") or [] if isinstance(line.get("failures"), list) else []:
        if not isinstance(failure, dict):
            continue
        name = str(failure.get("site") or f"node {failure.get('node_id')}")
        sites[name] = {"status": _failure_status(str(failure.get("stage", ""))),
                       "reason": str(failure.get("reason", ""))}
    for site, (epsilon, budget) in _privacy(line).items():
        sites.setdefault(site, {"status": "no reply", "reason": ""}).update(epsilon=epsilon, budget=budget)
    return {"round": line["round"], "status": str(line.get("status", "unknown")),
            "wall_time_s": _number(line.get("wall_time_s")), "sites": dict(sorted(sites.items())),
            "held_out": _metrics(line.get("held_out")), "evaluate": _metrics(line.get("evaluate")),
            "evaluate_noise": {"auroc": _band(line, "auroc"), "threshold": _band(line, "threshold")},
            "reason": str(line.get("reason", "")) if line.get("reason") else ""}

