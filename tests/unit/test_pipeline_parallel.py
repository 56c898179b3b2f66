"""Sequence- and CFG-parallel sampling of a diffusers Wan transformer equals one rank (fp32,
within 1e-5): its own forward with the token split hooked in at its `_cp_plan` points and Ulysses
self-attention (actors/workers/pipeline_parallel.py).

Real collectives, no Ray: ranks are processes started with torch.multiprocessing and joined in
a gloo group, each world size spawned once per module; rank 0 compares every case with the
plain model and writes the worst error per case, and the tests assert on those. Token grids
and head counts that K does not divide: 3 x 5 x 7 = 105 tokens, 5 x 7 = 35 tokens (K = 2),
2 x 5 x 7 = 70 and 1 x 1 x 2 = 2 tokens (K = 3: a rank of padding only); 3 and 5 heads.
Wan 2.2 TI2V's per-token timesteps (B, N), a different one per token, are split with the tokens
at the plan's root point; its samples (expand_timesteps) equal one rank too.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.distributed as dist

from actors.workers.pipeline_parallel import guided_noise, self_attentions, sharded
from actors.workers.sequence_parallel import SamplerMesh
from models.wan_pipeline import sample_latents
from tests.distributed import spawn
from tests.pretrained import wan_scheduler

C, TEXT_DIM, TOL = 4, 32, 1e-5
SIZES = {2: [(3, 10, 14), (1, 10, 14)], 3: [(2, 10, 14), (1, 2, 4)]}  # latents (T, H, W)
HEADS = (3, 5)


def tiny_wan(heads: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Wan 2.1 transformer, `heads` x 12 channels, weights nudged off their init."""
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12, in_channels=C,
        out_channels=C, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=2,
        rope_max_seq_len=32,
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def inputs(size: tuple[int, int, int], seed: int) -> dict[str, torch.Tensor]:
    """Latents (1, C, T, H, W) and text as the pipeline passes it: 7 rows, zeros after 4."""
    g = torch.Generator().manual_seed(seed)
    text, neg = torch.randn(2, 1, 7, TEXT_DIM, generator=g)
    text[:, 4:], neg[:, 2:] = 0, 0
    return dict(x=torch.randn(1, C, *size, generator=g), text=text, neg=neg)


def forward(model: torch.nn.Module, z: dict, t: float = 700.0) -> torch.Tensor:
    return model(hidden_states=z["x"], timestep=torch.tensor([t]), encoder_hidden_states=z["text"],
                 return_dict=False)[0]


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def sample(model: torch.nn.Module, z: dict, mesh: SamplerMesh | None, guidance: float = 5.0,
           expand: bool = False) -> torch.Tensor:
    """3 UniPC steps with guidance, one rank (mesh None) or on the mesh; `expand`: Wan 2.2
    TI2V's per-token timesteps."""
    kw = dict(predict=guided_noise(model, mesh)) if mesh is not None else {}
    with sharded(model, mesh.sp if mesh is not None else None):
        return sample_latents(model, wan_scheduler("unipc"), z["text"], z["neg"], z["x"], 3,
                              guidance, expand_timesteps=expand, **kw)


