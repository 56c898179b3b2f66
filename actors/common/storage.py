"""Where data lives: a local path or an object-store URI (`s3://bucket/prefix`, or any URI
`pyarrow.fs.FileSystem.from_uri` knows: `gs://`, `hdfs://`, `file://`), resolved once, in the
driver, into a `Store`: (pyarrow filesystem, path). Stores are picklable, so the driver hands
the same resolved pair to Ray Data (`filesystem=`), Ray Train (`storage_filesystem=`) and the
actors, and no worker depends on its own environment.

Credentials and endpoint come from where the ecosystem puts them: the standard `AWS_*`
variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for S3-compatible stores such
as MinIO), the URI's query string (`?endpoint_override=...&region=...&scheme=http`, as
pyarrow takes it), then the AWS SDK's own chain (profiles, instance roles); a `storage:`
config section (`StorageConfig`) overrides endpoint, region and anonymity. pyarrow traps this
module avoids: `S3FileSystem()` ignores the endpoint variables `FileSystem.from_uri` honours
(read here); without a region it probes the bucket (slow offline: us-east-1 is the default
here); an endpoint without a scheme means https (`127.0.0.1:9000` tries TLS: give
`http://...`). A URI is only ever recorded without its query string (`Store.uri`), and
secrets never leave this module except inside the filesystem object itself.

Writes are whole-or-nothing. Local: a temp name in the same folder, then rename. Object
stores have no rename, but one PUT is atomic: the bytes are built in memory and written with
one `write` + `close` (pyarrow commits what a failed writer streamed so far, so nothing is
ever streamed into an output object). Reads of videos go through `RemoteFile`, a read buffer
of `READ_BLOCK` bytes over a random-access input (pyarrow's default costs one GET per
packet), with seeks, and no local copy.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

READ_BLOCK = 4 << 20  # bytes per ranged GET of a video read from an object store


class StorageError(ValueError):
    """A location that cannot be used (no bucket, no credentials, access denied, no endpoint);
    the message is one line naming it and what to do. pipeline/ turns it into a UsageError."""


@dataclass
class StorageConfig:
    """The `storage:` section of every command's config (all optional)."""

    endpoint: str = ""  # S3-compatible endpoint, e.g. http://127.0.0.1:9000; "" = AWS_ENDPOINT_URL*
    region: str = ""  # "" = AWS_REGION / AWS_DEFAULT_REGION / the URI's, else us-east-1
    anonymous: bool = False  # unsigned requests (public buckets)
    connect_timeout: float = 5.0  # seconds; an unreachable endpoint fails in a bounded time
    request_timeout: float = 60.0
    retries: int = 3  # attempts per request (AWS standard retry strategy)

    def validate(self) -> None:
        if self.connect_timeout <= 0 or self.request_timeout <= 0 or self.retries < 1:
            raise ValueError("storage: connect_timeout and request_timeout must be > 0, "
                             "retries >= 1")


