"""Typed run and site configuration, parsed from Flower's flat run_config/node_config or TOML.

Flower config values are scalars (bool/int/float/str) under dotted kebab-case keys
(`train.lr`); lists are comma-separated strings. Pydantic owns types, ranges and defaults;
pyproject.toml's [tool.flwr.app.config] mirrors the defaults (a test keeps them equal).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from medfusion_fl.attention.config import AttentionConfig, unsupported
from medfusion_fl.config_base import WHERE, Scalar, Section, kebab
from medfusion_fl.config_sources import read_toml_flat
from medfusion_fl.errors import ConfigError
from medfusion_fl.evaluation_config import EvaluationConfig
from medfusion_fl.pretrained.config import InitConfig
from medfusion_fl.report.config import ReportConfig
from medfusion_fl.secagg_config import SecAggConfig
from medfusion_fl.strategy_config import StrategyConfig, refuse_under_secure_sum
from medfusion_fl.synth_config import SynthConfig
from medfusion_fl.train_config import TrainConfig, split_list


class TabularColumn(BaseModel):
    """One clinical feature: its manifest column and its plausible range (None = unbounded); `log`: the range is
    mapped on a log scale (a skewed, positive measurement: lab values, areas, counts)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False


class OutputConfig(Section):
    run_dir: str = Field("runs/flwr-run", description="Folder for checkpoints, metrics and the exported model.")
    keep_checkpoints: int = Field(3, ge=1, description="Round checkpoints kept on disk (older ones are pruned).")
    resume: bool = Field(False, description="Continue from the newest checkpoint in run-dir (weights, round, "
                         "strategy state, sites) instead of starting over; the model and data config must match "
                         "(the data's folder may have moved). A fresh run refuses a run-dir that already holds a run.")
    resume_from: str = Field("", description="With resume: the checkpoint to continue from (e.g. round-0002.pt in "
                             "run-dir/checkpoints); '' = the newest, which must be intact. Newer checkpoints and "
                             "metrics lines are moved aside, never deleted.")
    overwrite: bool = Field(False, description="A fresh run into a run-dir that holds a run moves that run aside to "
                            "<run-dir>.replaced-<UTC time> (false: refuse, naming what is there).")


VIEW_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")  # a manifest column and part of each image file name


