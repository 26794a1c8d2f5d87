"""The one error type of a refused run and its exit code, shared by the config, the planner,
the preflight and the CLI (a module of its own so that none of them imports another for it)."""
from __future__ import annotations

EXIT_CONFIG = 2   # the exit code of a refused config, before anything starts


class ConfigError(ValueError):
    """A bad config; str(err) is one line naming the key and value."""

    kind = "config error"       # how the CLI labels the line


def describe_error(err: BaseException) -> str:
    """`Type: message` of what the training function raised. Ray Train V2 wraps it in
    UserExceptionWithTraceback, whose text is the whole traceback (its first line read
    "Traceback (most recent call last):"), and a failed fit() in a WorkerGroupError that
    holds each rank's; the original is taken out (private attributes, so guarded)."""
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank, first = next(iter(sorted(failures.items())))
        return f"rank {rank}: {describe_error(first)}"
    base = getattr(err, "_base_exc", None)
    if isinstance(base, BaseException):
        return describe_error(base)
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        return lines[-1].strip()        # the exception line of a formatted traceback
    return f"{type(err).__name__}: {text}"