def is_uri(path: str | Path) -> bool:
    """Whether `path` names an object store (has a scheme other than file://)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _s3_filesystem(query: dict[str, str], cfg: StorageConfig) -> pafs.S3FileSystem:
    env = os.environ
    endpoint = (cfg.endpoint or query.get("endpoint_override") or env.get("AWS_ENDPOINT_URL_S3")
                or env.get("AWS_ENDPOINT_URL") or "")
    scheme = query.get("scheme", "https")
    if "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    region = (cfg.region or query.get("region") or env.get("AWS_REGION")
              or env.get("AWS_DEFAULT_REGION") or "us-east-1")
    keys: dict[str, Any] = {}
    if not cfg.anonymous and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        # resolved here, in the driver: actors on other nodes get them inside the filesystem
        keys = dict(access_key=env["AWS_ACCESS_KEY_ID"],
                    secret_key=env["AWS_SECRET_ACCESS_KEY"],
                    session_token=env.get("AWS_SESSION_TOKEN") or None)
    return pafs.S3FileSystem(
        region=region, endpoint_override=endpoint.rstrip("/") or None, scheme=scheme,
        anonymous=cfg.anonymous, connect_timeout=cfg.connect_timeout,
        request_timeout=cfg.request_timeout,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.retries), **keys)


@dataclass(frozen=True)
class Store:
    """A resolved location: `fs` + `path` (local: absolute; object store: `bucket/key`,
    no scheme) + `uri` (what the user gave, without its query string: safe to record)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def remote(self) -> bool:
        return not isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __str__(self) -> str:
        return self.uri

    def local(self) -> Path:
        """The local path (only for a local store)."""
        if self.remote:
            raise StorageError(f"{self.uri}: a local path is needed here")
        return Path(self.path)

    def child(self, *parts: str) -> Store:
        """`self / part / ...`; a part that would leave this location (absolute, `..`, empty,
        a drive) is refused: ids and names from data never escape an output prefix."""
        path, uri = self.path, self.uri
        for part in parts:
            pure = PurePosixPath(str(part))
            if (not str(part) or pure.is_absolute() or ".." in pure.parts or "\\" in str(part)
                    or re.match(r"[A-Za-z]:", str(part))):  # a drive letter
                raise StorageError(f"{self.uri}: {part!r} is not a name inside it")
            path, uri = f"{path.rstrip('/')}/{pure}", f"{uri.rstrip('/')}/{pure}"
        return Store(self.fs, path, uri)

    __truediv__ = child

    @property
    def parent(self) -> Store:
        cut = self.uri.rstrip("/").rsplit("/", 1)[0]
        return Store(self.fs, posixpath.dirname(self.path.rstrip("/")), cut)

    # ---------------------------------------------------------------------------------- reads

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def files(self, recursive: bool = True) -> list[Store]:
        """Every file below this folder (none if it does not exist), sorted by path."""
        if not self.is_dir():
            return []
        found = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive,
                                                        allow_not_found=True))
        base = self.path.rstrip("/")
        out = [self.child(*PurePosixPath(i.path[len(base) + 1:]).parts)
               for i in found if i.type == pafs.FileType.File]
        return sorted(out, key=lambda s: s.path)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def open_video(self) -> Any:
        """A seekable binary file for PyAV: the path itself when local, else a `RemoteFile`."""
        if not self.remote:
            return self.path
        return RemoteFile(self.fs.open_input_file(self.path))

    # --------------------------------------------------------------------------------- writes

    def mkdir(self) -> Store:
        self.fs.create_dir(self.path, recursive=True)
        return self

    def write_bytes(self, data: bytes) -> None:
        """Whole or absent: local, a temp name then rename; remote, one PUT."""
        if not self.remote:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                tmp.write_bytes(data)
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
            return
        with self.fs.open_output_stream(self.path) as f:  # one write, one commit at close
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """A local path to make this file at (for writers that need one: PyAV, matplotlib):
        the file itself on a local store (its folder made), else a temporary file uploaded
        whole (one PUT) when the block ends without an error."""
        if not self.remote:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="tubelet-put-") as tmp:
            path = Path(tmp) / self.name
            yield path
            self.write_bytes(path.read_bytes())

    def put_files(self, root: Path, files: Iterable[Path]) -> None:
        """Each of `files` (below the local folder `root`) to its relative name here, whole."""
        for f in files:
            self.child(*f.relative_to(root).parts).write_bytes(f.read_bytes())

    def delete(self) -> None:
        info = self.info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)


def as_store(location: str | Path | Store, cfg: StorageConfig | None = None) -> Store:
    """`location` as a Store (a Store is returned as it is)."""
    return location if isinstance(location, Store) else resolve(location, cfg)


def filesystem_of(paths: list[str], cfg: StorageConfig | None = None) -> Any:
    """The filesystem object-store paths among `paths` are read through (the first one's:
    one S3 filesystem reaches every bucket of its endpoint), None when all are local."""
    remote = next((p for p in paths if is_uri(p)), None)
    return resolve(remote, cfg).fs if remote else None


