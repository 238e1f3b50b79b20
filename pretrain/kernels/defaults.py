"""A process-wide kernel choice (`auto` or a named backend) that an environment variable starts and a
training run's config sets: what the attention entry point and the norm modules resolve `auto` through."""

from __future__ import annotations

import os


class ProcessDefault:
    """One choice among `choices`, read from the environment variable `env` at import (else `fallback`)."""

    def __init__(self, env: str, choices: tuple[str, ...], fallback: str = "auto"):
        self.env, self.choices, self.fallback = env, choices, fallback
        self.value = self.configured()

    def configured(self) -> str:
        """What the environment names now, else the fallback (a run's config value `auto` means this)."""
        return self.validated(os.environ.get(self.env, self.fallback), self.env)

    def validated(self, name: str, source: str) -> str:
        if name not in self.choices:
            raise ValueError(f"{source}={name!r}: must be one of {self.choices}")
        return name

    def set(self, name: str) -> str:
        """Make `name` the choice from now on; returns the previous one."""
        previous, self.value = self.value, self.validated(name, "backend")
        return previous
