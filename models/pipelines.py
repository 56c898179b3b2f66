"""A diffusers pipeline folder, in one place: `tubelet generate --checkpoint FOLDER` reads it.

A pipeline folder (`DiffusionPipeline.save_pretrained`; supported families: `WanPipeline`, Wan
2.1 text-to-video and Wan 2.2 TI2V-5B in text-to-video mode; `CogVideoXPipeline`, CogVideoX
2B / 5B text-to-video, whose own pieces are models/cogvideox_pipeline.py):
    model_index.json   the pipeline class and, per component, [library, class]
    tokenizer/ text_encoder/ transformer/ vae/ scheduler/   one folder per component

`read_pipeline` checks the folder from its JSON files alone (nothing in it is imported,
unpickled or run; weights must be safetensors) and gives the typed record, or one
`PipelineError` line naming the folder and what to do. Each stage then loads only what it
uses: the text stage `load_text_encoder` (tokenizer + encoder), the sampler `load_transformer`
and `new_scheduler`, the VAE stage `vae_folder` (models/vae_adapters.py loads it and owns the
latents' normalisation). `sample` runs the family's denoising loop (models/wan_pipeline.py
`sample_latents`, models/cogvideox_pipeline.py `sample_cogvideox`), step for step, so the
stages together give the latents `WanPipeline(..., output_type="latent")` (or
CogVideoXPipeline's, permuted to (C, T', H', W')) gives. What differs per family is one
`Family` record (`FAMILIES`): its components, its text length and masking, its latents'
layout.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.cogvideox_pipeline import MAX_SEQUENCE_LENGTH as COGVIDEOX_TEXT_LENGTH
from models.cogvideox_pipeline import sample_cogvideox
from models.safety import PICKLED
from models.vae_adapters import wan_factors
from models.wan_pipeline import NoisePredictor, prompt_clean, sample_latents

INDEX = "model_index.json"
MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default: every prompt is padded to it

# Component -> (library, the classes we load it as). Names are checked against these before
# any class is looked up, so a folder cannot name code for us to import.
WAN_COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tokenizer": ("transformers", ("T5Tokenizer", "T5TokenizerFast", "PreTrainedTokenizerFast")),
    "text_encoder": ("transformers", ("UMT5EncoderModel", "T5EncoderModel")),
    "transformer": ("diffusers", ("WanTransformer3DModel",)),
    "vae": ("diffusers", ("AutoencoderKLWan",)),
    "scheduler": ("diffusers", ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler",
                                "DPMSolverMultistepScheduler")),
}
COGVIDEOX_COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tokenizer": ("transformers", ("T5Tokenizer", "T5TokenizerFast")),
    "text_encoder": ("transformers", ("T5EncoderModel",)),
    "transformer": ("diffusers", ("CogVideoXTransformer3DModel",)),
    "vae": ("diffusers", ("AutoencoderKLCogVideoX",)),
    "scheduler": ("diffusers", ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")),
}


@dataclass(frozen=True)
class Family:
    """What one pipeline class needs that another does not."""

    components: dict[str, tuple[str, tuple[str, ...]]]
    text_length: int  # every prompt is padded to it
    # Wan: prompts cleaned, the encoder masked, features zero after the real tokens;
    # CogVideoX: raw prompts, no mask, all text_length rows are the encoder's output
    masked_text: bool
    frames_first: bool  # the pipeline's latents are (B, F, C, H, W), not (B, C, F, H, W)
    text_dim_key: str  # the transformer config's text width
    parallel: bool  # sequence / CFG parallel samplers (actors/workers/pipeline_parallel.py)


FAMILIES = {
    "WanPipeline": Family(WAN_COMPONENTS, MAX_SEQUENCE_LENGTH, masked_text=True,
                          frames_first=False, text_dim_key="text_dim", parallel=True),
    "CogVideoXPipeline": Family(COGVIDEOX_COMPONENTS, COGVIDEOX_TEXT_LENGTH, masked_text=False,
                                frames_first=True, text_dim_key="text_embed_dim",
                                parallel=False),
}
SUPPORTED = {name: f.components for name, f in FAMILIES.items()}
WEIGHTED = ("text_encoder", "transformer", "vae")  # the components with weights files
CONFIG_FILE = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}


LORA_RECORD = "tubelet_lora.json"  # a LoRA export: its base folder, digest and settings
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name


class PipelineError(ValueError):
    """A folder that is not a usable pipeline; the message is one line naming it."""


@dataclass(frozen=True)
class PipelineRecord:
    """What a pipeline folder's JSON files say, typed and checked."""

    folder: Path
    pipeline: str  # model_index.json's _class_name
    components: dict[str, str]  # component -> class
    configs: dict[str, dict[str, Any]]  # component -> its config JSON
    # model_index.json's expand_timesteps (Wan 2.2 TI2V): the transformer is given one
    # timestep per token (B, N) instead of one per video (B,)
    expand_timesteps: bool = False
    # A LoRA export of `tubelet train --lora` (models/finetune.py): `folder` is its base
    # pipeline, `lora` the adapter weights (diffusers' LoRA format) applied to the transformer,
    # `source` the export folder the user named (what travels to the sampler ranks).
    lora: Path | None = None
    source: Path | None = None

    def path(self, component: str) -> Path:
        return self.folder / component

    @property
    def given(self) -> Path:
        """The folder this record was read from (a LoRA export, else the pipeline folder)."""
        return self.source or self.folder

    @property
    def family(self) -> Family:
        return FAMILIES[self.pipeline]

    @property
    def cogvideox(self) -> bool:
        return self.pipeline == "CogVideoXPipeline"

    @property
    def latent_channels(self) -> int:
        return int(self.configs["transformer"]["in_channels"])

    @property
    def temporal_factor(self) -> int:
        if self.cogvideox:  # CogVideoXPipeline.__init__'s vae_scale_factor_temporal
            return int(self.configs["vae"].get("temporal_compression_ratio") or 4)
        # WanPipeline reads vae.config.scale_factor_*; AutoencoderKLWan's defaults are 4 and 8
        # (Wan 2.1 folders saved before those keys existed leave them out).
        return int(self.configs["vae"].get("scale_factor_temporal") or 4)

    @property
    def spatial_factor(self) -> int:
        if self.cogvideox:
            return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)
        return int(self.configs["vae"].get("scale_factor_spatial") or 8)

    @property
    def text_dim(self) -> int:
        return int(self.configs["transformer"][self.family.text_dim_key])

    @property
    def patch(self) -> tuple[int, int, int]:
        """The transformer's (pt, ph, pw); CogVideoX 1.0 has no temporal patch (1)."""
        config = self.configs["transformer"]
        if self.cogvideox:
            p = int(config.get("patch_size") or 2)
            return (int(config.get("patch_size_t") or 1), p, p)
        pt, ph, pw = config.get("patch_size") or [1, 2, 2]
        return (int(pt), int(ph), int(pw))