class DataConfig(Section):
    source: Literal["synthetic", "folders"] = Field(
        "synthetic", description="'synthetic': sites generate their folder under sites-root if missing; "
        "'folders': site folders must already exist.")
    sites_root: str = Field("runs/flwr-run/data", description="In simulation, site k reads <sites-root>/site-k.")
    test_path: str = Field("", description="Held-out folder for centralized evaluation; '' = <sites-root>/test "
                           "for synthetic data, none otherwise.")
    view_names: str = Field("frontal,lateral", description="Image views per patient, one manifest column each.")
    tabular_columns: str = Field(
        "age:0:100,marker-a:-6:6,marker-b:-6:6,marker-c:-6:6,noise-a:-6:6,noise-b:-6:6",
        description="Clinical columns as name[:low:high[:log]]; a range both validates and scales the value to [-1, "
        "1], linearly or (':log', low > 0) on a log scale. Choose the range so that typical patients sit near its "
        "middle: DP training converges slowly from inputs that all lie at one end (docs/benchmarks.md).")
    label_column: str = Field("label", description="Manifest column holding the class name.")
    classes: str = Field("negative,positive", description="Class names, in logit order.")
    image_size: int = Field(32, ge=8, le=4096, description="Images are resized to image-size x image-size.")
    channels: int = Field(1, ge=1, le=4, description="Channels per image (1 = grayscale, 3 = RGB).")
    depth: int = Field(0, ge=0, le=1024, description="0 = 2D images; D > 0 = 3D volumes (CT/MR) resized to "
                       "depth x image-size x image-size, for a 3D backbone (list_backbones()).")
    max_source_side: int = Field(0, ge=0, description="Largest side (pixels, or slices of a volume) a source image "
                                 "may have; larger files are refused from their header, before decoding (a 60000 px "
                                 "PNG would decode to gigabytes). 0 = 16 x max(image-size, depth), at least 4096.")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of each site's patients held for "
                                "federated evaluation, chosen by a hash of the patient id (stable).")

    @field_validator("view_names", "classes")
    @classmethod
    def _non_empty_unique(cls, value: str) -> str:
        items = split_list(value)
        if len(set(items)) != len(items):
            raise ValueError(f"names must be unique, got {list(items)}")
        return value

    @field_validator("view_names")
    @classmethod
    def _file_safe_views(cls, value: str) -> str:
        bad = [name for name in split_list(value) if not VIEW_NAME.fullmatch(name)]
        if bad:  # a view names a manifest column and a part of every image's file name
            raise ValueError(f"view names {bad}: use 1-32 letters, digits, '_' or '-' each (no '/', ';' or spaces), "
                             "e.g. 'frontal,lateral'")
        return value

    @field_validator("tabular_columns")
    @classmethod
    def _valid_columns(cls, value: str) -> str:
        _parse_columns(value)
        return value

    @model_validator(mode="after")
    def _some_input(self) -> DataConfig:
        if len(self.class_names) < 2:
            raise ValueError("classes needs at least two names, e.g. 'negative,positive'")
        if not self.views and not self.columns:
            raise ValueError("view-names and tabular-columns are both empty: the model has no input")
        return self

    @property
    def source_side_limit(self) -> int:
        return self.max_source_side or default_source_side(self.image_size, self.depth)

    @property
    def views(self) -> tuple[str, ...]:
        return split_list(self.view_names)

    @property
    def columns(self) -> tuple[TabularColumn, ...]:
        return _parse_columns(self.tabular_columns)

    @property
    def class_names(self) -> tuple[str, ...]:
        return split_list(self.classes)


def default_source_side(size: int, depth: int) -> int:
    """data.max-source-side = 0: 16 x the largest side the run needs, at least 4096 (a full-size radiograph)."""
    return max(16 * max(size, depth), 4096)


def _parse_columns(spec: str) -> tuple[TabularColumn, ...]:
    columns = []
    for item in split_list(spec):
        parts = item.split(":")
        if len(parts) == 1:
            columns.append(TabularColumn(name=parts[0]))
            continue
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "log"):
            raise ValueError(f"column {item!r} must be 'name', 'name:low:high' or 'name:low:high:log'")
        try:
            low, high = float(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(f"column {item!r}: low and high must be numbers") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"column {item!r}: low must be below high, both finite")
        log = len(parts) == 4
        if log and low <= 0:
            raise ValueError(f"column {item!r}: a log scale needs low > 0 (got {low:g}); give the smallest plausible "
                             "positive value, or drop ':log' for a linear scale")
        columns.append(TabularColumn(name=parts[0], low=low, high=high, log=log))
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise ValueError(f"column names must be unique, got {names}")
    return tuple(columns)


class ModelConfig(Section):
    backbone: str = Field("resnet10t", description="Any timm model name (pretrained=False), or one of our 3D "
                          "backbones for data.depth > 0; list_backbones() shows the tested families.")
    shared_backbone: bool = Field(True, description="One backbone for all views (true) or one per view.")
    checkpointing: bool = Field(False, description="Gradient checkpointing in the backbone: less memory, more "
                                "time, same gradients (reentrant, as Opacus needs).")
    view_aggregation: str = Field("mean", description="How per-view features combine (see list_aggregations()).")
    fusion: str = Field("concatenate", description="How image and tabular features combine (list_fusions()).")
    norm: Literal["group", "fold", "batch"] = Field(
        "group", description="What becomes of a backbone's BatchNorm, whose batch statistics mix patients (per-patient "
        "DP breaks) and average meaninglessly across hospitals: 'group' replaces it by GroupNorm (pretrained scale and "
        "shift kept, statistics dropped), 'fold' folds it into the convolution before it (a pretrained backbone "
        "computes exactly what it did; no normalisation afterwards), 'batch' keeps it (refused under DP).")
    image_dim: int = Field(64, ge=1, description="Width of the projected image embedding (per view).")
    fusion_dim: int = Field(64, ge=1, description="Common width the gated/attention/cross-attention/bilinear "
                            "fusions project both modalities to.")
    attention_heads: int = Field(4, ge=1, description="Heads of the transformer aggregation and cross-attention; "
                                 "must divide image-dim and fusion-dim.")
    transformer_layers: int = Field(1, ge=1, le=12, description="Blocks of the transformer view aggregation.")
    tabular_hidden: int = Field(32, ge=1, description="Width of the tabular MLP encoder.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout before the classifier head.")


