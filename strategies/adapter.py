"""Run a Flower strategy's own configure_train / aggregate_train inside the coordinator's round loop.

Under secure aggregation the coordinator holds only sum n_i (w_i - w) and sum n_i. Strategies whose step
depends only on the weighted mean (FedAvg, FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi) get one reply:
the mean w + sum n_i (w_i - w) / sum n_i, weighted by the total. FedAvg's weighted mean of that one reply is
the reply itself (factor N / N = 1.0), and every later step of those classes reads only that mean
(tests/strategy/test_mean.py feeds both forms). Without secure aggregation the sites' replies go to the
strategy one by one, as Flower's own loop would pass them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import Strategy

from medfusion_fl.errors import ParameterMismatch, RoundFailed
from medfusion_fl.parameters import Weights, check_weights
from strategies.state import load_state, save_state

log = logging.getLogger("medfusion_fl.server")
Scalar = bool | int | float | str


@dataclass
class Update:
    """One site's reply as a strategy sees it without secure aggregation."""

    weights: Weights
    weight: int  # num-examples: the site's training cohort
    loss: float | None = None  # train-loss, when the site's policy shares it


class _Placeholder:
    """A Grid for configure_train that offers as many nodes as the strategy asks for (never a wait): the round
    loop samples sites itself (bounded waits, rounds.fraction-train), so only the strategy's config is used."""

    def __init__(self, strategy: Strategy) -> None:
        wanted = [getattr(strategy, key, 1) for key in ("min_available_nodes", "min_train_nodes")]
        self.count = max([1, *(int(v) for v in wanted if isinstance(v, int | float))])

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))


class _NoSamplingLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("configure_train: Sampled")


@contextmanager
def _placeholder_sampling() -> Iterator[None]:
    """Drop Flower's "Sampled 1 nodes (out of 1)" line: it would misstate the round's real sample."""
    quiet = _NoSamplingLine()
    logging.getLogger("flwr").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("flwr").removeFilter(quiet)


def _record(weights: Weights) -> ArrayRecord:
    """Weights as Flower's strategies take them; integer buffers as float64, as FedAvg's mean leaves them
    (QFedAvg's in-place float steps would fail on int64)."""
    return ArrayRecord({k: Array(np.require(np.asarray(v, np.float64 if np.issubdtype(v.dtype, np.integer) else None),
                                            requirements="C")) for k, v in weights.items()})


def mean_of(weights: Weights, delta_sum: Weights, total_weight: int) -> Weights:
    """w + sum n_i (w_i - w) / sum n_i in float64, cast back to each float array's dtype; integer buffers
    (BatchNorm's step counter) stay float64, as Flower's own weighted mean leaves them."""
    if total_weight <= 0:
        raise ValueError("the mean needs a positive total weight")
    mean: Weights = {}
    for key, ref in weights.items():
        value = ref.astype(np.float64) + delta_sum[key] / total_weight
        mean[key] = value.astype(ref.dtype) if np.issubdtype(ref.dtype, np.floating) else value
    return mean