def _json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{folder}: {path.relative_to(folder)} is missing; re-save the "
                            "pipeline with save_pretrained") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: not a JSON object")
    return data


def _check_weights(folder: Path, component: str) -> None:
    """Safetensors only: a pickle anywhere in a component is refused (unread), so nothing
    loaded from the folder can run code; a weighted component needs *.safetensors."""
    files = [p for p in (folder / component).rglob("*") if p.is_file()]
    pickled = sorted(str(p.relative_to(folder)) for p in files if p.suffix in PICKLED)
    if pickled:
        raise PipelineError(
            f"{folder}: {', '.join(pickled)} are pickles, which can run code when loaded, so "
            "the folder is refused (nothing was loaded); keep only the *.safetensors weights, "
            "or convert once where you trust them (save_pretrained(..., "
            "safe_serialization=True))")
    if component in WEIGHTED and not any(p.suffix == ".safetensors" for p in files):
        raise PipelineError(f"{folder}: {component}/ has no *.safetensors weights; save the "
                            "pipeline with save_pretrained(..., safe_serialization=True)")


def read_pipeline(path: str | Path) -> PipelineRecord:
    """A diffusers pipeline folder -> its record, from JSON alone. Refuses, in one line, an
    unsupported pipeline or component class, a second transformer (Wan 2.2 A14B), a missing
    component, weights that are not safetensors, and components that do not fit together.
    A LoRA export (`LORA_RECORD`, written by `tubelet train --lora`) is its base pipeline's
    record with the adapter weights attached (`read_lora_export`)."""
    folder = Path(path).resolve()
    if not (folder / INDEX).is_file() and (folder / LORA_RECORD).is_file():
        return read_lora_export(folder)
    if not (folder / INDEX).is_file():
        raise PipelineError(f"{folder}: not a diffusers pipeline folder (needs {INDEX}, written "
                            "by DiffusionPipeline.save_pretrained)")
    index = _json(folder / INDEX, folder)
    name = index.get("_class_name")
    if name not in SUPPORTED:
        raise PipelineError(f"{folder}: pipeline {name!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED)} (Wan 2.1, Wan 2.2 TI2V, CogVideoX 2B / 5B "
                            "text-to-video)")
    second = index.get("transformer_2")
    if (isinstance(second, list) and second[:1] != [None]) or index.get("boundary_ratio"):
        raise PipelineError(f"{folder}: two transformers (transformer_2 / boundary_ratio: Wan 2.2 "
                            "A14B) are not supported yet; use a single-transformer Wan folder")
    wanted = SUPPORTED[name]
    components, configs = {}, {}
    for component, (library, classes) in wanted.items():
        entry = index.get(component)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            raise PipelineError(f"{folder}/{INDEX}: no {component!r} component; a {name} needs "
                                f"{', '.join(wanted)}")
        if tuple(entry) not in {(library, c) for c in classes}:
            raise PipelineError(f"{folder}/{INDEX}: {component} is {entry}, supported: "
                                f"{library} {', '.join(classes)}")
        if not (folder / component).is_dir():
            raise PipelineError(f"{folder}: the {component}/ folder is missing (model_index.json "
                                "names it); copy the whole pipeline folder")
        _check_weights(folder, component)
        file = folder / component / CONFIG_FILE.get(component, "config.json")
        config = _json(file, folder)
        saved = config.get("_class_name")
        if library == "diffusers" and saved != entry[1]:
            raise PipelineError(f"{file}: class {saved!r}, model_index.json says {entry[1]!r}")
        components[component], configs[component] = entry[1], config
    expand = bool(index.get("expand_timesteps"))
    patch = configs["transformer"].get("patch_size")
    # WanPipeline's per-token mask is strided by 2 x 2
    if expand and list(patch or [1, 2, 2]) != [1, 2, 2]:
        raise PipelineError(f"{folder}: expand_timesteps (Wan 2.2 TI2V) needs the transformer's "
                            f"patch_size [1, 2, 2], got {patch}")
    record = PipelineRecord(folder, name, components, configs, expand)
    d_model = configs["text_encoder"].get("d_model")
    if d_model != record.text_dim:
        raise PipelineError(f"{folder}: the text encoder's d_model ({d_model}) is not the "
                            f"transformer's text_dim ({record.text_dim})")
    z_key = "latent_channels" if record.cogvideox else "z_dim"
    if configs["vae"].get(z_key) != record.latent_channels:
        raise PipelineError(f"{folder}: the VAE's {z_key} ({configs['vae'].get(z_key)}) is not "
                            f"the transformer's in_channels ({record.latent_channels})")
    if record.cogvideox:
        return record
    layers = wan_factors(configs["vae"])
    if (record.temporal_factor, record.spatial_factor) != layers:
        raise PipelineError(f"{folder}/vae: scale_factor_temporal / _spatial "
                            f"({record.temporal_factor}, {record.spatial_factor}) are not what its "
                            f"layers compress by {layers}; fix vae/config.json")
    return record


