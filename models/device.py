"""Devices and dtypes by name, as configs spell them: one table and one picker for every stage,
trainer and runner (plain PyTorch, so models/ and everything above can use it)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """"float32" | "bfloat16" | "float16" -> the torch dtype; anything else names the choices."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}") from None


def pick_device(name: str = "auto", num_cpus: float | None = None) -> torch.device:
    """"auto" (cuda if this process sees a GPU, else cpu) | "cpu" | "cuda" | "cuda:N" -> a
    device. `num_cpus`: on the CPU, torch's thread count (an actor must not take more cores
    than Ray gave it). An explicit name is taken as given: whether this process sees that GPU
    is checked where the model runs (a driver may plan for GPU actors on a CPU head node)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cpu" and num_cpus is not None:
        torch.set_num_threads(max(1, int(num_cpus)))
    return device
