"""ClientApp of a hospital: trains and evaluates the global model on the site's own data.

By default (secure aggregation) a site's update and evaluation release leave it only masked, in the
four SecAgg+ stages of `train.secagg_*` and `evaluate.secagg_*` (client/secagg_stages.py); the plain
`train` / `evaluate` handlers serve runs with secagg.enabled = false, for sites whose policy allows it.
Every handler first checks the run against the site's own policy; every reply passes the outbound
audit (client/outbound.py); a simulated site whose policy asks for it checks the app (client/approval.py).
A site that cannot serve a message answers with an error naming the problem.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg_stages
from client.approval import approval_mod
from client.outbound import audit_mod
from client.replies import event_key, instruction, refuse, site_records, warn_once
from medfusion_fl.config import RunConfig
from medfusion_fl.errors import MedFusionError, ParameterMismatch
from medfusion_fl.policy.enforce import Work
from medfusion_fl.secagg import SecAggError
from medfusion_fl.site_config import SiteConfig

if TYPE_CHECKING:  # torch-heavy: imported inside the handlers that train or evaluate; a process that only
    # runs a secure-aggregation stage (Flower starts one per message) never imports torch
    from medfusion_fl.site import EvalRelease, LocalUpdate, SiteRunner

Handler = Callable[[Message, Context], Message]
app = ClientApp(mods=[audit_mod, approval_mod])
_ERRORS = (MedFusionError, FloatingPointError)


def _runner(context: Context, work: Work) -> SiteRunner:
    from medfusion_fl.site import SiteRunner  # torch-heavy: only where a site trains or evaluates

    runner = SiteRunner.from_configs(context.run_config, context.node_config)
    warn_once(context, runner)
    runner.check_policy(work)
    return runner


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        # 1. parse configs once and check the run against the site's policy; load the global weights
        runner = _runner(context, "train")
        if runner.run.secagg.enabled:
            raise SecAggError("secagg.enabled: this site sends its update only through secure aggregation")
        global_weights, config = instruction(msg)
        # 2-3. train locally (DP-SGD after the site's budget check under privacy.enabled)
        update = runner.train(global_weights, server_round=int(config["server-round"]),
                              proximal_mu=config.get("proximal-mu", 0.0), event_key=event_key(msg, config, "train"))
    except _ERRORS as exc:
        return refuse(msg, context, exc)
    # 4. reply with the local weights and the public FedAvg weight (the cohort size)
    content = site_records(runner, update.privacy, _train_figures(update))
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in update.weights.items()})
    content["metrics"] = MetricRecord({"num-examples": update.cohort})
    return Message(content=content, reply_to=msg)


def _train_figures(update: LocalUpdate) -> dict[str, float]:
    return {"train-loss": update.result.loss, "train-steps": update.result.steps,
            "train-seconds": update.result.seconds}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        runner = _runner(context, "evaluate")
        if runner.run.secagg.enabled:
            raise SecAggError("secagg.enabled: this site sends its evaluation only through secure aggregation")
        global_weights, config = instruction(msg)
        release = runner.release_evaluation(global_weights, server_round=int(config["server-round"]),
                                            event_key=event_key(msg, config, "evaluate"),
                                            threshold=_threshold(config))
    except _ERRORS as exc:
        return refuse(msg, context, exc)
    content = site_records(runner, release.privacy, _eval_figures(release))
    content["release"] = ArrayRecord({"sums": Array(release.sums)})
    return Message(content=content, reply_to=msg)


def _eval_figures(release: EvalRelease) -> dict[str, float]:
    local = release.local
    figures = {"eval-loss": local.loss, "eval-accuracy": local.accuracy, "eval-patients": local.num_examples}
    return figures | ({"eval-auroc": local.auroc} if local.auroc is not None else {}) | release.shared_figures


def _threshold(config: dict[str, float]) -> float:
    """The coordinator's operating threshold of the previous round (0.5 before one exists)."""
    value = config.get("threshold", 0.5)
    if not 0.0 < value < 1.0:
        raise ParameterMismatch(f"evaluate instruction: threshold = {value!r} is not a probability in (0, 1)")
    return value


@app.train("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    """Secure stage 1: check, train, encode and keep the update at the site; reply with public keys."""
    from medfusion_fl.secagg.encoding import input_length

    try:
        runner = _runner(context, "train")
        global_weights, config = instruction(msg)
        run = runner.run
        # a malformed, replayed or too small round is refused before training spends privacy
        setup, party = secagg_stages.check_instruction(
            msg.content, context.state, run, length=input_length(global_weights, with_loss=not run.privacy.enabled),
            modulus=secagg_stages.training_modulus(run), policy=runner.site.policy, site_id=runner.site.site_id,
            work="train")
        update = runner.train(global_weights, server_round=int(config["server-round"]),
                              proximal_mu=config.get("proximal-mu", 0.0), event_key=event_key(msg, config, "train"))
        vector = secagg_stages.training_input(run, setup, global_weights, update.weights, weight=update.cohort,
                                              loss=update.result.loss,
                                              seed=runner.seeded(int(config["server-round"]), "train"))
        keys = secagg_stages.start(context.state, setup, party, vector)
    except _ERRORS as exc:
        return refuse(msg, context, exc)
    content = site_records(runner, update.privacy, _train_figures(update))
    content["secagg"] = keys
    return Message(content=content, reply_to=msg)


@app.evaluate("secagg_advertise")
def secagg_evaluate_advertise(msg: Message, context: Context) -> Message:
    """Secure stage 1 of an evaluation: check, score the validation patients, keep the release; reply with keys."""
    from medfusion_fl.release.evaluation import ReleaseLayout

    try:
        runner = _runner(context, "evaluate")
        global_weights, config = instruction(msg)
        run = runner.run
        layout = ReleaseLayout(len(run.data.class_names), run.evaluation.bins)
        setup, party = secagg_stages.check_instruction(
            msg.content, context.state, run, length=layout.length + 2, modulus=secagg_stages.release_modulus(run),
            policy=runner.site.policy, site_id=runner.site.site_id, work="evaluate")
        release = runner.release_evaluation(global_weights, server_round=int(config["server-round"]),
                                            event_key=event_key(msg, config, "evaluate"),
                                            threshold=_threshold(config))
        vector = secagg_stages.release_input(run, setup, release.sums,
                                             seed=runner.seeded(int(config["server-round"]), "evaluate"))
        keys = secagg_stages.start(context.state, setup, party, vector)
    except _ERRORS as exc:
        return refuse(msg, context, exc)
    content = site_records(runner, release.privacy, _eval_figures(release))
    content["secagg"] = keys
    return Message(content=content, reply_to=msg)


def _secure_stage(stage: Callable[[RecordDict, RecordDict, SiteConfig], ConfigRecord | ArrayRecord]) -> Handler:
    """Stages 2-4 (the same for training and evaluation sums): no torch, the site's policy at hand."""

    def handle(msg: Message, context: Context) -> Message:
        try:
            site = SiteConfig.from_node_config(context.node_config, RunConfig.from_flat(context.run_config))
            record = stage(msg.content, context.state, site)
        except (MedFusionError, KeyError, TypeError, ValueError) as exc:
            return refuse(msg, context, exc)
        return Message(content=RecordDict({"secagg": record}), reply_to=msg)

    return handle


for _name, _stage in (("secagg_share", secagg_stages.share), ("secagg_mask", secagg_stages.mask),
                      ("secagg_unmask", secagg_stages.unmask)):
    app.train(_name)(_secure_stage(_stage))
    app.evaluate(_name)(_secure_stage(_stage))