def read_lora_export(folder: Path) -> PipelineRecord:
    """A LoRA export -> its base pipeline's record with `lora` (the adapter file) and `source`
    set. The base must still be the folder it was trained on (same `base_digest`)."""
    record = _json(folder / LORA_RECORD, folder)
    base = Path(str(record.get("base", "")))
    if not (folder / LORA_WEIGHTS).is_file():
        raise PipelineError(f"{folder}: {LORA_WEIGHTS} is missing; the LoRA export is "
                            "incomplete (rerun the export or the training)")
    try:
        parent = read_pipeline(base)
    except PipelineError as e:
        raise PipelineError(f"{folder}: the LoRA's base pipeline cannot be read ({e}); put "
                            f"the base folder back at {base}") from None
    if parent.lora is not None:
        raise PipelineError(f"{folder}: its base {base} is itself a LoRA export")
    digest = base_digest(parent)
    if record.get("base_digest") not in (None, digest):
        raise PipelineError(f"{folder}: its base pipeline {base} changed since training "
                            f"(digest {digest}, trained on {record['base_digest']}); put the "
                            "original base back or fine-tune again")
    return dataclasses.replace(parent, lora=folder / LORA_WEIGHTS, source=folder)


def apply_lora(record: PipelineRecord, transformer: torch.nn.Module) -> None:
    """The record's LoRA adapter loaded into `transformer` as the family pipeline's
    `load_lora_weights` loads it (its `lora_state_dict`, then `load_lora_into_transformer`,
    with the saved adapter metadata: rank, alpha, targets), unfused."""
    if record.lora is None:
        return
    pipeline = getattr(_library("diffusers"), record.pipeline)
    state, metadata = pipeline.lora_state_dict(str(record.lora.parent),
                                               weight_name=record.lora.name,
                                               return_lora_metadata=True)
    pipeline.load_lora_into_transformer(state, transformer=transformer, metadata=metadata)