def ti2v_cases(world: int, results: dict[str, float]) -> None:
    """Per-token timesteps (Wan 2.2 TI2V): forwards with a different timestep per token, and
    a sample with expand_timesteps, on K = world ranks (x2 CFG branches for world 4)."""
    model = tiny_wan(3, seed=6)
    for size in SIZES.get(world, ()):
        z = inputs(size, seed=100 + len(results))
        n = size[0] * (size[1] // 2) * (size[2] // 2)
        ts = torch.linspace(50.0, 950.0, n)[None]  # (1, N): token order matters
        kw = dict(hidden_states=z["x"], timestep=ts, encoder_hidden_states=z["text"],
                  return_dict=False)
        with torch.no_grad():
            ref = model(**kw)[0]
            with sharded(model, dist.group.WORLD):
                out = model(**kw)[0]
        results[f"ti2v/sp{world}/{size}"] = err(out, ref)
        results[f"scale/ti2v/{size}"] = ref.abs().max().item()
    z = inputs((3, 10, 14), seed=21)
    ref = sample(model, z, None, expand=True)
    mesh = SamplerMesh.build(2, True) if world == 4 else SamplerMesh.build(world, False)
    results[f"ti2v/sample{world}"] = err(sample(model, z, mesh, expand=True), ref)
    results["scale/ti2v/sample"] = ref.abs().max().item()


def cases(world: int) -> dict[str, float]:
    results: dict[str, float] = {}
    group = dist.group.WORLD
    # Sequence parallel, K = world: forwards, odd grids and heads.
    for heads in HEADS if world in SIZES else ():
        model = tiny_wan(heads)
        processors = [a.processor for a in self_attentions(model)]
        for size in SIZES[world]:
            z = inputs(size, seed=len(results))
            with torch.no_grad():
                ref = forward(model, z)
                with sharded(model, group):
                    out = forward(model, z)
            results[f"sp{world}/heads{heads}/{size}"] = err(out, ref)
            results[f"scale/heads{heads}/{size}"] = ref.abs().max().item()
        # ... and the model is as it was: its processors back, no hook left behind.
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        results[f"restored/heads{heads}"] = float(
            hooks != 0 or [a.processor for a in self_attentions(model)] != processors)
    ti2v_cases(world, results)
    # Whole samples (UniPC, guidance 5 with a negative prompt) against one rank.
    model, z = tiny_wan(3, seed=4), inputs((3, 10, 14), seed=9)
    ref = sample(model, z, None)
    results["scale/sample"] = ref.abs().max().item()
    if world == 4:  # K = 2 x 2 CFG branches
        results["sample/sp2_cfg"] = err(sample(model, z, SamplerMesh.build(2, True)), ref)
        return results
    results[f"sample/sp{world}"] = err(sample(model, z, SamplerMesh.build(world, False)), ref)
    if world == 2:  # K = 1 x 2 CFG branches, and no guidance at all on a CFG mesh
        mesh = SamplerMesh.build(1, True)
        results["sample/cfg"] = err(sample(model, z, mesh), ref)
        results["sample/cfg_g1"] = err(sample(model, z, mesh, 1.0), sample(model, z, None, 1.0))
    return results


def run_cases(world: int, rank: int) -> dict[str, float]:
    return cases(world)


@pytest.fixture(scope="module", params=[2, 3, 4], ids=["K2", "K3", "K2xCFG"])
def world(request, tmp_path_factory) -> tuple[int, dict[str, float]]:
    return request.param, spawn(run_cases, request.param,
                                tmp_path_factory.mktemp(f"wan{request.param}"))


def test_parallel_forward_and_sample_equal_one_rank(world):
    n, results = world
    errors = {k: v for k, v in results.items()
              if k.startswith(("sp", "sample/s", "sample/c", "ti2v/"))}
    assert max(errors.values()) < TOL, {k: v for k, v in errors.items() if v >= TOL}
    scales = [v for k, v in results.items() if "scale" in k]
    assert min(scales) > 0.1  # the outputs carry signal: the tolerance means something
    assert not any(v for k, v in results.items() if k.startswith("restored/"))
    want = {2: {"sample/sp2", "sample/cfg", "sample/cfg_g1"}, 3: {"sample/sp3"},
            4: {"sample/sp2_cfg"}}[n] | {f"ti2v/sample{n}"}
    assert want <= set(results)
    assert len([k for k in results if k.startswith("sp")]) == (
        len(HEADS) * len(SIZES[n]) if n in SIZES else 0)
    assert len([k for k in results if k.startswith("ti2v/sp")]) == len(SIZES.get(n, ()))
