"""A named registry of builders (timm's habit): register by name, list, and get with close-match errors."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from medfusion_fl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Builders of one kind of model part, keyed by a short lower-case name."""

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            return builder

        return decorate

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._builders:
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.4)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise ConfigError(
                f"Unknown {self.kind} {name!r} (config key {self.config_key}).{hint} "
                f"Registered: {', '.join(self.names())}.")
        return self._builders[name]
