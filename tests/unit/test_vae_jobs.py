"""train-vae / eval-vae without Ray: the metrics, the clip buffer, the training loop's clear
error, the held-out split, the configs and the CLI's error paths. (The multi-step loop, val loss
falls and resume continues, is in tests/integration/test_train_loops.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.common.tensors import pack
from actors.common.video import to_uint8
from actors.workers.toolkit import LocalBackend
from actors.workers.train_vae import center_crops, local_source, train_vae_loop
from actors.workers.vae_clips import ClipBuffer
from models.metrics import clip_metrics, gaussian_window, ssim
from models.vae import build_vae, save_vae
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.eval_vae import EvalVAEConfig, summarize
from pipeline.ray_train import TrainError
from pipeline.report import eval_table, read_metrics
from pipeline.train_vae import TrainVAEConfig, split_sources

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train-vae"
EVAL_CONFIGS = CONFIGS.parent / "eval-vae"


def ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Direct SSIM of one (H, W) channel pair: a 2D gaussian window at every valid position."""
    w = np.outer(*(2 * [gaussian_window().numpy()]))  # (11, 11)
    c1, c2, vals = 0.01**2, 0.03**2, []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
            cov = (w * a * b).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2)
                        / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_and_psnr_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 20, generator=g, dtype=torch.float64)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    # two flat images a, b: no variance, so SSIM is the luminance term alone
    a, b = torch.full((1, 3, 12, 12), 0.2), torch.full((1, 3, 12, 12), 0.7)
    c1 = 0.01**2
    assert ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.7 + c1) / (0.2**2 + 0.7**2 + c1))
    # against a direct per-window implementation, channel-averaged
    y = (x + 0.2 * torch.rand(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ref = np.mean([ssim_reference(x[0, c].numpy(), y[0, c].numpy()) for c in range(3)])
    assert ssim(x[:1], y[:1]).item() == pytest.approx(ref, abs=1e-9)
    # uint8 clips one level apart everywhere: MSE = (1/255)^2, PSNR = 20 log10(255)
    clip = torch.randint(0, 255, (3, 16, 16, 3), generator=g, dtype=torch.uint8)
    m = clip_metrics(clip, clip + 1)
    assert m["psnr"] == pytest.approx(20 * math.log10(255)) and m["mse"] == pytest.approx(255**-2)
    assert clip_metrics(clip, clip)["ssim"] == pytest.approx(1.0)
    video = clip.permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
    assert torch.equal(to_uint8(video)[0], clip)  # [-1, 1] <-> uint8 round trip is exact
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_clip_buffer_samples_crops_and_stays_bounded():
    clip = np.zeros((9, 40, 48, 3), np.uint8)
    clip[..., 0] = np.arange(48, dtype=np.uint8)  # red = x coordinate: flips are visible
    one = clip.nbytes
    buf = ClipBuffer(max_bytes=3 * one, crop=(5, 32, 32))
    for _ in range(5):
        buf.add(clip)
    buf.add(np.zeros((3, 40, 48, 3), np.uint8))  # too short for the crop: not kept
    assert len(buf) == 3 and buf.nbytes <= 3 * one and buf.too_small == 1 and buf.seen == 6
    x = buf.sample(16, flip=True, g=torch.Generator().manual_seed(0))
    assert x.shape == (16, 3, 5, 32, 32) and x.min() >= -1 and x.max() <= 1
    red = (x[:, 0, 0, 0] + 1) * 127.5  # (16, 32) one row of each crop
    steps = (red[:, 1:] - red[:, :-1]).round()
    assert {int(s) for s in steps[:, 0]} == {1, -1}  # some crops flipped, some not
    assert torch.all(steps == steps[:, :1])
    crops = center_crops([clip], (5, 32, 32))
    assert crops.shape == (1, 3, 5, 32, 32)
    assert (crops[0, 0, 0, 0, 0] + 1) * 127.5 == pytest.approx(8)  # x0 = (48 - 32) // 2


def moving_squares(n: int, seed: int, T: int = 9, H: int = 48, W: int = 64) -> list[np.ndarray]:
    """Tiny clips: a coloured square moving over a flat background."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        c = np.empty((T, H, W, 3), np.uint8)
        c[:] = rng.integers(0, 255, 3)
        y, x, dy, dx = rng.integers(0, 24), rng.integers(0, 32), *rng.integers(-2, 3, 2)
        for t in range(T):
            yy, xx = np.clip(y + dy * t, 0, H - 16), np.clip(x + dx * t, 0, W - 16)
            c[t, yy:yy + 16, xx:xx + 16] = rng.integers(0, 255, 3) if t == 0 else c[0, yy, xx]
        clips.append(c)
    return clips


def debug_config(*sets: str) -> TrainVAEConfig:
    return load_config(TrainVAEConfig, CONFIGS / "debug.yaml",
                       ["log_every=100", "data.val_every=10", "optim.lr=0.003", *sets])


def test_clips_smaller_than_the_crop_give_a_clear_error(tmp_path):
    source = local_source([pa.table(pack("frames", moving_squares(2, seed=0, H=24, W=24)))])
    with pytest.raises(RuntimeError, match="no usable clips .* 2 smaller than the crop 5x32x32"):
        train_vae_loop(debug_config("steps=3", "data.stages=[]"), LocalBackend(tmp_path), source,
                       tmp_path, {})


def test_held_out_split_is_seeded_and_disjoint():
    sources = pa.table({"path": [f"/v/{i}.mp4" for i in range(10)], "caption": [""] * 10})
    train, val = split_sources(sources, 3, seed=0)
    again = split_sources(sources.take([9, 8, 7, 6, 5, 4, 3, 2, 1, 0]), 3, seed=0)[1]
    assert set(val.column("path").to_pylist()) == set(again.column("path").to_pylist())
    assert train.num_rows == 7 and not set(train.column("path").to_pylist()) & set(
        val.column("path").to_pylist())
    assert split_sources(sources, 3, seed=1)[1] != val
    moved = pa.table({"path": [f"/elsewhere/{i}.mp4" for i in range(10)], "caption": [""] * 10})
    assert [p.rsplit("/", 1)[1] for p in split_sources(moved, 3, seed=0)[1].column("path")
            .to_pylist()] == [p.rsplit("/", 1)[1] for p in val.column("path").to_pylist()]
    with pytest.raises(TrainError, match="leaves none to train on"):
        split_sources(sources.slice(0, 3), 3, seed=0)


def test_shipped_configs_load_and_bad_crops_are_refused(capsys):
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(TrainVAEConfig, path)
        assert cfg.model.temporal_factor == 4 and cfg.model.spatial_factor == 8, path
    for path in sorted(EVAL_CONFIGS.glob("*.yaml")):  # eval-vae: its own config
        assert load_config(EvalVAEConfig, path).preprocess.buckets.temporal_factor == 4, path
    with pytest.raises(ConfigError, match="crop_size a multiple of 8"):
        load_config(TrainVAEConfig, CONFIGS / "debug.yaml", ["data.crop_size=30"])
    # the model's own check (models.vae.VAEConfig.validate) is a config error like any other
    assert cli("train-vae", "--input", "x", "--output", "y", "--config",
               str(CONFIGS / "debug.yaml"), "--set", "model.temporal_strides=[2, 2, 2]") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config error" in err[0], err
    assert "model.VAEConfig.temporal_strides" in err[0] and "debug.yaml" in err[0], err


def test_stages_set_the_crops_of_each_step_and_are_checked():
    cfg = load_config(TrainVAEConfig, CONFIGS / "default.yaml")
    d = cfg.data
    assert d.crop_at(0) == (1, 64, 32) and d.crop_at(599) == (1, 64, 32)  # images first
    assert d.crop_at(600) == (9, 64, 8) and d.crop_at(cfg.steps - 1) == (9, 64, 8)
    assert d.largest_crop() == (9, 64, 64)
    with pytest.raises(ConfigError, match="data.stages too; got 4, 64"):
        load_config(TrainVAEConfig, CONFIGS / "default.yaml",
                    ["data.stages=[{steps: 10, crop_frames: 4}]"])
    with pytest.raises(ConfigError, match="nothing is left for the main crops"):
        load_config(TrainVAEConfig, CONFIGS / "default.yaml", ["steps=600"])


def test_training_runs_its_image_stage_then_clips(tmp_path):
    """The loop itself: stage steps train on 1-frame crops, then the main clips."""
    from dataclasses import replace

    from actors.workers.train_vae import VAEDataConfig, VAEStage, VAETrainLoopConfig

    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    table = pa.table(pack("frames", clips))
    cfg = VAETrainLoopConfig(data=VAEDataConfig(batch_size=2, crop_frames=5, crop_size=16,
                                                stages=[VAEStage(3, 1, 16, 4)]),
                             steps=5, log_every=100, checkpoint_every=100)
    cfg.model = replace(cfg.model)
    cfg.validate()
    train_vae_loop(cfg, LocalBackend(tmp_path), local_source([table]), tmp_path, {})
    rows = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert [(r["crop_frames"], r["samples"]) for r in rows] == [(1, 4)] * 3 + [(5, 2)] * 2


def test_summary_averages_clips_per_video_then_videos():
    clips = [{"path": "a.mp4", "start": s, "num_frames": 9, "width": 80, "height": 48,
              "psnr": p, "ssim": q} for s, p, q in ((0.0, 20.0, 0.5), (1.1, 30.0, 0.7))]
    clips.append({**clips[0], "path": "b.mp4", "psnr": 40.0, "ssim": 0.9})
    report = summarize(clips, "v.safetensors", "4x8x8")
    assert [v["psnr"] for v in report["per_video"]] == [25.0, 40.0]
    assert report["overall"]["psnr"] == 32.5 and report["overall"]["clips"] == 3
    assert report["overall"]["ssim"] == pytest.approx(0.75)
    assert "| **overall** (mean of 2 videos) | | 3 | 27 | **32.50** | **0.7500** |" in eval_table(
        report)


def cli(*argv: str) -> int:
    """`tubelet ...` in this process: the exit status (messages on stderr)."""
    return main(list(argv))


def test_bad_vae_path_is_one_line_and_exit_2(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"\0" * 64)
    not_a_vae = tmp_path / "text.safetensors"
    not_a_vae.write_text("hello")
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(other))
    for bad, needle in ((tmp_path / "missing.safetensors", "not found"),
                        (not_a_vae, "is not a tubelet VAE checkpoint"),
                        (other, "is not a tubelet VAE checkpoint")):
        assert cli("eval-vae", "--vae", str(bad), "--input", str(videos)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and str(bad) in err[0], err
    good = tmp_path / "vae.safetensors"
    save_vae(build_vae("debug"), good)
    assert cli("eval-vae", "--vae", str(good), "--input", str(tmp_path / "nothing")) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # --vae is the config key `checkpoint`: the same refusal through --set
    assert cli("eval-vae", "--set", f"checkpoint={not_a_vae}", "--input", str(videos)) == 2
    assert "is not a tubelet VAE checkpoint" in capsys.readouterr().err
