"""The experiment a kernel runs, as data, and the identity of the training run it belongs to.

The command resolves the config once (shipped config, overrides, the flags that stand for config
fields) and sends it to the kernels as their `config` parameter (`config_parameter`): Kaggle
references in it stay references (`kaggle:OWNER/SLUG/FILE`, data sources' kaggle_slug) until
`load_kernel_config` resolves them where the session mounts them. The run identity hashes that
resolved config, less what may change between a run's sessions, with the source it runs.

`load_kernel_config` runs inside the kernels: nothing heavy is imported.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from guie.config import ExperimentConfig, migrate
from guie.config_io import ConfigError, from_dict, to_dict
from guie.kaggle.inputs import (WEIGHTS_PREFIX, InputRef, is_kaggle_ref, parse_weights_ref,
                                resolve_input, resolve_kaggle_path)

# In shipped configs' kaggle: references, as in datasets-metadata.
OWNER_PLACEHOLDER = "KAGGLE_USERNAME"


def _source_location(location: str, slug: str) -> str:
    """A source's location inside its dataset: a leading folder named after the slug (the legacy
    mount, where the data root was /kaggle/input) is the dataset itself."""
    parts = Path(location).parts
    return str(Path(*parts[1:])) if parts and parts[0] == slug else location


def resolve_config_inputs(cfg, input_root: str):
    """The config with every Kaggle reference in it replaced by where it is mounted: data and
    evaluation sources by their kaggle_slug, `kaggle:OWNER/SLUG/FILE` weights, soup and concat
    runs."""
    def located(src):
        if not src.kaggle_slug:
            return src
        ref = InputRef("dataset", *src.kaggle_slug.split("/"))
        folder = resolve_input(ref, input_root)
        inner = _source_location(src.location, ref.slug)
        return replace(src, location=str(folder / inner) if inner not in ("", ".") else str(folder))
    data = replace(cfg.data, sources=tuple(map(located, cfg.data.sources)),
                   eval_sources=tuple(map(located, cfg.data.eval_sources)))
    model = replace(cfg.model,
                    pretrained_path=resolve_kaggle_path(cfg.model.pretrained_path, input_root))
    export = replace(cfg.export,
                     soup=tuple(resolve_kaggle_path(r, input_root) for r in cfg.export.soup),
                     concat=tuple(resolve_kaggle_path(r, input_root) for r in cfg.export.concat))
    return replace(cfg, data=data, model=model, export=export)


def load_kernel_config(config: dict, input_root: str) -> ExperimentConfig:
    """The experiment config a kernel runs: the resolved config the command sent (its JSON form,
    `config_parameter`), its Kaggle references resolved to where this session mounts them."""
    if not config:
        raise ConfigError("this notebook carries no experiment config (its `config` parameter "
                            "is empty): build it with `submit.py push` or `submit.py local`")
    return resolve_config_inputs(from_dict(ExperimentConfig, migrate(config)), input_root)


def config_parameter(cfg: ExperimentConfig) -> dict:
    """The resolved config as a notebook parameter: its JSON form (lists, not tuples, which
    papermill would write as strings), what `save_config` writes and `load_kernel_config` reads.
    Read back through the schema first, so that a value a recipe wrote as an int in a float
    field (`epochs=40`) reads 40.0 here as in the config.json of the run, and the run identity
    is the same whether it is computed from a recipe or from a config loaded from its JSON."""
    plain = json.loads(json.dumps(to_dict(cfg)))
    return json.loads(json.dumps(to_dict(from_dict(ExperimentConfig, plain))))


def weights_datasets(cfg) -> list[str]:
    """owner/slug of every dataset the config's `kaggle:` references name."""
    values = [cfg.model.pretrained_path, *cfg.export.soup, *cfg.export.concat]
    return list(dict.fromkeys(parse_weights_ref(v)[0].ref for v in values if is_kaggle_ref(v)))


def owner_overrides(cfg, owner: str) -> list[str]:
    """Overrides that put the pushing user's name into `kaggle:KAGGLE_USERNAME/...` references,
    so a shipped recipe can name the dataset `push-weights` creates for whoever pushes it."""
    placeholder = f"{WEIGHTS_PREFIX}{OWNER_PLACEHOLDER}/"

    def own(value: str) -> str:
        return value.replace(placeholder, f"{WEIGHTS_PREFIX}{owner}/", 1)
    overrides = []
    if cfg.model.pretrained_path.startswith(placeholder):
        overrides.append(f"model.pretrained_path={own(cfg.model.pretrained_path)}")
    for key in ("soup", "concat"):
        values = getattr(cfg.export, key)
        if any(v.startswith(placeholder) for v in values):
            overrides.append(f"export.{key}={json.dumps([own(v) for v in values])}")
    return overrides


# Config fields that may differ between the sessions (or machines) of one training run, so the
# run identity leaves them out; each with why. The world size (GPUs per machine, GUIE_NPROC) and
# the AMP dtype that `amp="auto"` resolves to on a GPU are not config fields: never hashed.
RUN_VARIABLES = {
    "max_hours": "a session's time budget: a chain may give each session its own",
    "data.root": "where this machine keeps the data (sources on Kaggle resolve by kaggle_slug)",
    "export.compat": "how the trained weights are exported, not what is trained",
    "stages.*.parallel": "how a stage's steps spread over the ranks (DDP or FSDP, the same model)",
    "stages.*.max_hours": "a stage's time budget in one session, as max_hours",
}


def identity_config(cfg) -> dict:
    """The resolved config as the run identity hashes it: `RUN_VARIABLES` left out."""
    data = config_parameter(cfg)

    def drop(node, keys: list[str]) -> None:
        if keys[0] == "*":
            for item in node:
                drop(item, keys[1:])
        elif len(keys) == 1:
            node.pop(keys[0], None)
        elif keys[0] in node:
            drop(node[keys[0]], keys[1:])
    for path in RUN_VARIABLES:
        drop(data, path.split("."))
    return data


def run_identity(cfg, source_hash: str) -> dict:
    """What identifies a training run: the resolved config with its Kaggle references unresolved
    (as the command sends it), less what may change between its sessions (`RUN_VARIABLES`), and
    the source it runs. A chain's every session, and the inference kernel after it, compute the
    same identity however their time budgets, machines or export modes differ."""
    body = {"config": identity_config(cfg), "source_hash": source_hash}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {"run_id": digest, "config_name": cfg.name, "source_hash": source_hash}
