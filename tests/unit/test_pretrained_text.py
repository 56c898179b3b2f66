"""A pretrained text encoder as a training choice (`text_encoder.pretrained`): a tiny random T5
encoder and a word-level tokenizer made here and saved to a folder (nothing is downloaded),
trained with on the LocalBackend (frozen, outside the trained module), recorded in the export
and loaded back by `load_exported`; the config and load errors name what is wrong."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

import actors.workers.train_dit as train_dit
from actors.workers.checkpoints import EMA, export_ema
from actors.workers.toolkit import LocalBackend
from actors.workers.train_data import Collate, PlanLoader, read_index
from actors.workers.train_dit import local_batches, train_loop
from models.denoiser import Denoiser
from models.export import load_exported
from models.flow import interpolate
from models.text_encoder import (
    PretrainedTextEncoder,
    TextEncoder,
    TextEncoderConfig,
    caption_tokenizer,
)
from pipeline.config import ConfigError, load_config, to_dict
from pipeline.train import TrainConfig
from tests.unit.test_train_data import write_latents
from tests.unit.test_train_worker import CONFIGS, debug_config

WORDS = ["a red square", "a green square", "a blue square", "a cat on grass"]


def save_tiny_t5(folder: Path, seed: int = 0) -> transformers.T5EncoderModel:
    """A random 2-layer T5 encoder (d_model 64 = the debug DiT's text_dim) and a word-level
    tokenizer that ends every caption with </s>, as T5's does; saved as a Hugging Face folder."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        WORDS, tokenizers.trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
    ).save_pretrained(folder)
    config = transformers.T5Config(vocab_size=300, d_model=64, d_kv=16, num_heads=4,
                                   num_layers=2, d_ff=128, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> tuple[Path, transformers.T5EncoderModel]:
    folder = tmp_path_factory.mktemp("t5") / "tiny-t5"
    return folder, save_tiny_t5(folder)


def reference_features(model: transformers.T5EncoderModel, tok: PretrainedTextEncoder,
                       captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The saved T5 run directly by transformers, on the folder's own tokenizer."""
    t = tok.tokenizer.tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    mask = t["attention_mask"].bool()
    return out.last_hidden_state * mask[..., None], mask


def test_collate_uses_the_encoders_tokenizer_padded_to_max_len(t5, tmp_path):
    folder, model = t5
    tokenize = caption_tokenizer(TextEncoderConfig(max_len=12, pretrained=str(folder)))
    ids, mask = tokenize(["a red square", "", "a zebra"])
    assert ids.shape == mask.shape == (3, 12)
    assert mask.sum(1).tolist() == [4, 1, 3]  # 3 words + </s>; "" is </s> alone; zebra: <unk>
    assert ids[0, 3] == ids[1, 0] == 1 and ids[2, 1] == 2 and (ids[~mask] == 0).all()
    rows = pq.read_table(write_latents(tmp_path / "latents")).sort_by("id").slice(0, 2)
    batch = Collate(tokenize)(rows)
    assert batch.text_ids.shape == (2, 12) and batch.x.shape[0] == 2
    # Training's tokens through the frozen encoder = what generation's encode() gives.
    enc = PretrainedTextEncoder(folder, max_len=12)
    feats = enc(batch.text_ids, batch.text_mask)
    alone, m = enc.encode(rows.column("caption").to_pylist())
    n = m.shape[1]
    assert feats.shape == (2, 12, 64) and feats[:, n:].abs().max() == 0
    torch.testing.assert_close(feats[:, :n], alone, atol=1e-5, rtol=1e-5)
    ref, _ = reference_features(model, enc, rows.column("caption").to_pylist())
    torch.testing.assert_close(alone, ref, atol=1e-5, rtol=1e-5)


def eval_loss(dit, encoder: PretrainedTextEncoder, loader: PlanLoader, collate: Collate) -> float:
    """Flow loss with fixed noise and times over one epoch: comparable across DiTs."""
    g, losses = torch.Generator().manual_seed(123), []
    with torch.no_grad():
        for step in range(loader.plan.steps_per_epoch):
            b = collate(loader(pa.table({"step": [step]})))
            text = encoder(b.text_ids, b.text_mask)
            for t in (0.25, 0.5, 0.75):
                noise = torch.randn(b.x.shape, generator=g)
                tt = torch.full((b.x.shape[0],), t)
                pred = dit(interpolate(b.x, noise, tt), tt, text=text, text_mask=b.text_mask,
                           fps=b.fps)
                losses.append((pred - (noise - b.x)).square().mean().item())
    return sum(losses) / len(losses)


def test_training_with_a_frozen_pretrained_encoder_exports_and_loads(t5, tmp_path, monkeypatch):
    folder, reference = t5
    torch.set_num_threads(1)
    latents = write_latents(tmp_path / "latents", {"a-9f": 8, "b-5f": 4})
    cfg = debug_config(steps=60, checkpoint_every=60, log_every=100,
                       **{"text_encoder.pretrained": str(folder), "optim.warmup_steps": 5})
    used = []  # the frozen encoder the loop ran with
    make = train_dit.frozen_text_encoder
    monkeypatch.setattr(train_dit, "frozen_text_encoder",
                        lambda *a: used.append(make(*a)) or used[-1])
    loader = PlanLoader(read_index(latents), cfg.data, 1, 0)
    collate = Collate(caption_tokenizer(cfg.text_encoder))
    run = tmp_path / "run"
    train_loop(cfg, LocalBackend(run), local_batches(loader, collate), run, to_dict(cfg),
               loader.plan.fingerprint)

    # Frozen: the encoder the loop used still has the saved weights and never got a gradient.
    (frozen,) = used
    saved = reference.state_dict()
    for name, p in frozen.model.state_dict().items():
        assert torch.equal(p, saved[name]), name
    assert not any(p.requires_grad or p.grad is not None for p in frozen.parameters())
    # Not in the optimizer state, the EMA or the exported weights: the DiT only.
    ckpt = run / "checkpoints" / "step_00000060"
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert any(k.startswith("ema.dit.") for k in keys)
    assert not [k for k in keys if ".text." in k or k.startswith(("ema.text", "model.text"))]
    exported = load_file(str(run / "export" / "model.safetensors"))
    assert exported and all(k.startswith("dit.") for k in exported)

    # The export names the encoder, and a digest of each file it loads.
    config = json.loads((run / "export" / "config.json").read_text())
    record = config["text_encoder"]
    assert record["pretrained"] == str(folder.resolve()) and record["max_len"] == 64
    assert (record["model_type"], record["d_model"], record["dtype"]) == ("t5", 64, "float32")
    weights_sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert record["files"]["model.safetensors"] == weights_sha
    assert {"config.json", "tokenizer.json"} <= record["files"].keys()

    dit, encoder, loaded = load_exported(run / "export")
    assert isinstance(encoder, PretrainedTextEncoder) and loaded["step"] == 60
    captions = ["a green square", "a cat on grass"]
    feats, mask = encoder.encode(captions)
    ref, ref_mask = reference_features(reference, encoder, captions)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    # The DiT learnt from the frozen features: the loss on fixed noise and times fell.
    torch.manual_seed(cfg.seed)
    init = Denoiser(cfg.model, cfg.text_encoder).eval()
    before = eval_loss(init.dit, frozen, loader, collate)
    after = eval_loss(dit, encoder, loader, collate)
    print(f"eval loss before {before:.4f}, after {after:.4f}")
    assert after < 0.7 * before
    # What generation does with it.
    y = dit(torch.randn(2, 4, 3, 8, 8), torch.rand(2), text=feats, text_mask=mask,
            fps=torch.tensor([8.0, 8.0]))
    assert y.shape == (2, 4, 3, 8, 8) and torch.isfinite(y).all()


def test_text_dim_must_equal_the_encoders_width(t5):
    folder, _ = t5
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, CONFIGS / "debug.yaml",
                    [f"text_encoder.pretrained={folder}", "model.text_dim=32"])
    msg = str(e.value)
    assert "debug.yaml" in msg and str(folder) in msg
    assert "model.text_dim (32) must equal the d_model of text_encoder.pretrained" in msg
    assert msg.endswith("(64)")
    with pytest.raises(ValueError, match=r"text_dim \(32\) must equal .* \(64\)"):
        Denoiser(debug_config(**{"model.text_dim": 32}).model,
                 TextEncoderConfig(pretrained=str(folder)))


def test_a_missing_encoder_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, CONFIGS / "debug.yaml",
                    [f"text_encoder.pretrained={tmp_path / 'nope'}"])
    assert f"text_encoder.pretrained: text encoder directory {tmp_path / 'nope'} does not " \
           "exist" in str(e.value)


