"""ClientApp of a hospital: trains and evaluates the global model on the site's own data.

Replies carry only aggregate metrics and, without secure aggregation, the site's weights; with
`secagg.enabled` the update leaves only masked (client/secagg_stages.py). A site whose data or
config is bad answers with an error naming the problem, so the coordinator can go on without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg_stages
from medfusion_fl.config import RunConfig, SiteConfig
from medfusion_fl.errors import MedFusionError, ParameterMismatch, PrivacyBudgetExhausted
from medfusion_fl.protocol import PRIVACY_DECLINED, SITE_ERROR
from medfusion_fl.secagg import SecAggError

Weights = dict[str, np.ndarray]  # as medfusion_fl.parameters, which imports torch

if TYPE_CHECKING:  # torch-heavy modules load inside the handlers that train or evaluate: a process that
    # only runs a secure-aggregation stage (Flower starts one per message) never imports torch
    from medfusion_fl.privacy.guard import PrivacyReport
    from medfusion_fl.site import SiteRunner
    from medfusion_fl.training import TrainResult

log = logging.getLogger("medfusion_fl.client")
app = ClientApp()


def _instruction(msg: Message) -> tuple[Weights, dict[str, float]]:
    """The global weights and the round config of an instruction; malformed ones are refused."""
    content = msg.content
    if "arrays" not in content.array_records:
        raise ParameterMismatch(f"{msg.metadata.message_type} instruction has no 'arrays' record")
    config = content.config_records.get("config")
    if config is None or not isinstance(config.get("server-round"), int):
        raise ParameterMismatch(f"{msg.metadata.message_type} instruction has no integer config 'server-round'")
    numbers = {k: float(v) for k, v in config.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {k: a.numpy() for k, a in content.array_records["arrays"].items()}, numbers


def _site_name(context: Context) -> str:
    try:
        return SiteConfig.from_node_config(context.node_config, RunConfig.from_flat(context.run_config)).site_id
    except MedFusionError:
        return "site (config not parsed)"


def _refuse(msg: Message, context: Context, exc: Exception, code: int = SITE_ERROR) -> Message:
    site = _site_name(context)
    log.error("%s refused %s: %s", site, msg.metadata.message_type, exc)
    reason = str(exc) if str(exc).startswith(site) else f"{site}: {exc}"
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


def _train_locally(msg: Message, runner: SiteRunner, global_weights: Weights,
                   config: dict[str, float]) -> tuple[Weights, TrainResult, PrivacyReport | None]:
    """Step 3 of a train instruction: train the global weights on the site's data."""
    server_round = int(config["server-round"])
    event = f"{msg.metadata.run_id}/{server_round}/{msg.metadata.message_id}" if msg.metadata.message_id else ""
    return runner.train(global_weights, server_round=server_round, proximal_mu=config.get("proximal-mu", 0.0),
                        event_key=event)


def _site_records(runner: SiteRunner, privacy: PrivacyReport | None) -> RecordDict:
    content = RecordDict({"site": ConfigRecord({"site-id": runner.site.site_id})})
    if privacy is not None:  # cumulative epsilon and the history anyone can recompute it from
        content["privacy"] = ConfigRecord(dict(privacy.to_record()))
    return content


@app.train()
def train(msg: Message, context: Context) -> Message:
    from medfusion_fl.site import SiteRunner

    try:
        # 1-2. parse configs once; load the global weights
        runner = SiteRunner.from_configs(context.run_config, context.node_config)
        if runner.run.secagg.enabled:
            raise SecAggError("secagg.enabled: this site sends its update only through secure aggregation, "
                              "not as a plain train reply")
        global_weights, config = _instruction(msg)
        # 3. train locally (DP-SGD after the site's budget check under privacy.enabled)
        weights, result, privacy = _train_locally(msg, runner, global_weights, config)
    except PrivacyBudgetExhausted as exc:
        return _refuse(msg, context, exc, code=PRIVACY_DECLINED)
    except (MedFusionError, FloatingPointError) as exc:
        return _refuse(msg, context, exc)
    # 4. reply with the local weights and aggregate metrics
    content = _site_records(runner, privacy)
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in weights.items()})
    content["metrics"] = MetricRecord({
        "num-examples": result.num_examples, "train-loss": result.loss,
        "train-steps": result.steps, "train-seconds": result.seconds,
    })
    return Message(content=content, reply_to=msg)


@app.train("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    """Secure stage 1: train, encode and keep the update at the site; reply with public keys only."""
    from medfusion_fl.site import SiteRunner

    try:
        runner = SiteRunner.from_configs(context.run_config, context.node_config)
        global_weights, config = _instruction(msg)
        # a malformed or replayed instruction, or a site too large for the modulus, is refused before
        # training spends privacy
        setup, party = secagg_stages.check_instruction(msg.content, context.state, runner.run, global_weights)
        patients = len(runner.load_data().train)
        if patients > runner.run.secagg.max_weight:
            raise SecAggError(f"{patients} training patients > secagg.max-weight = "
                              f"{runner.run.secagg.max_weight}; raise secagg.max-weight in the run config")
        weights, result, privacy = _train_locally(msg, runner, global_weights, config)
        keys = secagg_stages.start(context.state, runner.run, setup, party, global_weights, weights,
                                   weight=result.num_examples, loss=result.loss)
    except PrivacyBudgetExhausted as exc:
        return _refuse(msg, context, exc, code=PRIVACY_DECLINED)
    except (MedFusionError, FloatingPointError) as exc:
        return _refuse(msg, context, exc)
    content = _site_records(runner, privacy)
    content["secagg"] = keys
    return Message(content=content, reply_to=msg)


def _secure_stage(msg: Message, context: Context,
                  stage: Callable[[RecordDict, RecordDict], ConfigRecord | ArrayRecord]) -> Message:
    try:
        record = stage(msg.content, context.state)
    except (MedFusionError, KeyError, TypeError, ValueError) as exc:
        return _refuse(msg, context, exc)
    return Message(content=RecordDict({"secagg": record}), reply_to=msg)


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    return _secure_stage(msg, context, secagg_stages.share)


@app.train("secagg_mask")
def secagg_mask(msg: Message, context: Context) -> Message:
    return _secure_stage(msg, context, secagg_stages.mask)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return _secure_stage(msg, context, secagg_stages.unmask)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from medfusion_fl.site import SiteRunner

    try:
        # 1. parse configs once; load the global weights
        runner = SiteRunner.from_configs(context.run_config, context.node_config)
        global_weights, _ = _instruction(msg)
        # 2-3. load the site's validation patients and score the global model
        result = runner.evaluate(global_weights)
    except MedFusionError as exc:
        return _refuse(msg, context, exc)
    # 4. reply with aggregate metrics (AUROC only when both classes are present)
    metrics = MetricRecord({
        "num-examples": result.num_examples, "eval-loss": result.loss, "eval-accuracy": result.accuracy,
    })
    if result.auroc is not None:
        metrics["eval-auroc"] = result.auroc
    if result.positive_hist is not None and result.negative_hist is not None:  # aggregate counts per score bin
        metrics["eval-positive-hist"], metrics["eval-negative-hist"] = result.positive_hist, result.negative_hist
    return Message(content=RecordDict({
        "metrics": metrics, "site": ConfigRecord({"site-id": runner.site.site_id}),
    }), reply_to=msg)
