"""The DiT trainer's pieces in one process (no Ray): the toolkit both trainers share (optimizer
step, restore, metrics log, seeds, progress line), the per-sample draws, the schedule, the
shipped configs. The multi-step loops are in tests/integration/test_train_loops.py; `train`,
`weights` and `debug_config` here are the helpers they (and tests/integration) share."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from actors.workers.toolkit import (
    LocalBackend,
    MetricsLog,
    OptimConfig,
    Progress,
    TrainState,
    optimizer_step,
    process_group,
    sample_seed,
    train_state,
)
from actors.workers.train_data import Collate, PlanLoader, read_index
from actors.workers.train_dit import TrainLoopConfig, draw, empty_batch, local_batches, train_loop
from models.export import load_exported
from models.text_encoder import ByteTokenizer
from pipeline.config import ConfigError, from_dict, load_config, to_dict
from pipeline.train import TrainConfig

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


def test_load_exported_names_a_bad_folder(tmp_path):
    from models.export import ExportError

    with pytest.raises(ExportError, match="not an exported model"):
        load_exported(tmp_path)


def test_an_export_written_with_the_old_checkpointing_switch_loads(tmp_path):
    """Exports from before activation checkpointing left the model carry
    `dit.grad_checkpointing` (always false); load_exported drops it."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from models.denoiser import Denoiser
    from models.export import EXPORT_FORMAT

    cfg = TrainLoopConfig()
    model = Denoiser(cfg.model, cfg.text_encoder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    config = {"format": EXPORT_FORMAT, "step": 1, "text_encoder": asdict(cfg.text_encoder),
              "dit": {**asdict(cfg.model), "grad_checkpointing": False}, "train": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    dit, _, _ = load_exported(tmp_path)
    assert dit.config == cfg.model


def test_lr_warmup_then_schedule():
    opt = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [opt.lr_at(s, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert opt.lr_at(4, 100) == pytest.approx(1.0)
    assert opt.lr_at(100, 100) == pytest.approx(0.1)
    assert OptimConfig(lr=2.0, warmup_steps=0).lr_at(50, 100) == 2.0


@pytest.mark.parametrize("name", ["debug", "default", "cluster", "finetune"])
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
    (["model.grad_checkpointing=true"], "unknown key 'model.grad_checkpointing'"),  # parallel.*
    (["parallel.param_dtype=fp8"], "key 'parallel.param_dtype'"),
    (["data.batch_size=0"], "batch_size and bucket_batch_sizes: must be >= 1"),
    (["finetune.lora.rank=-1"], "lora: rank and alpha must be >= 0"),
    (["finetune.text_dropout=1.5"], "text_dropout in [0, 1)"),
])
def test_bad_config_names_the_key(sets, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, CONFIGS / "debug.yaml", sets)
    assert needle in str(e.value)


# ---------------------------------------------------------------------------------------------
# The toolkit


def tiny_state(seed: int = 0, ema_decay: float = 0.5) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    from actors.workers.checkpoints import EMA

    return TrainState(model, model, opt, EMA(model, ema_decay))


def test_optimizer_step_with_zero_total_weight_changes_nothing():
    """A worker whose stream ran dry takes part in the step with weight 0 (and so may every
    worker, as a batch of padding): no NaN from 0 / 0, and no update."""
    state = tiny_state()
    before = [p.detach().clone() for p in state.model.parameters()]
    ema_before = {k: v.clone() for k, v in state.ema.shadow.items()}
    loss = state.model(torch.randn(4, 3)).square().mean(1)  # (B,)
    norm = optimizer_step(state, (loss * torch.zeros(4)).sum(), torch.zeros(1), 1, 1.0)
    assert norm == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, state.model.parameters(), strict=True))
    assert all(torch.equal(ema_before[k], v) for k, v in state.ema.shadow.items())
    assert all(p.grad is None for p in state.model.parameters())  # zeroed for the next step


def test_optimizer_step_takes_the_weighted_mean_gradient_and_clips():
    x, w = torch.randn(4, 3), torch.tensor([1.0, 0.0, 2.0, 1.0])
    ref = tiny_state()
    (ref.model(x).square().mean(1) * w).sum().div(w.sum()).backward()
    want = [p.grad for p in ref.model.parameters()]
    norm_want = torch.cat([g.flatten() for g in want]).norm().item()
    for clip, scale in ((0.0, 1.0), (1e-3, 1e-3 / norm_want)):
        state, used = tiny_state(), []
        state.optim.step = lambda s=state, u=used: u.extend(p.grad.clone()
                                                            for p in s.model.parameters())
        loss = (state.model(x).square().mean(1) * w).sum()  # this worker's weighted sum
        assert optimizer_step(state, loss, w.sum(), 1, clip) == pytest.approx(norm_want)
        for a, b in zip(used, want, strict=True):  # the mean gradient, clipped to `clip`
            torch.testing.assert_close(a, b * scale, rtol=1e-4, atol=1e-7)


