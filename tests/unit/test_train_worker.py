"""The training loop in one process (no Ray): exact resume, the loss falls, the export loads,
the schedule, the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from actors.workers.train_data import Collate, PlanLoader, read_index
from actors.workers.train_dit import LocalBackend, OptimConfig, local_batches, train_loop
from models.denoiser import Denoiser, load_exported
from models.flow import interpolate, sample
from models.text_encoder import ByteTokenizer
from pipeline.config import ConfigError, from_dict, load_config, to_dict
from pipeline.train import TrainConfig
from tests.unit.test_train_data import write_latents

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


def debug_config(**overrides) -> TrainConfig:
    sets = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(TrainConfig, CONFIGS / "debug.yaml", sets)


def train(cfg: TrainConfig, latents: Path, run: Path) -> tuple[PlanLoader, Collate]:
    """What a Ray Train worker does, in this process (LocalBackend, 1-rank FSDP)."""
    loader = PlanLoader(read_index(latents), cfg.data, 1, 0)
    collate = Collate(ByteTokenizer(cfg.text_encoder.max_len))
    train_loop(cfg, LocalBackend(run), local_batches(loader, collate), run, to_dict(cfg),
               loader.plan.fingerprint)
    return loader, collate


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "model.safetensors"))


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


def test_load_exported_names_a_bad_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported model"):
        load_exported(tmp_path)


def test_lr_warmup_then_schedule():
    opt = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [opt.lr_at(s, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert opt.lr_at(4, 100) == pytest.approx(1.0)
    assert opt.lr_at(100, 100) == pytest.approx(0.1)
    assert OptimConfig(lr=2.0, warmup_steps=0).lr_at(50, 100) == 2.0


@pytest.mark.parametrize("name", ["debug", "default", "cluster"])
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(TrainConfig, CONFIGS / f"{name}.yaml")
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    for b in [cfg.data.batch_size, *cfg.data.bucket_batch_sizes.values()]:
        assert b % cfg.num_workers == 0


def test_cluster_workers_fit_a_gpu_train_node():
    cluster = yaml.safe_load((CONFIGS.parents[1] / "cluster.yaml").read_text())
    node = cluster["available_node_types"]["gpu_train"]["resources"]
    cfg = load_config(TrainConfig, CONFIGS / "cluster.yaml")
    per_node = node["GPU"] // cfg.worker.num_gpus
    assert cfg.worker.num_cpus * per_node + cfg.loader.num_cpus * per_node <= node["CPU"]


@pytest.mark.parametrize("sets, needle", [
    (["stepz=3"], "unknown key 'stepz'"),
    (["model.text_dim=32"], "model.text_dim (32) must equal text_encoder.dim (64)"),
    (["model.grad_checkpointing=true"], "parallel.activation_checkpointing"),
    (["parallel.param_dtype=fp8"], "key 'parallel.param_dtype'"),
    (["data.batch_size=0"], "batch sizes must be >= 1"),
])
def test_bad_config_names_the_key(sets, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, CONFIGS / "debug.yaml", sets)
    assert needle in str(e.value)


def test_parallelize_options_keep_the_losses(tmp_path):
    """Activation checkpointing and keeping gathered weights change memory, not the maths."""
    torch.set_num_threads(1)
    latents = write_latents(tmp_path / "latents")
    losses = {}
    for name, sets in {"plain": {}, "ac": {"parallel.activation_checkpointing": "true"},
                       "kept": {"parallel.reshard_after_forward": "false"}}.items():
        cfg = debug_config(steps=3, checkpoint_every=3, **sets)
        train(cfg, latents, tmp_path / name)
        assert cfg.model.grad_checkpointing is False  # the caller's config is left alone
        losses[name] = [m["loss"] for m in map(json.loads, (tmp_path / name / "metrics.jsonl")
                                               .read_text().splitlines())]
    assert losses["ac"] == pytest.approx(losses["plain"], rel=1e-6)
    assert losses["kept"] == pytest.approx(losses["plain"], rel=1e-6)


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