class ServerStrategy:
    """A Flower Strategy object, driven one round at a time by server/rounds.py."""

    def __init__(self, strategy: Strategy, *, name: str, individual: bool) -> None:
        self.strategy = strategy
        self.name = name  # strategy.name as configured, for the metrics lines
        self.label = type(strategy).__name__
        self.individual = individual  # its step needs each site's update: refused under secure aggregation

    def train_config(self, server_round: int, weights: Weights, base: dict[str, Scalar]) -> dict[str, Scalar]:
        """The config record the strategy sends with this round's train instruction (FedProx adds
        proximal-mu; every strategy adds server-round). FedOpt and QFedAvg note the round's weights here."""
        with _placeholder_sampling():
            messages = list(self.strategy.configure_train(server_round, _record(weights), ConfigRecord(dict(base)),
                                                          _Placeholder(self.strategy)))  # type: ignore[arg-type]
        if not messages:
            raise RoundFailed(f"round {server_round}: {self.label}.configure_train chose no site to train",
                              record={"round": server_round, "strategy": self.name, "status": "failed"})
        config = messages[0].content.config_records.get("config", ConfigRecord())
        return {k: v for k, v in config.items() if isinstance(v, bool | int | float | str)}

    def aggregate_mean(self, server_round: int, weights: Weights, delta_sum: Weights, total_weight: int, *,
                       sites: int | None = None) -> Weights:
        """The new global weights from the secure sum: one reply holding the mean, weighted by the total."""
        if sites is not None:  # Flower's own line below counts replies: the sum is one
            log.info("round %d: %d sites' updates, summed, go to %s as one reply (their weighted mean): Flower's "
                     "'Received 1 results' counts that reply", server_round, sites, self.label)
        reply = RecordDict({"arrays": _record(mean_of(weights, delta_sum, total_weight)),
                            "metrics": MetricRecord({"num-examples": total_weight})})
        return self._aggregate(server_round, weights, [reply])

    def aggregate_updates(self, server_round: int, weights: Weights, updates: Sequence[Update]) -> Weights:
        """The new global weights from the sites' own replies (secure aggregation off)."""
        with_loss = all(u.loss is not None for u in updates)  # Flower wants the same metric keys in every reply
        if not with_loss and hasattr(self.strategy, "train_loss_key"):  # QFedAvg
            lacking = sum(u.loss is None for u in updates)
            raise RoundFailed(f"round {server_round}: {self.label} weights each site's update by its training loss, "
                              f"which {lacking} of {len(updates)} sites did not send: a site sends it only when its "
                              "policy shares its figures (site policy share-metrics = true). Choose another strategy, "
                              "or ask the sites to share.", record={"round": server_round, "strategy": self.name,
                                                                     "status": "failed"})
        replies = [RecordDict({"arrays": _record(u.weights), "metrics": MetricRecord(
            {"num-examples": u.weight, **({"train-loss": float(u.loss)} if with_loss and u.loss is not None else {})})})
            for u in updates]
        return self._aggregate(server_round, weights, replies)

    def _aggregate(self, server_round: int, weights: Weights, replies: list[RecordDict]) -> Weights:
        messages = [Message(content=content, dst_node_id=i + 1, message_type=MessageType.TRAIN)
                    for i, content in enumerate(replies)]
        failed = {"round": server_round, "strategy": self.name, "status": "failed"}
        try:
            arrays, _ = self.strategy.aggregate_train(server_round, messages)
        except AggregationError as exc:
            raise RoundFailed(f"round {server_round}: {self.label} could not aggregate: {exc}", record=failed) from None
        if arrays is None:
            raise RoundFailed(f"round {server_round}: {self.label} returned no model from {len(replies)} "
                              "replies (see its log line above); the global model is unchanged", record=failed)
        return _as_template(arrays, weights, self.label, server_round, failed)

    def state_dict(self) -> dict[str, object]:
        return save_state(self.strategy)

    def load_state_dict(self, state: dict[str, object]) -> None:
        load_state(self.strategy, state)


def _as_template(arrays: ArrayRecord, template: Weights, label: str, server_round: int,
                 failed: dict[str, object]) -> Weights:
    """The strategy's result in the global model's dtypes (integers rounded), checked like weights from a site."""
    got = {k: a.numpy() for k, a in arrays.items()}
    try:
        bad = [k for k, v in got.items() if np.issubdtype(v.dtype, np.number) and not np.isfinite(v).all()]
        if bad:
            raise ParameterMismatch(f"{label}'s result: {bad[0]!r} contains NaN or infinite values")
        new = {k: v if k not in template else np.asarray(np.rint(v) if np.issubdtype(template[k].dtype, np.integer)
                                                       else v, dtype=template[k].dtype) for k, v in got.items()}
        check_weights(new, template, source=f"{label}'s result")
    except ParameterMismatch as exc:
        raise RoundFailed(f"round {server_round}: {exc}; the global model is unchanged", record=failed) from None
    return new
