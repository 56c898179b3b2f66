"""A diffusers pipeline folder through generation's own stages (text encode -> sample -> VAE
decode -> mp4 encode, in this process): several rows of different sizes and lengths give the
latents `WanPipeline(...)` gives for each (saved by the decode stage, `save_latents`) and mp4
frames within what the encoder loses; the text stage never loads the transformer. The same for
a Wan 2.2 TI2V folder (per-token timesteps, the 16x-spatial VAE), text-to-video, and for a
CogVideoX folder ((B, F, C, H, W) latents saved as (C, T', H', W'), one rank only)."""

from __future__ import annotations

from dataclasses import replace

import av
import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.common.stage import run_here
from actors.common.tensors import unpack
from actors.text_encode import TextEncodeStage
from actors.workers.step_cache import StepCacheConfig
from pipeline.config import ConfigError
from pipeline.generate import GenerateConfig, generate_stages, inspect_model, run_generate
from pipeline.prompts import Defaults
from tests.pretrained import (
    diffusers_cogvideox,
    diffusers_pipeline,
    write_cogvideox_pipeline,
    write_wan22_ti2v_pipeline,
    write_wan_pipeline,
)

ROWS = [  # id, prompt, negative_prompt, height, width, frames, steps, cfg, seed
    {"id": "wide", "prompt": "a red square on the grass", "negative_prompt": "",
     "height": 32, "width": 48, "frames": 5, "steps": 3, "cfg": 5.0, "seed": 3},
    {"id": "tall", "prompt": "a blue cat and a dog", "negative_prompt": "blurred, static",
     "height": 48, "width": 32, "frames": 9, "steps": 2, "cfg": 4.0, "seed": 11},
    {"id": "plain", "prompt": "a green square", "negative_prompt": "",
     "height": 32, "width": 32, "frames": 5, "steps": 2, "cfg": 1.0, "seed": 5},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe", seed=1)


def reference(pipe, row: dict, output_type: str) -> np.ndarray:
    out = pipe(prompt=row["prompt"], negative_prompt=row["negative_prompt"] or None,
               height=row["height"], width=row["width"], num_frames=row["frames"],
               num_inference_steps=row["steps"], guidance_scale=row["cfg"],
               generator=torch.Generator().manual_seed(row["seed"]), output_type=output_type)
    return out.frames[0] if output_type == "np" else out.frames[0].float().numpy()


TI2V_ROWS = [  # sides multiples of 32: the 16x VAE times the 2 x 2 patch
    {"id": "wide", "prompt": "a red square on the grass", "negative_prompt": "blurred",
     "height": 32, "width": 64, "frames": 5, "steps": 3, "cfg": 5.0, "seed": 2},
    {"id": "tall", "prompt": "a blue cat", "negative_prompt": "",
     "height": 64, "width": 32, "frames": 9, "steps": 2, "cfg": 1.0, "seed": 7},
]


def test_the_stages_give_the_pipelines_latents_and_frames(folder, tmp_path):
    check_stages(folder, ROWS, 16, tmp_path)


def test_wan22_ti2v_stages_give_the_pipelines_latents_and_frames(tmp_path):
    folder = write_wan22_ti2v_pipeline(tmp_path / "ti2v", seed=2)
    check_stages(folder, TI2V_ROWS, 32, tmp_path)


COG_ROWS = [  # odd T' (frames 8k + 1): the adapter's decode is then the pipeline's, frame for frame
    {"id": "wide", "prompt": "a red square on the grass", "negative_prompt": "blurred",
     "height": 32, "width": 48, "frames": 9, "steps": 3, "cfg": 6.0, "seed": 4},
    {"id": "plain", "prompt": "a blue cat", "negative_prompt": "",
     "height": 32, "width": 32, "frames": 1, "steps": 2, "cfg": 1.0, "seed": 8},
]


def test_cogvideox_stages_give_the_pipelines_latents_and_frames(tmp_path):
    folder = write_cogvideox_pipeline(tmp_path / "cog", seed=4)
    check_stages(folder, COG_ROWS, 16, tmp_path, diffusers_cogvideox, frames_first=True)


def test_cogvideox_parallel_samplers_are_refused_before_ray(tmp_path):
    folder = write_cogvideox_pipeline(tmp_path / "cog", seed=4)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "a cat"}\n')
    cfg = GenerateConfig(defaults=Defaults(fps=8.0, height=32, width=32, frames=9))
    for sampler in (replace(cfg.sampler, sequence_parallel=2),
                    replace(cfg.sampler, cfg_parallel=True)):
        with pytest.raises(ConfigError, match="CogVideoXPipeline folders sample on one rank"):
            run_generate(replace(cfg, sampler=sampler), folder, prompts, tmp_path / "out")
    assert not (tmp_path / "out").exists()


