"""ClientApp of a hospital: trains and evaluates the global model on the site's own data.

Replies carry only the site's weights and aggregate metrics; a site whose data or config is
bad answers with an error naming the problem, so the coordinator can go on without it.
"""

from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medfusion_fl.errors import MedFusionError, ParameterMismatch, PrivacyBudgetExhausted
from medfusion_fl.parameters import Weights
from medfusion_fl.protocol import PRIVACY_DECLINED, SITE_ERROR
from medfusion_fl.site import SiteRunner

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


def _refuse(msg: Message, runner: SiteRunner | None, exc: Exception, code: int = SITE_ERROR) -> Message:
    site = runner.site.site_id if runner else "site (config not parsed)"
    log.error("%s refused %s: %s", site, msg.metadata.message_type, exc)
    reason = str(exc) if str(exc).startswith(site) else f"{site}: {exc}"
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    runner = None
    try:
        # 1. parse configs once; load the global weights
        runner = SiteRunner.from_configs(context.run_config, context.node_config)
        global_weights, config = _instruction(msg)
        # 2-3. load the site's data and train locally (FedProx term when proximal-mu > 0)
        server_round = int(config["server-round"])
        event = f"{msg.metadata.run_id}/{server_round}/{msg.metadata.message_id}" if msg.metadata.message_id else ""
        weights, result, privacy = runner.train(global_weights, server_round=server_round,
                                                proximal_mu=config.get("proximal-mu", 0.0), event_key=event)
    except PrivacyBudgetExhausted as exc:
        return _refuse(msg, runner, exc, code=PRIVACY_DECLINED)
    except (MedFusionError, FloatingPointError) as exc:
        return _refuse(msg, runner, exc)
    # 4. reply with the local weights and aggregate metrics
    metrics = MetricRecord({
        "num-examples": result.num_examples, "train-loss": result.loss,
        "train-steps": result.steps, "train-seconds": result.seconds,
    })
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
        "metrics": metrics,
        "site": ConfigRecord({"site-id": runner.site.site_id}),
    })
    if privacy is not None:  # cumulative epsilon and the history anyone can recompute it from
        content["privacy"] = ConfigRecord(dict(privacy.to_record()))
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    runner = None
    try:
        # 1. parse configs once; load the global weights
        runner = SiteRunner.from_configs(context.run_config, context.node_config)
        global_weights, _ = _instruction(msg)
        # 2-3. load the site's validation patients and score the global model
        result = runner.evaluate(global_weights)
    except MedFusionError as exc:
        return _refuse(msg, runner, exc)
    # 4. reply with aggregate metrics (AUROC only when both classes are present)
    metrics = MetricRecord({
        "num-examples": result.num_examples, "eval-loss": result.loss, "eval-accuracy": result.accuracy,
    })
    if result.auroc is not None:
        metrics["eval-auroc"] = result.auroc
    return Message(content=RecordDict({
        "metrics": metrics, "site": ConfigRecord({"site-id": runner.site.site_id}),
    }), reply_to=msg)
