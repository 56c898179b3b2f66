"""actors/common/storage.py against a real S3-compatible server on loopback (tests/s3.py):
URIs resolve with the endpoint from the environment and never keep their query string, names
cannot leave their prefix, writes are whole, a video is read in a few large GETs, and
records are redacted."""

from __future__ import annotations

import io
import json
import os

import av
import numpy as np
import pyarrow.fs as pafs
import pytest

from actors.common.storage import (
    RemoteFile,
    StorageConfig,
    StorageError,
    check_reachable,
    local_copy,
    redact,
    resolve,
)
from actors.common.video import write_mp4
from tests.s3 import aws_env, new_bucket, s3_server


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    with s3_server() as endpoint, aws_env(endpoint, tmp_path_factory.mktemp("aws")):
        yield new_bucket(endpoint)


def test_local_paths_stay_local(tmp_path):
    store = resolve(tmp_path / "a")
    assert not store.remote and store.path == str(tmp_path / "a")
    store.child("x", "y.txt").write_text("hi")
    assert (tmp_path / "a/x/y.txt").read_text() == "hi"
    assert [f.name for f in store.files()] == ["y.txt"]


def test_a_uri_resolves_with_the_environments_endpoint_and_drops_its_query(bucket):
    store = resolve(f"{bucket.uri}/some/prefix?region=us-east-1&scheme=http")
    assert store.remote and store.path == f"{bucket.name}/some/prefix"
    assert store.uri == f"{bucket.uri}/some/prefix"  # what records and messages hold
    store.child("a.txt").write_text("whole")
    assert bucket.read("some/prefix/a.txt") == b"whole"
    assert resolve(f"{bucket.uri}/some").child("prefix", "a.txt").read_text() == "whole"
    assert [f.uri for f in resolve(f"{bucket.uri}/some").files()] == [
        f"{bucket.uri}/some/prefix/a.txt"]


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "", "c:\\x", "C:x"])
def test_names_cannot_leave_their_prefix(bucket, name):
    with pytest.raises(StorageError, match="is not a name inside it"):
        resolve(f"{bucket.uri}/out").child(name)


def test_a_missing_bucket_is_one_line(bucket):
    with pytest.raises(StorageError, match="bucket 'no-such-tubelet' does not exist"):
        check_reachable(resolve("s3://no-such-tubelet/x"), "--input")
    check_reachable(resolve(f"{bucket.uri}/anything"), "--output")  # a prefix may be new


def test_a_video_is_read_in_a_few_large_gets(bucket, tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (48, 128, 160, 3), np.uint8)
    write_mp4(tmp_path / "v.mp4", iter(frames), 24, crf=30)
    size = (tmp_path / "v.mp4").stat().st_size
    bucket.put_tree(tmp_path, "videos")
    store = resolve(f"{bucket.uri}/videos/v.mp4")

    class Counting:  # counts the ranged GETs a RemoteFile makes
        def __init__(self, raw):
            self.raw, self.gets = raw, 0

        def size(self):
            return self.raw.size()

        def read_at(self, n, offset):
            self.gets += 1
            return self.raw.read_at(n, offset)

        def close(self):
            self.raw.close()

    raw = Counting(store.fs.open_input_file(store.path))
    with av.open(RemoteFile(raw, block=1 << 20)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    assert decoded == 48
    assert raw.gets <= size // (1 << 20) + 3, (raw.gets, size)  # not one GET per packet


def test_remote_file_reads_and_seeks_like_a_file(bucket, tmp_path):
    data = os.urandom(3000)
    (tmp_path / "d").mkdir()
    (tmp_path / "d/blob").write_bytes(data)
    bucket.put_tree(tmp_path / "d", "blobs")
    store = resolve(f"{bucket.uri}/blobs/blob")
    f = RemoteFile(store.fs.open_input_file(store.path), block=512)
    assert f.read(10) == data[:10]
    f.seek(-5, io.SEEK_END)
    assert f.read() == data[-5:] and f.read(3) == b""
    f.seek(700)
    assert f.read(1000) == data[700:1700] and f.tell() == 1700


def test_local_copy_is_cached_and_refetched_when_the_object_changes(bucket, tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "m").mkdir()
    (tmp_path / "m/config.json").write_text("{}")
    bucket.put_tree(tmp_path / "m", "model")
    first = local_copy(resolve(f"{bucket.uri}/model"), cache)
    assert (first / "config.json").read_text() == "{}"
    assert local_copy(resolve(f"{bucket.uri}/model"), cache) == first
    resolve(f"{bucket.uri}/model/config.json").write_text('{"changed": 1}')
    second = local_copy(resolve(f"{bucket.uri}/model"), cache)
    assert second != first and (second / "config.json").read_text() == '{"changed": 1}'


def test_keys_in_uris_are_redacted():
    text = 'argv: ["--input", "s3://b/p?access_key=AK&secret_key=SK", "gs://x/y?token=T"]'
    assert redact(text) == 'argv: ["--input", "s3://b/p", "gs://x/y"]'


def test_the_storage_section_overrides_the_environment(bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    store = resolve(f"{bucket.uri}/x", StorageConfig(endpoint=bucket.endpoint))
    assert isinstance(store.fs, pafs.S3FileSystem)
    check_reachable(store, "--output")  # through the configured endpoint, not the variable


@pytest.fixture(scope="module")
def iam_user(bucket):
    """A user (keys) allowed to use `bucket` and nothing else, created on the server."""
    import boto3

    iam = boto3.client("iam", endpoint_url=bucket.endpoint, region_name="us-east-1")
    name = f"user-{bucket.name}"
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{bucket.name}", f"arn:aws:s3:::{bucket.name}/*"]}]}
    iam.put_user_policy(UserName=name, PolicyName="only-its-bucket",
                        PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    other = new_bucket(bucket.endpoint)  # a bucket the user may not touch
    return key["AccessKeyId"], key["SecretAccessKey"], other


@pytest.mark.parametrize("who, needle", [
    ("nobody", "no valid credentials"),
    ("user", "access denied"),
])
def test_refused_credentials_are_one_line_before_ray(bucket, iam_user, who, needle, tmp_path,
                                                     capsys, monkeypatch):
    from moto.core.authorization import enable_iam_authentication

    from pipeline.cli import main

    key, secret, other = iam_user
    if who == "nobody":
        key, secret = "AKIANOBODY0000000000", "not-a-secret"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with enable_iam_authentication():
        assert main(["preprocess", "--input", f"{other.uri}/videos", "--output",
                     str(tmp_path / "out")]) == 2
        if who == "user":  # its own bucket is fine: the output check writes and removes
            assert main(["generate", "--checkpoint", "weights/dit-demo", "--prompts", "nope",
                         "--output", f"{bucket.uri}/gen"]) == 2  # the prompt file, not S3
    lines = capsys.readouterr().err.strip().splitlines()
    assert needle in lines[0] and f"{other.uri}/videos" in lines[0], lines
    if who == "user":
        assert "prompt file nope not found" in lines[1], lines


def test_synth_writes_whole_videos_and_captions_into_a_bucket(bucket, capsys):
    from pipeline.cli import main

    assert main(["synth", "--output", f"{bucket.uri}/synth", "--num-videos", "2",
                 "--set", "workers=1"]) == 0
    keys = bucket.keys("synth")
    assert {"synth/captions.jsonl", "synth/run.json", "synth/config.yaml"} <= set(keys)
    videos = [k for k in keys if k.endswith(".mp4")]
    assert len(videos) == 2
    for k in videos:
        with av.open(io.BytesIO(bucket.read(k))) as f:
            assert sum(1 for _ in f.decode(video=0)) > 0
