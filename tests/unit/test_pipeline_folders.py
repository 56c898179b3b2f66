"""A diffusers pipeline folder driven stage by stage (models/pipelines.py): the text encoder
alone, then the transformer with a fresh scheduler, give the latents diffusers' own
`WanPipeline` gives; the VAE adapter decodes them to its frames; bad folders are refused in
one line before anything in them is loaded.

The folders are tiny random Wan 2.1 pipelines, a Wan 2.2 TI2V one (per-token timesteps,
the 16x-spatial residual VAE), and CogVideoX ones (T5 at 226 tokens unmasked, (B, F, C, H, W)
latents, rotary embeddings per size, DDIM / DPM with its generator), saved with
`save_pretrained` (tests/pretrained.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import diffusers
import pytest
import torch

from models.pipelines import (
    MAX_SEQUENCE_LENGTH,
    PipelineError,
    initial_noise,
    latent_shape,
    load_text_encoder,
    load_transformer,
    new_scheduler,
    read_pipeline,
    sample,
    step_generator,
    vae_folder,
)
from models.vae_adapters import load_diffusers_vae
from models.wan_pipeline import sample_latents, step_timestep
from tests.pretrained import (
    TI2V_CHANNELS,
    diffusers_cogvideox,
    diffusers_pipeline,
    write_cogvideox_pipeline,
    write_wan22_ti2v_pipeline,
    write_wan_pipeline,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {s: write_wan_pipeline(root / s, seed=0, scheduler=s) for s in ("unipc", "euler")}


@pytest.fixture(scope="module")
def diffusers_pipes(folders) -> dict[str, diffusers.WanPipeline]:
    """diffusers' own WanPipeline.from_pretrained on each folder."""
    return {name: diffusers_pipeline(folder) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def stages(folders) -> dict[str, tuple]:
    """Per folder: (record, text encoder, transformer), each loaded alone."""
    out = {}
    for name, folder in folders.items():
        record = read_pipeline(folder)
        out[name] = (record, load_text_encoder(record), load_transformer(record))
    return out


CASES = [  # scheduler, prompt, negative prompt, height, width, frames, steps, guidance, seed
    ("unipc", "a red square on the grass", None, 32, 32, 5, 2, 5.0, 0),
    ("unipc", "  a blue\tcat &amp;amp; a  dog\n", "blurred, low quality", 48, 32, 9, 3, 5.0, 7),
    ("euler", "a green square in the kitchen", "static", 32, 48, 5, 3, 5.0, 1),
    ("euler", "a cat", None, 32, 32, 5, 2, 1.0, 2),  # no guidance: one pass per step
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[3]}x{c[4]}x{c[5]}-g{c[7]}")
def test_stages_give_the_pipelines_latents(case, diffusers_pipes, stages):
    scheduler, prompt, negative, height, width, frames, steps, guidance, seed = case
    expected = diffusers_pipes[scheduler](
        prompt, negative_prompt=negative, height=height, width=width, num_frames=frames,
        num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed), output_type="latent",
    ).frames  # fmt: skip

    record, text, transformer = stages[scheduler]
    features, mask = text.encode([prompt])
    negative_features, _ = text.encode([negative or ""])
    noise = initial_noise(record, frames, height, width, seed)
    latents = sample_latents(transformer, new_scheduler(record), features, negative_features,
                             noise, steps, guidance)

    assert latents.dtype == torch.float32
    assert latents.shape == expected.shape == (1, *latent_shape(record, frames, height, width))
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
    assert (latents - noise).abs().mean() > 0.1  # the transformer really moved the noise


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory) -> tuple:
    """A Wan 2.2 TI2V folder: (diffusers' pipeline, record, text encoder, transformer)."""
    folder = write_wan22_ti2v_pipeline(tmp_path_factory.mktemp("ti2v") / "pipe", seed=3)
    record = read_pipeline(folder)
    return (diffusers_pipeline(folder), record, load_text_encoder(record),
            load_transformer(record))


