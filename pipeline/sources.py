"""Input listing for jobs that read videos: a directory, a glob, or a manifest file.

- directory: every entry below it (recursively) with a video extension that is not a folder
  (symlinked folders are not followed); FIFOs, sockets, dangling or looping symlinks are
  listed too, so the probe reports each as an error row instead of it silently vanishing;
  a `captions.jsonl` (rows with `path` relative to its folder, and `caption`) in any folder
  supplies captions;
- glob: `glob.glob(pattern, recursive=True)`;
- manifest: `.jsonl`, `.csv` or `.parquet` with a `path` column and optional `caption`;
  relative paths are relative to the manifest's folder.
Paths become absolute, so workers on other nodes see the same paths (a shared filesystem or
the same layout on every node is assumed). Or the same three in an object store
(`s3://bucket/prefix`, `s3://bucket/videos/**/*.mp4`, `s3://bucket/list.jsonl`), listed
through its filesystem (actors/common/storage.py); the rows are then URIs, which the probe
and decode stages open through the filesystem the driver resolved.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import posixpath
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actors.common.storage import (
    StorageConfig,
    StorageError,
    Store,
    is_uri,
    locate,
    resolve,
    storage_reason,
)
from pipeline.config import UsageError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts",
                    ".flv", ".wmv", ".3gp", ".gif", ".nut")
SOURCE_SCHEMA = pa.schema([("path", pa.string()), ("caption", pa.string())])


class SourceError(UsageError):
    """The input itself (not one video in it) is unusable."""


def _captions_in(folder: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    for manifest in folder.rglob("captions.jsonl"):
        for line in manifest.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                captions[str((manifest.parent / row["path"]).resolve())] = row.get("caption", "")
    return captions


def _read_manifest(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        table = pa.Table.from_pylist(rows) if rows else SOURCE_SCHEMA.empty_table()
    elif suffix == ".csv":
        table = pacsv.read_csv(path)
    else:
        table = pq.read_table(path)
    if "path" not in table.column_names:
        raise SourceError(f"{path}: manifest has no 'path' column (columns: "
                          f"{', '.join(table.column_names)}); add one with the video paths")
    return table


def _read_remote_manifest(store: Store) -> pa.Table:
    data = store.read_bytes()
    suffix = PurePosixPath(store.path).suffix.lower()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        table = pa.Table.from_pylist(rows) if rows else SOURCE_SCHEMA.empty_table()
    elif suffix == ".csv":
        table = pacsv.read_csv(io.BytesIO(data))
    else:
        table = pq.read_table(io.BytesIO(data))
    if "path" not in table.column_names:
        raise SourceError(f"{store.uri}: manifest has no 'path' column; add one with the "
                          "video paths")
    return table


def _join(base: Store, relative: str) -> str:
    """`relative` (a manifest's path) as a URI under the manifest's folder `base`; absolute
    paths and URIs as given."""
    if is_uri(relative) or relative.startswith("/"):
        return relative
    return f"{base.uri.rstrip('/')}/{posixpath.normpath(relative)}"


def _list_remote(src: str, extensions: tuple[str, ...], storage: StorageConfig | None
                 ) -> dict[str, str]:
    """`list_sources` of an object-store URI: a prefix (recursive; captions.jsonl files
    supply captions), a glob, a manifest object, or one video."""
    wild = any(ch in src for ch in "*?[")
    base = src
    if wild:  # list from the last folder before the first wildcard, then match
        base = src[:min(src.index(c) for c in "*?[" if c in src)].rsplit("/", 1)[0]
    try:
        store = locate(base, "--input", storage)
        if wild:
            pattern = resolve(src, storage).uri
            return {f.uri: "" for f in store.files() if fnmatch.fnmatchcase(f.uri, pattern)}
        kind = store.info().type  # one request, not one per question
        if kind == pafs.FileType.Directory:
            rows: dict[str, str] = {}
            files = store.files()
            for f in files:
                if f.name == "captions.jsonl":
                    for line in f.read_text().splitlines():
                        if line.strip():
                            row = json.loads(line)
                            rows[_join(f.parent, row["path"])] = row.get("caption", "")
            return {f.uri: rows.get(f.uri, "") for f in files
                    if PurePosixPath(f.path).suffix.lower() in extensions}
        if kind == pafs.FileType.File and PurePosixPath(store.path).suffix.lower() in (
                ".jsonl", ".csv", ".parquet"):
            table = _read_remote_manifest(store)
            caps = (table.column("caption").to_pylist() if "caption" in table.column_names
                    else [""] * table.num_rows)
            return {_join(store.parent, str(p)): c or ""
                    for p, c in zip(table.column("path").to_pylist(), caps, strict=True)}
        if kind == pafs.FileType.File:
            return {store.uri: ""}
    except StorageError as e:
        raise SourceError(str(e)) from None
    except OSError as e:
        raise SourceError(f"--input {src}: {storage_reason(e)}") from None
    raise SourceError(f"{src}: no such prefix, glob, manifest or video in the bucket")


def list_sources(src: str | Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
                 storage: StorageConfig | None = None) -> pa.Table:
    """(path, caption) rows for every input video, sorted by path, duplicates removed.
    An object-store URI (`s3://bucket/prefix`, a glob or a manifest there) lists through its
    filesystem (`storage`: the command's `storage:` section); its rows are URIs."""
    text = str(src)
    if is_uri(text):
        rows = _list_remote(text, extensions, storage)
        if not rows:
            raise SourceError(f"{src}: found no videos (extensions: {' '.join(extensions)})")
        paths = sorted(rows)
        return pa.table({"path": paths, "caption": [rows[p] for p in paths]},
                        schema=SOURCE_SCHEMA)
    path = Path(text)
    rows: dict[str, str] = {}
    if path.is_dir():
        captions = _captions_in(path)
        for f in sorted(path.rglob("*")):
            if f.suffix.lower() in extensions and not f.is_dir():
                key = str(f.resolve(strict=False)) if f.is_file() else str(f.absolute())
                rows[key] = captions.get(key, "")
    elif path.is_file() and path.suffix.lower() in (".jsonl", ".csv", ".parquet"):
        table = _read_manifest(path)
        caps = (table.column("caption").to_pylist() if "caption" in table.column_names
                else [""] * table.num_rows)
        for p, c in zip(table.column("path").to_pylist(), caps, strict=True):
            p = Path(str(p))
            rows[str(p if p.is_absolute() else (path.parent / p).absolute())] = c or ""
    elif any(ch in text for ch in "*?["):
        for f in sorted(glob.glob(text, recursive=True)):
            if Path(f).is_file():
                rows[str(Path(f).resolve())] = ""
    elif path.is_file():
        rows[str(path.resolve())] = ""
    else:
        raise SourceError(f"{src}: no such directory, glob, manifest or video; give a folder "
                          "of videos, a glob, or a .jsonl/.csv/.parquet manifest with 'path'")
    if not rows:
        raise SourceError(f"{src}: found no videos (extensions: {' '.join(extensions)})")
    paths = sorted(rows)
    return pa.table({"path": paths, "caption": [rows[p] for p in paths]}, schema=SOURCE_SCHEMA)
