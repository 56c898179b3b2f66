"""Typed configs: YAML files parsed into dataclasses, with dotted `--set` overrides.

Every field is declared once, with its type and default, on a dataclass. The loader checks
every key and value against those declarations, so an unknown key, a wrong type or an
impossible value is one `ConfigError` naming the file, the key and what is allowed.
Dataclasses may define `validate(self) -> None` raising `ValueError` for value rules
(e.g. "must be > 0"); the loader adds the file and key to the message.

Shared tables (the bucket table) are written once, in `configs/buckets/<name>.yaml`; a config
key of that type may give the table's name (`buckets: default`) or a `.yaml` path instead of
the table itself. The loader reads it (errors name the table's file) and every run record
holds the whole table, so a recorded `config.yaml` still reproduces the run.

`resolve_config` is what every command does: `--config` (default
`configs/<command>/default.yaml`) <- each `--set dotted.key=value` <- the command's own flags.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import platform
import re
import sys
import time
import types
import typing
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"


class UsageError(ValueError):
    """Input the user can fix (a bad config, path, dataset or output folder): the CLI prints
    the one-line message and exits with status 2. Each kind of input has a subclass."""


class ConfigError(UsageError):
    """A bad config file, key or value. The message is one line meant for the user."""


class OutputError(UsageError):
    """An output folder this job cannot write to, found before any work starts."""


# What a full disk, a read-only mount or a folder taken away looks like from inside a job.
UNWRITABLE = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG,
              errno.ENOTDIR}


def writable_dir(path: str | Path) -> Path:
    """Create `path` and prove a file can be written in it (then removed), or OutputError:
    a job refuses an unwritable output before it starts Ray or writes anything."""
    path = Path(path)
    probe = path / f".tubelet-write-check-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output {path} is not writable ({e.strerror or e}); choose another "
                          "--output, or fix its permissions or free space") from None
    return path


def output_store(output: Any, storage: Any = None) -> Any:
    """An output location (a folder or an object-store URI) as a `Store`, proven writable
    before any work: a folder as `writable_dir` does; a prefix by one small object written
    and removed there (no bucket, no credentials, access denied, an endpoint that does not
    answer: one OutputError line, in a bounded time)."""
    from actors.common.storage import StorageError, check_reachable, resolve, storage_reason

    try:
        store = resolve(output, storage)
        if not store.remote:
            writable_dir(store.path)
            return store
        check_reachable(store, "output")
        probe = store.child(f".tubelet-write-check-{os.getpid()}")
        probe.write_bytes(b"")
        probe.delete()
    except StorageError as e:
        raise OutputError(str(e)) from None
    except OSError as e:
        raise OutputError(f"output {output}: {storage_reason(e)}") from None
    return store


def unwritable(error: BaseException) -> str | None:
    """If `error` (or what caused it, through Ray's task-error wrappers) is an output write
    that the disk refused (full, read-only, gone), one line saying so; else None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in UNWRITABLE and e.filename:
            return f"{e.strerror}: {e.filename}"
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    # Ray may hand back only the remote traceback's text
    m = re.search(r"(PermissionError|OSError|NotADirectoryError): "
                  r"\[Errno (\d+)\] ([^\n]*)", str(error))
    if m and int(m.group(2)) in UNWRITABLE:
        return m.group(3)
    return None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        k, v = get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    """Check `value` against type `tp`, converting YAML shapes (list -> tuple, int -> float)."""

    def bad() -> ConfigError:
        return ConfigError(
            f"{where}: key '{key}': expected {_type_name(tp)}, got {value!r}"
        )

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise bad()
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(arg, value, key, where)
            except ConfigError:
                continue
        raise bad()
    if tp is type(None):
        if value is not None:
            raise bad()
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return from_dict(tp, value, where=where, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(
                    f"{where}: key '{key}': expected {len(args)} items, got {value!r}"
                )
            pairs = enumerate(zip(args, value, strict=True))
            items = [_coerce(a, v, f"{key}[{i}]", where) for i, (a, v) in pairs]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(item_tp, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = get_args(tp)
        return {
            _coerce(kt, k, key, where): _coerce(vt, v, f"{key}.{k}", where)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise bad()
        return Path(value)
    raise ConfigError(f"{where}: key '{key}': unsupported field type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from a plain dict, checking every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at '{prefix or 'top level'}', got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}'; allowed keys at this level: "
            + ", ".join(sorted(fields))
        )
    kwargs = {name: _coerce(hints[name], data[name], prefix + name, where) for name in data}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field with no default is missing
        raise ConfigError(f"{where}: {prefix or 'top level'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{where}: {prefix}{e}") from None
    return obj


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-able form of a config (tuples become lists, Paths strings)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set '{assignment}': expected dotted.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set '{assignment}': empty key in '{dotted}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    set_key(data, keys, value, f"--set '{assignment}'")


def set_key(data: dict[str, Any], keys: list[str], value: Any, what: str) -> None:
    """data[k0][k1]...[kn] = value, creating mappings on the way."""
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: '{k}' is not a mapping")
        node = child
    node[keys[-1]] = value


def _shared_tables() -> dict[type, Path]:
    """Config types written once as named tables: type -> the folder of its tables."""
    from actors.common.buckets import BucketConfig

    return {BucketConfig: CONFIG_DIR / "buckets"}


def read_table(cls: type, ref: str, folder: Path, where: str, key: str) -> dict[str, Any]:
    """The mapping of a shared table given by name (a file in `folder`) or by .yaml path;
    checked against `cls` here, so a bad table names its own file and key."""
    by_name = "/" not in ref and not ref.endswith((".yaml", ".yml"))
    candidates = [folder / f"{ref}.yaml"] if by_name else [Path(ref), ROOT / ref]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(f"{where}: key '{key}': no table {ref!r} (named tables in {folder}: "
                          f"{known}); give one of those names, a .yaml path, or the table")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    from_dict(cls, loaded, where=str(path))
    return loaded


def expand_tables(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> None:
    """In place: each key of a shared-table type whose value is a name or path becomes that
    table's mapping (so `--set buckets.target_fps=4` works on `buckets: default` too)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return
    tables = _shared_tables()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value = hints[f.name], data[f.name]
        if tp in tables and isinstance(value, str):
            data[f.name] = read_table(tp, value, tables[tp], where, prefix + f.name)
        elif dataclasses.is_dataclass(tp):
            expand_tables(tp, value, where, prefix + f.name + ".")


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> T:
    """Defaults of `cls` <- YAML file `path` <- each `--set dotted.key=value` in order <- `flags`
    ({dotted key: value}, values used as given: a command's own options)."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        data = loaded or {}
    expand_tables(cls, data, where)
    if overrides:
        where = f"{where} + --set"
        for assignment in overrides:
            apply_override(data, assignment)
            expand_tables(cls, data, where)
    if flags and not overrides:
        where = f"{where} + options"
    for dotted, value in (flags or {}).items():
        set_key(data, dotted.split("."), value, f"option for {dotted}")
    return from_dict(cls, data, where=where)


def default_config_path(command: str) -> Path | None:
    path = CONFIG_DIR / command / "default.yaml"
    return path if path.is_file() else None


def resolve_config(cls: type[T], command: str, config: str | Path | None = None,
                   overrides: list[str] | tuple[str, ...] = (),
                   flags: dict[str, Any] | None = None) -> T:
    """`config` (default `configs/<command>/default.yaml`) <- `overrides` (`--set`) <- `flags`
    (the command's own options; None values are options not given)."""
    path = config if config is not None else default_config_path(command)
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    return load_config(cls, path, overrides, given)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("tubelet", "torch", "ray", "pyarrow", "av", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_run_record(out_dir: Any, command: str, cfg: Any, **extra: Any) -> Any:
    """Write `config.yaml` (loadable with --config) and `run.json` (command, versions) into
    `out_dir` (a folder, or a `Store`: actors/common/storage.py). Any URI's query string (where
    keys could be passed) is cut from both."""
    from actors.common.storage import Store, redact, resolve

    out = out_dir if isinstance(out_dir, Store) else resolve(out_dir)
    resolved = to_dict(cfg)
    out.child("config.yaml").write_text(redact(yaml.safe_dump(resolved, sort_keys=False)))
    record = {
        "command": command,
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        "config": resolved,
        **extra,
    }
    path = out.child("run.json")
    path.write_text(redact(json.dumps(record, indent=2, default=str)))
    return path if path.remote else path.local()