def export_with(folder: Path, out: Path) -> None:
    """An export of an untrained DiT that uses the encoder in `folder` (no training needed)."""
    cfg = debug_config(**{"text_encoder.pretrained": str(folder)})
    model = Denoiser(cfg.model, cfg.text_encoder)
    encoder = PretrainedTextEncoder(folder, cfg.text_encoder.max_len)
    export_ema(out, EMA(model, 0.5), model, to_dict(cfg), 0, encoder)


def test_a_changed_or_missing_encoder_folder_is_named_at_load(t5, tmp_path):
    folder = tmp_path / "encoder"
    shutil.copytree(t5[0], folder)
    export_with(folder, tmp_path / "export")
    load_exported(tmp_path / "export")  # as written: loads
    save_tiny_t5(folder, seed=1)  # other weights, same shapes: only the digest can tell
    with pytest.raises(ValueError) as e:
        load_exported(tmp_path / "export")
    assert f"pretrained text encoder {folder} changed" in str(e.value)
    assert "['model.safetensors']" in str(e.value)
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError, match=f"pretrained text encoder {folder} .*does not "
                                                "exist"):
        load_exported(tmp_path / "export")


def test_builtin_export_records_its_config_and_keeps_its_weights(tmp_path):
    cfg = debug_config()
    model = Denoiser(cfg.model, cfg.text_encoder)
    with pytest.raises(ValueError, match="exactly when"):  # no frozen encoder for the built-in
        export_ema(tmp_path / "bad", EMA(model, 0.5), model, {}, 0, object())
    export_ema(tmp_path / "export", EMA(model, 0.5), model, to_dict(cfg), 0)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["text_encoder"] == asdict(cfg.text_encoder)
    assert config["text_encoder"]["pretrained"] == ""
    assert any(k.startswith("text.") for k in load_file(str(tmp_path / "export" /
                                                             "model.safetensors")))
    # Exports written before the choice existed have no `pretrained` key: built-in.
    del config["text_encoder"]["pretrained"]
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    _, encoder, _ = load_exported(tmp_path / "export")
    assert isinstance(encoder, TextEncoder)
    for name, p in encoder.state_dict().items():
        assert torch.equal(p, model.text.state_dict()[name]), name


def test_a_folder_with_pickled_weights_is_refused_and_runs_nothing(tmp_path) -> None:
    """transformers falls back to pytorch_model.bin (a pickle) without safetensors: not us."""
    from tests.payloads import payload

    folder = tmp_path / "t5"
    save_tiny_t5(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(payload(marker))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin are pickles.*refused"):
        PretrainedTextEncoder(folder)
    assert not marker.exists()
