"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medfusion_fl.report.metrics import Reliability, format_interval

DPI = 110


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _label(classes: Sequence[str], key: str) -> str:
    return classes[int(key)]


def roc_figure(curves: dict[str, Any], auroc: dict[str, Any], classes: Sequence[str]) -> bytes:
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.add_subplot()
    for key, curve in curves.items():
        ax.plot(curve["fpr"], curve["tpr"], lw=1.8, label=f"{_label(classes, key)} vs rest")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC, AUROC {format_interval(auroc)}")
    ax.legend(loc="lower right", fontsize=8)
    return png(fig)


def pr_figure(curves: dict[str, Any], auprc: dict[str, Any], classes: Sequence[str]) -> bytes:
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.add_subplot()
    for key, curve in curves.items():
        line = ax.step(curve["recall"], curve["precision"], where="post", lw=1.8, label=_label(classes, key))[0]
        ax.axhline(curve["prevalence"], ls=":", lw=0.8, color=line.get_color())
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01),
           title=f"Precision-recall, AUPRC {format_interval(auprc)}")
    ax.legend(loc="lower left", fontsize=8)
    return png(fig)


def confusion_figure(matrices: dict[str, list[list[int]]], classes: Sequence[str]) -> bytes:
    fig = Figure(figsize=(3.6 * len(matrices), 3.4))
    for i, (title, matrix) in enumerate(matrices.items()):
        ax = fig.add_subplot(1, len(matrices), i + 1)
        ax.imshow(matrix, cmap="Blues")
        top = max(max(row) for row in matrix) or 1
        for r, row in enumerate(matrix):
            for c, count in enumerate(row):
                ax.text(c, r, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
        ax.set_xticklabels(classes, fontsize=8)
        ax.set_yticklabels(classes, fontsize=8)
    return png(fig)


def reliability_figure(curves: dict[str, Reliability], binary: bool) -> bytes:
    fig = Figure(figsize=(4.4, 4.2))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfect calibration")
    for name, rel in curves.items():
        points = [(c, f) for c, f in zip(rel.confidence, rel.frequency, strict=True) if c is not None and f is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", lw=1.5, label=f"{name}: ECE {rel.ece:.3f}, Brier {rel.brier:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability of the positive class" if binary else
           "confidence (top class)", ylabel="observed rate of the positive class" if binary else "accuracy",
           title="Reliability (held-out)")
    ax.legend(loc="upper left", fontsize=7)
    return png(fig)


def rounds_figure(lines: list[dict[str, Any]]) -> bytes | None:
    """Loss, AUROC and each site's epsilon per round, from metrics.jsonl (None without a completed round)."""
    done = [line for line in lines if line.get("status") == "ok"]
    if not done:
        return None
    rounds = [int(line["round"]) for line in done]
    fig = Figure(figsize=(11, 3.3))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for source, label in (("held_out", "held-out"), ("evaluate", "sites, pooled")):
        for ax, key in ((axes[0], "loss"), (axes[1], "auroc")):
            series = [((line.get(source) or {}).get(key)) for line in done]
            if any(v is not None for v in series):
                ax.plot(rounds, [float("nan") if v is None else v for v in series], marker="o", label=label)
    sites = sorted({site for line in done for site in (line.get("privacy") or {})})
    for site in sites:
        axes[2].plot(rounds, [((line.get("privacy") or {}).get(site) or {}).get("epsilon", float("nan"))
                              for line in done], marker="o", label=site)
    budgets = {report.get("max-epsilon") for line in done for report in (line.get("privacy") or {}).values()}
    for budget in sorted(b for b in budgets if isinstance(b, int | float)):
        axes[2].axhline(budget, ls="--", lw=0.8, color="grey")
    for ax, title in zip(axes, ("loss", "AUROC", "epsilon per site (dashed: budget)"), strict=True):
        ax.set(xlabel="round", title=title)
        ax.set_xticks(rounds)
        if ax.lines:
            ax.legend(fontsize=7)
    if not sites:
        axes[2].text(0.5, 0.5, "no DP accounting\n(privacy.enabled = false)", ha="center", va="center",
                     transform=axes[2].transAxes)
    return png(fig)