def _library(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as e:
        raise ImportError(f"a diffusers pipeline folder needs {name}: pip install "
                          "'tubelet[bench]'") from e


class PipelineTextEncoder:
    """A pipeline's tokenizer and text encoder, giving what WanPipeline.encode_prompt gives."""

    def __init__(self, tokenizer: Any, model: torch.nn.Module, max_len: int,
                 masked: bool = True) -> None:
        self.tokenizer, self.model, self.max_len = tokenizer, model.eval(), max_len
        self.masked = masked  # False: CogVideoXPipeline's _get_t5_prompt_embeds
        self.out_dim = int(model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """features (B, max_len, D) float32 and mask (B, max_len) bool, True on a prompt's
        tokens (its </s> included). Features are the encoder's output on the tokens and exactly
        zero after them: WanPipeline cuts each row to its length and pads it back with zeros,
        and its transformer attends to all max_len rows, zeros included.
        Unmasked (CogVideoX): the prompts as given, the encoder run on all max_len tokens
        without an attention mask; every row is its output, so the mask is all True."""
        tok = self.tokenizer(
            [prompt_clean(p) if self.masked else p for p in prompts], padding="max_length",
            max_length=self.max_len, truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="pt",
        )  # fmt: skip
        device = next(self.model.parameters()).device
        ids, attention = tok.input_ids.to(device), tok.attention_mask.to(device)
        if not self.masked:
            hidden = self.model(ids).last_hidden_state  # (B, L, D)
            return hidden.float(), torch.ones(hidden.shape[:2], dtype=torch.bool, device=device)
        hidden = self.model(ids, attention).last_hidden_state  # (B, L, D)
        lengths = attention.gt(0).sum(1)  # (B,)
        mask = torch.arange(hidden.shape[1], device=device)[None] < lengths[:, None]  # (B, L)
        return torch.where(mask[..., None], hidden, 0.0).float(), mask


def _dtype_kwargs(transformers: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers renamed `torch_dtype` to `dtype` in 4.56 (diffusers passes it the same way)."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_text_encoder(record: PipelineRecord, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32,
                      max_len: int | None = None) -> PipelineTextEncoder:
    """The tokenizer and text encoder alone (no transformer, no VAE): what the text stage runs."""
    transformers = _library("transformers")
    transformers.utils.logging.disable_progress_bar()  # a bar per actor start is log noise
    tokenizer = getattr(transformers, record.components["tokenizer"]).from_pretrained(
        record.path("tokenizer"), local_files_only=True)
    model = getattr(transformers, record.components["text_encoder"]).from_pretrained(
        record.path("text_encoder"), local_files_only=True, use_safetensors=True,
        **_dtype_kwargs(transformers, dtype))
    family = record.family
    return PipelineTextEncoder(tokenizer, model.to(device).requires_grad_(False),
                               max_len or family.text_length, family.masked_text)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _safetensors_files(folder: Path, weights: str) -> list[Path]:
    """`weights`, or the shards its `.index.json` lists (diffusers' own file names)."""
    index = folder / f"{weights}.index.json"
    if index.is_file():
        shards = sorted(set(_json(index, folder.parent)["weight_map"].values()))
        return [folder / s for s in shards]
    if not (folder / weights).is_file():
        raise PipelineError(f"{folder}: no {weights} (or its .index.json); re-save the pipeline")
    return [folder / weights]


def load_transformer(record: PipelineRecord, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The denoising transformer alone (eval mode), loaded as diffusers' from_pretrained loads
    it: built without init in `dtype`, the modules its class keeps in float32
    (`_keep_in_fp32_modules`) in float32, then every tensor of the safetensors weights, strictly.
    (Done here because from_pretrained needs `accelerate` for a class that keeps modules in
    float32; this path needs nothing but diffusers and safetensors.)"""
    from safetensors.torch import load_file

    diffusers = _library("diffusers")
    cls = getattr(diffusers, record.components["transformer"])
    try:  # what from_pretrained builds under: the weights are overwritten, skip their init
        from diffusers.models.modeling_utils import no_init_weights as skip_init
    except ImportError:
        skip_init = nullcontext
    with _default_dtype(dtype), skip_init():
        model = cls.from_config(record.configs["transformer"])
    keep = cls._keep_in_fp32_modules or []
    for name, param in model.named_parameters():
        if any(m in name.split(".") for m in keep):
            param.data = param.data.float()
    state: dict[str, Tensor] = {}
    for file in _safetensors_files(record.path("transformer"),
                                   "diffusion_pytorch_model.safetensors"):
        state.update(load_file(str(file)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        why = " ".join(str(e).split())[:300]
        raise PipelineError(f"{record.folder}/transformer: weights do not fit its config.json "
                            f"({why})") from None
    apply_lora(record, model)
    return model.to(device).eval().requires_grad_(False)


def new_scheduler(record: PipelineRecord) -> Any:
    """A fresh scheduler from the folder's config: multistep schedulers keep state, so every
    sampling run (every video) gets its own."""
    diffusers = _library("diffusers")
    return getattr(diffusers, record.components["scheduler"]).from_config(
        record.configs["scheduler"])


def vae_folder(record: PipelineRecord) -> Path:
    """The VAE's folder, for models/vae_adapters.py:load_diffusers_vae (which un-normalises
    the latents with latents_mean / latents_std before decoding, as the pipeline does)."""
    return record.path("vae")


def latent_shape(record: PipelineRecord, frames: int, height: int,
                 width: int) -> tuple[int, int, int, int]:
    """(C, T', H', W') of a video's latents: T' = 1 + (frames - 1) // 4, H' = height // 8
    (// 16 with Wan 2.2's VAE: the VAE config's scale_factor_*).
    Sizes the pipeline would round (frames not 4k + 1, sides not multiples of 16 or of a patch
    of latents; CogVideoX 1.5: T' not a multiple of its temporal patch, which the pipeline pads
    with extra noise frames) are refused in one line, so every video is exactly the size
    asked for."""
    t, s = record.temporal_factor, record.spatial_factor
    pt, ph, pw = record.patch
    if frames < 1 or (frames - 1) % t:
        raise PipelineError(f"{record.folder}: frames must be {t}k + 1 (e.g. "
                            f"{max(1, (frames - 1) // t * t + 1)}), got {frames}")
    if record.cogvideox and (1 + (frames - 1) // t) % pt:
        raise PipelineError(f"{record.folder}: frames must give a multiple of {pt} latent "
                            f"frames (frames = {t * pt}k + {t + 1}), got {frames}")
    for side, n, p in (("height", height, ph), ("width", width, pw)):
        multiple = max(16, s * p)
        if n < multiple or n % multiple:
            raise PipelineError(f"{record.folder}: {side} must be a multiple of {multiple} "
                                f"(e.g. {max(multiple, n // multiple * multiple)}), got {n}")
    return (record.latent_channels, 1 + (frames - 1) // t, height // s, width // s)


def pipeline_noise(record: PipelineRecord, shape: tuple[int, ...] | torch.Size, seed: int,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, torch.Generator]:
    """(noise, generator): the noise of `shape` (1, C, T', H', W') as the pipeline's
    prepare_latents draws it with `generator=torch.Generator().manual_seed(seed)` (on the CPU;
    CogVideoX in its (1, T', C, H', W') layout and in the pipeline's dtype, `dtype`: a bfloat16
    draw is not a float32 draw rounded), as float32 (1, C, T', H', W'); and the generator
    after it, as the pipeline's loop finds it (CogVideoXDPMScheduler draws at every step)."""
    generator = torch.Generator().manual_seed(seed)
    if not record.family.frames_first:  # WanPipeline draws float32 whatever its dtype
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32), generator
    b, c, f, h, w = shape
    noise = torch.randn((b, f, c, h, w), generator=generator, dtype=dtype)
    return noise.permute(0, 2, 1, 3, 4).float(), generator


def initial_noise(record: PipelineRecord, frames: int, height: int, width: int, seed: int,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                  ) -> Tensor:
    """The noise (1, C, T', H', W') float32 the pipeline draws for a video (`pipeline_noise`;
    `dtype`: the pipeline's, which only CogVideoX draws in), moved to `device`."""
    shape = (1, *latent_shape(record, frames, height, width))
    return pipeline_noise(record, shape, seed, dtype)[0].to(device)


def step_generator(record: PipelineRecord, noise: Tensor, seed: int,
                   dtype: torch.dtype = torch.float32) -> torch.Generator:
    """The pipeline's generator after drawing `noise` (`pipeline_noise`)."""
    return pipeline_noise(record, noise.shape, seed, dtype)[1]


def sample(record: PipelineRecord, transformer: torch.nn.Module, scheduler: Any,
           prompt_embeds: Tensor, negative_embeds: Tensor | None, latents: Tensor, steps: int,
           guidance_scale: float, predict: NoisePredictor | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """The family's denoising loop on (B, C, T', H', W') noise: `sample_latents` (Wan, with
    the record's expand_timesteps) or `sample_cogvideox` (`generator`: `step_generator`'s;
    no `predict`: its sampler runs on one rank)."""
    if record.cogvideox:
        if predict is not None:
            raise ValueError("CogVideoXPipeline folders sample on one rank (no predict)")
        return sample_cogvideox(transformer, scheduler, prompt_embeds, negative_embeds, latents,
                                steps, guidance_scale, generator)
    return sample_latents(transformer, scheduler, prompt_embeds, negative_embeds, latents, steps,
                          guidance_scale, predict=predict,
                          expand_timesteps=record.expand_timesteps)


def pipeline_digest(record: PipelineRecord) -> str:
    """A digest of the folder that reads no weights: model_index.json, every component's config
    JSON, and each safetensors file's name, size and header (its tensor names, dtypes, shapes
    and offsets). A 60 GB folder is identified in milliseconds; weights rewritten in place with
    the same header would not change it (their mtimes are not hashed, so a copy of the folder
    keeps its digest)."""
    import hashlib

    h = hashlib.sha256((record.folder / INDEX).read_bytes())
    for component in sorted(record.components):
        _hash_component(h, record, component)
    if record.lora is not None:  # a LoRA export: its adapter (megabytes) in full
        h.update(record.lora.read_bytes())
    return h.hexdigest()[:16]


def _hash_component(h: Any, record: PipelineRecord, component: str) -> None:
    """A component's config JSON and each of its safetensors files' name, size and header."""
    import struct

    h.update(json.dumps(record.configs[component], sort_keys=True).encode())
    for file in sorted((record.folder / component).rglob("*.safetensors")):
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            h.update(f"{file.relative_to(record.folder)}|{file.stat().st_size}|".encode())
            h.update(f.read(min(size, 100 << 20)))


def base_digest(record: PipelineRecord) -> str:
    """What a fine-tune records of its base folder: `pipeline_digest` plus sampled weight
    values of its transformer (`_hash_samples`), so a base rewritten with other weights of
    the same shapes no longer passes for the one a LoRA was trained on."""
    import hashlib

    h = hashlib.sha256(pipeline_digest(record).encode())
    for file in sorted(record.path("transformer").rglob("*.safetensors")):
        _hash_samples(h, file)
    return h.hexdigest()[:16]


def _hash_samples(h: Any, file: Path, count: int = 256, size: int = 4096) -> None:
    """`count` blocks of `size` bytes at evenly spaced offsets of `file` (all of a small one)."""
    total = file.stat().st_size
    with file.open("rb") as f:
        if total <= count * size:
            h.update(f.read())
            return
        for i in range(count):
            f.seek(i * (total - size) // (count - 1))
            h.update(f.read(size))


def text_encoder_id(record: PipelineRecord) -> str:
    """Which encoder made a caption's features: `<class>:<digest>` of the pipeline's tokenizer
    (every file) and text encoder (config, weight headers, 1 MB of sampled weight bytes per
    file) and its text length. A latent dataset records
    it per row; fine-tuning refuses features whose id is not the pipeline's own."""
    import hashlib

    h = hashlib.sha256(f"{record.pipeline}|{record.family.text_length}".encode())
    for component in ("tokenizer", "text_encoder"):
        _hash_component(h, record, component)
    for file in sorted(p for p in record.path("tokenizer").rglob("*") if p.is_file()):
        h.update(file.name.encode() + file.read_bytes())  # the vocabulary (a few MB)
    # the weights' values too, sampled (headers alone do not tell two checkpoints of one
    # architecture apart; reading all of UMT5-XXL's 11 GB would cost a minute per start)
    for file in sorted(record.path("text_encoder").rglob("*.safetensors")):
        _hash_samples(h, file)
    return f"{record.components['text_encoder']}:{h.hexdigest()[:16]}"