def test_train_state_restores_step_weights_and_warns_of_another_plan(tmp_path, capsys):
    backend = LocalBackend(tmp_path)
    with process_group():
        assert dist.is_initialized()
        state = train_state(lambda: torch.nn.Linear(3, 2), OptimConfig(ema_decay=0.5), 7,
                            backend, "t", fingerprint="plan-a")
        assert state.start == 0 and backend.restore_dir() is None
        optimizer_step(state, state.model(torch.ones(1, 3)).sum(), torch.ones(1), 1, 1.0)
        state.save(backend, 5, {"loss": 0.0}, {"steps": 5}, "plan-a")
        again = train_state(lambda: torch.nn.Linear(3, 2), OptimConfig(ema_decay=0.5), 7,
                            backend, "t", fingerprint="plan-b")
    assert not dist.is_initialized()  # the 1-rank group is gone with the block
    assert again.start == 5 and "[t] warning: the dataset changed" in capsys.readouterr().out
    for a, b in zip(state.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert again.ema.shadow.keys() == state.ema.shadow.keys()
    assert all(torch.equal(state.ema.shadow[k], again.ema.shadow[k]) for k in state.ema.shadow)
    ckpt = tmp_path / "checkpoints" / "step_00000005"
    assert json.loads((ckpt / "train.json").read_text())["data_fingerprint"] == "plan-a"


def test_metrics_log_drops_the_lines_after_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path, 0, enabled=True)
    for step in range(1, 8):
        log.write({"step": step})
    MetricsLog(tmp_path, 4, enabled=False)  # other ranks leave the file alone
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 7
    MetricsLog(tmp_path, 4, enabled=True).write({"step": 5})
    rows = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5]


def test_sample_seeds_are_fixed_and_apart():
    assert sample_seed(0, 3, 1) == sample_seed(0, 3, 1)
    seeds = {sample_seed(s, step, slot) for s in (0, 1) for step in range(20) for slot in range(8)}
    assert len(seeds) == 2 * 20 * 8 and all(0 <= x < 2**63 for x in seeds)


def test_draws_of_a_sample_do_not_depend_on_its_batch():
    """What makes runs with 1 or N workers (and resumed runs) see the same noise and t."""
    cfg = TrainLoopConfig()
    one = empty_batch(cfg)
    x = torch.zeros(4, cfg.model.in_channels, 2, 4, 4)
    batch = replace(one, step=3, x=x, slot=[0, 1, 2, 3], weight=torch.ones(4))
    alone = replace(one, step=3, x=x[2:3], slot=[2], weight=torch.ones(1))
    for a, b in zip(draw(batch, cfg), draw(alone, cfg), strict=True):
        assert torch.equal(a[2:3], b)
    noise, t, _ = draw(batch, cfg)
    assert len(set(t.tolist())) == 4 and not torch.equal(noise[0], noise[1])
    assert not torch.equal(draw(replace(batch, step=4), cfg)[1], t)


def test_progress_line_every_n_steps_and_at_the_end(capsys):
    progress = Progress("train", 10, 25, every=10, enabled=True)
    for step in range(11, 26):
        progress(step, f"loss {0.5:.4f}")
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(" eta ")[0] for ln in out] == ["[train] step 20/25 loss 0.5000",
                                                     "[train] step 25/25 loss 0.5000"]
    assert out[-1].endswith(" eta 0s")
    Progress("train", 0, 5, every=1, enabled=False)(1, "x")  # other ranks print nothing
    assert capsys.readouterr().out == ""


def test_prefetched_batches_are_the_plain_ones_in_order_and_errors_surface():
    """data.loader: worker runs the rank's plan in a prefetch thread: the same items in the
    same order from any start, nothing past `end`, and a loader error raised in the loop."""
    from actors.workers.train_dit import prefetched

    def plain(start):
        step = start
        while True:
            yield {"step": step}
            step += 1

    assert [b["step"] for b in prefetched(plain, 3, 10)(4)] == list(range(4, 10))
    early = prefetched(plain, 2, 1000)(0)
    assert [next(early)["step"] for _ in range(5)] == list(range(5))
    early.close()  # stops the thread

    def broken(start):
        yield {"step": start}
        raise OSError("latent file vanished")

    it = prefetched(broken, 2, 10)(0)
    assert next(it)["step"] == 0
    with pytest.raises(OSError, match="vanished"):
        next(it)
