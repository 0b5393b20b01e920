"""Where run-config values come from: TOML files (a pyproject's [tool.flwr.app.config] or plain tables)
and `--set KEY=VALUE` overrides, as the flat dotted keys that config.RunConfig validates."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medfusion_fl.errors import ConfigError


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested TOML tables to dotted keys, as Flower does."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def read_toml(path: Path, what: str = "Config file") -> dict[str, Any]:
    """A TOML file as a dict; a missing or invalid file is a ConfigError naming `what` and the path."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def read_toml_flat(path: Path) -> dict[str, Any]:
    """Read a TOML file into flat keys; a pyproject contributes its [tool.flwr.app.config]."""
    doc = read_toml(path)
    table = doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", doc)
    return flatten(table)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse `KEY=VALUE` strings; VALUE is read as TOML (3, 0.1, true, "x") or else as a string."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {item!r} must look like KEY=VALUE, e.g. train.lr=0.01")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        overrides[key.strip()] = value
    return overrides