CACHE_ROWS = [  # enough steps for the first-block cache to skip some
    {"id": "wide", "prompt": "a red square on the grass", "negative_prompt": "",
     "height": 32, "width": 48, "frames": 5, "steps": 8, "cfg": 5.0, "seed": 3},
    {"id": "plain", "prompt": "a green square", "negative_prompt": "blurred",
     "height": 32, "width": 32, "frames": 5, "steps": 8, "cfg": 1.0, "seed": 5},
]


def cached_pipeline(threshold: float):
    """diffusers' pipeline with diffusers' own First Block Cache on its transformer."""
    from diffusers.hooks import FirstBlockCacheConfig

    def load(folder):
        pipe = diffusers_pipeline(folder)
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        return pipe
    return load


def test_step_caching_of_a_folder_is_diffusers_first_block_cache(folder, tmp_path):
    threshold = 0.3  # the tiny random transformer moves a lot from step to step
    cache = StepCacheConfig(enabled=True, threshold=threshold)
    check_stages(folder, CACHE_ROWS, 16, tmp_path / "cached", cached_pipeline(threshold),
                 cache=cache)
    pipe = diffusers_pipeline(folder)  # and caching changed something: it skipped steps
    cached = np.load(tmp_path / "cached" / "gen" / "latents" / "wide.npy")
    assert np.abs(cached - reference(pipe, CACHE_ROWS[0], "latent")).max() > 1e-3


def test_a_cached_folder_on_a_sequence_parallel_group_is_refused_before_ray(folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "a cat"}\n')
    cfg = GenerateConfig(defaults=Defaults(fps=8.0, height=32, width=32, frames=5))
    sampler = replace(cfg.sampler, sequence_parallel=2, cache=StepCacheConfig(enabled=True))
    with pytest.raises(ConfigError, match="drop --cache or --sequence-parallel"):
        run_generate(replace(cfg, sampler=sampler), folder, prompts, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def check_stages(folder, rows: list[dict], spatial: int, tmp_path, load=diffusers_pipeline,
                 frames_first: bool = False, vae=None, cache=None) -> None:
    """`folder` (a pipeline folder, or a fine-tune's RUN: `vae` its base's VAE folder)
    through the stages equals `load(folder)`'s pipeline, row by row (`cache`: the sampler's
    step caching)."""
    cfg = replace(GenerateConfig(defaults=Defaults(fps=8.0)), save_latents=True)
    if cache is not None:
        cfg = replace(cfg, sampler=replace(cfg.sampler, cache=cache))
    model = inspect_model(folder, cfg.vae)  # vae.checkpoint auto: the folder's own VAE
    assert model.vae == str(vae or folder / "vae") and model.grid.spatial == spatial
    cfg = replace(cfg, vae=replace(cfg.vae, checkpoint=model.vae, device="cpu"))
    rows = pa.Table.from_pylist([{**r, "name": r["id"], "fps": 8.0} for r in rows])
    out = tmp_path / "gen"
    specs = generate_stages(cfg, model, out, gpus=False)
    decoded = run_here(rows, specs[:-1])  # text -> sample -> VAE decode
    made = specs[-1].build()(decoded)  # -> mp4
    pipe = load(folder)
    videos = dict(zip(decoded.column("id").to_pylist(), unpack(decoded, "video", np.uint8),
                      strict=True))
    for row in made.to_pylist():
        ours = np.load(out / row["latents"])
        want = reference(pipe, row, "latent")
        if frames_first:  # CogVideoX's (F, C, H, W) -> tubelet's (C, T', H', W')
            want = want.transpose(1, 0, 2, 3)
        assert ours.shape == want.shape
        np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5, err_msg=row["id"])
        expected = np.round(reference(pipe, row, "np") * 255)  # (T, H, W, 3) from [0, 1]
        assert np.abs(videos[row["id"]] - expected).max() <= 1, row["id"]  # rounding only
        with av.open(str(out / row["file"])) as f:
            frames = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
        assert frames.shape == expected.shape, row["id"]  # the mp4 of those frames


def test_the_text_stage_loads_no_transformer(folder, monkeypatch):
    import diffusers

    def refuse(*_, **__):
        raise AssertionError("the text stage loaded the transformer")

    for name in ("from_pretrained", "from_config"):
        monkeypatch.setattr(diffusers.WanTransformer3DModel, name, refuse)
    monkeypatch.setattr("models.pipelines.load_transformer", refuse)
    stage = TextEncodeStage(str(folder))
    table = stage(pa.table({"id": ["a", "b"], "prompt": ["a red square", "a cat"],
                            "negative_prompt": ["", "blurred"]}))
    text = unpack(table, "text", np.float32)
    lens = table.column("text_len").to_pylist()
    assert [t.shape[0] for t in text] == lens  # features travel at their real length
    assert all(n > 0 for n in table.column("neg_len").to_pylist())  # "" is encoded too