class PrivacyConfig(Section):
    enabled: bool = Field(True, description="DP-SGD at every site and DP noise on every figure a site releases "
                          "about its patients (on by default; false leaves the patients without any DP guarantee, "
                          "is warned at the coordinator and every site, and is stated in the model card).")
    noise_multiplier: float = Field(1.0, ge=0.0, description="Gaussian noise std / max-grad-norm. 1.0 keeps a "
                                    "~100-patient site at epsilon ~6.2 after 3 rounds of 6 steps (delta 1e-5).")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Per-patient clipping bound.")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant for epsilon.")
    engine: Literal["bookkeeping", "opacus"] = Field(
        "bookkeeping", description="How per-patient gradients are clipped: 'bookkeeping' (one backward pass, "
        "per-patient norms from Gram matrices, no per-sample copy of large weights; fastest) or 'opacus' "
        "(Opacus' per-sample hooks). Same DP-SGD step and accounting.")
    cuda_graphs: bool = Field(
        False, description="Replay the bookkeeping step as CUDA graphs (CUDA sites): removes the per-layer host "
        "work that leaves small backbones launch-bound. Batches are padded with empty patients (adding nothing) "
        "to a multiple of graph-batch-multiple; each padded size is recorded once.")
    graph_batch_multiple: int = Field(8, ge=1, description="cuda-graphs: batch sizes are padded up to a multiple "
                                      "of this (fewer recorded graphs, at most this - 1 empty patients a step).")
    secure_rng: bool = Field(True, description="true: every site draws its DP noise, Poisson sampling, evaluation "
                             "noise and secure aggregation's rounding from the OS CSPRNG. false (simulations only, "
                             "for repeatable runs): from generators seeded by train.seed, the site and the round, "
                             "which anyone with the run config could recompute; a deployed site refuses the run.")


class RoundsConfig(Section):
    num_server_rounds: int = Field(3, ge=1, description="Federated rounds to run.")
    min_sites: int = Field(3, ge=1, description="Sites that must be connected to start, and must reply "
                           "with a valid update for a round to count. 3: a sum over two sites reveals each one's "
                           "update to the other (the sites' default policy min-sites is 3 too).")
    fraction_train: float = Field(1.0, gt=0.0, le=1.0, description="Share of sites sampled to train.")
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0, description="Share of sites sampled to evaluate.")
    wait_for_sites: float = Field(120.0, gt=0.0, description="Seconds to wait for min-sites to connect.")
    reply_timeout: float = Field(1800.0, gt=0.0, description="Seconds to wait for site replies each stage.")


# Keys that existed once: what replaced them (checkpoints of older runs carry them, empty)
RETIRED = {"model.backbone-weights": "set init.source = 'file', init.path = the file and init.part = 'backbone' "
                                    "(only the coordinator reads it now; the sites receive its weights)"}
_SECTIONS: dict[str, type[Section]] = {
    "output": OutputConfig, "data": DataConfig, "synth": SynthConfig, "model": ModelConfig,
    "train": TrainConfig, "privacy": PrivacyConfig, "secagg": SecAggConfig,
    "evaluation": EvaluationConfig, "strategy": StrategyConfig, "rounds": RoundsConfig, "report": ReportConfig,
    "attention": AttentionConfig, "init": InitConfig,
}


