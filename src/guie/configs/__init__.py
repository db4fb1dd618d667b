"""Shipped experiment configs: one module per experiment, each defining `CONFIG`.

Each states only what differs from the defaults in `guie.config` (via `dataclasses.replace`).
"""
from __future__ import annotations

import importlib
import pkgutil

from guie.config import ExperimentConfig


def list_configs() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_config(name: str) -> ExperimentConfig:
    module_name = name.replace("-", "_")
    if module_name not in list_configs():
        raise ValueError(f"unknown config {name!r}; shipped: {', '.join(list_configs())}")
    return importlib.import_module(f"{__name__}.{module_name}").CONFIG
