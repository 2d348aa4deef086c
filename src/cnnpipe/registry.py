"""Names -> builders, one registry per config key (`model.name`, `optim.name`), as timm registers its models.

A builder registers itself where it is defined (`@MODELS.register("cnn")`); an unknown name is one line naming
the config key and the known names, so a registry is also the check of its key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from cnnpipe.errors import ConfigError

B = TypeVar("B", bound=Callable[..., object])


class Registry(Generic[B]):
    def __init__(self, key: str) -> None:
        self.key = key  # the config key whose values are the names: `model.name`
        self._builders: dict[str, B] = {}

    def register(self, *names: str) -> Callable[[B], B]:
        """Decorator: the builder makes the options named `names` (one builder may serve several)."""

        if not names:
            raise ValueError(f"register a {self.key} builder under at least one name")

        def register(builder: B) -> B:
            taken = [n for n in names if self._builders.get(n, builder) is not builder]
            if taken:  # checked before any name is registered: nothing half-registered
                raise ValueError(f"{self.key} {taken[0]!r} is already registered (by {self._builders[taken[0]]!r})")
            self._builders.update(dict.fromkeys(names, builder))
            return builder

        return register

    def unregister(self, name: str) -> None:
        """Forget `name` (a test that registers a builder of its own cleans up with it)."""
        self._builders.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._builders))

    def get(self, name: str) -> B:
        """The builder registered as `name`; an unknown name is a ConfigError naming the key."""
        try:
            return self._builders[name]
        except KeyError:
            raise ConfigError(f"{self.key} must be one of {', '.join(self.names())}, got {name!r}") from None
