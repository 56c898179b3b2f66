"""Multi-step training loops in one process, no Ray (the tier, not a cluster, is why they are
here: each runs tens to hundreds of optimizer steps). The DiT loop: exact resume, the loss
falls and the export loads, parallelize options keep the losses, uneven stream splits keep the
workers in step; a bare DiT + text encoder overfit one clip; the VAE loop: val loss falls and
resume continues."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from actors.common.tensors import pack
from actors.workers.toolkit import LocalBackend
from actors.workers.train_data import Collate, PlanLoader
from actors.workers.train_dit import train_loop
from actors.workers.train_vae import center_crops, local_source, train_vae_loop
from models.denoiser import Denoiser
from models.dit import build_dit
from models.export import load_exported
from models.flow import FlowConfig, flow_loss, interpolate, sample, sample_timesteps
from models.text_encoder import ByteTokenizer, build_text_encoder
from models.vae import load_vae
from pipeline.config import from_dict, to_dict
from pipeline.train import TrainConfig
from tests.unit.test_train_data import write_latents
from tests.unit.test_train_worker import debug_config, train, weights
from tests.unit.test_vae_jobs import debug_config as vae_debug_config
from tests.unit.test_vae_jobs import moving_squares


def test_resume_ends_at_the_same_weights(tmp_path):
    torch.set_num_threads(1)
    latents = write_latents(tmp_path / "latents")
    cfg = dict(checkpoint_every=10, log_every=100, **{"optim.warmup_steps": 3})
    train(debug_config(steps=20, **cfg), latents, tmp_path / "straight")
    train(debug_config(steps=10, **cfg), latents, tmp_path / "resumed")
    train(debug_config(steps=20, **cfg), latents, tmp_path / "resumed")  # picks up step 10
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert steps == list(range(1, 21))  # every step once, no duplicates after the resume
    ckpt = tmp_path / "resumed" / "checkpoints" / "step_00000020"
    assert (ckpt / ".metadata").is_file()
    saved = from_dict(TrainConfig, yaml.safe_load((ckpt / "config.yaml").read_text()))
    assert saved.steps == 20  # the resolved config travels with the checkpoint


def eval_loss(dit, text, loader: PlanLoader, collate: Collate) -> float:
    """Flow loss with fixed noise and times over one epoch: comparable across models."""
    g, losses = torch.Generator().manual_seed(123), []
    with torch.no_grad():
        for step in range(loader.plan.steps_per_epoch):
            b = collate(loader(pa.table({"step": [step]})))
            for t in (0.25, 0.5, 0.75):
                noise = torch.randn(b.x.shape, generator=g)
                tt = torch.full((b.x.shape[0],), t)
                pred = dit(interpolate(b.x, noise, tt), tt, text=text(b.text_ids, b.text_mask),
                           text_mask=b.text_mask, fps=b.fps)
                losses.append((pred - (noise - b.x)).square().mean().item())
    return sum(losses) / len(losses)


def test_loss_falls_and_the_export_loads(tmp_path):
    """The debug preset's budget (200 steps) on learnable synthetic latents."""
    torch.set_num_threads(1)
    latents = write_latents(tmp_path / "latents", {"a-9f": 12, "b-5f": 8, "c-9f": 4})
    cfg = debug_config(checkpoint_every=200)
    run = tmp_path / "run"
    loader, collate = train(cfg, latents, run)
    dit, text, config = load_exported(run / "export")
    assert config["step"] == 200 and config["train"]["steps"] == 200
    torch.manual_seed(cfg.seed)
    init = Denoiser(cfg.model, cfg.text_encoder).eval()
    before = eval_loss(init.dit, init.text, loader, collate)
    after = eval_loss(dit, text, loader, collate)
    print(f"eval loss before {before:.4f}, after {after:.4f}")
    assert after < 0.5 * before
    # What generate will do with it: text features, then a guided sampler.
    feats, mask = text.encode(["a red square"])
    x = sample(dit, torch.randn(1, 4, 3, 8, 8), steps=2, shift=1.0, guidance=3.0,
               text=feats, text_mask=mask, fps=torch.tensor([8.0]))
    assert x.shape == (1, 4, 3, 8, 8) and torch.isfinite(x).all()


def test_parallelize_options_keep_the_losses(tmp_path):
    """Activation checkpointing and keeping gathered weights change memory, not the maths."""
    torch.set_num_threads(1)
    latents = write_latents(tmp_path / "latents")
    losses = {}
    for name, sets in {"plain": {}, "ac": {"parallel.activation_checkpointing": "true"},
                       "kept": {"parallel.reshard_after_forward": "false"}}.items():
        cfg = debug_config(steps=3, checkpoint_every=3, **sets)
        train(cfg, latents, tmp_path / name)
        losses[name] = [m["loss"] for m in map(json.loads, (tmp_path / name / "metrics.jsonl")
                                               .read_text().splitlines())]
    assert losses["ac"] == pytest.approx(losses["plain"], rel=1e-6)
    assert losses["kept"] == pytest.approx(losses["plain"], rel=1e-6)
    # checkpointing is applied from outside: the export has the plain model's names and loads
    # into a model without it
    assert weights(tmp_path / "ac").keys() == weights(tmp_path / "plain").keys()
    load_exported(tmp_path / "ac" / "export")