class RunConfig(Section):
    """Everything the coordinator decides for a run; identical at every site."""

    output: OutputConfig = OutputConfig()
    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secagg: SecAggConfig = SecAggConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    strategy: StrategyConfig = StrategyConfig()
    rounds: RoundsConfig = RoundsConfig()
    report: ReportConfig = ReportConfig()
    attention: AttentionConfig = AttentionConfig()
    init: InitConfig = InitConfig()

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat run_config (`{"train.lr": 0.01, ...}`)."""
        nested: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            if key in RETIRED:  # older configs and checkpoints: empty is dropped, a value says what replaced it
                if value in ("", None):
                    continue
                raise ConfigError(f"config key {key!r} = {value!r} was retired: {RETIRED[key]}")
            section, _, field = key.partition(".")
            if section not in _SECTIONS or not field:
                raise ConfigError(unknown_key(key, all_keys(), value))
            if _field_name(_SECTIONS[section], field) is None and section != "strategy":  # a user strategy's own
                raise ConfigError(unknown_key(key, all_keys(), value))
            nested.setdefault(section, {})[field] = value
        try:
            config = cls.model_validate(nested)
        except ValidationError as exc:
            raise ConfigError(explain_invalid(exc, flat)) from None
        _refuse_unavailable(config)
        return config

    @classmethod
    def from_toml(cls, path: Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Build from a TOML file: a pyproject.toml ([tool.flwr.app.config]) or plain tables."""
        return cls.from_flat({**read_toml_flat(path), **(overrides or {})})

    def to_flat(self) -> dict[str, Scalar]:
        """The flat dotted-key form Flower carries (and checkpoints store)."""
        flat: dict[str, Scalar] = {}
        for section, values in self.model_dump(by_alias=True).items():
            for field, value in values.items():
                flat[f"{section}.{field}"] = value
        return flat


def all_keys() -> list[str]:
    """Every valid flat key, e.g. 'train.lr'."""
    return [f"{s}.{kebab(f)}" for s, model in _SECTIONS.items() for f in model.model_fields]


def _field_name(model: type[Section], key: str) -> str | None:
    name = key.replace("-", "_")
    return name if name in model.model_fields and kebab(name) == key else None


def unknown_key(key: str, valid: Iterable[str], value: Any) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (f"Unknown config key {key!r} (value {value!r}).{hint} "
            f"Valid keys are listed by `medfusion-fl config show`; set them in {WHERE}.")


