"""Generation's stages on Arrow tables, without Ray: text encode (fixed-length features that
do not depend on the batch), VAE decode (chunked = whole), mp4 encode (exact size and frame
count, read back with PyAV)."""

from __future__ import annotations

import av
import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.common.tensors import pack, unpack
from actors.common.vae import VAEStageConfig
from actors.mp4_encode import Mp4EncodeStage
from actors.text_encode import TextEncodeStage
from actors.vae_decode import VAEDecodeStage
from models.vae import load_vae
from tests.exports import write_export, write_vae


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_export(tmp_path_factory.mktemp("export"))


def prompts(texts, negatives=None):
    return pa.table({"id": [str(i) for i in range(len(texts))], "prompt": texts,
                     "negative_prompt": negatives or [""] * len(texts)})


def test_text_features_do_not_depend_on_the_batch(export):
    stage = TextEncodeStage(str(export))
    both = stage(prompts(["a red circle moving right", "a much longer prompt " * 3],
                         ["", "blurry"]))
    alone = stage(prompts(["a red circle moving right"]))
    f_both, f_alone = unpack(both, "text", np.float32), unpack(alone, "text", np.float32)
    assert f_both[0].shape == f_alone[0].shape == (stage.length, 64)
    assert np.array_equal(f_both[0], f_alone[0])  # bitwise, whatever shares the batch
    lens = both.column("text_len").to_pylist()
    assert lens[0] == len("a red circle moving right") + 2 and lens[1] > lens[0]
    assert not f_both[0][lens[0]:].any()  # padding is zero
    assert both.column("neg_len").to_pylist()[0] == 0 and both.column("neg_len")[1].as_py() > 0


def test_vae_decode_is_chunked_and_matches_a_whole_decode(tmp_path):
    path = write_vae(tmp_path / "vae.safetensors")
    vae = load_vae(path)
    z = torch.randn(4, 4, 4, 6, generator=torch.Generator().manual_seed(0))  # 13 frames
    table = pa.table({"id": ["v"], **pack("latent", [z.numpy()])})
    out = VAEDecodeStage(VAEStageConfig(checkpoint=str(path), device="cpu"),
                         chunk_frames=4)(table)
    frames = unpack(out, "video", np.uint8)[0]
    assert frames.shape == (13, 32, 48, 3) and "latent" not in out.column_names
    with torch.no_grad():
        whole = ((vae.decode(z[None]).clamp(-1, 1) + 1) * 127.5).round()
    whole = whole[0].permute(1, 2, 3, 0).numpy()
    assert np.abs(frames.astype(np.float32) - whole).max() <= 1.0  # chunking is exact


def test_mp4_has_exactly_the_size_and_frame_count(tmp_path):
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (9, 48, 80, 3), np.uint8),
              rng.integers(0, 255, (5, 64, 32, 3), np.uint8)]
    table = pa.table({"id": ["a", "b"], "name": ["a", "b"], "fps": [8.0, 12.0],
                      **pack("video", videos)})
    out = Mp4EncodeStage(str(tmp_path))(table)
    assert "video" not in out.column_names
    for row, video in zip(out.to_pylist(), videos, strict=True):
        with av.open(str(tmp_path / row["file"])) as f:
            decoded = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
        assert len(decoded) == video.shape[0]
        assert decoded[0].shape == video.shape[1:]
        assert (tmp_path / row["sheet"]).is_file()
    assert not list(tmp_path.glob("videos/.*"))  # no temp files left


def sample_table(export, rows):
    """Prompt rows with every setting, through the text stage: the sampler's input."""
    n = len(rows)
    table = pa.table({"id": [r["id"] for r in rows], "prompt": [r["prompt"] for r in rows],
                      "negative_prompt": [r.get("negative_prompt", "") for r in rows],
                      "seed": [r["seed"] for r in rows], "height": [32] * n,
                      "width": [r.get("width", 48) for r in rows], "frames": [5] * n,
                      "fps": [8.0] * n, "steps": [3] * n, "cfg": [r.get("cfg", 3.0) for r in rows]})
    return TextEncodeStage(str(export))(table)


def test_latents_are_bitwise_the_same_whatever_the_batch(export):
    from actors.sample import SampleStage

    rows = [{"id": "a", "prompt": "a red circle", "seed": 1},
            {"id": "b", "prompt": "a blue square moving up", "seed": 2, "width": 64},
            {"id": "c", "prompt": "a green dot", "seed": 3, "negative_prompt": "blur"},
            {"id": "d", "prompt": "a red circle", "seed": 1, "cfg": 1.0},
            {"id": "e", "prompt": "two red circles", "seed": 5}]
    stage = SampleStage(str(export), {"device": "cpu"}, temporal=4, spatial=8, max_batch=4)
    batched = stage(sample_table(export, rows))
    together = dict(zip(batched.column("id").to_pylist(),
                        unpack(batched, "latent", np.float32), strict=True))
    assert together["a"].shape == (4, 2, 4, 6) and together["b"].shape == (4, 2, 4, 8)
    for row in rows:
        alone = unpack(stage(sample_table(export, [row])), "latent", np.float32)[0]
        assert np.array_equal(alone, together[row["id"]]), row["id"]
    assert not np.array_equal(together["a"], together["e"])  # seeds and prompts matter
    assert not np.array_equal(together["a"], together["d"])  # guidance matters
    small = SampleStage(str(export), {"device": "cpu"}, temporal=4, spatial=8, max_batch=1)
    again = unpack(small(sample_table(export, rows)), "latent", np.float32)
    assert all(np.array_equal(z, together[r["id"]]) for z, r in zip(again, rows, strict=True))


def test_packed_batches_give_the_one_by_one_latents_within_1e_5(export):
    from actors.sample import SampleStage

    rows = [{"id": "a", "prompt": "a red circle", "seed": 1},
            {"id": "b", "prompt": "a blue square moving up", "seed": 2},
            {"id": "c", "prompt": "a green dot", "seed": 3},
            {"id": "e", "prompt": "two red circles", "seed": 5, "width": 64}]
    table = sample_table(export, rows)
    exact = SampleStage(str(export), {"device": "cpu"}, temporal=4, spatial=8, max_batch=4)
    packed = SampleStage(str(export), {"device": "cpu", "batch_invariant": False},
                         temporal=4, spatial=8, max_batch=4)
    want, got = (unpack(s(table), "latent", np.float32) for s in (exact, packed))
    for a, b, row in zip(want, got, rows, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5, row["id"]


def test_mp4_pixel_format_and_crf_are_the_users(tmp_path):
    rng = np.random.default_rng(1)
    video = rng.integers(0, 255, (5, 32, 48, 3), np.uint8)
    table = pa.table({"id": ["a"], "name": ["a"], "fps": [8.0], **pack("video", [video])})
    errors = {}
    for pix_fmt, crf in (("yuv420p", 18), ("yuv444p", 0)):
        out = tmp_path / pix_fmt
        row = Mp4EncodeStage(str(out), crf=crf, pix_fmt=pix_fmt)(table).to_pylist()[0]
        with av.open(str(out / row["file"])) as f:
            assert f.streams.video[0].codec_context.pix_fmt == pix_fmt
            frames = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
        errors[pix_fmt] = np.abs(frames.astype(int) - video).mean()
    assert errors["yuv444p"] < errors["yuv420p"] / 3, errors  # the archival setting keeps more
