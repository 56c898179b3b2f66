"""Fine-tuning a pretrained pipeline's transformer, on a tiny random Wan folder built here:
`preprocess --model` writes the folder's VAE latents and its own `encode_prompt` features;
`train --init` (full and LoRA) gives on 2 FSDP2 Ray Train workers the losses of one process,
resumes exactly and lowers the loss; the exports load in diffusers (`from_pretrained`,
`load_lora_weights`) and `tubelet generate --checkpoint RUN` makes the frames diffusers makes
with them; wrong inputs are refused before Ray in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import pytest
import torch
from safetensors.torch import load_file

from actors.common.tensors import unpack
from actors.workers.toolkit import LocalBackend
from actors.workers.train_data import PlanLoader, data_columns
from actors.workers.train_dit import local_batches, train_loop, trainee_of
from models.pipelines import load_transformer, read_pipeline
from pipeline.cli import main
from pipeline.config import load_config, to_dict
from pipeline.preprocess import run_preprocess
from pipeline.streams import PreprocessConfig
from pipeline.synth import SynthConfig, synthesize
from pipeline.train import TrainConfig, planned_data
from tests.pretrained import (
    diffusers_pipeline,
    write_caption_latents,
    write_wan22_ti2v_pipeline,
    write_wan_pipeline,
)
from tests.stages.test_pretrained_generate import ROWS, check_stages
from tests.unit.test_train_data import write_latents

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "train" / "debug.yaml"
SETS = ["checkpoint_every=3", "log_every=1", "optim.warmup_steps=0", "optim.lr=0.001",
        "ray.object_store_mb=300", "worker.num_cpus=0.5", "loader.num_cpus=0.2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe", seed=1)


@pytest.fixture(scope="module")
def latents(folder, tmp_path_factory) -> Path:
    return write_caption_latents(folder, tmp_path_factory.mktemp("data") / "latents")


def tune_config(folder: Path, lora: int, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, DEBUG, [*SETS, f"finetune.init={folder}",
                                            f"finetune.lora.rank={lora}", *sets])


def train_here(cfg: TrainConfig, latents: Path, run: Path) -> list[dict]:
    """One process, no Ray (LocalBackend): what a Ray Train worker runs. Its metrics rows."""
    torch.set_num_threads(1)
    cfg, index, plan = planned_data(cfg, latents, 1)
    trainee = trainee_of(cfg)
    loader = PlanLoader(index, cfg.data, 1, 0, columns=data_columns(cfg))
    train_loop(cfg, LocalBackend(run), local_batches(loader, trainee.collate()), run,
               to_dict(cfg), plan.fingerprint, trainee=trainee)
    return metrics(run)


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def exported(run: Path, lora: int) -> dict[str, torch.Tensor]:
    name = ("pytorch_lora_weights.safetensors" if lora
            else "transformer/diffusion_pytorch_model.safetensors")
    return load_file(str(run / "export" / name))


def test_preprocess_with_a_model_writes_its_latents_and_its_prompt_features(
        folder, ray_local, tmp_path):
    import diffusers

    from actors.common.stage import run_here
    from pipeline.streams import clip_stages

    rows = synthesize(SynthConfig(num_videos=3, seed=4, workers=1), tmp_path / "videos")
    manifest = [{"path": str(tmp_path / "videos" / r["path"]), "caption": r["caption"]}
                for r in rows]
    manifest[-1].pop("caption")  # a video without a caption: the empty prompt's features
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    cfg = load_config(PreprocessConfig, ROOT / "configs/preprocess/default.yaml",
                      ["ray.object_store_mb=300", "latent_dtype=float32", "vae.checkpoint=",
                       f"model={folder}"])
    out = tmp_path / "pre"
    summary = run_preprocess(cfg, str(tmp_path / "list.jsonl"), out, progress=False)
    table = pds.dataset(out / "latents", format="parquet").to_table().sort_by("id")
    assert summary["clips_written"] == table.num_rows >= 3 and summary["errors"] == 0
    record = json.loads((out / "run.json").read_text())
    assert record["vae"] == str(folder / "vae") and record["text_encoder"].startswith("UMT5")

    # latents: the folder's VAE encode of each clip, as diffusers normalises Wan latents
    vae = diffusers.AutoencoderKLWan.from_pretrained(folder / "vae").eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    clips = run_here(pds.dataset(tmp_path / "list.jsonl", format="json").to_table(),
                     clip_stages(cfg, None))
    frames = dict(zip(clips.column("id").to_pylist(), unpack(clips, "frames", np.uint8),
                      strict=True))
    pipe = diffusers_pipeline(folder)
    captions = {m["path"]: m.get("caption", "") for m in manifest}
    for row in table.to_pylist():
        x = torch.from_numpy(np.array(frames[row["id"]])).permute(3, 0, 1, 2)[None]
        with torch.no_grad():
            z = vae.encode(x.float() / 127.5 - 1).latent_dist.mode()
        want = ((z - mean) / std)[0].numpy()
        ours = np.array(row["latent"], np.float32).reshape(row["latent_shape"])
        np.testing.assert_allclose(ours, want, rtol=0, atol=1e-4, err_msg=row["id"])
        # features: the pipeline's own encode_prompt of the caption, at their real length
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(captions[row["path"]],
                                           do_classifier_free_guidance=False)
        n, d = row["text_shape"]
        assert row["text_len"] == n and d == embeds.shape[-1]
        feats = np.array(row["text_features"], np.float32).reshape(n, d)
        np.testing.assert_allclose(feats, embeds[0, :n].numpy(), rtol=0, atol=1e-5)
        assert not embeds[0, n:].any()  # the rest of the pipeline's 512 rows are zeros
    assert "" in {captions[p] for p in table.column("path").to_pylist()}

    again = run_preprocess(cfg, str(tmp_path / "list.jsonl"), out, progress=False)
    assert again["clips_written"] == 0 and again["clips_in_dataset"] == table.num_rows


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_two_fsdp_workers_match_one_process(folder, latents, ray_local, tmp_path, lora):
    ref = train_here(tune_config(folder, lora, "steps=4"), latents, tmp_path / "one")
    run = tmp_path / "two"
    flags = ["--lora", str(lora)] if lora else []
    code = main(["train", "--data", str(latents), "--output", str(run), "--config", str(DEBUG),
                 "--init", str(folder), *flags, "--workers", "2",
                 *[a for s in SETS for a in ("--set", s)], "--set", "steps=4"])
    assert code == 0
    got = metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got, strict=True):
        assert a["bucket"] == b["bucket"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    ours, theirs = exported(tmp_path / "one", lora), exported(run, lora)
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=2e-5, msg=k)


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_resume_ends_at_the_same_weights(folder, latents, tmp_path, lora):
    train_here(tune_config(folder, lora, "steps=6"), latents, tmp_path / "straight")
    train_here(tune_config(folder, lora, "steps=3"), latents, tmp_path / "resumed")
    rows = train_here(tune_config(folder, lora, "steps=6"), latents, tmp_path / "resumed")
    assert [r["step"] for r in rows] == list(range(1, 7))
    a, b = exported(tmp_path / "straight", lora), exported(tmp_path / "resumed", lora)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    if lora:  # a LoRA checkpoint holds the adapters, not the frozen base
        ckpt = load_checkpoint_names(tmp_path / "resumed" / "checkpoints" / "step_00000006")
        assert ckpt and all("lora_" in n for n in ckpt)


def load_checkpoint_names(path: Path) -> list[str]:
    from actors.workers.checkpoints import read_safe_metadata

    keys = read_safe_metadata(path / ".metadata").state_dict_metadata
    return [k for k in keys if k.startswith("model.")]


def test_full_fine_tuning_lowers_the_loss(folder, latents, tmp_path):
    rows = train_here(tune_config(folder, 0, "steps=40", "checkpoint_every=40"), latents,
                      tmp_path / "run")
    first = np.mean([r["loss"] for r in rows[:8]])
    last = np.mean([r["loss"] for r in rows[-8:]])
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_exports_load_in_diffusers_and_generate_makes_their_frames(folder, latents, tmp_path,
                                                                   lora):
    run = tmp_path / "run"
    train_here(tune_config(folder, lora, "steps=4", "optim.ema_decay=0.0", "optim.lr=0.01"),
               latents, run)

    def load(_):
        if not lora:  # a diffusers pipeline folder
            return diffusers_pipeline(run / "export")
        pipe = diffusers_pipeline(folder)
        pipe.load_lora_weights(run / "export")
        return pipe

    pipe = load(None)
    trained = pipe.transformer
    base = load_transformer(read_pipeline(folder))
    x, t, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([700.0]), torch.randn(1, 512, 32)
    with torch.no_grad():
        moved = (trained(hidden_states=x, timestep=t, encoder_hidden_states=text)[0]
                 - base(hidden_states=x, timestep=t, encoder_hidden_states=text)[0])
    assert moved.abs().max() > 1e-3  # the export is not the base model
    check_stages(run, ROWS[:2], 16, tmp_path, load=load,
                 vae=(folder if lora else run / "export") / "vae")


def test_wrong_inputs_are_refused_before_ray(folder, latents, tmp_path, capsys, monkeypatch):
    def no_ray(*_, **__):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("pipeline.train.ray_session", no_ray)
    other = write_wan_pipeline(tmp_path / "other", seed=2)  # another text encoder
    ti2v = write_wan22_ti2v_pipeline(tmp_path / "ti2v")  # 8-channel latents
    plain = write_latents(tmp_path / "plain")  # no caption features
    headless = tmp_path / "headless"
    shutil.copytree(folder, headless)
    shutil.rmtree(headless / "transformer")
    cases = [
        ([str(latents), "--init", str(other)], "caption features from UMT5EncoderModel:"),
        ([str(latents), "--init", str(ti2v)], "latents with 4 channels, the transformer"),
        ([str(plain), "--init", str(folder)], "(no features: None)"),
        ([str(latents), "--init", str(folder), "--lora", "0"], "LoRA rank must be >= 1"),
        ([str(latents), "--init", str(headless)], "transformer/ folder is missing"),
    ]
    for i, (args, needle) in enumerate(cases):
        code = main(["train", "--data", *args, "--output", str(tmp_path / f"run{i}"),
                     "--config", str(DEBUG)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (args, err)


def test_a_lora_whose_base_was_rewritten_is_refused(tmp_path):
    from models.pipelines import PipelineError

    base = write_wan_pipeline(tmp_path / "base", seed=1)
    data = write_caption_latents(base, tmp_path / "latents")
    run = tmp_path / "run"
    train_here(tune_config(base, 4, "steps=2"), data, run)
    assert read_pipeline(run / "export").lora is not None  # reads while the base is as trained
    other = write_wan_pipeline(tmp_path / "other", seed=3)  # same shapes, other weights
    weights = "transformer/diffusion_pytorch_model.safetensors"
    shutil.copy(other / weights, base / weights)
    with pytest.raises(PipelineError, match="changed since training"):
        read_pipeline(run / "export")
