"""The VAE eval stage (actors/vae_eval.py), called on a table without Ray."""

from __future__ import annotations

import av
import pytest
import torch

from actors.common.buckets import BucketConfig
from actors.common.vae import VAELoadError
from actors.vae_eval import EVAL_SCHEMA, VAEEvalStage
from models.vae import build_vae, save_vae
from tests.stages.test_vae_encode import decoded


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_vae(build_vae("debug"), path)
    return str(path)


def test_metrics_per_clip_and_reconstructions_as_mp4(dataset, checkpoint, tmp_path):
    clips = decoded(dataset, 2)
    stage = VAEEvalStage(checkpoint, BucketConfig(target_fps=8.0), videos_dir=str(tmp_path),
                         crf=0, num_cpus=1)
    out = stage(clips)
    assert out.schema.equals(EVAL_SCHEMA)
    assert out.column("id").to_pylist() == clips.column("id").to_pylist()
    for row, shape in zip(out.to_pylist(), clips.column("frames_shape").to_pylist(),
                          strict=True):
        assert (row["num_frames"], row["height"], row["width"]) == tuple(shape[:3])
        assert 0 < row["psnr"] < 100 and -1 <= row["ssim"] <= 1 and row["mse"] > 0
        with av.open(row["video"]) as container:  # the reconstruction decodes, full size
            frames = list(container.decode(video=0))
        assert len(frames) == row["num_frames"]
        assert (frames[0].height, frames[0].width) == (row["height"], row["width"])


def test_a_bad_checkpoint_is_one_line_naming_it(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    with pytest.raises(VAELoadError, match="junk.safetensors is not a tubelet VAE"):
        VAEEvalStage(str(junk), BucketConfig())
    with pytest.raises(VAELoadError, match="not found"):
        VAEEvalStage(str(tmp_path / "missing.safetensors"), BucketConfig())
