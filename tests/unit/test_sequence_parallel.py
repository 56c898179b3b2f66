"""Sequence- and CFG-parallel sampling equals the one-process model (fp32, within 1e-4).

Real collectives, no Ray: ranks are processes started with torch.multiprocessing and joined
in a gloo group. Starting processes costs seconds on 2 cores, so each world size is spawned
once per module (a fixture); its rank 0 compares every case against the plain model and
writes the worst error per case, and the tests assert on those.
"""

from __future__ import annotations

import math

import pytest
import torch

from actors.workers.sampler import sample_video_latents
from actors.workers.sequence_parallel import (
    SHARD_LAYOUTS,
    SamplerMesh,
    SequenceParallel,
    ShardPlan,
    cfg_velocity,
    shard_layout,
)
from actors.workers.step_cache import StepCacheConfig
from models.dit import ATTENTION_MODES, LAYOUTS, build_dit
from models.flow import guided_velocity as flow_guided_velocity
from models.flow import sample as flow_sample
from tests.distributed import spawn

C, TEXT_DIM, TOL = 4, 64, 1e-4
CACHE = StepCacheConfig(enabled=True, threshold=0.7)  # these random models move a lot
# Latent sizes (T, H, W) with patch (1, 2, 2): token grids 2x2x2, 3x5x7 (105 tokens: odd
# everywhere), 1x1x1 (one token: a rank holds only padding) and 5x3x2.
SIZES = [(2, 4, 4), (3, 10, 14), (1, 2, 2), (5, 6, 3)]
HEADS = [{}, {"hidden": 48, "heads": 3}]  # 4 heads; 3 heads, which 2 and 4 ranks do not divide


