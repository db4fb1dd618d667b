"""Config values from text: dicts and saved JSON (`from_dict`), command-line overrides
(`apply_overrides`), each mistake a one-line ConfigError naming the nearest right key or value.

Generic over a tree of frozen dataclasses, so that `guie.config` (the schema) can import it
without an import cycle. The one rule of the schema it knows: the items of a
`stages` field are addressed by their name (`stage1.epochs=3`), never by position.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import shlex
import types
import typing
from dataclasses import fields, is_dataclass, replace
from typing import Any, Literal

from guie.errors import UserValueError


class ConfigError(UserValueError):
    """A config name, override or saved config that is wrong. The message says in one line what
    is wrong and what would be right; the command line prints it as `error: ...` (exit 2)."""


def _has_stages(obj: Any) -> bool:
    return any(f.name == "stages" for f in fields(obj))


def _stages(obj: Any) -> tuple:
    """The stages an override can address by name under `obj` (none below the top level)."""
    return obj.stages if _has_stages(obj) else ()


def _stage_fields(obj: Any) -> set[str]:
    """The field names of `obj`'s stage type, read off `stages: tuple[StageConfig, ...]`, so
    that they are known even where it has no stages."""
    stage_type = typing.get_args(typing.get_type_hints(type(obj))["stages"])[0]
    return {f.name for f in fields(stage_type)}


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Build a dataclass from a dict (e.g. a saved resolved config), checking every key."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {unknown}"
                          + (_did_you_mean(unknown[0], known) if len(unknown) == 1 else ""))
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{cls.__name__}.{name}")
    return cls(**kwargs)


def _takes(tp: Any) -> str:
    """What a field of type `tp` takes, in the words of someone writing an override."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_dataclass(tp):
        return "a section"
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join("null" if a is type(None) else _takes(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a JSON list, each item {_takes(args[0])}"
        return f"a JSON list of {len(args)} items, each {_takes(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    wrong = ConfigError(f"`{where}` takes {_takes(tp)}, got {value!r}")
    if is_dataclass(tp):
        if not isinstance(value, dict):
            first = fields(tp)[0].name
            raise ConfigError(f"`{where}` is a section, not a value: set its fields one by one, "
                              f"e.g. `{where}.{first}=...`")
        return from_dict(tp, value)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except (ValueError, TypeError):
                continue
        raise wrong
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{wrong}{_did_you_mean(str(value), [str(a) for a in args])}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{wrong} ({len(value)} items)")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise wrong
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise wrong
        try:
            return int(value)
        except ValueError:
            raise wrong from None
    if tp is float:
        if isinstance(value, bool):
            raise wrong
        try:
            return float(value)
        except (TypeError, ValueError):
            raise wrong from None
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")


def override_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every key an override can set, stages by name: `seed`, `model.dropout`, `stage1.epochs`."""
    keys = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        keys += override_keys(value, f"{prefix}{f.name}.") if is_dataclass(value) else [
            prefix + f.name]
    for stage in _stages(cfg):
        keys += override_keys(stage, f"{prefix}{stage.name}.")
    return keys


def _closest(word: str, candidates: list[str], cutoff: float = 0.6) -> list[str]:
    """The candidates nearest to `word` (several only where they tie)."""
    ranked = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates),
                    reverse=True)
    best = ranked[0][0] if ranked else 0.0
    return sorted(c for r, c in ranked if r == best) if best >= cutoff else []


def _did_you_mean(word: str, candidates: list[str], cutoff: float = 0.6, suffix: str = "") -> str:
    close = _closest(word, candidates, cutoff)
    return ("; did you mean " + " or ".join(f"`{c}{suffix}`" for c in close[:3]) + "?"
            if close else "")


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `key.sub=value` overrides (values parsed as JSON where they parse, else strings).

    Every mistake is a ConfigError whose message names the nearest valid key or value."""
    for item in overrides:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ConfigError(_not_key_value(cfg, item, key))
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        cfg = _replace_path(cfg, key.split("."), value, item, cfg, ())
    return cfg


def _not_key_value(cfg: Any, item: str, key: str) -> str:
    keys = override_keys(cfg)
    if key in keys:
        return f"override `{item}` has no value: write `{key}=VALUE`, with no spaces around `=`"
    return (f"override `{item}` is not KEY=VALUE"
            + (_did_you_mean(key, keys, suffix="=VALUE") or " (e.g. `stage1.epochs=3`)"))


def _replace_path(obj: Any, path: list[str], value: Any, item: str, root: Any,
                  walked: tuple[str, ...]) -> Any:
    name, here = path[0], ".".join((*walked, path[0]))
    known = {f.name for f in fields(obj)}
    stage_names = [s.name for s in _stages(obj)]
    if name not in known and name in stage_names and len(path) > 1:
        stages = tuple(_replace_path(s, path[1:], value, item, root, (*walked, name))
                       if s.name == name else s for s in obj.stages)
        return replace(obj, stages=stages)
    if name not in known:
        raise ConfigError(f"override `{item}`: " + _unknown_key(obj, path, walked, root, item))
    hints = typing.get_type_hints(type(obj))
    if len(path) == 1:
        try:
            return replace(obj, **{name: _coerce(hints[name], value, here)})
        except ConfigError as e:
            current = getattr(obj, name)  # a string is written as is, everything else as JSON
            now = current if isinstance(current, str) else json.dumps(
                current, default=dataclasses.asdict)
            shown = f" (currently `{here}={shlex.quote(now)}`)" if len(now) <= 60 else ""
            raise ConfigError(f"override `{item}`: {e}{shown}") from None
    child = getattr(obj, name)
    if not is_dataclass(child):
        raise ConfigError(f"override `{item}`: `{here}` is a value, not a section: write "
                          f"`{here}=VALUE`")
    return replace(obj, **{name: _replace_path(child, path[1:], value, item, root,
                                               (*walked, name))})


def _unknown_key(obj: Any, path: list[str], walked: tuple[str, ...], root: Any, item: str
                 ) -> str:
    """Why `path` (under `walked`) names nothing, and the nearest key that exists."""
    name, full = path[0], ".".join((*walked, *path))
    keys = override_keys(root)
    if _has_stages(obj) and len(path) > 1 and path[1] in _stage_fields(obj):
        stages = ", ".join(f"`{s.name}`" for s in obj.stages)
        typo = _closest(name, stage_names := [s.name for s in obj.stages], cutoff=0.75)
        fix = ".".join(path[1:]) + "=" + item.partition("=")[2]
        return (f"config `{obj.name}` has no stage `{name}`; "
                + (f"its stages are {stages}" if stages else "it trains no stages")
                + (f"; did you mean `{typo[0]}.{fix}`?" if len(typo) == 1 else
                   f" (e.g. `{stage_names[0]}.{fix}`)" if stage_names else ""))
    where = ("the config" if not walked else f"stage `{walked[-1]}`"
             if any(obj is s for s in _stages(root)) else f"section `{'.'.join(walked)}`")
    what = "section or stage" if _has_stages(obj) and len(path) > 1 else "field"
    message = f"{where} has no {what} `{name}`"
    # The right field name in the wrong place (`epochs` for `stage1.epochs`) beats a near spelling.
    elsewhere = [k for k in keys if k.rsplit(".", 1)[-1] == path[-1]]
    close = _closest(full, keys, cutoff=0.75)
    if close and (not elsewhere or difflib.SequenceMatcher(None, full, close[0]).ratio() >= 0.9):
        return message + _did_you_mean(full, keys, cutoff=0.75)
    if elsewhere:
        return message + "; did you mean " + " or ".join(f"`{k}`" for k in elsewhere[:3]) + "?"
    stages = f"; stages: {', '.join(s.name for s in obj.stages)}" if _stages(obj) else ""
    return message + f" (its fields: {', '.join(sorted(f.name for f in fields(obj)))}{stages})"
