"""The VAE encode stage (actors/vae_encode.py), called on a table without Ray."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import torch

from actors.common.buckets import BucketConfig
from actors.common.tensors import pack, with_columns
from actors.common.vae import VAEStageConfig
from actors.common.video import frames_to_video
from actors.decode import DecodeStage
from actors.vae_encode import VAEEncodeStage
from models.vae import build_vae
from tests.stages.test_decode import plan_rows

VAE, BUCKETS = VAEStageConfig(preset="debug", seed=3), BucketConfig(target_fps=8.0)


def decoded(dataset, n: int) -> pa.Table:
    root, rows = dataset
    return DecodeStage(threads=1)(pa.Table.from_pylist(plan_rows(root, rows[:n])))


def test_latents_have_the_vae_shape_and_match_a_direct_forward(dataset):
    clips = decoded(dataset, 4)  # several buckets (aspect ratios) in one batch
    out = VAEEncodeStage(VAE, BUCKETS, latent_dtype="float32")(clips)
    assert out.column("id").to_pylist() == clips.column("id").to_pylist()
    assert "frames" not in out.column_names
    torch.manual_seed(VAE.seed)
    vae = build_vae("debug").eval()
    for row in out.to_pylist():
        T, H, W = row["num_frames"], row["height"], row["width"]
        assert tuple(row["latent_shape"]) == vae.latent_shape(T, H, W)
        assert len(row["latent"]) == math.prod(row["latent_shape"])
    # the stage's first clip equals the model's own forward on it, alone
    frames = np.frombuffer(clips.column("frames")[0].as_py(), np.uint8).reshape(
        clips.column("frames_shape")[0].as_py())
    with torch.inference_mode():
        z = vae.encode(frames_to_video([frames]))[0].numpy()
    got = np.array(out.column("latent")[0].as_py(), np.float32).reshape(z.shape)
    np.testing.assert_allclose(got, z, atol=1e-5)


def test_a_clip_the_vae_refuses_is_an_error_row_and_the_rest_go_on(dataset, tmp_path):
    clips = decoded(dataset, 2)
    first = np.frombuffer(clips.column("frames")[0].as_py(), np.uint8).reshape(
        clips.column("frames_shape")[0].as_py())
    bad = first[:6]  # 6 frames: not 1 + 4k, the causal VAE refuses it
    frames = [bad, np.frombuffer(clips.column("frames")[1].as_py(), np.uint8).reshape(
        clips.column("frames_shape")[1].as_py())]
    table = with_columns(clips.drop_columns(["frames", "frames_shape"]), pack("frames", frames))
    out = VAEEncodeStage(VAE, BUCKETS, str(tmp_path))(table)
    assert out.column("id").to_pylist() == [clips.column("id")[1].as_py()]
    errors = pds.dataset(tmp_path, format="parquet").to_table().to_pylist()
    assert [(e["stage"], e["kind"]) for e in errors] == [("encode", "error")]
    assert clips.column("id")[0].as_py() in errors[0]["error"]


def test_a_batch_with_no_clip_left_gives_an_empty_table(dataset, tmp_path):
    """A batch whose every clip fails (or that holds none: a fused decode + encode actor after a
    video with no decodable clip) is an empty table with the output columns, not a crash."""
    clips = decoded(dataset, 1)
    first = np.frombuffer(clips.column("frames")[0].as_py(), np.uint8).reshape(
        clips.column("frames_shape")[0].as_py())
    table = with_columns(clips.drop_columns(["frames", "frames_shape"]),
                         pack("frames", [first[:6]]))  # 6 frames: refused
    stage = VAEEncodeStage(VAE, BUCKETS, str(tmp_path))
    out = stage(table)
    assert out.num_rows == 0 and {"id", "latent", "latent_shape"} <= set(out.column_names)
    assert stage(table.slice(0, 0)).num_rows == 0