def fs_path(uri: str) -> str:
    """The filesystem path of a URI (what its `Store.fs` takes): `bucket/key` for an object
    store, the path itself for a local one."""
    if not is_uri(uri):
        return uri[len("file://"):] if uri.startswith("file://") else uri
    split = urlsplit(uri)
    if split.scheme in ("s3", "s3a", "gs", "gcs"):
        return f"{split.netloc}{split.path}"
    return split.path


def open_source(path: str, fs: pafs.FileSystem | None) -> Any:
    """A video path as PyAV opens it: a local path as is, an object-store URI (`fs` its
    filesystem) as a buffered `RemoteFile`; FileNotFoundError / IsADirectoryError / an empty
    object raise before FFmpeg sees anything."""
    if fs is None or not is_uri(path):
        return path
    try:
        raw = fs.open_input_file(fs_path(path))  # one HEAD: the size
    except FileNotFoundError:
        if fs.get_file_info(fs_path(path)).type == pafs.FileType.Directory:
            raise IsADirectoryError(path) from None
        raise
    except IsADirectoryError:
        raise
    if not raw.size():
        raw.close()
        raise EOFError(path)
    return RemoteFile(raw)


CACHE = Path("~/.cache/tubelet/objects")  # where each node copies object-store models


def local_copy(store: Store, root: Path | None = None) -> Path:
    """A local copy of a remote file or folder (its whole tree): what torch, safetensors and
    diffusers load. Cached per node under `root` (default `CACHE`), keyed by the URI and the
    listing (names, sizes, modification times; one listing request), so every node computes
    the same path, a changed object is fetched again, and a copy is made once (into a temp
    folder renamed into place). A local store is its own path."""
    import hashlib
    import shutil

    if not store.remote:
        return Path(store.path)
    info = store.info()
    is_dir = info.type == pafs.FileType.Directory
    files = ([i for i in store.fs.get_file_info(pafs.FileSelector(store.path, recursive=True))
              if i.type == pafs.FileType.File] if is_dir
             else [info] if info.type == pafs.FileType.File else [])
    if not files:
        raise FileNotFoundError(f"{store.uri}: nothing there")
    listing = "\n".join(f"{i.path}|{i.size}|{i.mtime_ns}" for i in files)
    key = hashlib.sha256(f"{store.uri}\n{listing}".encode()).hexdigest()[:16]
    dest = (root or CACHE).expanduser() / f"{key}-{store.name}"
    if dest.exists():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for i in files:
            target = tmp / i.path[len(store.path):].lstrip("/") if is_dir else tmp
            target.parent.mkdir(parents=True, exist_ok=True)
            with store.fs.open_input_stream(i.path) as f:
                target.write_bytes(f.read())
        try:
            tmp.rename(dest)
        except OSError:  # another actor of this node made it first
            if not dest.exists():
                raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return dest


def ensure_local(path: str | Path, source: Store | None) -> None:
    """On a node that lacks `path` (the driver's `local_copy` of `source`), make the copy."""
    if source is not None and not Path(path).exists():
        local_copy(source, Path(path).parent)  # under the driver's cache root


def resolve(location: str | Path, cfg: StorageConfig | None = None) -> Store:
    """A local path or URI -> its Store (local paths absolute, `~` expanded)."""
    cfg = cfg or StorageConfig()
    text = str(location)
    if not is_uri(text):
        if text.startswith("file://"):
            text = text[len("file://"):]
        path = str(Path(text).expanduser().absolute())
        return Store(pafs.LocalFileSystem(), path, path)
    split = urlsplit(text)
    uri = f"{split.scheme}://{split.netloc}{split.path}"  # no query string: never recorded
    if split.scheme in ("s3", "s3a"):
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        fs = _s3_filesystem(query, cfg)
        return Store(fs, f"{split.netloc}{split.path}".rstrip("/"), uri.rstrip("/"))
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"{uri}: not a storage URI this build can open ({e}); use s3://, "
                           "gs:// or a local path") from None
    return Store(fs, path.rstrip("/"), uri.rstrip("/"))