TI2V_CASES = [  # prompt, negative prompt, height, width, frames, steps, guidance, seed
    ("a red square on the grass", "blurred, low quality", 32, 64, 5, 3, 5.0, 0),
    ("a blue cat in the kitchen", None, 64, 32, 9, 2, 4.0, 5),
]


@pytest.mark.parametrize("case", TI2V_CASES, ids=lambda c: f"{c[2]}x{c[3]}x{c[4]}")
def test_wan22_ti2v_stages_give_the_pipelines_latents(case, ti2v):
    prompt, negative, height, width, frames, steps, guidance, seed = case
    pipe, record, text, transformer = ti2v
    assert record.expand_timesteps and (record.spatial_factor, record.temporal_factor) == (16, 4)
    expected = pipe(
        prompt, negative_prompt=negative, height=height, width=width, num_frames=frames,
        num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed), output_type="latent",
    ).frames  # fmt: skip
    features, _ = text.encode([prompt])
    negative_features, _ = text.encode([negative or ""])
    noise = initial_noise(record, frames, height, width, seed)
    seen = []
    hook = transformer.register_forward_pre_hook(
        lambda _, args, kw: seen.append(tuple(kw["timestep"].shape)), with_kwargs=True)
    try:
        latents = sample_latents(transformer, new_scheduler(record), features,
                                 negative_features, noise, steps, guidance,
                                 expand_timesteps=True)
    finally:
        hook.remove()
    tokens = (1 + (frames - 1) // 4) * (height // 32) * (width // 32)
    assert set(seen) == {(1, tokens)}  # one timestep per token, as WanPipeline gives it
    shape = (TI2V_CHANNELS, 1 + (frames - 1) // 4, height // 16, width // 16)
    assert latents.shape == expected.shape == (1, *shape)
    assert latent_shape(record, frames, height, width) == shape
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
    assert (latents - noise).abs().mean() > 0.1


def test_wan22_ti2v_timesteps_are_per_token(ti2v):
    """One timestep per token of the 1 x 2 x 2 patch grid; Wan 2.1's stay one per video."""
    latents, t = torch.zeros(2, 8, 3, 4, 6), torch.tensor(937.0)
    per_token = step_timestep(t, latents, expand_timesteps=True)
    assert per_token.shape == (2, 3 * 2 * 3) and per_token.dtype == torch.float32
    assert (per_token == 937.0).all()
    assert step_timestep(t, latents).shape == (2,)
    # Wan 2.2 TI2V sizes: sides multiples of 32 (16x VAE x patch 2)
    with pytest.raises(PipelineError, match="height must be a multiple of 32"):
        latent_shape(ti2v[1], 5, 48, 32)


def test_wan22_ti2v_frames_are_the_pipelines(ti2v):
    """The adapter decodes the Wan 2.2 VAE's latents (16x, patchified) to the pipeline's
    frames (output_type="np")."""
    pipe, record, text, transformer = ti2v
    kw = {"height": 32, "width": 64, "num_frames": 5, "num_inference_steps": 2}
    frames = pipe("a dog", generator=torch.Generator().manual_seed(4), output_type="np",
                  **kw).frames  # (B, T, H, W, 3) in [0, 1]
    features, _ = text.encode(["a dog"])
    empty, _ = text.encode([""])
    latents = sample_latents(transformer, new_scheduler(record), features, empty,
                             initial_noise(record, 5, 32, 64, 4), 2, 5.0, expand_timesteps=True)
    vae = load_diffusers_vae(vae_folder(record))
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (16, 4, 8)
    video = vae.decode(latents)  # (B, 3, T, H, W) in [-1, 1]
    assert frames.shape == (1, 5, 32, 64, 3)
    ours = ((video.permute(0, 2, 3, 4, 1) + 1) / 2).numpy()
    assert abs(ours - frames).max() < 1e-5
    assert frames.std() > 0.01  # not a flat picture


def test_text_features_are_the_pipelines_padded_to_512(diffusers_pipes, stages):
    _, text, _ = stages["unipc"]
    prompts = ["a red square", "  a  cat &amp;amp;\n dog ", ""]
    features, mask = text.encode(prompts)
    assert features.shape == (3, MAX_SEQUENCE_LENGTH, 32) and features.dtype == torch.float32
    assert mask.shape == (3, MAX_SEQUENCE_LENGTH) and mask.dtype == torch.bool
    # Real tokens first (their </s> included), then exact zeros to 512. The second prompt is
    # cleaned to "a cat & dog": a, cat, "▁", & (<unk>), dog, </s>.
    assert mask.sum(1).tolist() == [4, 6, 1]
    assert (features[~mask] == 0).all() and (features[mask].abs().sum(-1) > 0).all()
    assert (mask[:, :-1] >= mask[:, 1:]).all()
    for i, prompt in enumerate(prompts):
        expected, _ = diffusers_pipes["unipc"].encode_prompt(
            prompt, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
        torch.testing.assert_close(features[i : i + 1], expected.detach(), atol=1e-5, rtol=0)


def test_the_vae_adapter_decodes_the_latents_to_the_pipelines_frames(diffusers_pipes, stages):
    """The pipeline's last step (latents * std + mean, vae.decode) is the adapter's decode."""
    record, text, transformer = stages["unipc"]
    kw = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
    frames = diffusers_pipes["unipc"](
        "a dog", generator=torch.Generator().manual_seed(4), output_type="pt", **kw).frames
    features, _ = text.encode(["a dog"])
    empty, _ = text.encode([""])
    latents = sample_latents(transformer, new_scheduler(record), features, empty,
                             initial_noise(record, 5, 32, 32, 4), 2, 5.0)
    video = load_diffusers_vae(vae_folder(record)).decode(latents)  # (B, 3, T, H, W) in [-1, 1]
    assert frames.shape == (1, 5, 3, 32, 32)  # (B, T, 3, H, W) in [0, 1]
    torch.testing.assert_close((video.permute(0, 2, 1, 3, 4) + 1) / 2, frames, atol=1e-5, rtol=0)


def test_a_scheduler_is_fresh_per_video(stages):
    record, text, transformer = stages["unipc"]
    assert new_scheduler(record) is not new_scheduler(record)
    features, _ = text.encode(["a cat"])
    empty, _ = text.encode([""])
    noise = initial_noise(record, 5, 32, 32, 0)
    runs = [sample_latents(transformer, new_scheduler(record), features, empty, noise, 2, 5.0)
            for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)


def test_the_text_stage_loads_no_transformer_and_no_vae(folders, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the text stage loaded a model it does not use")

    for cls in (diffusers.WanTransformer3DModel, diffusers.AutoencoderKLWan):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
        monkeypatch.setattr(cls, "from_config", refuse)
    text = load_text_encoder(read_pipeline(folders["unipc"]))
    features, mask = text.encode(["a red square"])
    assert features.shape == (1, MAX_SEQUENCE_LENGTH, 32) and mask.sum() == 4


def test_a_bfloat16_transformer_keeps_its_float32_modules(stages):
    record, text, _ = stages["euler"]
    transformer = load_transformer(record, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    assert dtypes["patch_embedding.weight"] == torch.bfloat16 == transformer.dtype
    assert dtypes["scale_shift_table"] == torch.float32  # diffusers' _keep_in_fp32_modules
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    features, _ = text.encode(["a cat"])
    empty, _ = text.encode([""])
    latents = sample_latents(transformer, new_scheduler(record), features, empty,
                             initial_noise(record, 5, 32, 32, 0), 2, 5.0)
    assert latents.dtype == torch.float32 and latents.isfinite().all()


def test_sizes_the_pipeline_would_round_are_refused(stages):
    record = stages["unipc"][0]
    assert latent_shape(record, 81, 480, 832) == (4, 21, 60, 104)
    for frames, height, width, what in ((8, 32, 32, "frames must be 4k + 1 (e.g. 5)"),
                                        (5, 40, 32, "height must be a multiple of 16"),
                                        (5, 32, 8, "width must be a multiple of 16")):
        with pytest.raises(PipelineError, match=r"\(e\.g\.|multiple") as e:
            latent_shape(record, frames, height, width)
        assert what in str(e.value) and "\n" not in str(e.value)


# ---- folders refused in one line ------------------------------------------------------------


class Payload:
    """A pickle that, if ever unpickled, creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def edit_index(folder: Path, **changes) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


def edit_config(folder: Path, component: str, **changes) -> None:
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def pickled_text_encoder(folder: Path, marker: Path) -> None:
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))


def pickle_next_to_safetensors(folder: Path, marker: Path) -> None:
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(
        pickle.dumps(Payload(marker)))


def two_transformers(folder: Path, marker: Path) -> None:
    shutil.copytree(folder / "transformer", folder / "transformer_2")
    edit_index(folder, transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)


BAD = {  # what is done to a good folder -> what the one line says
    "unknown pipeline": (lambda f, m: edit_index(f, _class_name="WanImageToVideoPipeline"),
                         "pipeline 'WanImageToVideoPipeline' is not supported"),
    "pickle weights": (pickled_text_encoder, "text_encoder/pytorch_model.bin are pickles"),
    "pickle beside safetensors": (pickle_next_to_safetensors, "diffusion_pytorch_model.bin"),
    "two transformers": (two_transformers, "two transformers"),
    "missing component folder": (lambda f, m: shutil.rmtree(f / "vae"), "vae/ folder is missing"),
    "component left out": (lambda f, m: edit_index(f, scheduler=[None, None]),
                           "no 'scheduler' component"),
    "a component's class": (lambda f, m: edit_index(f, scheduler=["evil_lib", "Evil"]),
                            "scheduler is ['evil_lib', 'Evil']"),
    "no index": (lambda f, m: (f / "model_index.json").unlink(), "not a diffusers pipeline"),
    "expand_timesteps with another patch": (
        lambda f, m: (edit_index(f, expand_timesteps=True), edit_config(f, "transformer",
                                                                        patch_size=[1, 4, 4])),
        "expand_timesteps (Wan 2.2 TI2V) needs the transformer's patch_size [1, 2, 2]"),
    "VAE factors its layers do not give": (
        lambda f, m: edit_config(f, "vae", scale_factor_spatial=16),
        "scale_factor_temporal / _spatial (4, 16) are not what its layers compress by (4, 8)"),
    "mismatched text width": (
        lambda f, m: (f / "transformer" / "config.json").write_text(json.dumps(
            {**json.loads((f / "transformer" / "config.json").read_text()), "text_dim": 64})),
        "d_model (32) is not the transformer's text_dim (64)"),
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_folders_are_refused_in_one_line(bad, folders, tmp_path):
    folder = shutil.copytree(folders["unipc"], tmp_path / "pipe")
    marker = tmp_path / "pickle-ran"
    damage, message = BAD[bad]
    damage(folder, marker)
    with pytest.raises(PipelineError) as e:
        read_pipeline(folder)
    text = str(e.value)
    assert message in text and str(folder) in text and "\n" not in text, text
    assert not marker.exists()  # nothing from the folder was unpickled


# CogVideoXPipeline: the second family through the same seam.
COG_FOLDERS = {"ddim": ("ddim", True), "dpm": ("dpm", True), "2b": ("ddim", False)}


@pytest.fixture(scope="module")
def cogvideox(tmp_path_factory) -> dict[str, tuple]:
    """Per CogVideoX folder (5B-like DDIM / DPM with rotary embeddings, 2B-like DDIM with
    sincos positions): (diffusers' pipeline, record, text encoder, transformer)."""
    root, out = tmp_path_factory.mktemp("cogvideox"), {}
    for name, (scheduler, rotary) in COG_FOLDERS.items():
        folder = write_cogvideox_pipeline(root / name, seed=5, scheduler=scheduler,
                                          rotary=rotary)
        record = read_pipeline(folder)
        out[name] = (diffusers_cogvideox(folder), record, load_text_encoder(record),
                     load_transformer(record))
    return out


COG_CASES = [  # folder, prompt, negative prompt, height, width, frames, steps, guidance, seed
    ("ddim", "a red square on the grass", None, 32, 32, 5, 2, 6.0, 0),  # T' 2
    ("ddim", "a blue cat and a dog", "blurred, static", 48, 32, 9, 3, 6.0, 7),  # T' 3
    ("ddim", "a cat", None, 32, 48, 9, 2, 1.0, 2),  # no guidance: one pass per step
    ("dpm", "a green square in the kitchen", "static", 32, 48, 9, 3, 6.0, 1),
    ("2b", "a dog on the grass", "low quality", 48, 32, 5, 2, 6.0, 3),
]


@pytest.mark.parametrize("case", COG_CASES, ids=lambda c: f"{c[0]}-{c[3]}x{c[4]}x{c[5]}-g{c[7]}")
def test_cogvideox_stages_give_the_pipelines_latents(case, cogvideox):
    name, prompt, negative, height, width, frames, steps, guidance, seed = case
    pipe, record, text, transformer = cogvideox[name]
    expected = pipe(
        prompt, negative_prompt=negative, height=height, width=width, num_frames=frames,
        num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed), output_type="latent",
    ).frames  # fmt: skip  (B, F, C, H, W)

    features, _ = text.encode([prompt])
    negative_features, _ = text.encode([negative or ""])
    noise = initial_noise(record, frames, height, width, seed)
    latents = sample(record, transformer, new_scheduler(record), features, negative_features,
                     noise, steps, guidance, generator=step_generator(record, noise, seed))

    assert latents.dtype == torch.float32  # tubelet's layout (B, C, T', H', W')
    assert latents.shape == (1, *latent_shape(record, frames, height, width))
    torch.testing.assert_close(latents, expected.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=0)
    assert (latents - noise).abs().mean() > 0.1  # the transformer really moved the noise


def test_cogvideox_text_features_are_all_226_rows_unmasked(cogvideox):
    """CogVideoX's T5 runs without an attention mask on the padded 226 tokens and its
    transformer attends to every row, so every row is the encoder's (none zeroed), no cleaning."""
    pipe, _, text, _ = cogvideox["ddim"]
    prompts = ["a red square", "  a  cat &amp;\n dog ", ""]
    features, mask = text.encode(prompts)
    assert features.shape == (3, 226, 32) and mask.all()
    assert (features.abs().sum(-1) > 0).all()
    for i, prompt in enumerate(prompts):
        expected, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                         max_sequence_length=226)
        torch.testing.assert_close(features[i : i + 1], expected.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cogvideox_noise_is_drawn_in_the_pipelines_layout_and_dtype(cogvideox, dtype):
    """prepare_latents draws (B, F, C, H, W) in the pipeline's dtype: a bfloat16 draw is other
    numbers than a float32 one rounded, so the noise is drawn as the pipeline would draw it."""
    _, record, _, _ = cogvideox["ddim"]
    noise = initial_noise(record, 9, 32, 48, seed=3, dtype=dtype)
    generator = torch.Generator().manual_seed(3)
    expected = torch.randn((1, 3, 4, 4, 6), generator=generator, dtype=dtype)
    assert noise.dtype == torch.float32 and noise.shape == (1, 4, 3, 4, 6)
    assert torch.equal(noise, expected.permute(0, 2, 1, 3, 4).float())
    after = step_generator(record, noise, 3, dtype)  # the DPM steps' draws continue from here
    assert torch.equal(torch.randn(5, generator=after), torch.randn(5, generator=generator))


def test_cogvideox_bad_folders_are_refused_in_one_line(cogvideox, tmp_path):
    _, record, _, _ = cogvideox["ddim"]
    folder = shutil.copytree(record.folder, tmp_path / "pipe")
    edit_config(folder, "transformer", text_embed_dim=64)
    with pytest.raises(PipelineError, match="d_model \\(32\\) is not the transformer's text_dim"):
        read_pipeline(folder)
    folder = shutil.copytree(record.folder, tmp_path / "pipe2")
    edit_config(folder, "vae", latent_channels=8)
    with pytest.raises(PipelineError, match="latent_channels \\(8\\) is not"):
        read_pipeline(folder)
    with pytest.raises(PipelineError, match="frames must be 4k \\+ 1"):
        latent_shape(record, 6, 32, 32)
