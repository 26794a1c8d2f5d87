"""The one error type of a refused run and its exit code, shared by the config, the planner,
the preflight and the CLI (a module of its own so that none of them imports another for it)."""
from __future__ import annotations

EXIT_CONFIG = 2   # the exit code of a refused config, before anything starts


class ConfigError(ValueError):
    """A bad config; str(err) is one line naming the key and value."""

    kind = "config error"       # how the CLI labels the line
