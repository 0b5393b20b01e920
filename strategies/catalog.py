"""Find the configured Strategy class and build it from the `strategy.*` keys, checked against its signature.

Sampling, waiting and reply keys belong to the coordinator's round loop (rounds.*, server/rounds.py), so
the arguments that set them in Flower are fixed here and refused as keys. A user's own class (module:Class)
says whether its step needs each site's own update with a class attribute `needs_individual_updates`
(default False: under secure aggregation it gets one reply, the mean).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

import flwr.serverapp.strategy as flower
from flwr.serverapp.strategy import Strategy

from medfusion_fl.config import RunConfig
from medfusion_fl.config_base import kebab
from medfusion_fl.errors import ConfigError
from medfusion_fl.strategy_config import FLOWER, INDIVIDUAL, StrategyConfig, refuse_under_secure_sum

# Flower's FedAvg arguments that the round loop owns: the value it passes, and the key that does the job
FIXED: dict[str, tuple[Any, str]] = {
    "fraction_train": (1.0, "rounds.fraction-train"), "fraction_evaluate": (1.0, "rounds.fraction-evaluate"),
    "min_train_nodes": (1, "rounds.min-sites"), "min_evaluate_nodes": (1, "rounds.min-sites"),
    "min_available_nodes": (1, "rounds.min-sites"), "weighted_by_key": ("num-examples", "the sites' cohort sizes"),
    "arrayrecord_key": ("arrays", "the message layout"), "configrecord_key": ("config", "the message layout"),
    "train_loss_key": ("train-loss", "the sites' shared figures"),
}
UNCONFIGURABLE = {"train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "selection_rule"}  # callables


def strategy_class(cfg: StrategyConfig) -> type[Strategy]:
    """The class `strategy.name` names; ConfigError when it cannot be found or is not a Flower Strategy."""
    if not cfg.custom:
        return getattr(flower, FLOWER[cfg.key])  # type: ignore[no-any-return]
    module_name, _, class_name = cfg.key.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"strategy.name = {cfg.name!r}: module {module_name!r} cannot be imported ({exc}). Put "
                          "it in the app folder (it travels in the FAB) or install it at the coordinator.") from None
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy.name = {cfg.name!r}: {module_name}.{class_name} is "
                          f"{'missing' if cls is None else 'not a subclass of flwr.serverapp.strategy.Strategy'}; "
                          "subclass Strategy (or FedAvg) and name it as module:Class.")
    return cls


def needs_individual_updates(cfg: StrategyConfig, cls: type[Strategy]) -> bool:
    return cfg.key in INDIVIDUAL if not cfg.custom else bool(getattr(cls, "needs_individual_updates", False))


def _named(cls: type) -> set[str]:
    """The keyword arguments cls takes: its own, and those of its bases when it passes **kwargs on."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()  # type: ignore[misc]
        names |= {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def arguments(cfg: StrategyConfig, cls: type[Strategy], run: RunConfig) -> dict[str, Any]:
    """Keyword arguments for cls: the fixed ones it takes, then the keys set; every key checked by name."""
    params = inspect.signature(cls.__init__).parameters
    named = _named(cls)
    given = cfg.arguments()
    label = f"{cls.__name__} (strategy.name = {cfg.name!r})"
    for name in given:
        if name in FIXED:
            raise ConfigError(f"strategy.{kebab(name)}: {label} gets {FIXED[name][0]!r} from the round loop; "
                              f"set {FIXED[name][1]} instead.")
        if name in UNCONFIGURABLE:
            raise ConfigError(f"strategy.{kebab(name)}: a function cannot be a config value; subclass {cls.__name__} "
                              "and set it in your class (strategy.name = module:Class).")
    unknown = sorted(n for n in given if n not in named)
    if unknown:
        takes = sorted(kebab(n) for n in named - set(FIXED) - UNCONFIGURABLE)
        lines = []
        for name in unknown:
            close = difflib.get_close_matches(kebab(name), takes, n=3, cutoff=0.5)
            lines.append(f"strategy.{kebab(name)}" + (f" (close: {', '.join(close)})" if close else ""))
        raise ConfigError(f"{label} takes no {', '.join(lines)}. It takes: "
                          f"{', '.join(f'strategy.{t}' for t in takes) or 'no strategy.* argument'}. Set the "
                          "others back to \"\".")
    kwargs = {name: value for name, (value, _) in FIXED.items() if name in named}
    if "client_learning_rate" in named and "client_learning_rate" not in given:
        kwargs["client_learning_rate"] = run.train.lr  # QFedAvg's Lipschitz estimate: the sites' own step size
    kwargs |= given
    missing = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in kwargs]
    if missing:
        raise ConfigError(f"{label} needs {', '.join(f'strategy.{kebab(n)}' for n in missing)}: add the key(s) to "
                          "[tool.flwr.app.config] and set them.")
    return kwargs


def build(run: RunConfig) -> tuple[Strategy, bool]:
    """The configured Flower strategy object and whether its step needs each site's own update."""
    cfg = run.strategy
    cls = strategy_class(cfg)
    individual = needs_individual_updates(cfg, cls)
    if individual and run.secagg.enabled:
        raise ConfigError(refuse_under_secure_sum(cfg) or
                          f"strategy.name = {cfg.name!r}: {cls.__name__} sets needs_individual_updates = True, but "
                          "under secure aggregation (secagg.enabled = true) the coordinator holds only the sum of "
                          "the sites' updates. Set secagg.enabled = false (warned, stated in the model card).")
    kwargs = arguments(cfg, cls, run)
    try:
        return cls(**kwargs), individual
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {exc}. "
                          "Check the strategy.* keys.") from None
