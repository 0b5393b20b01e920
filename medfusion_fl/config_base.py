"""What every run-config section shares: the flat key style and the strict pydantic settings.

Its own module so that a capability's package can define its section (report/config.py) without
importing config.py, which assembles the sections into RunConfig.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

Scalar = bool | int | float | str
WHERE = "pyproject.toml [tool.flwr.app.config], a --config TOML file or --set KEY=VALUE"


def kebab(name: str) -> str:
    return name.replace("_", "-")


class Section(BaseModel):
    model_config = ConfigDict(  # allow_inf_nan=False: 'nan' or 'inf' is refused as "should be a finite number"
        extra="forbid", alias_generator=kebab, populate_by_name=True, frozen=True, allow_inf_nan=False
    )
