"""Caption encoders: a built-in byte-level transformer, or a pretrained one from a local path.

Both give the same interface, `encode(captions) -> (features (B, L, out_dim), mask (B, L))`,
with mask True on real tokens, which is what `DiT(text=..., text_mask=...)` takes.

- `TextEncoder` (built-in): a byte tokenizer (no vocabulary file, nothing to download) and a
  small pre-norm transformer. It is an ordinary trainable module: put its parameters in the
  DiT's optimizer and it trains jointly with the DiT.
- `PretrainedTextEncoder`: a frozen Hugging Face encoder (T5 / UMT5 or any `AutoModel`) plus
  its tokenizer, loaded from a local directory. Needs the optional `transformers` package.
  Training picks it with `TextEncoderConfig.pretrained`; it then stays outside the trained
  module (models/denoiser.py), and an export records its folder and a digest of its files
  (`record`) instead of copying its weights (`load_recorded` checks them and loads it).
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.device import torch_dtype
from models.safety import require_safetensors


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..2 are PAD, BOS, EOS; byte b is id b + 3."""

    PAD, BOS, EOS = 0, 1, 2
    vocab_size = 259

    def __init__(self, max_len: int = 128):
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 (BOS, a byte, EOS), got {max_len}")
        self.max_len = max_len

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) int64 and mask (B, L) bool, padded to the longest caption (<= max_len).

        Longer captions are cut to max_len - 2 bytes, so every row ends with EOS.
        """
        rows = [
            [self.BOS, *(b + 3 for b in c.encode("utf-8")[: self.max_len - 2]), self.EOS]
            for c in captions
        ]
        L = max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), L), self.PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != self.PAD

    def decode(self, ids: torch.Tensor) -> str:
        data = bytes(int(i) - 3 for i in ids if int(i) >= 3)
        return data.decode("utf-8", errors="ignore")  # a cut may split a multi-byte character


class WordTokenizer:
    """Lower-cased words (and single punctuation marks) as tokens, each hashed into
    `vocab_size` - 3 buckets (crc32, stable across processes and machines): a word-level
    vocabulary with no file to ship or download. ids 0..2 are PAD, BOS, EOS as for bytes.

    Why: every word of a caption is one token whose embedding the model learns directly,
    like a class label, where bytes make it first learn to spell; a jointly trained encoder
    on short captions learns to condition on words in a fraction of the steps. Collisions are
    possible (two words, one bucket) and harmless at a vocabulary this size for short,
    repetitive captions."""

    PAD, BOS, EOS = 0, 1, 2
    WORDS = re.compile(r"\w+|[^\w\s]")

    def __init__(self, max_len: int = 128, vocab_size: int = 4096):
        if max_len < 3 or vocab_size < 4:
            raise ValueError(f"max_len must be >= 3 and vocab_size >= 4, got {max_len}, "
                             f"{vocab_size}")
        self.max_len, self.vocab_size = max_len, vocab_size

    def word_id(self, word: str) -> int:
        return 3 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 3)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) int64 and mask (B, L) bool, padded to the longest caption (<= max_len)."""
        rows = [[self.BOS, *[self.word_id(w) for w in self.WORDS.findall(c.lower())
                             ][: self.max_len - 2], self.EOS] for c in captions]
        L = max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), L), self.PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != self.PAD


# captions -> token ids (B, L) int64 and mask (B, L) bool: ByteTokenizer, WordTokenizer or
# PretrainedTokenizer
Tokenizer = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TextEncoderConfig:
    max_len: int = 128  # tokens, BOS/EOS included (bytes for the built-in encoder)
    dim: int = 512
    depth: int = 4
    heads: int = 8
    mlp_ratio: float = 4.0
    # Tokens of the built-in encoder: "bytes" (UTF-8 bytes) or "words" (hashed words, a
    # `vocab_size` table; see WordTokenizer).
    tokenizer: Literal["bytes", "words"] = "bytes"
    vocab_size: int = 4096  # "words" only
    # A local Hugging Face T5 / UMT5 folder (config.json, weights, tokenizer): used frozen
    # instead of the built-in encoder, whose fields above but max_len are then unused; the
    # DiT's text_dim must equal its d_model. Empty: the built-in encoder, trained jointly.
    pretrained: str = ""

    def validate(self) -> None:
        if self.max_len < 3:
            raise ValueError(f"max_len must be >= 3 (BOS, a byte, EOS), got {self.max_len}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4 (PAD, BOS, EOS, a word), got "
                             f"{self.vocab_size}")
        if self.pretrained:
            try:
                pretrained_config(self.pretrained)
            except FileNotFoundError as e:  # a config value error: the loader names file + key
                raise ValueError(f"pretrained: {e}") from None


