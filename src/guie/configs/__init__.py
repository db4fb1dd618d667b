"""Shipped experiment configs: one module per experiment, each defining `CONFIG`.

Each states only what differs from the defaults in `guie.config` (via `dataclasses.replace`).
`resolve_config(name, overrides)` is the one way from what a user names (on the command line, in
a kernel's parameters) to the config that runs.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Sequence

from guie.config import ExperimentConfig
from guie.config_io import ConfigError, apply_overrides


def list_configs() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_config(name: str) -> ExperimentConfig:
    """The shipped config `name` (`-` and `_` alike); an unknown name is a ConfigError that
    suggests the nearest shipped one and lists them all."""
    module_name = name.replace("-", "_")
    shipped = list_configs()
    if module_name not in shipped:
        close = difflib.get_close_matches(module_name, shipped, n=1, cutoff=0.6)
        raise ConfigError(f"unknown config `{name}`"
                          + (f"; did you mean `{close[0]}`?" if close else "")
                          + f" (shipped: {', '.join(shipped)})")
    return importlib.import_module(f"{__name__}.{module_name}").CONFIG


def resolve_config(name: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The shipped config `name` with the KEY=VALUE `overrides` applied in order; a mistake in
    either is a one-line ConfigError that says what would be right."""
    cfg = get_config(name)
    for item in overrides:
        # A shipped config's name among the overrides is a `--config` left out; only this
        # module knows the names, so the hint lives here and not in guie.config_io.
        if "=" not in item and item in list_configs():
            raise ConfigError(f"override `{item}` is not KEY=VALUE; did you mean "
                              f"`--config {item}`?")
    return apply_overrides(cfg, list(overrides))


def epoch_readings(cfg: ExperimentConfig) -> tuple[tuple[str, dict[str, float]], ...]:
    """The ways a recipe's source can be read for its length, where a shipped config states
    them as `EPOCH_READINGS` ((label, {stage name: epochs}), ...): `submit.py plan` prints the
    hours of each, so a length the write-up leaves open is a stated choice with its price."""
    module_name = cfg.name.replace("-", "_")
    if module_name not in list_configs():
        return ()
    return tuple(getattr(importlib.import_module(f"{__name__}.{module_name}"),
                         "EPOCH_READINGS", ()))
