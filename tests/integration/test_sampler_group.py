"""`SamplerGroup` on a real local Ray (2 CPUs): ranks started as Ray actors from an export on
disk sample the latents one process does (fp32, within 1e-4), and one process gives a row
bitwise the same latents whether it is sampled alone or in a batch; a rank killed mid-sample
is replaced and the batch sampled again; a diffusers pipeline folder's ranks (sequence + CFG
parallel) give one process's latents."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from actors.workers.sampler import SamplerConfig, SamplerGroup
from tests.exports import write_export
from tests.faults import ray_processes

pytestmark = pytest.mark.integration
STEPS, SHIFT, GUIDANCE = 3, 2.0, 4.0


def rows(B: int = 2, seed: int = 0) -> dict:
    """Noise for a 3 x 10 x 14 latent (a 3 x 5 x 7 token grid: odd for 2 ranks), text
    features with a padded mask, fps, and a negative prompt."""
    g = torch.Generator().manual_seed(seed)
    return dict(noise=torch.randn(B, 4, 3, 10, 14, generator=g),
                text=torch.randn(B, 6, 64, generator=g),
                text_mask=torch.arange(6)[None] < torch.tensor([[4], [6]])[:B],
                fps=torch.tensor([8.0, 24.0])[:B],
                neg_text=torch.randn(B, 6, 64, generator=g),
                neg_mask=torch.arange(6)[None] < torch.tensor([[2], [3]])[:B])


def sample(group: SamplerGroup, z: dict, negative: bool = False) -> torch.Tensor:
    neg = {k: z[k] for k in ("neg_text", "neg_mask")} if negative else {}
    return group.sample(z["noise"], z["text"], z["text_mask"], z["fps"], steps=STEPS,
                        shift=SHIFT, guidance=GUIDANCE, **neg)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {layout: str(write_export(root / layout, layout=layout, scale=0.1))
            for layout in ("factorized", "full3d")}


def test_one_process_gives_a_row_the_same_latents_in_any_batch(exports):
    """Bitwise: the project promises a row's video does not depend on its batch. (Batched
    CPU matmuls round differently by batch size, so the sampler runs one row at a time.)"""
    z = rows()
    with SamplerGroup(exports["factorized"], SamplerConfig(device="cpu")) as group:
        both = sample(group, z)
        alone = [sample(group, {k: v[i : i + 1] for k, v in z.items()}) for i in range(2)]
        swapped = sample(group, {k: v.flip(0) for k, v in z.items()})
    assert both.dtype == torch.float32 and both.device.type == "cpu"
    assert both.shape == z["noise"].shape and both.abs().max() > 0.1
    for i in range(2):
        assert torch.equal(both[i], alone[i][0])
        assert torch.equal(both[i], swapped[1 - i])


def test_two_sequence_parallel_ranks_match_one_process(exports, ray_local):
    z = rows(seed=1)
    with SamplerGroup(exports["factorized"], SamplerConfig(device="cpu")) as group:
        ref = sample(group, z)
    cfg = SamplerConfig(sequence_parallel=2, device="cpu", num_cpus_per_rank=1.0)
    with SamplerGroup(exports["factorized"], cfg) as group:
        assert len(group.actors) == 1
        out = sample(group, z)
        again = sample(group, z)  # the group serves many calls
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert torch.equal(out, again)


def test_sequence_and_cfg_parallel_ranks_match_one_process(exports, ray_local):
    """K = 2 x 2 CFG branches (3 actors) with a negative prompt, Ulysses (full3d)."""
    z = rows(seed=2)
    with SamplerGroup(exports["full3d"], SamplerConfig(device="cpu")) as group:
        ref = sample(group, z, negative=True)
    cfg = SamplerConfig(sequence_parallel=2, cfg_parallel=True, device="cpu",
                        num_cpus_per_rank=0.5)
    with SamplerGroup(exports["full3d"], cfg) as group:
        assert len(group.actors) == 3
        out = sample(group, z, negative=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_a_killed_rank_is_replaced_and_the_batch_sampled_again(exports, ray_local):
    """SIGKILL of a sequence-parallel rank actor mid-sample (its process, as the OOM killer or
    a lost node would): the group starts a new rank, samples the batch again and returns what
    an undisturbed group returns; the next call runs on the new group as usual."""
    z = rows(seed=3)
    steps = 40  # long enough to kill the rank while it samples

    def run(group: SamplerGroup) -> torch.Tensor:
        return group.sample(z["noise"], z["text"], z["text_mask"], z["fps"], steps=steps,
                            shift=SHIFT, guidance=GUIDANCE)

    with SamplerGroup(exports["factorized"], SamplerConfig(device="cpu")) as group:
        ref = run(group)
    killed: list[int] = []

    def kill_busy_rank() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            busy = [pid for pid, title in ray_processes().items()
                    if "SamplerRank.sample" in title]
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.02)

    cfg = SamplerConfig(sequence_parallel=2, device="cpu", num_cpus_per_rank=0.5)
    with SamplerGroup(exports["factorized"], cfg) as group:
        first = group.actors[0]
        killer = threading.Thread(target=kill_busy_rank, daemon=True)
        killer.start()
        out = run(group)
        killer.join(timeout=5)
        assert killed, "no busy sampler rank was found to kill"
        assert group.actors and group.actors[0] != first  # a new rank actor
        again = run(group)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert torch.equal(out, again)


def test_a_pipeline_folder_on_sequence_and_cfg_parallel_ranks_matches_one_process(tmp_path,
                                                                                ray_local):
    """A diffusers Wan folder's sampler (the stage's `PipelineSampler`) on K = 2 x 2 CFG
    branches (3 rank actors, each loading the transformer alone): the latents of one process,
    for a row of 3 x 5 x 7 tokens (odd for 2 ranks), guidance with a negative prompt."""
    import numpy as np

    from actors.workers.pipeline_sampler import PipelineSampler
    from tests.pretrained import write_wan_pipeline

    folder = write_wan_pipeline(tmp_path / "wan", seed=5)
    g = np.random.default_rng(0)
    row = dict(frames=9, height=80, width=112, seed=7, steps=2, cfg=5.0)
    text, neg = g.standard_normal((6, 32), np.float32), g.standard_normal((3, 32), np.float32)
    ref = PipelineSampler(folder, SamplerConfig(device="cpu")).sample([row], [text], [neg])
    cfg = SamplerConfig(sequence_parallel=2, cfg_parallel=True, device="cpu",
                        num_cpus_per_rank=0.5)
    sampler = PipelineSampler(folder, cfg)
    assert len(sampler.group.actors) == 3
    out = sampler.sample([row], [text], [neg])
    sampler.group.close()
    assert out[0].shape == (4, 3, 10, 14) and np.abs(ref[0]).max() > 0.1
    np.testing.assert_allclose(out[0], ref[0], rtol=0, atol=1e-5)


def test_config_errors_name_the_field():
    for bad, field in [(dict(sequence_parallel=0), "sequence_parallel"),
                       (dict(device="tpu"), "device"), (dict(dtype="int8"), "dtype"),
                       (dict(num_cpus_per_rank=0), "num_cpus_per_rank"),
                       (dict(rank_restarts=-1), "rank_restarts")]:
        with pytest.raises(ValueError, match=field):
            SamplerConfig(**bad).validate()
