"""Federated evaluation at the coordinator: the sites' evaluation releases, summed, and what it reads.

Each sampled site sends the release of its validation patients (medfusion_fl/release/evaluation.py):
through a secure sum by default, in clear only when secagg.enabled = false. Under DP every site has
noised its release and charged it to its ledger. The coordinator reads pooled loss, accuracy, AUROC
and the operating threshold from the sum only; per-site figures exist only for sites whose policy
shares them. A failed secure evaluation leaves the round's training intact: the round records why.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import ParameterMismatch, RoundFailed
from medfusion_fl.parameters import Weights
from medfusion_fl.release.evaluation import PooledEvaluation, ReleaseLayout, noise_spread
from server.secure_round import secure_release
from server.sites import (
    SiteDirectory,
    SiteFailure,
    collect,
    parse_privacy,
    parse_shared,
    sample,
    site_name,
    weights_record,
)


@dataclass
class Evaluation:
    record: dict[str, Any]  # the metrics line's "evaluate" entry
    failures: list[SiteFailure] = field(default_factory=list)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # reports sent with the releases
    shared: set[str] = field(default_factory=set)  # sites whose policy shared their own figures


@dataclass
class _Release:
    site: str
    sums: np.ndarray
    privacy: dict[str, Any] | None
    shared: dict[str, float] | None


def _parse_release(msg: Message, length: int) -> _Release:
    site = site_name(msg)
    record = msg.content.array_records.get("release")
    sums = record["sums"].numpy() if record is not None and "sums" in record else None
    if sums is None or sums.shape != (length,) or not np.all(np.isfinite(sums)):
        raise ParameterMismatch(f"evaluation reply of {site} has no finite 'release' of {length} entries")
    privacy = msg.content.config_records.get("privacy")
    shared = parse_shared(msg, site) if "shared" in msg.content.metric_records else None
    return _Release(site, sums.astype(np.float64), parse_privacy(privacy, site) if privacy else None, shared)


def federated_evaluation(grid: Grid | SiteDirectory, run: RunConfig, weights: Weights, server_round: int,
                         nodes: list[int], rng: random.Random, threshold: float | None = None) -> Evaluation:
    """Sample sites, collect and sum their releases, read the pooled figures. `threshold` (the previous
    round's operating threshold, 0.5 before one) is where sharing sites report their sensitivity and
    specificity."""
    layout = ReleaseLayout(len(run.data.class_names), run.evaluation.bins)
    needed = max(run.secagg.threshold, run.rounds.min_sites) if run.secagg.enabled else 1
    chosen = sample(nodes, run.rounds.fraction_evaluate, needed, rng)
    config = ConfigRecord({"server-round": server_round, "threshold": 0.5 if threshold is None else float(threshold)})
    content = RecordDict({"arrays": weights_record(weights), "config": config})
    if run.secagg.enabled:
        try:
            total, overflow, summed = secure_release(grid, run, content, server_round, chosen, layout.length)
        except RoundFailed as exc:  # training of the round stands; the evaluation did not happen
            failed = (exc.record or {}).get("failures", [])
            return Evaluation({"status": "failed", "reason": str(exc)}, [SiteFailure(**f) for f in failed])
        evaluation = Evaluation({}, summed.failures, summed.privacy, set(summed.shared))
        sites, shared = summed.sites, summed.shared
        how = "secure sum"
    else:
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in chosen]
        replies, failures = collect(grid, messages, "evaluate", run.rounds.reply_timeout,
                                    lambda msg: _parse_release(msg, layout.length))
        releases = sorted(replies.values(), key=lambda r: r.site)  # summed in site order, not arrival order
        if not releases:
            return Evaluation({"status": "failed", "reason": "no site sent a valid evaluation release"}, failures)
        total, overflow = np.sum([r.sums for r in releases], axis=0), 0
        sites = sorted(r.site for r in releases)
        shared = {r.site: r.shared for r in releases if r.shared}
        evaluation = Evaluation({}, failures, {r.site: r.privacy for r in releases if r.privacy}, set(shared))
        how = "clear (secagg.enabled = false)"
    std = _noise_std(run, layout, evaluation.privacy, sites)
    target = run.evaluation.target_sensitivity
    pooled = PooledEvaluation.from_sum(layout, total, std, target)
    noise = (f", Gaussian noise of std {std:.3g} per entry of the sum ({len(sites)} sites)" if run.privacy.enabled
             else ", no DP noise")
    evaluation.record = {**{k.replace("_", "-"): _finite(v) for k, v in asdict(pooled).items()}, "status": "ok",
                         "summed": sites,
                         "released": how + noise, "overflow": overflow, "sites": dict(sorted(shared.items()))}
    if run.privacy.enabled:  # what the noise does to these figures, said wherever they are shown
        evaluation.record["dp-noise"] = noise_spread(layout, total, std, target_sensitivity=target)
    if layout.binary:  # the pooled histograms themselves: the temperature of the export is fitted on them
        cells = [round(float(c), 4) for c in total[: layout.cells]]
        evaluation.record["score-histogram"] = {"negative": cells[: layout.bins], "positive": cells[layout.bins:]}
    return evaluation


def _noise_std(run: RunConfig, layout: ReleaseLayout, reports: dict[str, dict[str, Any]], sites: list[str]) -> float:
    """The std of the DP noise on each entry of the summed release: sqrt(sum of the sites' variances), each site's
    noise multiplier as its privacy report states it for this release (its last evaluation event: under
    evaluation.budget-share each site sets its own), else evaluation.noise-multiplier."""
    if not run.privacy.enabled:
        return 0.0
    variance = 0.0
    for site in sites:
        events = [e for e in (reports.get(site) or {}).get("history", []) if e.get("kind") == "evaluate"]
        sigma = float(events[-1]["noise_multiplier"]) if events else run.evaluation.noise_multiplier
        variance += (sigma * layout.sensitivity) ** 2
    return math.sqrt(variance)


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None
