"""The errors table: every input a stage could not use becomes a row, never a crash or silence.

Stages drop a failed row from their output and hand it here; it is written at once as a small
Parquet file (`ERRORS_DIR/<stage>-<hash of its rows>.parquet`, in a folder or an object store:
actors/common/storage.py; whole or absent, so a killed job never leaves half a file). The
name is the content's hash: when Ray retries a batch whose actor was killed after it wrote its
rows, the retry rewrites the same file instead of adding a second copy, so every bad input is
one row however often it was tried.
Columns: `path`, `stage`, `kind` ("error" for a broken input, "skip" for a usable video that
no bucket fits), `error` (one line for the user).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.common.storage import Store, resolve

ERROR_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("stage", pa.string()),
    ("kind", pa.string()),
    ("error", pa.string()),
])


def error_row(path: str, stage: str, error: str | BaseException, kind: str = "error") -> dict:
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}".splitlines()[0]
    return {"path": path, "stage": stage, "kind": kind, "error": error}


def write_atomic(table: pa.Table, path: Path | Store) -> None:
    """Write Parquet whole or not at all: to an object store in one PUT of the finished file
    (`Store.write_bytes`); locally to a temp name in the same folder, then rename (atomic on
    POSIX).

    Every step goes through one open handle on the folder (`dir_fd`), so the file ends whole
    in the folder it was started in even if that folder is renamed or replaced meanwhile (a
    user moving the output aside mid-job); on failure the temp file is removed from there."""
    if isinstance(path, Store):
        if path.remote:
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            path.write_bytes(sink.getvalue().to_pybytes())
            return
        path = path.local()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                pq.write_table(table, f)
            os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:  # a full disk leaves no half-written temp file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=folder)
            raise
    except OSError as e:  # name the whole path, not the name relative to the folder handle
        if e.filename is None or not os.path.isabs(str(e.filename)):
            e.filename = str(path.parent / (e.filename or tmp))
        raise
    finally:
        os.close(folder)


class ErrorSink:
    """Collects error rows of one stage call and writes them in one file (or keeps them in
    memory when `errors_dir` is None, e.g. a stage called on a table in a test)."""

    def __init__(self, errors_dir: str | Path | Store | None, stage: str):
        self.dir = (None if errors_dir is None else errors_dir if isinstance(errors_dir, Store)
                    else resolve(errors_dir))
        self.stage = stage
        self.rows: list[dict] = []

    def add(self, path: str, error: str | BaseException, kind: str = "error") -> None:
        self.rows.append(error_row(path, self.stage, error, kind))

    def flush(self) -> None:
        if self.dir is not None and self.rows:
            rows = sorted(self.rows, key=lambda r: (r["path"], r["error"]))
            table = pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)
            key = "\n".join(f"{r['path']}\t{r['kind']}\t{r['error']}" for r in rows)
            name = hashlib.sha1(key.encode()).hexdigest()[:24]
            write_atomic(table, self.dir.child(f"{self.stage}-{name}.parquet"))
            self.rows = []
