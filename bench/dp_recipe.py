"""Levers of the private recipe on the README's demo federation, each beside the private defaults and the same
federation without DP, in one run of this script.

Per lever and round: the held-out AUROC and loss, the accuracy, sensitivity and specificity at the operating
threshold the sites' noisy release gave, and what the scores look like on the held-out folder: the mean logit
difference z = log P(positive) - log P(negative) of each class and its spread within a class. A model whose
classes sit 0.1 apart in z on a common offset of -2 ranks well (AUROC) and decides badly: no 10-bin histogram
of probabilities can place a threshold inside one bin.

A lever is a set of config keys (`--lever NAME:key=value,key=value`; `;` separates the items of a list value),
or one of two model changes that have no config key (`hook.NAME=1`, applied where the coordinator and the sites
build the model): `kaiming`, the tabular MLP and the image projection initialised for ReLU (He) instead of
PyTorch's default; `headnorm`, a LayerNorm over the fused features before the head.

`--start pretrained` starts every federation from `medfusion-fl pretrain` on a public-style synthetic folder (as
bench/pretrained_start.py: other patients, fainter lesions, never a site's) instead of random weights.

    python bench/dp_recipe.py --repeats 3 --out bench/results/dp-recipe-demo-cpu2.json
    python bench/dp_recipe.py --start pretrained --repeats 3 --out bench/results/dp-recipe-pretrained-cpu2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"):
    os.environ.setdefault(_key, "0" if _key == "FLWR_TELEMETRY_ENABLED" else "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pretrained_start import PUBLIC  # noqa: E402
from stepbench import write_report  # noqa: E402

import medfusion_fl.pretrained.start as start_module  # noqa: E402
import medfusion_fl.site as site_module  # noqa: E402
import server.federation as federation_module  # noqa: E402
from client.client_app import app as client_app  # noqa: E402
from medfusion_fl.config import RunConfig  # noqa: E402
from medfusion_fl.console import ensure_logging  # noqa: E402
from medfusion_fl.data import write_federation  # noqa: E402
from medfusion_fl.data.synthetic import write_public  # noqa: E402
from medfusion_fl.models import medfusion  # noqa: E402
from medfusion_fl.parameters import set_weights  # noqa: E402
from medfusion_fl.pretrained.pretrain import pretrain  # noqa: E402
from medfusion_fl.training import predict  # noqa: E402
from server.federation import Federation  # noqa: E402
from simulations.inprocess import InProcessGrid  # noqa: E402

log = logging.getLogger("medfusion_fl.bench.dp_recipe")
NO_DP_POLICY = {"require-dp": False}  # the simulated sites' policy relaxed for the non-DP baseline only
LEVERS = [
    "defaults:",
    "no-dp:privacy.enabled=false",
    "clip-5:privacy.max-grad-norm=5",
    "clip-20:privacy.max-grad-norm=20",
    "clip-20-lr-0.01:privacy.max-grad-norm=20,train.lr=0.01",
    "lr-0.0005:train.lr=0.0005",
    "batch-48-noise-2:train.batch-size=48,privacy.noise-multiplier=2",
    "kaiming:hook.kaiming=1",
    "headnorm:hook.headnorm=1",
    "frozen-image-lr-0.05:train.freeze=image,train.lr=0.05",
    "frozen-backbone-lr-0.01:train.freeze=image.backbones,train.lr=0.01",
    "balanced:train.class-weights=0.45;1",
    "balanced-lr-0.006:train.class-weights=0.45;1,train.lr=0.006",
    "balanced-frozen-image-lr-0.05:train.class-weights=0.45;1,train.freeze=image,train.lr=0.05",
    "balanced-frozen-image-lr-0.05-kaiming:train.class-weights=0.45;1,train.freeze=image,train.lr=0.05,hook.kaiming=1",
    "balanced-frozen-backbone-lr-0.02:train.class-weights=0.45;1,train.freeze=image.backbones,train.lr=0.02",
]


def apply_hooks(hooks: dict[str, str]) -> None:
    """Install the lever's model changes in the builders the coordinator and the sites call (or none)."""
    build = medfusion.build_model

    def built(*args: Any, **kwargs: Any) -> medfusion.MedFusionModel:
        model = build(*args, **kwargs)
        if "headnorm" in hooks:
            model.head_norm = torch.nn.LayerNorm(model.fusion.out_dim)
            model.forward = _normed_forward.__get__(model)  # type: ignore[method-assign]
        if "kaiming" in hooks:
            for layer in [*getattr(model.tabular, "mlp", []), *getattr(model.image, "project", [])]:
                if isinstance(layer, torch.nn.Linear):
                    torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    torch.nn.init.zeros_(layer.bias)
        return model

    for module in (site_module, federation_module, start_module):  # the sites', the coordinator's initial model
        module.build_model = built if hooks else build  # type: ignore[attr-defined]


