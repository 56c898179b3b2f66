"""A real S3-compatible server on loopback for tests: moto's `ThreadedMotoServer` on
127.0.0.1 with an OS-picked port, fake credentials, the machine's AWS config files pointed
away and every `AWS_*` variable of the machine cleared while a test uses it."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest


@dataclass(frozen=True)
class Bucket:
    name: str
    endpoint: str  # http://127.0.0.1:PORT
    fs: pafs.S3FileSystem  # an admin view of the server (bucket creation allowed)

    @property
    def uri(self) -> str:
        return f"s3://{self.name}"

    def put_tree(self, local: Path, prefix: str) -> str:
        """Upload every file below `local` to `prefix`; its URI."""
        for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            key = f"{self.name}/{prefix}/{f.relative_to(local).as_posix()}"
            with self.fs.open_output_stream(key) as out:
                out.write(f.read_bytes())
        return f"{self.uri}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` (relative to the bucket)."""
        base = f"{self.name}/{prefix}".rstrip("/")
        found = self.fs.get_file_info(pafs.FileSelector(base, recursive=True,
                                                        allow_not_found=True))
        return sorted(i.path[len(self.name) + 1:] for i in found
                      if i.type == pafs.FileType.File)

    def read(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{self.name}/{key}") as f:
            return f.read()


@contextlib.contextmanager
def aws_env(endpoint: str, home: Path) -> Iterator[None]:
    """The machine's AWS_* variables cleared, fake credentials, the endpoint, and the AWS
    config / credentials files pointed at files that do not exist, for the duration."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("AWS_"):
                mp.delenv(key)
        mp.setenv("AWS_ACCESS_KEY_ID", "tubelet-test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "tubelet-test-secret")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@contextlib.contextmanager
def s3_server(verbose: bool = False) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (port picked by the OS): its endpoint URL. `verbose`:
    one `werkzeug` log record per request (what benchmarks/storage.py counts)."""
    from moto.server import ThreadedMotoServer

    if not verbose:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=verbose)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def new_bucket(endpoint: str) -> Bucket:
    host = endpoint.split("://", 1)[1]
    fs = pafs.S3FileSystem(access_key="tubelet-test", secret_key="tubelet-test-secret",
                           endpoint_override=host, scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    name = f"tubelet-{uuid.uuid4().hex[:10]}"
    fs.create_dir(name)
    return Bucket(name, endpoint, fs)


@pytest.fixture(scope="module")
def s3_bucket(tmp_path_factory) -> Iterator[Bucket]:
    """A fresh bucket on a module-wide loopback S3 server, the AWS environment faked for the
    module's tests."""
    with s3_server() as endpoint, aws_env(endpoint, tmp_path_factory.mktemp("aws")):
        yield new_bucket(endpoint)
