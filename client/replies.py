"""What a hospital's replies may hold: instruction parsing, refusals and the records of a reply.

Per-site figures in clear (the `shared` record) go out only when the site's policy shares metrics;
a refusal caused by the site's data names file and row only then (the details stay in its log).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from medfusion_fl.config import RunConfig
from medfusion_fl.errors import (
    DataError,
    LedgerTampered,
    MedFusionError,
    ParameterMismatch,
    PolicyRefused,
    PrivacyBudgetExhausted,
)
from medfusion_fl.protocol import POLICY_REFUSED, PRIVACY_DECLINED, SITE_ERROR
from medfusion_fl.site_config import SiteConfig

if TYPE_CHECKING:
    from medfusion_fl.privacy.guard import PrivacyReport
    from medfusion_fl.site import SiteRunner

Weights = dict[str, np.ndarray]  # as medfusion_fl.parameters, which imports torch
log = logging.getLogger("medfusion_fl.client")
WARNED = "policy-warned"  # context.state record: this run's relaxations were logged


def instruction(msg: Message) -> tuple[Weights, dict[str, float]]:
    """The global weights and the round config of an instruction; malformed ones are refused."""
    content = msg.content
    if "arrays" not in content.array_records:
        raise ParameterMismatch(f"{msg.metadata.message_type} instruction has no 'arrays' record")
    config = content.config_records.get("config")
    if config is None or not isinstance(config.get("server-round"), int):
        raise ParameterMismatch(f"{msg.metadata.message_type} instruction has no integer config 'server-round'")
    numbers = {k: float(v) for k, v in config.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {k: a.numpy() for k, a in content.array_records["arrays"].items()}, numbers


def event_key(msg: Message, config: dict[str, float], work: str) -> str:
    """The ledger key of this message's release (a replayed record is then not counted twice)."""
    if not msg.metadata.message_id:
        return ""
    return f"{msg.metadata.run_id}/{int(config['server-round'])}/{msg.metadata.message_id}/{work}"


def site_config_of(context: Context) -> SiteConfig | None:
    """The site's own config from its context, or None when the run or node config does not parse."""
    try:
        return SiteConfig.from_node_config(context.node_config, RunConfig.from_flat(context.run_config))
    except MedFusionError:
        return None


def refuse(msg: Message, context: Context, exc: Exception) -> Message:
    """An error reply: the code says why (policy, budget, anything else), the reason what to fix."""
    site = site_config_of(context)
    name = site.site_id if site else "site (config not parsed)"
    log.error("%s refused %s: %s", name, msg.metadata.message_type, exc)
    code = (POLICY_REFUSED if isinstance(exc, PolicyRefused) else PRIVACY_DECLINED
            if isinstance(exc, PrivacyBudgetExhausted) else SITE_ERROR)
    text = str(exc)
    if isinstance(exc, LedgerTampered):
        text = ("its privacy ledger failed its integrity check, so its privacy spend is unknown: it releases "
                "nothing under DP until the site restores the ledger (details in the site's own log)")
    elif isinstance(exc, DataError) and not (site and site.policy.share_metrics):
        text = ("its data cannot be used for this message; the file, row and problem stay in the site's own log "
                "(site policy share-metrics = false)")
    reason = text if text.startswith(name) else f"{name}: {text}"
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


def warn_once(context: Context, runner: SiteRunner) -> None:
    """Log, once per run at this site, every private default the run or the site's policy turns off."""
    if WARNED in context.state.config_records:
        return
    for line in runner.relaxations():
        log.warning("%s: %s", runner.site.site_id, line)
    context.state[WARNED] = ConfigRecord({"done": True})


def site_records(runner: SiteRunner, privacy: PrivacyReport | None, shared: dict[str, float]) -> RecordDict:
    """The records every stage-1 or plain reply carries: the site's name, its privacy report under DP
    (cumulative epsilon and the history it is recomputed from) and, if its policy shares them, its
    own figures in clear."""
    content = RecordDict({"site": ConfigRecord({"site-id": runner.site.site_id})})
    if privacy is not None:
        content["privacy"] = ConfigRecord(dict(privacy.to_record()))
    if runner.site.policy.share_metrics and shared:
        content["shared"] = MetricRecord({k: v for k, v in shared.items()})
    return content
