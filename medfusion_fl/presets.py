"""Simulation presets: the app folder's `simulations/presets/*.toml`, each a [simulation] table and run-config keys."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from medfusion_fl.config_sources import flatten
from medfusion_fl.errors import ConfigError

FOLDER = Path("simulations") / "presets"
DEFAULT = "tiny-cpu"  # what `medfusion-fl simulate` runs without --preset
SIMULATION_KEYS = {"num-sites": (int, 1), "cpus-per-site": (float, 0.01), "gpus-per-site": (float, 0.0),
                   # > 0: a public synthetic folder of this many patients, `pretrain`ed on, starts the federation
                   "public-patients": (int, 0), "pretrain-epochs": (int, 1)}


def find_app(app: str | Path) -> Path:
    """The MedFusion-FL app folder (its pyproject has [tool.flwr]), resolved."""
    folder = Path(app).resolve()
    pyproject = folder / "pyproject.toml"
    doc = tomllib.loads(pyproject.read_text()) if pyproject.is_file() else {}
    if "flwr" not in doc.get("tool", {}):
        raise ConfigError(f"{folder} is not the MedFusion-FL app folder (no pyproject.toml with "
                          "[tool.flwr.app]); run from the repository root or pass --app DIR.")
    return folder


def read_preset(app_dir: Path, name: str) -> dict[str, Any]:
    """One preset's TOML document; an unknown name lists the known ones."""
    path = app_dir / FOLDER / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"Unknown preset {name!r}; available: {', '.join(sorted(presets(app_dir)))}.")
    return tomllib.loads(path.read_text())


def presets(app_dir: Path) -> dict[str, dict[str, Any]]:
    """Each preset's flat run-config keys, by name."""
    return {p.stem: flatten(tomllib.loads(p.read_text()).get("config", {}))
            for p in sorted((Path(app_dir) / FOLDER).glob("*.toml"))}


def summaries(app_dir: Path) -> dict[str, str]:
    """Each preset's `description` (what it simulates), by name."""
    return {path.stem: str(tomllib.loads(path.read_text()).get("description", "(no description)"))
            for path in sorted((Path(app_dir) / FOLDER).glob("*.toml"))}


def help_text(app_dir: Path) -> str:
    """`simulate --preset`'s help: the default and every preset of the app folder, with what it simulates."""
    found = summaries(app_dir) if (Path(app_dir) / FOLDER).is_dir() else {}
    listed = "; ".join(f"{name}: {text}" for name, text in found.items()) or (
        f"none found under {Path(app_dir) / FOLDER}: run from the app folder or pass --app")
    return f"a simulation preset of the app's {FOLDER}/ (default: {DEFAULT}). Presets: {listed}"


def simulation_table(preset: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset's [simulation] table with `--set simulation.KEY=VALUE` applied, each value checked."""
    table = {**preset.get("simulation", {}), **overrides}
    for key, value in table.items():
        if key not in SIMULATION_KEYS:
            raise ConfigError(f"simulation.{key}: not a simulation key; known: "
                              + ", ".join(f"simulation.{k}" for k in SIMULATION_KEYS))
        kind, low = SIMULATION_KEYS[key]
        number = isinstance(value, int if kind is int else int | float) and not isinstance(value, bool)
        if not number or value < low:
            raise ConfigError(f"simulation.{key} = {value!r}: must be {'an integer' if kind is int else 'a number'} "
                              f">= {low:g}")
    return table