def opened(layout: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A debug DiT with every parameter nudged off its init (a fresh adaLN-Zero DiT outputs
    zeros, so any parallel forward would "match" it)."""
    torch.manual_seed(seed)
    model = build_dit("debug", layout=layout, in_channels=C, **overrides).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(size: tuple[int, int, int], seed: int, B: int = 2) -> dict:
    """x, t and conditioning: text with a padded mask, a negative prompt, fps."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(5)[None] < torch.tensor([[3], [5]])[:B]
    return dict(x=torch.randn(B, C, *size, generator=g), t=torch.rand(B, generator=g),
                text=torch.randn(B, 5, TEXT_DIM, generator=g), text_mask=mask,
                neg_text=torch.randn(B, 4, TEXT_DIM, generator=g),
                neg_mask=torch.ones(B, 4, dtype=torch.bool), fps=torch.tensor([8.0, 24.0])[:B])


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


STEPS = ("forward", "embed", "run_blocks", "head")


def spy(model: torch.nn.Module) -> dict[str, int]:
    """Counts calls of the model's `forward` and of its three steps from here on (instance
    attributes shadow the methods; `model(...)` goes through the counted `forward` too)."""
    counts = dict.fromkeys(STEPS, 0)

    def counted(name: str, method):
        def call(*args, **kwargs):
            counts[name] += 1
            return method(*args, **kwargs)
        return call

    for name in STEPS:
        setattr(model, name, counted(name, getattr(model, name)))
    return counts


def cases_world2(rank: int) -> dict[str, float]:
    results = {}
    # Sequence parallel, K = 2: every layout, grid and head count, a batch of 2.
    for heads in HEADS:
        for layout in LAYOUTS:
            model = opened(layout, **heads)
            sp, counts = SequenceParallel(model), spy(model)
            for size in SIZES:
                z = inputs(size, seed=len(results))
                cond = dict(text=z["text"], text_mask=z["text_mask"], fps=z["fps"])
                with torch.no_grad():
                    ref = model(z["x"], z["t"], **cond)
                before = dict(counts)
                out = sp(z["x"], z["t"], **cond)
                results[f"sp/{layout}/heads{model.config.heads}/{size}"] = err(out, ref)
                results[f"calls/{layout}/heads{model.config.heads}/{size}"] = [
                    counts[k] - before[k] for k in STEPS]
                results[f"scale/{layout}/{size}"] = ref.abs().max().item()
    # An absolute position embedding: each shard adds its own tokens' positions.
    for layout in ("full3d", "spatial", "temporal"):
        model = opened(layout, pos_embed="sincos")
        for size in SIZES:
            z = inputs(size, seed=len(results))
            cond = dict(text=z["text"], text_mask=z["text_mask"], fps=z["fps"])
            with torch.no_grad():
                ref = model(z["x"], z["t"], **cond)
            results[f"sp_pos/{layout}/{size}"] = err(SequenceParallel(model)(z["x"], z["t"],
                                                                             **cond), ref)
    # CFG parallel, K = 1 x 2 branches: null text (vs models.flow) and a negative prompt.
    mesh = SamplerMesh.build(sequence_parallel=1, cfg_parallel=True)
    model = opened("factorized")
    z = inputs((3, 6, 6), seed=99)
    cond = dict(text=z["text"], text_mask=z["text_mask"], fps=z["fps"])
    with torch.no_grad():
        ref = flow_guided_velocity(model, z["x"], z["t"], 4.0, **cond)
        v_neg = model(z["x"], z["t"], text=z["neg_text"], text_mask=z["neg_mask"], fps=z["fps"])
        ref_neg = v_neg + 4.0 * (model(z["x"], z["t"], **cond) - v_neg)
    out = cfg_velocity(model, z["x"], z["t"], 4.0, mesh=mesh, **cond)
    out_neg = cfg_velocity(model, z["x"], z["t"], 4.0, neg_text=z["neg_text"],
                           neg_mask=z["neg_mask"], mesh=mesh, **cond)
    results["cfg/null"], results["cfg/neg"] = err(out, ref), err(out_neg, ref_neg)
    # A few-step guided sample, K = 2, against models.flow.sample (one process, batched CFG).
    mesh = SamplerMesh.build(sequence_parallel=2, cfg_parallel=False)
    for layout in ("full3d", "interleaved"):
        model = opened(layout)
        z = inputs((3, 10, 14), seed=7)
        cond = dict(text=z["text"], text_mask=z["text_mask"], fps=z["fps"])
        ref = flow_sample(model, z["x"], steps=3, shift=2.0, guidance=4.0, **cond)
        out = sample_video_latents(model, z["x"], steps=3, shift=2.0, guidance=4.0, mesh=mesh,
                                   **cond)
        results[f"sample/{layout}"] = err(out, ref)
    # Step caching, K = 2: the same skip decisions and latents as one rank with caching
    # (interleaved and factorized switch layouts inside the blocks; full3d is Ulysses).
    for layout in ("full3d", "interleaved", "factorized"):
        model = opened(layout, depth=4)
        z = inputs((3, 10, 14), seed=8)
        kw = dict(text=z["text"], text_mask=z["text_mask"], fps=z["fps"], steps=10, shift=2.0,
                  guidance=4.0, cache=CACHE)
        one, many = [], []
        ref = sample_video_latents(model, z["x"], **kw, skipped=one)
        out = sample_video_latents(model, z["x"], mesh=mesh, **kw, skipped=many)
        results[f"cache/{layout}"] = err(out, ref)
        results[f"cache_skips/{layout}"] = [one, many]
    return results


def cases_world4(rank: int) -> dict[str, float]:
    results = {}
    # K = 4: more ranks than frames (3), positions 35 -> 9 per rank, 3 heads -> 1 per rank.
    for layout in LAYOUTS:
        model = opened(layout, hidden=48, heads=3)
        z = inputs((3, 10, 14), seed=3)
        cond = dict(text=z["text"], text_mask=z["text_mask"], fps=z["fps"])
        with torch.no_grad():
            ref = model(z["x"], z["t"], **cond)
        results[f"sp4/{layout}"] = err(SequenceParallel(model)(z["x"], z["t"], **cond), ref)
    # K = 2 x 2 CFG branches: a guided sample with a negative prompt, against one process.
    mesh = SamplerMesh.build(sequence_parallel=2, cfg_parallel=True)
    for layout in ("full3d", "factorized"):
        model = opened(layout)
        z = inputs((3, 10, 14), seed=11)
        kw = dict(text=z["text"], text_mask=z["text_mask"], fps=z["fps"], steps=3, shift=2.0,
                  guidance=4.0, neg_text=z["neg_text"], neg_mask=z["neg_mask"])
        ref = sample_video_latents(model, z["x"], **kw)
        results[f"sample_cfg/{layout}"] = err(sample_video_latents(model, z["x"], mesh=mesh,
                                                                   **kw), ref)
        # the same with step caching: one decision over both branches and all four ranks
        one, many = [], []
        kw["steps"] = 10
        ref = sample_video_latents(model, z["x"], **kw, cache=CACHE, skipped=one)
        out = sample_video_latents(model, z["x"], mesh=mesh, **kw, cache=CACHE, skipped=many)
        results[f"cache_cfg/{layout}"] = err(out, ref)
        results[f"cache_cfg_skips/{layout}"] = [one, many]
    return results


CASES = {2: cases_world2, 4: cases_world4}


def run_cases(world: int, rank: int) -> dict[str, float]:
    return CASES[world](rank)


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> dict[str, float]:
    return spawn(run_cases, 2, tmp_path_factory.mktemp("sp2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> dict[str, float]:
    return spawn(run_cases, 4, tmp_path_factory.mktemp("sp4"))


def test_shard_plan_holds_every_token_once():
    """Each layout's shards are equal-sized and, padding aside, hold every token once."""
    for grid in [(2, 2, 2), (3, 5, 7), (1, 1, 1), (5, 3, 1), (4, 2, 6)]:
        N = math.prod(grid)
        for K in (1, 2, 3, 4):
            plan = ShardPlan(grid, K)
            for layout in SHARD_LAYOUTS:
                idx = [plan.index(layout, r) for r in range(K)]
                assert len({len(i) for i in idx}) == 1, (grid, K, layout)
                real = torch.cat(idx)
                assert torch.equal(real[real >= 0].sort().values, torch.arange(N))
                z = torch.randn(2, N, 3)
                shard = plan.shard(z, layout, K - 1)
                keep = idx[-1] >= 0
                assert torch.equal(shard[:, keep], z[:, idx[-1][keep]])
                assert not shard[:, ~keep].any()  # padding is zero tokens


def test_sequence_parallel_two_ranks_matches_one_for_every_layout(world2):
    sp = {k: v for k, v in world2.items() if k.startswith("sp/")}
    assert len(sp) == len(HEADS) * len(LAYOUTS) * len(SIZES)
    assert max(sp.values()) < TOL, {k: v for k, v in sp.items() if v >= TOL}
    scales = [v for k, v in world2.items() if k.startswith("scale/")]
    assert min(scales) > 0.5  # the outputs carry signal: the tolerance means something
    # ... and it is the model's own forward, in its three steps: no copy of it here.
    calls = {k: v for k, v in world2.items() if k.startswith("calls/")}
    assert len(calls) == len(sp)
    assert all(v == [0, 1, 1, 1] for v in calls.values()), (STEPS, calls)


def test_sequence_parallel_adds_each_shards_own_absolute_positions(world2):
    sp = {k: v for k, v in world2.items() if k.startswith("sp_pos/")}
    assert len(sp) == 3 * len(SIZES)
    assert max(sp.values()) < TOL, sp


def test_each_attention_mode_shards_by_its_unit():
    assert SHARD_LAYOUTS == tuple(mode.unit for mode in ATTENTION_MODES.values())
    assert [shard_layout(m) for m in ("full", "spatial", "temporal")] == [
        "tokens", "frames", "positions"]
    with pytest.raises(ValueError, match="unknown attention mode 'diagonal'; known: full, "):
        shard_layout("diagonal")


def test_sequence_parallel_four_ranks_with_padding_only_ranks(world4):
    sp = {k: v for k, v in world4.items() if k.startswith("sp4/")}
    assert len(sp) == len(LAYOUTS)
    assert max(sp.values()) < TOL, sp


def test_cfg_parallel_matches_guided_velocity(world2):
    assert world2["cfg/null"] < TOL, world2["cfg/null"]
    assert world2["cfg/neg"] < TOL, world2["cfg/neg"]


def test_parallel_sample_matches_flow_sample(world2):
    for layout in ("full3d", "interleaved"):
        assert world2[f"sample/{layout}"] < TOL, (layout, world2[f"sample/{layout}"])


def test_sequence_parallel_caching_equals_one_rank_caching(world2):
    for layout in ("full3d", "interleaved", "factorized"):
        one, many = world2[f"cache_skips/{layout}"]
        assert one == many and min(one) > 0, (layout, one, many)  # it did skip, alike
        assert world2[f"cache/{layout}"] < TOL, (layout, world2[f"cache/{layout}"])


def test_sequence_and_cfg_parallel_caching_equals_one_rank_caching(world4):
    for layout in ("full3d", "factorized"):
        one, many = world4[f"cache_cfg_skips/{layout}"]
        assert one == many and min(one) > 0, (layout, one, many)
        assert world4[f"cache_cfg/{layout}"] < TOL, (layout, world4[f"cache_cfg/{layout}"])


def test_sequence_and_cfg_parallel_sample_with_negative_prompt(world4):
    for layout in ("full3d", "factorized"):
        assert world4[f"sample_cfg/{layout}"] < TOL, (layout, world4[f"sample_cfg/{layout}"])
