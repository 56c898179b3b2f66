"""Caption encoders: byte tokenizer, built-in encoder, and a pretrained T5 from a local path."""

import pytest
import torch

from models.dit import build_dit
from models.text_encoder import (
    ByteTokenizer,
    PretrainedTextEncoder,
    TextEncoder,
    TextEncoderConfig,
    WordTokenizer,
    build_text_encoder,
)


def test_byte_tokenizer_round_trips_and_pads():
    tok = ByteTokenizer(max_len=16)
    ids, mask = tok(["hi", "café au lait, long enough to be cut"])
    assert ids.shape == mask.shape == (2, 16)
    assert ids[0, 0] == tok.BOS and ids[0, 3] == tok.EOS and not mask[0, 4:].any()
    assert tok.decode(ids[0]) == "hi"
    assert ids[1, -1] == tok.EOS and mask[1].all()  # cut to max_len, still ends with EOS
    assert tok.decode(ids[1]) == "café au lait,"  # 14 bytes: é is two
    assert tok([""])[0].tolist() == [[tok.BOS, tok.EOS]]


def test_word_tokenizer_hashes_words_stably_and_pads():
    tok = WordTokenizer(max_len=6, vocab_size=64)
    ids, mask = tok(["A red circle", "a RED square moving up-right"])
    assert ids.shape == mask.shape == (2, 6)
    assert ids[0].tolist()[:5] == [tok.BOS, tok.word_id("a"), tok.word_id("red"),
                                   tok.word_id("circle"), tok.EOS]
    assert ids[0, 1] == ids[1, 1] and ids[0, 2] == ids[1, 2]  # case folded
    assert not mask[0, 5:].any() and mask[1].all() and ids[1, -1] == tok.EOS  # cut, EOS kept
    assert all(3 <= tok.word_id(w) < 64 for w in ("red", "-", "up", "éclair"))
    assert tok.word_id("red") == 3 + 4200685455 % 61  # crc32: the same in every process
    assert tok([""])[0].tolist() == [[tok.BOS, tok.EOS]]


def test_word_encoder_tells_captions_apart_and_its_config_round_trips():
    cfg = TextEncoderConfig(max_len=16, dim=32, depth=1, heads=4, tokenizer="words",
                            vocab_size=128)
    enc = TextEncoder(cfg)
    assert enc.embed.num_embeddings == 128
    feats, mask = enc.encode(["a red circle", "a blue circle"])
    assert feats.shape == (2, 5, 32) and mask.all()
    assert (feats[0, 2] - feats[1, 2]).abs().max() > 1e-3  # the colour word
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoder(TextEncoderConfig(tokenizer="words", vocab_size=3))


def test_encoder_features_ignore_padding_and_differ_by_caption():
    torch.manual_seed(0)
    enc = build_text_encoder("debug").eval()
    with torch.no_grad():
        alone, m1 = enc.encode(["a cat"])
        batched, m2 = enc.encode(["a cat", "a much longer caption about a dog running"])
    assert alone.shape == (1, 7, enc.out_dim) and m2.shape[1] > 7
    # Padding never changes a caption's features, and padded positions are zero.
    torch.testing.assert_close(batched[0, :7], alone[0], atol=1e-5, rtol=1e-5)
    assert batched[0, 7:].abs().max() == 0
    assert (batched[1, :7] - alone[0]).abs().max() > 1e-3


def test_builtin_encoder_feeds_the_dit():
    enc, model = build_text_encoder("debug"), build_dit("debug", in_channels=4)
    assert enc.out_dim == model.config.text_dim
    text, mask = enc.encode(["a red ball", "rain"])
    y = model(torch.randn(2, 4, 2, 4, 4), torch.rand(2), text=text, text_mask=mask)
    assert y.shape == (2, 4, 2, 4, 4)


def test_missing_pretrained_path_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PretrainedTextEncoder(tmp_path / "nope")


def test_pretrained_t5_from_a_local_path(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    # A tiny random T5 encoder and a word-level tokenizer, saved and loaded back: no download.
    words = ["<pad>", "</s>", "<unk>", "a", "red", "ball", "cat", "on", "grass"]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(tmp_path)
    config = transformers.T5Config(
        vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(tmp_path)

    enc = PretrainedTextEncoder(tmp_path, max_len=8)
    assert enc.out_dim == 32 and not any(p.requires_grad for p in enc.parameters())
    feats, mask = enc.encode(["a red ball", "a cat on grass"])
    assert feats.shape == (2, 4, 32) and mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert feats[0, 3].abs().max() == 0 and feats[0, :3].abs().max() > 0
    alone, _ = enc.encode(["a red ball"])
    torch.testing.assert_close(alone[0], feats[0, :3], atol=1e-5, rtol=1e-5)
    model = build_dit("debug", in_channels=4, text_dim=enc.out_dim)
    y = model(torch.randn(2, 4, 1, 4, 4), torch.rand(2), text=feats, text_mask=mask)
    assert y.shape == (2, 4, 1, 4, 4)
