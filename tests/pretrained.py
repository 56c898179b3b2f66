"""Small diffusers pipeline folders on disk, built here with random weights (nothing is
downloaded): what `models/pipelines.py` reads and what its tests run diffusers against."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import transformers

from tests.unit.test_vae_adapters import tiny_cogvideox, tiny_wan, tiny_wan22

# The tiny tokenizer's words; anything else falls back to letters (or <unk>), as UMT5's does.
WORDS = ("a red green blue square cat dog on the grass in kitchen bright tones overexposed "
         "static blurred low quality").split()


def tiny_umt5_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A Unigram tokenizer laid out like UMT5's (<pad> 0, </s> 1, <unk> 2, "▁word" pieces,
    every caption ended with </s>) from a word list and the letters a-z."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_wan_parts(seed: int = 0) -> dict[str, object]:
    """WanPipeline's components at a seeded random init: a 2-layer UMT5 encoder (d_model 32),
    a 2-layer Wan transformer (2 heads x 12) on the 4-channel tiny Wan VAE."""
    torch.manual_seed(seed)
    tokenizer = tiny_umt5_tokenizer()
    text = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=64, d_model=32, d_kv=16, num_heads=2, num_layers=2, d_ff=64,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
    )).eval()  # fmt: skip
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip
    return {"tokenizer": tokenizer, "text_encoder": text, "transformer": transformer,
            "vae": tiny_wan().eval()}


def wan_scheduler(scheduler: str = "unipc", flow_shift: float = 3.0) -> object:
    """The scheduler of Wan 2.1's published folders (UniPC on flow sigmas), or flow Euler."""
    if scheduler == "euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    if scheduler == "unipc":
        return diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
            num_train_timesteps=1000, solver_order=2, predict_x0=True, solver_type="bh2",
            lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace",
        )  # fmt: skip
    raise ValueError(f"scheduler {scheduler!r}: 'unipc' or 'euler'")


def write_wan_pipeline(folder: Path, seed: int = 0, scheduler: str = "unipc") -> Path:
    """A tiny random Wan 2.1 text-to-video `WanPipeline`, saved with `save_pretrained` as
    safetensors (model_index.json + tokenizer/, text_encoder/, transformer/, vae/,
    scheduler/)."""
    pipe = diffusers.WanPipeline(scheduler=wan_scheduler(scheduler), **tiny_wan_parts(seed))
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


TI2V_CHANNELS = 8  # Wan 2.2's VAE has z_dim 48; 8 keeps the tiny one fast (tiny_wan22)


def write_wan22_ti2v_pipeline(folder: Path, seed: int = 0, scheduler: str = "unipc") -> Path:
    """A tiny random Wan 2.2 TI2V-5B `WanPipeline` (text-to-video: `expand_timesteps`, one
    transformer, the Wan 2.2 VAE at 4x16x16), saved with `save_pretrained` as safetensors."""
    parts = tiny_wan_parts(seed)
    parts["transformer"] = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=TI2V_CHANNELS, out_channels=TI2V_CHANNELS, text_dim=32, freq_dim=32,
        ffn_dim=48, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip
    parts["vae"] = tiny_wan22(TI2V_CHANNELS).eval()
    pipe = diffusers.WanPipeline(scheduler=wan_scheduler(scheduler), expand_timesteps=True,
                                 **parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def diffusers_pipeline(folder: Path):
    """diffusers' own `WanPipeline.from_pretrained(folder)`, the reference the tests compare
    with. Without accelerate, from_pretrained refuses any class that keeps modules in float32;
    in float32 that list changes nothing, so it is emptied for the load."""
    import importlib.util

    import diffusers
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("accelerate") is None:
            mp.setattr(diffusers.WanTransformer3DModel, "_keep_in_fp32_modules", None)
        pipe = diffusers.WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cogvideox_parts(seed: int = 0, rotary: bool = True) -> dict[str, object]:
    """CogVideoXPipeline's components at a seeded random init: a 2-layer T5 encoder (d_model
    32), a 2-layer CogVideoX transformer (2 heads x 16; rotary embeddings as CogVideoX 5B, or
    sincos positions as 2B) on the 4-channel tiny CogVideoX VAE (0.7 scaling, as 5B)."""
    torch.manual_seed(seed)
    text = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=16, num_heads=2, num_layers=2, d_ff=64,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
    )).eval()  # fmt: skip
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=8, sample_height=6,
        sample_frames=9, patch_size=2, max_text_seq_length=226,
        use_rotary_positional_embeddings=rotary,
    ).eval()  # fmt: skip
    # tiny_umt5_tokenizer is a T5TokenizerFast: </s>-ended, <pad>-padded, as CogVideoX's T5
    return {"tokenizer": tiny_umt5_tokenizer(), "text_encoder": text, "transformer": transformer,
            "vae": tiny_cogvideox().eval()}


def cogvideox_scheduler(scheduler: str = "ddim") -> object:
    """CogVideoX 5B's published scheduler settings (v-prediction, zero-SNR, trailing)."""
    cls = {"ddim": diffusers.CogVideoXDDIMScheduler, "dpm": diffusers.CogVideoXDPMScheduler}
    return cls[scheduler](
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        set_alpha_to_one=True, snr_shift_scale=1.0, steps_offset=0, timestep_spacing="trailing",
    )  # fmt: skip


def write_cogvideox_pipeline(folder: Path, seed: int = 0, scheduler: str = "ddim",
                             rotary: bool = True) -> Path:
    """A tiny random CogVideoX text-to-video `CogVideoXPipeline`, saved with `save_pretrained`
    as safetensors."""
    pipe = diffusers.CogVideoXPipeline(scheduler=cogvideox_scheduler(scheduler),
                                       **tiny_cogvideox_parts(seed, rotary))
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def diffusers_cogvideox(folder: Path):
    """diffusers' own `CogVideoXPipeline.from_pretrained(folder)`."""
    pipe = diffusers.CogVideoXPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_caption_latents(folder: Path, out: Path, **kwargs) -> Path:
    """A small latent dataset (tests/unit/test_train_data.py `write_latents`: 4 channels,
    three buckets) with each caption's features from the pipeline `folder`'s own text encoder,
    added by the caption encode stage itself (actors/caption_encode.py), as `preprocess
    --model folder` writes them."""
    import pyarrow.parquet as pq

    from actors.caption_encode import CaptionEncodeStage
    from actors.common.schema import LATENT_COLUMNS, TEXT_COLUMNS
    from tests.unit.test_train_data import write_latents

    plain = write_latents(out.with_name(out.name + "-plain"), **kwargs)
    stage = CaptionEncodeStage(str(folder))
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(plain.glob("*.parquet")):
        table = stage(pq.read_table(file)).select(LATENT_COLUMNS + TEXT_COLUMNS)
        pq.write_table(table, out / file.name, row_group_size=2)
    return out
