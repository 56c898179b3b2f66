"""Pretrained folders load weights from safetensors only.

`*.bin`, `*.pt`, `*.pth` and `*.ckpt` weights are pickles: loading one (diffusers' and
transformers' fallback when no safetensors file is there) can run whatever its author put in
it. A folder with only those is refused with one line saying how to convert it; loaders are
called with `use_safetensors=True`, so a pickle next to a safetensors file is never read.
"""

from __future__ import annotations

from pathlib import Path

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(folder: str | Path, what: str) -> None:
    """ValueError naming `folder` if its weights are pickles only (or it has no weights)."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickled = sorted(p.name for p in files if p.suffix in PICKLED)
    if pickled:
        raise ValueError(
            f"{what} {folder}: weights {', '.join(pickled)} are pickles, which can run code "
            f"when loaded, so they are refused; convert them once where you trust them "
            f"(`model.save_pretrained(folder, safe_serialization=True)`) and pass that folder")
    raise ValueError(f"{what} {folder}: no *.safetensors weights in the folder")