class _RankBackend(LocalBackend):
    def __init__(self, run: Path, rank: int):
        super().__init__(run)
        self.rank, self.world_size = rank, 2

    def checkpoint(self, step, save, metrics) -> None:
        save(self.ckpt_dir / f"step_{step:08d}")  # both ranks write into one DCP folder


def _uneven_worker(rank: int, run: Path, latents: Path, counts: tuple[int, int]) -> None:
    import pyarrow.parquet as pq
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{run}/store", rank=rank, world_size=2)
    cfg = debug_config(steps=3, checkpoint_every=3, **{"data.batch_size": 4})
    rows = pq.read_table(latents).sort_by("id")
    a = rows.filter(pa.compute.equal(rows.column("bucket"), "a-9f"))
    collate = Collate(ByteTokenizer(cfg.text_encoder.max_len))
    mine = [collate(a.slice(2 * i, 2), slot_base=2 * rank) for i in range(counts[rank])]
    train_loop(cfg, _RankBackend(run, rank), lambda start: iter(mine), run, to_dict(cfg),
               stream=True)
    dist.destroy_process_group()


def test_uneven_stream_splits_keep_workers_in_step(tmp_path):
    """--input splits the stream unevenly: a worker that got nothing (or ran out first) takes
    zero-weight steps until all are out, so FSDP's collectives still pair up; then the stream
    starts again (a new epoch)."""
    import torch.multiprocessing as mp

    latents = write_latents(tmp_path / "latents")
    mp.spawn(_uneven_worker, args=(tmp_path, latents, (2, 0)), nprocs=2, join=True)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in rows] == [2, 2, 2]  # rank 0's 2 batches, then epoch 2
    assert (tmp_path / "checkpoints" / "step_00000003" / ".metadata").is_file()


def test_debug_dit_overfits_one_clip():
    # The whole training path, text encoder included (trained jointly): on a single clip,
    # with fresh noise and logit-normal t every step, the flow loss must fall >= 10x.
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster than two contending
    try:
        model = build_dit("debug", in_channels=4, text_dropout=0.0)
        encoder = build_text_encoder("debug")
        encoder_before = [p.detach().clone() for p in encoder.parameters()]
        params = [*model.parameters(), *encoder.parameters()]
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
        flow, B = FlowConfig(resolution_shift=False), 8
        x0 = torch.randn(1, 4, 3, 8, 8).expand(B, -1, -1, -1, -1)
        g = torch.Generator().manual_seed(1)
        fps = torch.full((B,), 24.0)

        def loss_on(seed: torch.Generator) -> torch.Tensor:
            noise = torch.randn(x0.shape, generator=seed)
            t = sample_timesteps(B, flow, 48, generator=seed)
            text, mask = encoder.encode(["a red ball bounces on grass"] * B)
            return flow_loss(model, x0, t, noise, text=text, text_mask=mask, fps=fps)

        with torch.no_grad():  # held-out noise and times, the same before and after
            before = loss_on(torch.Generator().manual_seed(99)).item()
        for _ in range(500):  # fresh noise and t every step
            loss = loss_on(g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = loss_on(torch.Generator().manual_seed(99)).item()
    finally:
        torch.set_num_threads(threads)
    assert after * 10 <= before, f"loss {before:.3f} -> {after:.3f}: fell less than 10x"
    pairs = zip(encoder_before, encoder.parameters(), strict=True)
    assert all(not torch.equal(a, b) for a, b in pairs), "the text encoder did not train jointly"


def test_train_loop_lowers_val_loss_and_resumes(tmp_path):
    torch.set_num_threads(1)
    source = local_source([pa.table(pack("frames", moving_squares(6, seed=0)))])
    val = center_crops(moving_squares(4, seed=1), (5, 32, 32))
    run = tmp_path / "run"

    def train(steps: int) -> None:
        cfg = vae_debug_config(f"steps={steps}", "checkpoint_every=15")
        train_vae_loop(cfg, LocalBackend(run), source, run, to_dict(cfg), val)

    train(30)
    train(45)  # resumes at the step-30 checkpoint
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 46))
    val_loss = {r["step"]: r["loss"] for r in rows if r["split"] == "val"}
    assert sorted(val_loss) == [0, 10, 20, 30, 40, 45]
    assert val_loss[45] < 0.8 * val_loss[0], val_loss
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000015", "step_00000030", "step_00000045"]
    vae = load_vae(run / "export" / "vae.safetensors")  # safetensors + JSON, no code
    assert vae.latent_channels == 4  # scaling fitted per channel (scaling: channel)
    assert len(vae.config.scaling_factor) == 4 and 1.0 not in vae.config.scaling_factor
    same = load_vae(run / "checkpoints" / "step_00000045" / "vae.safetensors")
    for a, b in zip(vae.state_dict().values(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b)
