"""The DiT export format, in one place: training writes it, generation reads it.

An export folder (`tubelet train` writes RUN/export):
    model.safetensors  the EMA weights: `dit.*` and, with the built-in text encoder, `text.*`
    config.json        an `ExportRecord`: format, step, the DiT's config, the text encoder's
                       record, the resolved training config (the flow's shift lives there)
    train.yaml         the training config again, as YAML (loads back with --config; JSON
                       turns the buckets' int keys into strings)

`read_export` checks the folder and gives the typed record (one `ExportError` line naming the
folder otherwise); each consumer then loads only what it uses: the sampler `load_dit` (the
`dit.*` tensors), the text stage `load_text_encoder` (the `text.*` tensors, or the pretrained
encoder folder the record names, checked against its digests). `load_exported` loads both.

Model folders of other families are told apart in `model_kind`: a diffusers pipeline folder
(`model_index.json`) is recognised there, and is where such a folder's reader plugs in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.dit import DiT, DiTConfig
from models.flow import FlowConfig
from models.text_encoder import (
    PretrainedTextEncoder,
    TextEncoder,
    TextEncoderConfig,
    load_recorded,
)

EXPORT_FORMAT = "tubelet-dit-v1"
CONFIG, WEIGHTS = "config.json", "model.safetensors"


class ExportError(ValueError):
    """A folder that is not a usable export; the message is one line naming it."""


@dataclass(frozen=True)
class ExportRecord:
    """What config.json of an export says, typed."""

    folder: Path
    step: int
    dit: DiTConfig
    # The built-in encoder's `TextEncoderConfig` fields, or a pretrained encoder's record
    # (`PretrainedTextEncoder.record()`: its folder, max_len, dtype, a sha256 per file).
    text_encoder: dict[str, Any]
    train: dict[str, Any]  # the resolved training config

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS

    @property
    def flow(self) -> FlowConfig:
        """The rectified-flow settings the model was trained with (its timestep shift)."""
        return FlowConfig(**self.train.get("flow", {}))

    @property
    def pretrained_text(self) -> bool:
        return bool(self.text_encoder.get("pretrained"))  # older exports: no key, built-in

    def text_config(self) -> TextEncoderConfig:
        if self.pretrained_text:
            return TextEncoderConfig(max_len=self.text_encoder["max_len"],
                                     pretrained=self.text_encoder["pretrained"])
        return TextEncoderConfig(**self.text_encoder)

    def to_json(self) -> dict[str, Any]:
        return {"format": EXPORT_FORMAT, "step": self.step, "dit": asdict(self.dit),
                "text_encoder": self.text_encoder, "train": self.train}


def model_kind(path: str | Path) -> str:
    """"tubelet" (an export: config.json + model.safetensors), "diffusers" (a pipeline folder
    with model_index.json, or a LoRA export of one: tubelet_lora.json, models/pipelines.py)
    or "" (neither)."""
    folder = Path(path)
    if (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file():
        return "tubelet"
    if (folder / "model_index.json").is_file() or (folder / "tubelet_lora.json").is_file():
        return "diffusers"
    return ""


def write_export(folder: str | Path, weights: dict[str, torch.Tensor], record: ExportRecord,
                 train_yaml: str) -> Path:
    """`folder/model.safetensors` (renamed into place whole), config.json and train.yaml."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
        tmp.replace(out / WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)
    (out / CONFIG).write_text(json.dumps(record.to_json(), indent=2, default=str))
    (out / "train.yaml").write_text(train_yaml)
    return out


def read_export(path: str | Path) -> ExportRecord:
    """An export folder (or its model.safetensors) -> its record. Refuses, in one line, a
    folder that is not an export, a config.json that is not this format, and a weights file
    that is not safetensors (only its header is read: nothing in it is loaded or run)."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ExportError(f"{folder}: not an exported model (needs {CONFIG} and {WEIGHTS}, "
                          "written by `tubelet train` in RUN/export)")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{folder}/{CONFIG}: not JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise ExportError(f"{folder}: format {found!r}, expected {EXPORT_FORMAT!r} (an export "
                          "of `tubelet train`)")
    try:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
        raise ExportError(f"{folder}/{WEIGHTS} is not a safetensors file ({type(e).__name__}); "
                          "exports are safetensors only, nothing in it was loaded or "
                          "run") from None
    # Exports written before activation checkpointing moved out of the model carry its old
    # switch (always false in an export); it is not a model field any more.
    dit = DiTConfig(**{k: v for k, v in config["dit"].items() if k != "grad_checkpointing"})
    record = ExportRecord(folder.resolve(), int(config.get("step", 0)), dit,
                          config["text_encoder"], config.get("train", {}))
    # The weights hold the DiT and, exactly for the built-in encoder, its text encoder.
    parts = {k.split(".", 1)[0] for k in keys}
    want = {"dit"} if record.pretrained_text else {"dit", "text"}
    if parts != want:
        raise ExportError(f"{folder}/{WEIGHTS} holds {sorted(parts)} tensors, the config says "
                          f"{sorted(want)}; re-export it with `tubelet train`")
    if not record.pretrained_text and dit.text_dim != record.text_config().dim:
        raise ExportError(f"{folder}/{CONFIG}: the DiT's text_dim ({dit.text_dim}) is not the "
                          f"text encoder's dim ({record.text_config().dim})")
    return record


def _load_part(record: ExportRecord, prefix: str, module: nn.Module) -> nn.Module:
    """`module` with the export's `prefix.*` tensors (all of them, and nothing else)."""
    from safetensors import safe_open

    with safe_open(str(record.weights), framework="pt") as f:
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    module.load_state_dict(state, strict=True)
    return module


def load_dit(record: ExportRecord, device: str | torch.device = "cpu") -> DiT:
    """The exported DiT alone (eval mode): what the sampler runs."""
    return _load_part(record, "dit.", DiT(record.dit)).to(device).eval()


def load_text_encoder(record: ExportRecord, device: str | torch.device = "cpu"
                      ) -> TextEncoder | PretrainedTextEncoder:
    """The export's text encoder alone: the built-in one's `text.*` tensors, or the
    pretrained folder the record names (checked against its digests). Both have
    `encode(captions, device) -> (features (B, L, text_dim), mask (B, L))`."""
    if record.pretrained_text:
        return load_recorded(record.text_encoder).to(device)
    return _load_part(record, "text.", TextEncoder(record.text_config())).to(device).eval()


def load_exported(path: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[DiT, TextEncoder | PretrainedTextEncoder, dict[str, Any]]:
    """An export folder (or its model.safetensors) -> (dit, text encoder, config.json)."""
    record = read_export(path)
    return load_dit(record, device), load_text_encoder(record, device), record.to_json()
