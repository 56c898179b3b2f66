"""Caption encoders: a built-in byte-level transformer, or a pretrained one from a local path.

Both give the same interface, `encode(captions) -> (features (B, L, out_dim), mask (B, L))`,
with mask True on real tokens, which is what `DiT(text=..., text_mask=...)` takes.

- `TextEncoder` (built-in): a byte tokenizer (no vocabulary file, nothing to download) and a
  small pre-norm transformer. It is an ordinary trainable module: put its parameters in the
  DiT's optimizer and it trains jointly with the DiT.
- `PretrainedTextEncoder`: a frozen Hugging Face encoder (T5 / UMT5 or any `AutoModel`) plus
  its tokenizer, loaded from a local directory. Needs the optional `transformers` package.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


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


@dataclass
class TextEncoderConfig:
    max_len: int = 128  # bytes, BOS/EOS included
    dim: int = 512
    depth: int = 4
    heads: int = 8
    mlp_ratio: float = 4.0

    def validate(self) -> None:
        if self.max_len < 3:
            raise ValueError(f"max_len must be >= 3 (BOS, a byte, EOS), got {self.max_len}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")


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
        self.tokenizer = ByteTokenizer(config.max_len)
        self.embed = nn.Embedding(ByteTokenizer.vocab_size, config.dim)
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


class PretrainedTextEncoder(nn.Module):
    """A frozen Hugging Face encoder and its tokenizer from a local directory (no download)."""

    def __init__(self, path: str | Path, max_len: int = 256, dtype: torch.dtype = torch.float32):
        super().__init__()
        try:
            import transformers
        except ImportError as e:
            raise ImportError(
                "a pretrained text encoder needs `transformers`: pip install 'tubelet[bench]'"
            ) from e
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
        self.model = cls.from_pretrained(path, local_files_only=True).to(dtype)
        self.model.eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_len = max_len
        self._out_dim = getattr(config, "d_model", None) or config.hidden_size

    @property
    def out_dim(self) -> int:
        return self._out_dim

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        return super().train(False)  # frozen: keep dropout off whatever the parent does

    @torch.no_grad()
    def encode(
        self, captions: list[str], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = device or next(self.model.parameters()).device
        tok = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_len,
            return_tensors="pt",
        )  # fmt: skip
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out.float() * mask[..., None], mask  # (B, L, out_dim), (B, L)


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
