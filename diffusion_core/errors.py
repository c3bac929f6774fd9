"""Errors raised at the library's boundaries: each names the offending field and what it accepts."""

from __future__ import annotations

from pydantic import ValidationError


class DiffusionPipelineError(Exception):
    """Base class: an error a user can act on. `hint` says what to try next."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(DiffusionPipelineError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class CheckpointError(DiffusionPipelineError, ValueError):
    """A checkpoint is missing, unreadable or does not match what was asked for."""


class DatasetError(DiffusionPipelineError, ValueError):
    """A data source or prepared dataset is unusable."""


def describe_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field by its dotted path: `train.lr: ...`."""
    parts = []
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # a validator that already names its field
            parts.append(str(cause))
            continue
        loc = ".".join(str(p) for p in e["loc"])
        field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "<root>")
        got = f" (got {e.get('input')!r})" if loc else ""
        parts.append(f"{field}: {e['msg'].removeprefix('Value error, ')}{got}")
    return "; ".join(parts)


def config_error_from(err: ValidationError, prefix: str = "") -> ConfigError:
    return ConfigError(describe_validation_error(err, prefix))
