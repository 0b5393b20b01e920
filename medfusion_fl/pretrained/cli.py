"""`medfusion-fl pretrain FOLDER --out FILE`: train a starting point on a public folder (pretrained/pretrain.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medfusion_fl.config import RunConfig
from medfusion_fl.config_sources import parse_overrides, read_toml_flat
from medfusion_fl.errors import ConfigError


def cmd_pretrain(args: argparse.Namespace) -> int:
    from medfusion_fl.pretrained.pretrain import pretrain

    if args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs}: train at least one epoch")
    base = read_toml_flat(Path(args.config)) if args.config else {}
    run = RunConfig.from_flat({**base, **parse_overrides(args.set or [])})
    pretrain(Path(args.folder), Path(args.out), run, epochs=args.epochs, seed=run.train.seed)
    return 0


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