def pretrained_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a pretrained encoder folder, read without transformers (cheap)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        why = "has no config.json" if folder.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"text encoder directory {folder} {why}: expected a local Hugging Face "
            "T5 / UMT5 folder (config.json, weights, tokenizer files; nothing is downloaded)")
    return json.loads((folder / "config.json").read_text())


def text_width(cfg: TextEncoderConfig) -> int:
    """Width of the features the DiT gets: `dim`, or the pretrained folder's d_model."""
    if not cfg.pretrained:
        return cfg.dim
    config = pretrained_config(cfg.pretrained)
    return int(config.get("d_model") or config["hidden_size"])  # T5 / UMT5, or BERT-likes


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attn(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Byte tokenizer + transformer; trained jointly with the DiT."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tokenizer = builtin_tokenizer(config)
        self.embed = nn.Embedding(self.tokenizer.vocab_size, config.dim)
        self.pos = nn.Parameter(torch.zeros(config.max_len, config.dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(config.dim, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.initialize_weights()

    @property
    def out_dim(self) -> int:
        return self.config.dim

    def initialize_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, L, dim)
        for block in self.blocks:
            x = block(x, mask)
        # Zero the padding so nothing downstream can read it, whatever mask handling it has.
        return self.norm(x) * mask[..., None]

    def encode(
        self, captions: list[str], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(captions)
        device = device or self.embed.weight.device
        mask = mask.to(device)
        return self(ids.to(device), mask), mask


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "a pretrained text encoder needs `transformers`: pip install 'tubelet[bench]'"
        ) from e
    return transformers


class PretrainedTokenizer:
    """A local folder's Hugging Face tokenizer behind ByteTokenizer's call. Training pads every
    batch to `max_len` (`pad_to_max`): one text length for every step."""

    def __init__(self, path: str | Path, max_len: int, pad_to_max: bool = True):
        pretrained_config(path)  # one clear error for a missing folder
        self.tokenizer = _transformers().AutoTokenizer.from_pretrained(
            Path(path), local_files_only=True)
        self.max_len, self.pad_to_max = max_len, pad_to_max

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            captions, padding="max_length" if self.pad_to_max else "longest", truncation=True,
            max_length=self.max_len, return_tensors="pt",
        )  # fmt: skip
        ids, mask = tok["input_ids"], tok["attention_mask"].bool()
        # A caption with no token at all (empty, with a tokenizer that adds no EOS) keeps its
        # first position, so cross-attention has a key to attend to (else SDPA gives NaN).
        mask[:, 0] |= ~mask.any(1)
        return ids, mask


def caption_tokenizer(cfg: TextEncoderConfig) -> Tokenizer:
    """What training's Collate tokenizes captions with: bytes for the built-in encoder, the
    pretrained folder's own tokenizer (padded to max_len) for a pretrained one."""
    if cfg.pretrained:
        return PretrainedTokenizer(cfg.pretrained, cfg.max_len)
    return builtin_tokenizer(cfg)


def builtin_tokenizer(cfg: TextEncoderConfig) -> ByteTokenizer | WordTokenizer:
    if cfg.tokenizer == "words":
        return WordTokenizer(cfg.max_len, cfg.vocab_size)
    return ByteTokenizer(cfg.max_len)


# What an export digests of a pretrained folder: what from_pretrained reads (config, weights,
# tokenizer files), not READMEs. With safetensors present, *.bin is not read, so not hashed.
DIGESTED = (".json", ".model", ".txt", ".safetensors", ".bin")


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256; size and mtime key the cache, so one process hashes a file once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def folder_digests(path: str | Path) -> dict[str, str]:
    """{file name: sha256} of the files a pretrained encoder loads from `path`."""
    files = sorted(p for p in Path(path).iterdir()
                   if p.is_file() and p.suffix in DIGESTED and not p.name.startswith("."))
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if p.suffix != ".bin"]
    return {p.name: _sha256(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files}


class PretrainedTextEncoder(nn.Module):
    """A frozen Hugging Face encoder and its tokenizer from a local directory (no download)."""

    def __init__(self, path: str | Path, max_len: int = 256, dtype: torch.dtype = torch.float32):
        super().__init__()
        transformers = _transformers()
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder directory {path} does not exist")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        # Encoder-only classes, so the (large) T5 decoder is never built.
        cls = {
            "t5": getattr(transformers, "T5EncoderModel", None),
            "mt5": getattr(transformers, "MT5EncoderModel", None),
            "umt5": getattr(transformers, "UMT5EncoderModel", None),
        }.get(config.model_type) or transformers.AutoModel
        # .to(dtype) rather than a dtype argument: its name changed across transformers versions.
        require_safetensors(path, "text encoder folder")
        self.model = cls.from_pretrained(path, local_files_only=True,
                                         use_safetensors=True).to(dtype)
        self.model.eval().requires_grad_(False)
        # Padded to the longest caption: features of real tokens do not depend on padding.
        self.tokenizer = PretrainedTokenizer(path, max_len, pad_to_max=False)
        self.path, self.max_len, self.dtype = path, max_len, dtype
        self.model_type = config.model_type
        self._out_dim = getattr(config, "d_model", None) or config.hidden_size

    @property
    def out_dim(self) -> int:
        return self._out_dim

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        return super().train(False)  # frozen: keep dropout off whatever the parent does

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) and mask (B, L) (from `tokenizer`, or training's Collate) ->
        float32 features (B, L, out_dim), zero at padding."""
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out.float() * mask[..., None]

    def encode(
        self, captions: list[str], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = device or next(self.model.parameters()).device
        ids, mask = self.tokenizer(captions)
        mask = mask.to(device)
        return self(ids.to(device), mask), mask  # (B, L, out_dim), (B, L)

    def record(self) -> dict[str, Any]:
        """What an export says of this encoder (its weights stay in its folder): where it is,
        what it is, the dtype it ran in, and a sha256 of each file it loads."""
        return {"pretrained": str(self.path.resolve()), "max_len": self.max_len,
                "model_type": self.model_type, "d_model": self.out_dim,
                "dtype": str(self.dtype).removeprefix("torch."),
                "files": folder_digests(self.path)}


def load_recorded(record: dict[str, Any]) -> PretrainedTextEncoder:
    """The encoder an export's `record` names, after checking its folder is still the one
    training used (a changed file would silently change every caption's features)."""
    path = Path(record["pretrained"])
    if not path.is_dir():
        raise FileNotFoundError(
            f"pretrained text encoder {path} (recorded by the export) does not exist: its "
            "weights are not in the export, put the folder back at that path")
    now, then = folder_digests(path), record["files"]
    if now != then:
        changed = sorted(n for n in set(now) & set(then) if now[n] != then[n])
        raise ValueError(
            f"pretrained text encoder {path} changed since the export was written: "
            f"changed {changed or '-'}, missing {sorted(set(then) - set(now)) or '-'}, "
            f"new {sorted(set(now) - set(then)) or '-'}; restore the folder training used")
    return PretrainedTextEncoder(path, record["max_len"], torch_dtype(record["dtype"]))


def text_encoder_debug() -> TextEncoderConfig:
    return TextEncoderConfig(max_len=64, dim=64, depth=2, heads=4)


def text_encoder_base() -> TextEncoderConfig:
    return TextEncoderConfig()


TEXT_PRESETS = {"debug": text_encoder_debug, "base": text_encoder_base}


def build_text_encoder(preset: str = "debug", **overrides) -> TextEncoder:
    """Built-in encoder; `debug` pairs with the debug DiT (text_dim 64), `base` with the rest."""
    if preset not in TEXT_PRESETS:
        raise ValueError(f"unknown text encoder preset {preset!r}; choose {sorted(TEXT_PRESETS)}")
    known = {f.name for f in fields(TextEncoderConfig)}
    if set(overrides) - known:
        raise ValueError(f"unknown TextEncoderConfig field(s) {sorted(set(overrides) - known)}")
    return TextEncoder(replace(TEXT_PRESETS[preset](), **overrides))
