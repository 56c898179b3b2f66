"""What training keeps: the EMA of the trained module, sharded checkpoints for resume, and the
exported EMA model that `generate` loads (the format is models/export.py's).

- Checkpoints are torch distributed checkpoints (DCP): every worker writes its own shards, so
  a checkpoint costs no gather and loads back on any number of workers. They load without
  running code: DCP's own reader unpickles `.metadata` with `pickle.load` and its planner
  loads non-tensor items with `torch.load(weights_only=False)`, either of which runs whatever
  a crafted file names. `SafeReader` unpickles the metadata with an allow-list of DCP's
  metadata classes, `SafePlanner` loads items with `weights_only=True`; anything else is an
  `UntrustedCheckpointError` naming the file and the object it wanted, before it is built.
- The export (`export_ema` -> `models.export.write_export`) is plain: the full EMA weights
  and an `ExportRecord`. A pretrained text encoder's weights are not copied: its record is
  `PretrainedTextEncoder.record()` (folder, model_type, d_model, dtype, a sha256 per file),
  and generation loads it from that folder after checking.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import yaml
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from models.denoiser import Denoiser, FrozenTextSlot
from models.export import ExportRecord, write_export
from models.text_encoder import PretrainedTextEncoder


class EMA:
    """Exponential moving average of the parameters, kept in fp32 and sharded like them
    (DTensor shards under FSDP), updated on the local shards only: no communication."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay  # trained parameters only (a LoRA run: its adapters)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # frozen ones (a LoRA base, a frozen VAE encoder) are their own average
        self.frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        self.shadow = {n: p.detach().clone().float() for n, p in self.params.items()}

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    @torch.no_grad()
    def update(self) -> None:
        shadow = [self._local(self.shadow[n]) for n in self.params]
        params = [self._local(p.detach()).float() for p in self.params.values()]
        torch._foreach_lerp_(shadow, params, 1.0 - self.decay)

    def full_state(self, frozen: bool = False) -> dict[str, torch.Tensor]:
        """Unsharded EMA weights on CPU (a collective under FSDP: every rank must call it);
        `frozen`: with the frozen parameters as they are, i.e. a whole model's state."""
        tensors = {**self.shadow, **(self.frozen if frozen else {})}
        return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu()
                for n, t in tensors.items()}


class UntrustedCheckpointError(ValueError):
    """A checkpoint file asks to build an object outside what a checkpoint holds."""


# What DCP metadata pickles (torch 2.13, checked by tests/unit/test_checkpoint_safety.py): its
# metadata dataclasses, the file reader's storage records, sizes, dtypes and layouts, paths.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module in _METADATA_MODULES and not name.startswith("__")
                   or (module, name) in _METADATA_GLOBALS
                   or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise UntrustedCheckpointError(
                f"{self.where}: refused to load: it asks to build {module}.{name}, which a "
                f"checkpoint does not hold (a crafted file would run code here); nothing was "
                f"run. Use checkpoints written by tubelet train / train-vae")
        return super().find_class(module, name)


def read_safe_metadata(path: Path) -> Metadata:
    """A DCP `.metadata` file, unpickled with the allow-list (or UntrustedCheckpointError)."""
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, str(path)).load()
        except UntrustedCheckpointError:
            raise
        except Exception as e:  # truncated or not a pickle at all
            raise UntrustedCheckpointError(f"{path}: not a DCP metadata file ({e})") from None
    if not isinstance(metadata, Metadata):
        raise UntrustedCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP "
                                       f"metadata")
    return metadata


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read by `read_safe_metadata` (tensor shards are
    already read with `torch.load(weights_only=True)` by DCP itself)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = read_safe_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(dcp.DefaultLoadPlanner):
    """DCP's load planner with non-tensor items (the `train` dict, optimizer hyperparameters)
    loaded by `torch.load(weights_only=True)`: plain containers and numbers only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UntrustedCheckpointError(
                f"checkpoint item {read_item.dest_index.fqn}: refused to load ({e}); "
                f"nothing was run") from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:  # as the parent does, with the object loaded safely
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _options(model: nn.Module) -> StateDictOptions:
    """Frozen weights (a LoRA run's base model) are not checkpointed: they are the pretrained
    folder's, loaded again at every start."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _state(model: nn.Module, optim: torch.optim.Optimizer, ema: EMA, train: dict) -> dict:
    model_sd, optim_sd = get_state_dict(model, optim, options=_options(model))
    return {"model": model_sd, "optim": optim_sd, "ema": ema.shadow, "train": dict(train)}


def save_checkpoint(path: Path, model: nn.Module, optim: torch.optim.Optimizer, ema: EMA,
                    train: dict[str, Any], resolved: dict[str, Any]) -> None:
    """Every rank writes its shards under `path` (a folder per rank is fine: DCP names files
    by rank and rank 0 writes the metadata, so the folders merge into one checkpoint). Rank 0
    adds the resolved run config (`config.yaml`, loadable with --config) and `train.json`."""
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(_state(model, optim, ema, train), checkpoint_id=str(path))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (path / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (path / "train.json").write_text(json.dumps(train))


def load_checkpoint(path: Path, model: nn.Module, optim: torch.optim.Optimizer,
                    ema: EMA) -> dict[str, Any]:
    """Load a `save_checkpoint` folder in place; returns its `train` dict (step, ...)."""
    state = _state(model, optim, ema, {"step": 0, "data_fingerprint": "", "world_size": 0})
    read_safe_metadata(path / ".metadata")  # a refusal as one clear error, before DCP starts
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())
    except CheckpointException as e:  # DCP wraps every rank's error; surface a refusal as is
        refused = [line for line in str(e).splitlines() if "refused to load" in line]
        if refused:
            raise UntrustedCheckpointError(refused[-1].split("UntrustedCheckpointError: ")[-1]
                                           .strip()) from None
        raise
    set_state_dict(model, optim, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=_options(model))
    return state["train"]


def export_ema(out: Path, ema: EMA, model: Denoiser, train_config: dict[str, Any],
               step: int, pretrained: PretrainedTextEncoder | None = None) -> Path | None:
    """Write `out/model.safetensors` + `out/config.json` from rank 0 (all ranks must call).
    `pretrained`: the frozen text encoder the model was trained with (outside `model`)."""
    weights = ema.full_state()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    if (pretrained is not None) != isinstance(model.text, FrozenTextSlot):
        raise ValueError("export_ema: pass the pretrained text encoder exactly when the model "
                         "was built for one")
    text = pretrained.record() if pretrained is not None else asdict(model.text.config)
    # JSON turns int mapping keys (bucket frame counts) into strings; the YAML copy is exact
    # and loads back with --config.
    record = ExportRecord(out, step, model.dit.config, text, train_config)
    return write_export(out, weights, record, yaml.safe_dump(train_config, sort_keys=False))
