"""`medfusion-fl pretrain FOLDER --out FILE`: train a starting point on a public folder (pretrained/pretrain.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from medfusion_fl.config import RunConfig
from medfusion_fl.config_sources import parse_overrides, read_toml_flat
from medfusion_fl.errors import ConfigError

log = logging.getLogger(__name__)
PUBLIC = {"seed-offset": 1000, "lesion-contrast": 0.7}  # simulate's public folder: other patients, fainter lesions


def cmd_pretrain(args: argparse.Namespace) -> int:
    from medfusion_fl.pretrained.pretrain import pretrain

    if args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs}: train at least one epoch")
    base = read_toml_flat(Path(args.config)) if args.config else {}
    run = RunConfig.from_flat({**base, **parse_overrides(args.set or [])})
    pretrain(Path(args.folder), Path(args.out), run, epochs=args.epochs, seed=run.train.seed)
    return 0


def public_start(run: RunConfig, out: Path, patients: int, epochs: int) -> RunConfig:
    """simulation.public-patients: the federation starts from `pretrain` on a public synthetic folder (another
    seed, fainter lesions: never a site's patients), as a consortium starts from public pretrained weights."""
    if run.init.source != "random":
        log.info("simulation.public-patients ignored: the run already starts from init.source = %r", run.init.source)
        return run
    from medfusion_fl.data.synthetic import write_public
    from medfusion_fl.pretrained.pretrain import pretrain

    public = RunConfig.from_flat({**run.to_flat(), "synth.seed": run.synth.seed + PUBLIC["seed-offset"],
                                  "synth.lesion-contrast": PUBLIC["lesion-contrast"]})
    weights = out / "pretrained" / "start.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    card = pretrain(write_public(out / "pretrained" / "public", public, patients), weights, public, epochs=epochs,
                    seed=run.train.seed + 1)
    log.info("the federation starts from %s: pretrained without DP on %d public synthetic patients, %d epochs",
             weights, patients, epochs)
    return RunConfig.from_flat({**run.to_flat(), "init.source": "file", "init.path": str(weights.resolve()),
                                "init.sha256": card["file_sha256"]})


def add_commands(sub: Any) -> None:
    p = sub.add_parser("pretrain", help="train a starting point centrally, without DP, on a public folder")
    p.add_argument("folder", help="a public folder in the site-folder format (folder.json role 'public', e.g. "
                                  "`medfusion-fl synth --public N`); a site's or the held-out folder is refused")
    p.add_argument("--out", required=True, help="the weights file to write (.safetensors); its card goes beside it")
    p.add_argument("--epochs", type=int, default=10, help="epochs over the folder's training split (default 10)")
    p.add_argument("--config", help="the run config whose data schema and model it trains (a pyproject.toml or "
                                    "plain tables; default: the defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key")
    p.set_defaults(func=cmd_pretrain)
