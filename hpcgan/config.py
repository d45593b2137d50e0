"""YAML configs with `--set key=value` overrides, checked against a dataclass schema before
any heavy work starts. A bad key or value is a UsageError naming the key (exit 2)."""

import dataclasses
import os
import types
import typing
from pathlib import Path

import yaml

from hpcgan.errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name_or_path) -> Path:
    """A path to a YAML file, or the name of a shipped config in configs/ (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise UsageError(f"{name_or_path}: no such config file (shipped configs: {shipped or 'none'})")


def read_yaml(path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides) -> dict:
    """Apply 'a.b.c=value' strings; the value is parsed as YAML (so 1e-4, true, [1, 2] work)."""
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise UsageError(f"--set {item}: '{part}' is not a section")
            node = node[part]
        node[parts[-1]] = value
    return data


def build(schema, data: dict, source: str = "config", prefix: str = ""):
    """Instantiate dataclass `schema` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"{source}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(hints[name], value, source, f"{prefix}{name}") for name, value in data.items()}
    try:
        return schema(**kwargs)
    except ValueError as exc:  # __post_init__ checks name their key in the message
        raise UsageError(f"{source}: {exc}") from None


def _coerce(hint, value, source, key):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    bad = UsageError(f"{source}: '{key}' must be {_describe(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, source, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except UsageError:
                pass
        raise bad
    if origin is typing.Literal:
        if value in args:
            return value
        raise UsageError(f"{source}: '{key}' must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):  # "flair,t1" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        inner = args[0] if args else typing.Any
        return origin(_coerce(inner, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if origin in (list, tuple):
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def load_config(schema, path=None, overrides=(), defaults: dict | None = None):
    """defaults < YAML file < --set overrides, validated into `schema`."""
    data = dict(defaults or {})
    source = "config"
    if path is not None:
        path = resolve_config_path(path)
        source = os.fspath(path)
        data = _deep_merge(data, read_yaml(path))
    data = apply_overrides(data, overrides)
    return build(schema, data, source)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