def explain_invalid(exc: ValidationError, flat: Mapping[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if p != "__root__")
        if key in _SECTIONS:  # a check across the section's keys (a model validator): its message names them
            lines.append(f"config section {key!r}: {_qualified(key, err['msg'].removeprefix('Value error, '))}")
            continue
        value = flat.get(key, err.get("input"))
        lines.append(f"config key {key!r} = {value!r}: {err['msg']}")
    return "Invalid run configuration:\n  " + "\n  ".join(lines) + f"\nSet these in {WHERE}."


def _qualified(section: str, message: str) -> str:
    """A section check's message with its keys as the user types them: 'neighbours' -> 'secagg.neighbours'."""
    for field in sorted(_SECTIONS[section].model_fields, key=len, reverse=True):
        message = re.sub(rf"(?<![\w.-]){re.escape(kebab(field))}(?![\w-])", f"{section}.{kebab(field)}", message)
    return message


def _refuse_unavailable(config: RunConfig) -> None:
    for key, value in (("privacy.noise-multiplier", config.privacy.noise_multiplier),
                       ("evaluation.noise-multiplier", config.evaluation.noise_multiplier)):
        if config.privacy.enabled and value == 0:
            raise ConfigError(f"{key} = 0 with privacy.enabled = true: no noise means no differential privacy "
                              "(epsilon is infinite), though the run would claim it. Set a noise multiplier > 0 "
                              "(the default is 1.0 for training, 2.0 for evaluation), or privacy.enabled = false "
                              "to run without DP openly (warned and stated in the model card).")
    if config.secagg.enabled and (why := refuse_under_secure_sum(config.strategy)):
        raise ConfigError(why)
    if config.privacy.enabled and config.train.precision == "fp16":
        raise ConfigError("train.precision = 'fp16' with privacy.enabled: the gradient scaler multiplies every "
                          "per-patient gradient, so Opacus would clip at max-grad-norm / scale. Use 'bf16' or 'fp32'.")
    if config.privacy.cuda_graphs and (config.privacy.engine != "bookkeeping" or config.model.checkpointing):
        raise ConfigError("privacy.cuda-graphs = true needs privacy.engine = 'bookkeeping' and model.checkpointing = "
                          "false (graphs of reentrant checkpoints are not verified). Set privacy.cuda-graphs = false.")
    share = config.evaluation.budget_share
    if share > 0 and not config.privacy.enabled:
        raise ConfigError(f"evaluation.budget-share = {share:g} with privacy.enabled = false: there is no privacy "
                          "budget to split; leave evaluation.budget-share = 0.")
    if share > 0 and config.rounds.fraction_evaluate == 0:
        raise ConfigError(f"evaluation.budget-share = {share:g} with rounds.fraction-evaluate = 0 would keep "
                          "budget for evaluation releases that never happen; set evaluation.budget-share = 0, or "
                          "rounds.fraction-evaluate > 0.")
    classes = len(config.data.class_names)
    if config.train.weights and len(config.train.weights) != classes:
        raise ConfigError(f"train.class-weights = {config.train.class_weights!r} gives {len(config.train.weights)} "
                          f"weights for {classes} classes {list(config.data.class_names)}: give one per class.")
    if config.train.weights and config.privacy.enabled and (config.privacy.engine != "bookkeeping" or
                                                            config.privacy.cuda_graphs):
        raise ConfigError("train.class-weights under DP is applied by the bookkeeping engine's eager step only: "
                          "set privacy.engine = 'bookkeeping' and privacy.cuda-graphs = false, or leave "
                          "train.class-weights empty.")
    privacy = config.privacy
    if why := unsupported(config.attention, views=len(config.data.views), depth=config.data.depth,
                          dp_engine=privacy.engine if privacy.enabled else None, cuda_graphs=privacy.cuda_graphs,
                          checkpointing=config.model.checkpointing):
        raise ConfigError(why)
    if config.secagg.enabled and config.secagg.threshold > config.rounds.min_sites:
        raise ConfigError(f"secagg.threshold = {config.secagg.threshold} > rounds.min-sites = "
                          f"{config.rounds.min_sites}: a round the coordinator accepts with min-sites sites could "
                          "not be unmasked. Raise rounds.min-sites or lower secagg.threshold.")


def privacy_warnings(run: RunConfig) -> list[str]:
    """One line per protection this run config turns off (the defaults turn every one on)."""
    warnings = []
    if not run.privacy.enabled:
        warnings.append("privacy.enabled = false: no differential privacy; every figure the sites release about "
                        "their patients (updates, evaluation histograms, losses) carries NO DP guarantee")
    if not run.secagg.enabled:
        warnings.append("secagg.enabled = false: no secure aggregation; the coordinator sees each site's update and "
                        "evaluation release one by one")
    if not run.secagg.enabled and run.strategy.needs_individual_updates:
        warnings.append(f"strategy.name = {run.strategy.name!r} aggregates the sites' individual updates: the "
                        "coordinator saw each site's update")
    if not run.privacy.secure_rng:
        warnings.append("privacy.secure-rng = false: the sites' DP noise, sampling and rounding come from the run's "
                        "seed, which anyone with the run config can recompute: for repeatable simulations only "
                        "(deployed sites refuse it)")
    if run.privacy.enabled and run.privacy.noise_multiplier < 0.5:
        warnings.append(f"privacy.noise-multiplier = {run.privacy.noise_multiplier:g} < 0.5: each round spends a "
                        "large part of a typical budget")
    return warnings