_QUERY = re.compile(r"""([A-Za-z][A-Za-z0-9+.-]*://[^\s"'?]*)\?[^\s"']*""")


def redact(text: str) -> str:
    """`text` with the query string of every URI in it removed (where a URI may carry keys:
    `s3://b/p?access_key=...`): what records and logs may hold."""
    return _QUERY.sub(r"\1", text)


def locate(location: str | Path, what: str, cfg: StorageConfig | None = None,
           must_exist: bool = False) -> Store:
    """`resolve` then `check_reachable`: a Store whose bucket answers (and, with `must_exist`,
    that exists), or one StorageError line naming `what`."""
    store = resolve(location, cfg)
    check_reachable(store, what, must_exist)
    return store


def check_reachable(store: Store, what: str, must_exist: bool = False) -> None:
    """For an object-store location, one request in the driver before any work: its bucket
    exists, the credentials are accepted, the endpoint answers (within the connect timeout
    times the retries); and, with `must_exist`, the location itself exists. Or one
    StorageError line naming it and what to do."""
    if not store.remote:
        return
    bucket = store.path.split("/", 1)[0]
    start = time.perf_counter()
    try:
        info = store.fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{what} {store.uri}: bucket {bucket!r} does not exist (create "
                               "it, or check the name and the endpoint)")
        if must_exist and not store.exists():
            raise StorageError(f"{what} {store.uri}: nothing there")
    except StorageError:
        raise
    except OSError as e:
        if "denied" in storage_reason(e):  # a HEAD's 403 has no body: bad key or no right?
            e = _listing_error(store.fs, bucket) or e  # a GET's error body says which
        raise StorageError(f"{what} {store.uri}: {storage_reason(e)} "
                           f"(after {time.perf_counter() - start:.1f}s)") from None


def _listing_error(fs: pafs.FileSystem, bucket: str) -> OSError | None:
    try:
        fs.get_file_info(pafs.FileSelector(bucket, recursive=False))
    except OSError as e:
        return e
    return None


def storage_reason(e: BaseException) -> str:
    """One line for an object-store error: what went wrong and what to do."""
    text = " ".join(str(e).split())
    low = text.lower().replace("_", "")
    if ("credentials" in low or "invalidaccesskeyid" in low or "signature" in low
            or "no auth" in low or "invalidtoken" in low or "expiredtoken" in low):
        return ("no valid credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE; storage.anonymous: true for a public bucket)")
    if "accessdenied" in low or "access denied" in low or "403" in low:
        return ("access denied: the credentials may not read / write there (check the "
                "bucket policy, AWS_ACCESS_KEY_ID / AWS_PROFILE)")
    if "curl" in low or "connect" in low or "resolve" in low or "timed out" in low \
            or "timeout" in low or "unreachable" in low:
        return ("the endpoint does not answer (check AWS_ENDPOINT_URL / storage.endpoint "
                f"and the network): {text[:160]}")
    return text[:300]


class RemoteFile(io.RawIOBase):
    """A pyarrow random-access input as a Python binary file with a read buffer: reads are
    served from one `READ_BLOCK` block fetched with a single ranged GET, seeks move within the
    file without a request. What PyAV needs (read, seek, tell) and no more."""

    def __init__(self, raw: Any, block: int = READ_BLOCK):
        super().__init__()
        self.raw, self.block = raw, block
        self.size = raw.size()
        self.pos = 0
        self.buf, self.buf_start = b"", 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        out = bytearray()
        while n > 0 and self.pos < self.size:
            lo = self.pos - self.buf_start
            if not 0 <= lo < len(self.buf):
                self.buf_start = self.pos
                self.buf = self.raw.read_at(min(self.block, self.size - self.pos), self.pos)
                lo = 0
                if not self.buf:
                    break
            chunk = self.buf[lo:lo + n]
            out += chunk
            self.pos += len(chunk)
            n -= len(chunk)
        return bytes(out)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.raw.close()
        super().close()
