"""A diffusers pipeline folder through `tubelet generate` against the diffusers pipeline called
in a loop over the same prompts (same run), and the memory each stage holds for the published
Wan configs.

    python benchmarks/pretrained.py [--videos 8] [--size 96] [--frames 17] [--steps 20]
                                    [--skip-speed] [--skip-memory]

1. Speed, on this machine: a small random Wan 2.1 pipeline folder (tests/pretrained.py's
   tokenizer and VAE, a 6-layer transformer of 6 x 32 heads, a 4-layer UMT5 of width 128),
   saved with save_pretrained. `WanPipeline.from_pretrained(folder)` called once per prompt
   (output_type="np"; its load timed apart) vs `run_generate` on a local Ray started first and
   timed apart (its actor pools load their components inside the time). Printed: s/video of
   both and the ratio diffusers / tubelet (> 1: tubelet is faster).
2. Memory (`--skip-speed`): the published Wan 2.1 T2V 1.3B / 14B and Wan 2.2 TI2V 5B
   transformer configs, both Wan VAEs and UMT5-XXL built on the meta device (no weights,
   nothing downloaded): parameters per stage and their bytes in bf16, i.e. what each stage's
   actor holds (the text stage the encoder, the sample stage the transformer, the decode
   stage the VAE).
Not a test; a shared 2-core box is noisy (run twice).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere

# Published configs (the folders' transformer/config.json and text_encoder/config.json).
WAN_TRANSFORMERS = {
    "Wan 2.1 T2V 1.3B": dict(num_attention_heads=12, attention_head_dim=128, num_layers=30,
                             ffn_dim=8960, in_channels=16, out_channels=16, text_dim=4096,
                             freq_dim=256, patch_size=(1, 2, 2), cross_attn_norm=True,
                             qk_norm="rms_norm_across_heads", eps=1e-6),
    "Wan 2.1 T2V 14B": dict(num_attention_heads=40, attention_head_dim=128, num_layers=40,
                            ffn_dim=13824, in_channels=16, out_channels=16, text_dim=4096,
                            freq_dim=256, patch_size=(1, 2, 2), cross_attn_norm=True,
                            qk_norm="rms_norm_across_heads", eps=1e-6),
    "Wan 2.2 TI2V 5B": dict(num_attention_heads=24, attention_head_dim=128, num_layers=30,
                            ffn_dim=14336, in_channels=48, out_channels=48, text_dim=4096,
                            freq_dim=256, patch_size=(1, 2, 2), cross_attn_norm=True,
                            qk_norm="rms_norm_across_heads", eps=1e-6),
}
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                num_heads=64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
               attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4],
                 num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True],
                 dropout=0.0, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                 scale_factor_spatial=16, scale_factor_temporal=4)


def small_wan_pipeline(folder: Path) -> Path:
    import diffusers
    import transformers

    from tests.pretrained import tiny_umt5_tokenizer, wan_scheduler
    from tests.unit.test_vae_adapters import tiny_wan

    torch.manual_seed(0)
    text = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=64, d_model=128, d_kv=32, num_heads=4, num_layers=4, d_ff=256,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=32, in_channels=4,
        out_channels=4, text_dim=128, freq_dim=64, ffn_dim=768, num_layers=6,
        rope_max_seq_len=64).eval()
    pipe = diffusers.WanPipeline(scheduler=wan_scheduler("unipc"), tokenizer=tiny_umt5_tokenizer(),
                                 text_encoder=text, transformer=transformer, vae=tiny_wan().eval())
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def bench_speed(args, root: Path) -> None:
    from pipeline.config import load_config
    from pipeline.generate import GenerateConfig, run_generate
    from pipeline.runtime import ray_session
    from tests.pretrained import diffusers_pipeline

    folder = small_wan_pipeline(root / "wan")
    prompts = [f"a {c} square moving {d}" for c in ("red", "blue", "green", "white")
               for d in ("left", "right", "up", "down")][:args.videos]
    kw = dict(height=args.size, width=args.size, num_frames=args.frames,
              num_inference_steps=args.steps, guidance_scale=5.0)
    t0 = time.perf_counter()
    pipe = diffusers_pipeline(folder)
    load = time.perf_counter() - t0
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        pipe(prompt=p, generator=torch.Generator().manual_seed(i), output_type="np", **kw)
    loop = time.perf_counter() - t0
    del pipe
    (root / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "seed": i}) + "\n"
                                          for i, p in enumerate(prompts)))
    cfg = load_config(GenerateConfig, ROOT / "configs/generate/default.yaml",
                      [f"defaults.height={args.size}", f"defaults.width={args.size}",
                       f"defaults.frames={args.frames}", f"defaults.steps={args.steps}",
                       "defaults.cfg=5.0", "ray.num_cpus=2"])
    t0 = time.perf_counter()
    with ray_session(None, cfg.ray):
        ray_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = run_generate(cfg, folder, root / "p.jsonl", root / "out", progress=False)
        ours = time.perf_counter() - t0
    n = len(prompts)
    print(f"{n} videos of {args.size}x{args.size}x{args.frames}, {args.steps} steps, CFG 5, "
          "a small random Wan 2.1 folder, 2-core CPU:")
    print(f"  diffusers WanPipeline loop  {loop / n:7.2f} s/video  (+ {load:.1f} s to load)")
    print(f"  tubelet generate (Ray)      {ours / n:7.2f} s/video  (pools load inside; the "
          f"local Ray's own start {ray_start:.1f} s before it)")
    print(f"  ratio diffusers / tubelet: {loop / ours:.2f}x; with diffusers' load counted "
          f"{(loop + load) / ours:.2f}x; first video after "
          f"{summary['first_video_seconds']:.1f} s")
    first, last = summary["first_video_seconds"], summary["last_video_seconds"]
    if n > 1 and last > first:
        steady = (last - first) / (n - 1)
        print(f"  tubelet steady state (first to last video): {steady:.2f} s/video, ratio "
              f"diffusers / tubelet {loop / n / steady:.2f}x")
    print(f"  tubelet stage busy seconds: {json.dumps(summary['stage_busy_seconds'])}")


def params_on_meta(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def bench_memory() -> None:
    import diffusers
    import transformers

    print("parameters per stage (published configs, meta device) and their bf16 bytes:")
    text = params_on_meta(lambda: transformers.UMT5EncoderModel(
        transformers.UMT5Config(**UMT5_XXL)))
    vae = params_on_meta(lambda: diffusers.AutoencoderKLWan(**WAN_VAE))
    vae22 = params_on_meta(lambda: diffusers.AutoencoderKLWan(**WAN22_VAE))
    rows = [("text stage: UMT5-XXL encoder", text), ("decode stage: Wan 2.1 VAE", vae),
            ("decode stage: Wan 2.2 VAE (TI2V)", vae22)]
    for name, cfg in WAN_TRANSFORMERS.items():
        rows.append((f"sample stage: {name} transformer",
                     params_on_meta(lambda cfg=cfg: diffusers.WanTransformer3DModel(**cfg))))
    for name, n in rows:
        print(f"  {name:44s} {n / 1e9:6.2f} B params  {2 * n / 2**30:6.1f} GiB bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not args.skip_memory:
        bench_memory()
    if not args.skip_speed:
        with tempfile.TemporaryDirectory(prefix="tubelet-bench-") as tmp:
            bench_speed(args, Path(tmp))


if __name__ == "__main__":
    main()
