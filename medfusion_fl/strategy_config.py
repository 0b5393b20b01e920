"""The `strategy.*` keys: which Flower strategy the coordinator runs, and its constructor arguments.

`strategy.name` is a strategy of `flwr.serverapp.strategy` (any case: `fedadam`, `FedAdam`) or a user's
own Strategy subclass as `module:Class`. The other keys are the constructor arguments of Flower's
strategies, in kebab case; `""` (the default) leaves the strategy's own default. The facts below about
what each strategy needs are read from Flower 1.42's code; the strategies/ package (the coordinator's
app) imports Flower and checks every key against the chosen class's signature.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from medfusion_fl.config_base import Section, kebab

Unset = Literal[""]  # Flower config values cannot be null: "" = the strategy's own default

# lower-case name -> Flower's class name
MEAN_ONLY = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM", "fedadagrad": "FedAdagrad",
             "fedadam": "FedAdam", "fedyogi": "FedYogi"}
# strategies whose step needs every site's own update, and why
INDIVIDUAL = {
    "fedmedian": ("FedMedian", "it takes the coordinate-wise median of the sites' updates"),
    "fedtrimmedavg": ("FedTrimmedAvg", "it drops the largest and smallest values of each coordinate across sites"),
    "krum": ("Krum", "it scores each site's update by its distances to the others'"),
    "multikrum": ("MultiKrum", "it scores each site's update by its distances to the others'"),
    "bulyan": ("Bulyan", "it selects site updates by Krum, then trims each coordinate across them"),
    "qfedavg": ("QFedAvg", "it weights each site's update by that site's own training loss"),
}
_XGB = "it aggregates XGBoost trees, not the weights of a neural network"
_WRAPS = ("it wraps another strategy object, which a config key cannot hold; per-patient DP at each site is "
          "privacy.enabled (on by default)")
_SERVER_CLIPS = ("it clips each site's update at the coordinator, which sees only their sum under secure "
                 "aggregation; per-patient DP at each site is privacy.enabled (on by default)")
REFUSED = {"fedxgbbagging": _XGB, "fedxgbcyclic": _XGB,
           "differentialprivacyclientsidefixedclipping": _WRAPS,
           "differentialprivacyclientsideadaptiveclipping": _WRAPS,
           "differentialprivacyserversidefixedclipping": _SERVER_CLIPS,
           "differentialprivacyserversideadaptiveclipping": _SERVER_CLIPS}
FLOWER = {**MEAN_ONLY, **{name: cls for name, (cls, _) in INDIVIDUAL.items()}}
CUSTOM = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class StrategyConfig(Section):
    """Flower's strategy arguments; each applies only to the strategies named in its description. A user's own
    strategy (`module:Class`) may take further `strategy.<argument>` keys: add them to [tool.flwr.app.config]
    (Flower refuses overrides of keys the app does not list)."""

    model_config = ConfigDict(extra="allow")  # a user's strategy's own arguments, checked against its signature

    name: str = Field("fedavg", description="Server strategy: one of flwr.serverapp.strategy (fedavg, fedprox, "
                      "fedavgm, fedadagrad, fedadam, fedyogi; without secure aggregation also fedmedian, "
                      "fedtrimmedavg, krum, multikrum, bulyan, qfedavg), any case, or module:Class for your own "
                      "flwr Strategy subclass.")
    proximal_mu: float | Unset = Field("", description="FedProx: weight of (mu/2)||w - w_global||^2 at the sites.")
    server_learning_rate: float | Unset = Field("", description="FedAvgM: server step size (Flower: 1.0).")
    server_momentum: float | Unset = Field("", description="FedAvgM: server momentum (Flower: 0.0).")
    eta: float | Unset = Field("", description="FedAdagrad/FedAdam/FedYogi: server learning rate (Flower: 0.1, "
                               "0.1, 0.01).")
    eta_l: float | Unset = Field("", description="FedAdagrad/FedAdam/FedYogi: the sites' learning rate as the "
                                 "strategy records it; unused in aggregation (the sites use train.lr).")
    beta_1: float | Unset = Field("", description="FedAdam/FedYogi: first-moment decay (Flower: 0.9).")
    beta_2: float | Unset = Field("", description="FedAdam/FedYogi: second-moment decay (Flower: 0.99).")
    tau: float | Unset = Field("", description="FedAdagrad/FedAdam/FedYogi: adaptivity (Flower: 1e-3).")
    beta: float | Unset = Field("", description="FedTrimmedAvg: share cut from each end (Flower: 0.2).")
    num_malicious_nodes: int | Unset = Field("", description="Krum/MultiKrum/Bulyan: sites assumed malicious "
                                             "(Flower: 0).")
    num_nodes_to_select: int | Unset = Field("", description="MultiKrum: updates averaged (Flower: 1).")
    q: float | Unset = Field("", description="QFedAvg: fairness exponent (Flower: 0.1).")
    client_learning_rate: float | Unset = Field("", description="QFedAvg: the sites' learning rate in its "
                                                "Lipschitz estimate (\"\" = train.lr).")

    @model_validator(mode="after")
    def _known_name(self) -> StrategyConfig:
        key = self.name.strip().lower()
        if key in REFUSED:
            raise ValueError(f"{self.name!r} cannot serve here: {REFUSED[key]}. Choose one of "
                             f"{', '.join(sorted(FLOWER))} or module:Class")
        if key not in FLOWER and not CUSTOM.match(self.name.strip()):
            close = difflib.get_close_matches(key, list(FLOWER), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{self.name!r} is neither a strategy of flwr.serverapp.strategy nor module:Class.{hint} "
                             f"Known: {', '.join(sorted(FLOWER))}")
        extra = sorted(self.model_extra or {})
        if extra and not self.custom:
            known = [kebab(f) for f in type(self).model_fields if f != "name"]
            lines = []
            for field in extra:
                close = difflib.get_close_matches(kebab(field), known, n=3, cutoff=0.5)
                lines.append(f"strategy.{kebab(field)}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ValueError(f"unknown key(s) {', '.join(lines)}; further keys are for a user's own strategy "
                             "(strategy.name = module:Class)")
        return self

    @property
    def key(self) -> str:
        """The lower-case Flower name, or the module:Class path as written."""
        name = self.name.strip()
        return name if self.custom else name.lower()

    @property
    def custom(self) -> bool:
        return self.name.strip().lower() not in FLOWER

    @property
    def needs_individual_updates(self) -> bool:
        """For Flower's strategies; a user's class says so itself (see strategies/catalog.py)."""
        return self.key in INDIVIDUAL

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments set (not ""), by Python name, extras included."""
        values = {f: getattr(self, f) for f in type(self).model_fields if f != "name"}
        values |= {k.replace("-", "_"): v for k, v in (self.model_extra or {}).items()}
        return {k: v for k, v in values.items() if v != ""}


def refuse_under_secure_sum(cfg: StrategyConfig) -> str | None:
    """Why `cfg` cannot run when the coordinator holds only the sum, or None when it can."""
    if cfg.key not in INDIVIDUAL:
        return None
    cls, why = INDIVIDUAL[cfg.key]
    return (f"strategy.name = {cfg.name!r}: {cls} needs each site's own update ({why}), but under secure "
            "aggregation (secagg.enabled = true, the default) the coordinator holds only their sum. Choose one of "
            f"{', '.join(sorted(MEAN_ONLY))}, whose step depends only on the mean, or set secagg.enabled = false "
            "(warned, and stated in the model card: the coordinator then sees every site's update).")