def _normed_forward(self: Any, views: torch.Tensor, view_mask: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
    image = self.image(views, view_mask) if self.image is not None else None
    clinical = self.tabular(tabular) if self.tabular is not None else None
    logits: torch.Tensor = self.head(self.dropout(self.head_norm(self.fusion(image, clinical))))
    return logits


def scores(federation: Federation, weights: Any) -> dict[str, float]:
    """Where the held-out patients' logit differences sit: each class's mean and the spread within a class."""
    set_weights(federation.model, weights)
    probs, labels = predict(federation.model, federation.held_out, batch_size=64, device=federation.model_device())
    z = np.log(np.clip(probs[:, 1], 1e-9, 1.0)) - np.log(np.clip(probs[:, 0], 1e-9, 1.0))
    within = np.concatenate([z[labels == k] - z[labels == k].mean() for k in (0, 1)])
    return {"z_negative": round(float(z[labels == 0].mean()), 3), "z_positive": round(float(z[labels == 1].mean()), 3),
            "z_spread_within_class": round(float(within.std()), 3)}


def federate(run: RunConfig, sites: int, policy: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    federation = Federation(run)
    seen: dict[int, dict[str, float]] = {}
    held_out_eval = federation.held_out_eval

    def with_scores(weights: Any, threshold: float | None = None) -> dict[str, Any] | None:
        out = held_out_eval(weights, threshold)
        if out is not None and threshold is not None:
            seen[len(seen) + 1] = scores(federation, weights)
        return out

    federation.held_out_eval = with_scores  # type: ignore[method-assign]
    federation.run_rounds(InProcessGrid(client_app, run.to_flat(), num_nodes=sites, node_config=policy))
    rows = []
    for line in federation.store.read_metrics():
        held = line.get("held_out") or {}
        rows.append({"round": line["round"], "status": line["status"], "auroc": held.get("auroc"),
                     "loss": held.get("loss"), "threshold": held.get("threshold"),
                     "accuracy_at_threshold": held.get("accuracy-at-threshold"),
                     "sensitivity": held.get("sensitivity"), "specificity": held.get("specificity"),
                     "max_site_epsilon": max((p["epsilon"] for p in (line.get("privacy") or {}).values()),
                                             default=None), **seen.get(line["round"], {})})
    return {"rounds": rows, "wall_s": round(time.perf_counter() - start, 1)}


def parse(lever: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    name, _, keys = lever.partition(":")
    flat: dict[str, Any] = {}
    hooks: dict[str, str] = {}
    for item in filter(None, keys.split(",")):
        key, _, value = item.partition("=")
        if key.startswith("hook."):
            hooks[key.removeprefix("hook.")] = value
        else:
            flat[key] = {"true": True, "false": False}.get(value, value.replace(";", ","))
    return name, flat, hooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lever", action="append", help="NAME:key=value,... (default: the list in LEVERS)")
    parser.add_argument("--repeats", type=int, default=1, help="federations per lever (DP noise from the OS)")
    parser.add_argument("--start", choices=("scratch", "pretrained"), default="scratch")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ensure_logging(logging.WARNING)
    log.setLevel(logging.INFO)
    root = Path(tempfile.mkdtemp(prefix="dp-recipe-"))
    base = {"data.sites-root": str(root / "data"), "report.enabled": False}
    write_federation(root / "data", RunConfig.from_flat(base), 3)
    start: dict[str, Any] = {}
    if args.start == "pretrained":
        public_run = RunConfig.from_flat({**base, **PUBLIC})
        card = pretrain(write_public(root / "public", public_run, 300), root / "start.safetensors", public_run,
                        epochs=5, seed=1)
        start = {"init.source": "file", "init.path": str(root / "start.safetensors"),
                 "init.sha256": card["file_sha256"]}
    results: dict[str, Any] = {}
    for lever in args.lever or LEVERS:
        name, flat, hooks = parse(lever)
        apply_hooks(hooks)
        policy = NO_DP_POLICY if flat.get("privacy.enabled") is False else {}
        results[name] = {"config": {**flat, **{f"hook.{k}": v for k, v in hooks.items()}}, "runs": []}
        for repeat in range(args.repeats):
            run = RunConfig.from_flat({**base, **start, **flat, "output.run-dir": str(root / f"{name}-{repeat}")})
            result = federate(run, 3, policy)
            results[name]["runs"].append(result)
            last = result["rounds"][-1]
            log.info("%-28s run %d: AUROC %.3f, accuracy %.3f, sensitivity %.3f at %.2f; z %.2f / %.2f (spread %.2f); "
                     "held-out loss %s; %.0f s", name, repeat + 1, last["auroc"], last["accuracy_at_threshold"],
                     last["sensitivity"], last["threshold"], last["z_negative"], last["z_positive"],
                     last["z_spread_within_class"], [round(r["loss"], 2) for r in result["rounds"]], result["wall_s"])
        if args.out:  # after each lever: an interrupted run keeps what it measured
            args.out.write_text(json.dumps(report(args, results), indent=2) + "\n")
    apply_hooks({})
    write_report(report(args, results), args.out)


def report(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    return {"what": "levers of the private recipe on the demo federation (3 synthetic sites x 120 patients, 32 px, "
            "3 rounds), the private defaults and no DP in the same run", "cpus": os.cpu_count(),
            "repeats": args.repeats, "start": args.start, "levers": results}


if __name__ == "__main__":
    main()
