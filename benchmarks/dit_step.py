"""DiT training-step cost per attention layout as clips get longer, and against diffusers.

    python benchmarks/dit_step.py [--quick]

1. Forward+backward time and tokens/s for every layout as T grows at a fixed H x W. Attention
   over all N tokens (full3d) costs ~N^2, so its step time should grow towards T^2; the
   factorized layouts attend within a frame (cost ~T) and along time (~T^2 but with only T
   tokens per sequence), so they stay ~T. Printed: the measured growth ratio and its exponent.
2. When diffusers is installed: our factorized / full3d step time over that of diffusers'
   LatteTransformer3DModel / WanTransformer3DModel built at the same width, depth, heads,
   MLP width and token count (ratio < 1: we are faster).
Not part of the test suite. Timings on a shared CPU are noisy: medians of a few repeats.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from models.dit import LAYOUTS, build_dit  # noqa: E402


def step_seconds(step: Callable[[], torch.Tensor], repeats: int) -> float:
    """Fastest wall time of forward + backward over `repeats`, after one warm-up step.

    The minimum, not the mean: on a shared machine other processes only ever add time.
    """
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        step().float().square().mean().backward()
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def ours(layout: str, s: argparse.Namespace, T: int) -> Callable[[], torch.Tensor]:
    model = build_dit(
        "debug", layout=layout, hidden=s.hidden, heads=s.heads, depth=s.depth,
        in_channels=s.channels, text_dim=s.hidden, text_dropout=0.0,
    ).train()  # fmt: skip
    x, t = torch.randn(s.batch, s.channels, T, s.size, s.size), torch.rand(s.batch)
    text = torch.randn(s.batch, s.text_len, s.hidden)
    return lambda: model(x, t, text=text, fps=torch.full((s.batch,), 24.0))


def latte(s: argparse.Namespace, T: int) -> Callable[[], torch.Tensor]:
    from diffusers import LatteTransformer3DModel

    # Latte's configuration (ada_norm_single, gelu-approximate), our width/depth/heads.
    model = LatteTransformer3DModel(
        num_attention_heads=s.heads, attention_head_dim=s.hidden // s.heads,
        in_channels=s.channels, out_channels=s.channels, num_layers=s.depth,
        cross_attention_dim=s.hidden, sample_size=s.size, patch_size=2,
        activation_fn="gelu-approximate", norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=s.hidden, video_length=T,
    ).train()  # fmt: skip
    x, t = torch.randn(s.batch, s.channels, T, s.size, s.size), torch.randint(0, 1000, (s.batch,))
    text = torch.randn(s.batch, s.text_len, s.hidden)
    return lambda: model(x, t, encoder_hidden_states=text, return_dict=False)[0]


def wan(s: argparse.Namespace, T: int) -> Callable[[], torch.Tensor]:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=s.heads, attention_head_dim=s.hidden // s.heads,
        in_channels=s.channels, out_channels=s.channels, text_dim=s.hidden,
        ffn_dim=4 * s.hidden, num_layers=s.depth,
    ).train()  # fmt: skip
    x, t = torch.randn(s.batch, s.channels, T, s.size, s.size), torch.rand(s.batch) * 1000
    text = torch.randn(s.batch, s.text_len, s.hidden)
    return lambda: model(x, t, encoder_hidden_states=text, return_dict=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: 1 with --quick, else torch's)",
    )
    args = parser.parse_args()
    # One thread in --quick: at these small sizes on a shared 2-core box, two threads spend
    # more time waiting on each other than computing, and timings scatter.
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    s = argparse.Namespace(
        hidden=64, heads=2, depth=2, channels=4, size=32, batch=1, text_len=16,
        frames=(2, 4, 8), repeats=3,
    )  # fmt: skip
    if not args.quick:
        s.hidden, s.heads, s.depth, s.frames, s.repeats = 128, 4, 4, (2, 4, 8, 16), 3
    torch.manual_seed(0)
    tokens_per_frame = (s.size // 2) ** 2
    print(
        f"DiT fwd+bwd on CPU ({torch.get_num_threads()} threads, torch {torch.__version__}): "
        f"width {s.hidden}, depth {s.depth}, heads {s.heads}, batch {s.batch}, "
        f"latent {s.size}x{s.size} -> {tokens_per_frame} tokens/frame, patch (1, 2, 2)"
    )
    print(
        f"{'layout':<12}" + "".join(f"{f'T={T} (N={T * tokens_per_frame})':>22}" for T in s.frames)
    )
    step_seconds(ours("full3d", s, s.frames[0]), 3)  # warm up the allocator and kernels
    times: dict[str, list[float]] = {}
    for layout in LAYOUTS:
        times[layout] = [step_seconds(ours(layout, s, T), s.repeats) for T in s.frames]
        cells = [
            f"{1e3 * sec:8.1f} ms {s.batch * T * tokens_per_frame / sec:7.0f} tok/s"
            for T, sec in zip(s.frames, times[layout], strict=True)
        ]
        print(f"{layout:<12}" + "".join(f"{c:>22}" for c in cells), flush=True)

    t_ratio = s.frames[-1] / s.frames[0]
    print(
        f"\ngrowth of step time from T={s.frames[0]} to T={s.frames[-1]} ({t_ratio:.0f}x frames; "
        "full3d tends to T^2 as attention outweighs the MLPs, the others stay ~T):"
    )
    last = s.frames[-1] / s.frames[-2]
    for layout, ts in times.items():
        ratio = ts[-1] / ts[0]
        # the exponent over the last step of T: where attention has grown to outweigh the MLPs
        print(f"  {layout:<12} {ratio:6.2f}x   ~T^{math.log(ratio) / math.log(t_ratio):.2f}   "
              f"(T={s.frames[-2]}->{s.frames[-1]}: "
              f"~T^{math.log(ts[-1] / ts[-2]) / math.log(last):.2f})")

    print("\nagainst diffusers (same width, depth, heads, MLP width, tokens; ours / theirs):")
    try:
        import diffusers
    except ImportError:
        print("  diffusers not installed, skipped")
        return
    print(f"  diffusers {diffusers.__version__}")
    theirs = {
        name: [step_seconds(build(s, T), s.repeats) for T in s.frames]
        for name, build in (("Latte", latte), ("Wan", wan))
    }
    # Latte's num_layers = L means L spatial + L temporal blocks, each with an MLP: block for
    # block that is our interleaved layout at depth 2L; our factorized at depth L has the same
    # attentions but half the MLPs.
    deep = argparse.Namespace(**{**vars(s), "depth": 2 * s.depth})
    times["interleaved x2"] = [
        step_seconds(ours("interleaved", deep, T), s.repeats) for T in s.frames
    ]
    pairs = [
        (f"factorized, depth {s.depth}", "factorized", "Latte"),
        (f"interleaved, depth {2 * s.depth}", "interleaved x2", "Latte"),
        (f"full3d, depth {s.depth}", "full3d", "Wan"),
    ]
    for label, key, name in pairs:
        cells = [
            f"T={T}: {1e3 * a:.0f}/{1e3 * b:.0f} ms = {a / b:.2f}"
            for T, a, b in zip(s.frames, times[key], theirs[name], strict=True)
        ]
        print(f"  {label:<22} vs {name:<6}" + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
