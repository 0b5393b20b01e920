"""Every kind of figure a site may send, where it travels and what protects it: the release inventory.

docs/design.md prints the same table (a test keeps the two equal), the model card lists the rows a run
used, and the privacy test checks every item of every site's outbound audit log against it. A row
applies when all of its conditions hold: `secagg` / `plain` (secagg.enabled true / false), `dp`
(privacy.enabled), `no-dp`, `share-metrics` (the site's policy shares per-site figures); `always` rows
always apply. Keys may end in `<j>` (a party index) or be `*` (any key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from medfusion_fl.config import RunConfig

SECURE_TRAIN = ("train.secagg_advertise", "train.secagg_share", "train.secagg_mask", "train.secagg_unmask")
SECURE_EVAL = tuple(t.replace("train.", "evaluate.") for t in SECURE_TRAIN)
STAGE_1 = (SECURE_TRAIN[0], SECURE_EVAL[0])


@dataclass(frozen=True)
class Figure:
    """One kind of figure: the messages and record it leaves in, its keys, what it is, how it is protected."""

    messages: tuple[str, ...]
    record: str
    keys: tuple[str, ...]
    what: str
    protection: str
    when: tuple[str, ...] = ("always",)
    spends: str = "nothing"  # its epsilon: "training", "evaluation", "nothing" (no patient figure), "uncovered"

    def matches(self, message_type: str, record: str, key: str) -> bool:
        return (message_type in self.messages or "*" in self.messages) and record == self.record and any(
            k == "*" or k == key or (k.endswith("<j>") and re.fullmatch(re.escape(k[:-3]) + r"\d+", key))
            for k in self.keys)

    def applies(self, run: RunConfig, *, shares: bool) -> bool:
        holds = {"always": True, "secagg": run.secagg.enabled, "plain": not run.secagg.enabled,
                 "dp": run.privacy.enabled, "no-dp": not run.privacy.enabled, "share-metrics": shares}
        return all(holds[c] for c in self.when)


FIGURES: tuple[Figure, ...] = (
    Figure(STAGE_1, "secagg", ("round-id", "c-public", "s-public"),
           "the round id echoed, two fresh X25519 public keys", "public: key agreement material", ("secagg",)),
    Figure((SECURE_TRAIN[1], SECURE_EVAL[1]), "secagg", ("round-id", "sealed-<j>"),
           "Shamir shares of the site's self-mask seed and mask key, one pair per neighbour j",
           "encrypted for neighbour j (ChaCha20-Poly1305); the coordinator cannot open them", ("secagg",)),
    Figure((SECURE_TRAIN[2],), "secagg", ("masked",),
           "masked training input: n x q(update), n (the training cohort size), the count of update entries "
           "beyond secagg.clip; without DP also n x q(training loss)",
           "secure sum: only the sum over >= min-sites sites is readable; under DP the update is DP-SGD output "
           "(privacy.noise-multiplier) and the overflow count is computed from it", ("secagg",), "training"),
    Figure((SECURE_EVAL[2],), "secagg", ("masked",),
           "masked evaluation release of the validation patients: score histograms per true class (counts "
           "and correct per class for K > 2), clipped loss sum, overflow count; at the rounds evaluation.every "
           "schedules",
           "secure sum; under DP Gaussian noise (evaluation.noise-multiplier x sqrt 2, sqrt 3 for K > 2) on every "
           "entry, charged to the site's ledger", ("secagg",), "evaluation"),
    Figure((SECURE_TRAIN[3], SECURE_EVAL[3]), "secagg", ("round-id", "share-<j>"),
           "one Shamir share per neighbour j: of a survivor's self-mask seed or of a dropped site's mask key, "
           "never both", "protocol: only rebuilds masks over >= secagg.threshold sites", ("secagg",)),
    Figure((*STAGE_1, "train", "evaluate"), "site", ("site-id",), "the site's name", "public"),
    Figure((*STAGE_1, "train", "evaluate"), "privacy",
           ("federation", "delta", "epsilon", "max-epsilon", "accountant", "history"),
           "the site's privacy report: cumulative epsilon and the history it is recomputed from (noise "
           "multiplier, sample rate, steps, kind of each release)",
           "clear: it states the guarantee; the training sample rate gives the cohort size within one batch",
           ("dp",)),
    Figure(("train",), "arrays", ("*",), "the site's locally trained weights",
           "clear to the coordinator (secagg.enabled = false); DP-SGD output under DP", ("plain",), "training"),
    Figure(("train",), "metrics", ("num-examples",), "FedAvg weight: the site's training cohort size",
           "public by the site's declaration (implied by its sample rate under DP)", ("plain",)),
    Figure(("evaluate",), "release", ("sums",),
           "evaluation release of the validation patients (as the masked evaluation input, in clear)",
           "clear to the coordinator; under DP Gaussian noise (evaluation.noise-multiplier x sqrt 2, sqrt 3 for "
           "K > 2), charged to the site's ledger", ("plain",), "evaluation"),
    Figure(("train", SECURE_TRAIN[0]), "shared", ("train-loss", "train-steps", "train-seconds"),
           "the site's own training loss, steps and time", "clear by site policy (share-metrics); no DP",
           ("share-metrics",), "uncovered"),
    Figure(("evaluate", SECURE_EVAL[0]), "shared", ("eval-loss", "eval-accuracy", "eval-auroc", "eval-patients",
                                                    "eval-threshold", "eval-sensitivity", "eval-specificity",
                                                    "eval-ece"),
           "the site's own validation loss, accuracy, AUROC, patient count and (binary tasks) sensitivity and "
           "specificity at the coordinator's threshold, and ECE",
           "clear by site policy (share-metrics); no DP", ("share-metrics",), "uncovered"),
    Figure(("*",), "error", ("code", "reason"), "the error code and reason of a refused message",
           "clear: reasons name config keys, policy keys, protocol faults and an unapproved app's hash; a data "
           "problem's file and row only with share-metrics"),
)


def figure_of(message_type: str, record: str, key: str) -> Figure | None:
    """The inventory row covering one item of an outgoing message, or None (the item is not allowed)."""
    return next((f for f in FIGURES if f.matches(message_type, record, key)), None)


def released(run: RunConfig, *, sharing_sites: list[str],
             epsilon: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """The rows this run's sites may have used, for the model card; `epsilon`: per site, the epsilon of its
    "training" and "evaluation" releases alone (what each row cost)."""
    rows = []
    for figure in FIGURES:
        if not figure.applies(run, shares=bool(sharing_sites)):
            continue
        row: dict[str, Any] = {"messages": ", ".join(figure.messages), "record": figure.record,
                               "keys": ", ".join(figure.keys), "what": figure.what,
                               "protection": _with_values(figure.protection, run)}
        if figure.spends in ("training", "evaluation"):
            row["epsilon"] = ({site: parts[figure.spends] for site, parts in sorted(epsilon.items())}
                              if run.privacy.enabled and epsilon else "no DP guarantee (privacy.enabled = false)")
        else:
            row["epsilon"] = {"nothing": "none: it carries no figure of the patients",
                              "uncovered": "not covered by DP: clear by the site's own policy"}[figure.spends]
        if "share-metrics" in figure.when:
            row["sites"] = ", ".join(sharing_sites)
        rows.append(row)
    return rows


def _with_values(text: str, run: RunConfig) -> str:
    for key, value in (("evaluation.noise-multiplier", run.evaluation.noise_multiplier),
                       ("privacy.noise-multiplier", run.privacy.noise_multiplier)):
        text = text.replace(key, f"{key} {value:g}")
    return text


def markdown_table() -> str:
    """The inventory as the markdown table docs/design.md prints."""
    lines = ["| messages | record | keys | figure | protection | sent when | epsilon charged to |",
             "|---|---|---|---|---|---|---|"]
    for f in FIGURES:
        lines.append(f"| {', '.join(f'`{m}`' for m in f.messages)} | `{f.record}` | "
                     f"{', '.join(f'`{k}`' for k in f.keys)} | {f.what} | {f.protection} | {', '.join(f.when)} | "
                     f"{f.spends} |")
    return "\n".join(lines)
