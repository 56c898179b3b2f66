"""Training throughput: tokens/s per worker, model FLOP utilisation, and whether the input
pipeline keeps up.

    python benchmarks/train.py [--quick] [--steps N] [--threads T]

1. Peak: the best fp32 matmul FLOP/s of this CPU, measured in this run with the same threads.
2. Cached: the worker loop (1-rank FSDP2, the code every Ray Train worker runs) on a fixed
   sequence of steps whose batches were loaded into memory beforehand.
3. Real data: the same steps streamed through Ray Data exactly as a worker gets them (step
   numbers -> PlanLoader actor reading Parquet -> collate), with a local Ray.
Model FLOPs per step are counted by torch's FlopCounterMode on one forward + backward.
Printed: tokens/s per worker, MFU = model FLOP/s / peak, and real/cached step time (the input
pipeline is not the bottleneck when the ratio is <= 1.1). Medians over the steps after warm-up.
Not part of the test suite; timings on a shared 2-core box are noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from actors.workers.toolkit import LocalBackend  # noqa: E402
from actors.workers.train_data import Collate, PlanLoader, planned_batches, read_index  # noqa: E402
from actors.workers.train_dit import draw, train_loop  # noqa: E402
from models.denoiser import Denoiser  # noqa: E402
from models.flow import flow_loss  # noqa: E402
from models.text_encoder import ByteTokenizer  # noqa: E402
from pipeline.config import load_config, to_dict  # noqa: E402
from pipeline.ray_train import keep_order, no_progress_bars  # noqa: E402
from pipeline.train import RankData, TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(out: Path, shapes: dict[str, tuple[int, ...]], clips: int) -> Path:
    """Random latents in the on-disk contract, one file per 4 clips, small row groups."""
    rng = np.random.default_rng(0)
    rows = [{"id": f"{b}-{i:04d}", "path": f"{b}-{i}.mp4", "caption": f"clip {i} of {b}",
             "bucket": b, "fps": 8.0, "num_frames": 4 * s[1] - 3, "height": 8 * s[2],
             "width": 8 * s[3], "start": 0.0, "latent_shape": list(s),
             "latent": rng.standard_normal(int(np.prod(s))).astype(np.float16)}
            for b, s in shapes.items() for i in range(clips)]
    types = {"fps": pa.float32(), "num_frames": pa.int32(), "height": pa.int32(),
             "width": pa.int32(), "latent": pa.list_(pa.float16()),
             "latent_shape": pa.list_(pa.int32())}
    out.mkdir(parents=True)
    for k in range(0, len(rows), 4):
        part = rows[k:k + 4]
        table = pa.table({c: pa.array([r[c] for r in part], types.get(c)) for c in rows[0]})
        pq.write_table(table, out / f"part-{k:05d}.parquet", row_group_size=1)
    return out


def matmul_peak(threads: int, n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_flops(cfg: TrainConfig, batch) -> float:
    """Model FLOPs of one forward + backward on `batch` (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = Denoiser(cfg.model, cfg.text_encoder).train()
    noise, t, drop = draw(batch, cfg)
    with FlopCounterMode(display=False) as counter:  # the loss the trainer computes
        flow_loss(model, batch.x, t, noise, weight=batch.weight, text_ids=batch.text_ids,
                  text_mask=batch.text_mask, fps=batch.fps, drop_text=drop).backward()
    return float(counter.get_total_flops())


def run(cfg: TrainConfig, batches, out: Path) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    train_loop(cfg, LocalBackend(out), batches, out, to_dict(cfg))
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the debug model; ~1 minute")
    parser.add_argument("--steps", type=int, default=0, help="steps per pass (default 30/40)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = ["checkpoint_every=100000", "log_every=100000", "data.batch_size=4"]
    if args.quick:
        shapes, steps = {"a-9f": (4, 3, 16, 16), "b-9f": (4, 3, 12, 20)}, args.steps or 30
    else:
        sets += ["model.hidden=256", "model.depth=4", "model.heads=4", "model.text_dim=128",
                 "text_encoder.dim=128"]
        shapes, steps = {"a-17f": (4, 5, 16, 16), "b-17f": (4, 5, 12, 20)}, args.steps or 40
    cfg = load_config(TrainConfig, ROOT / "configs/train/debug.yaml",
                      [*sets, f"steps={steps}", "loader.num_cpus=0.5"])
    warm = 5
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        latents = write_dataset(tmp / "latents", shapes, clips=steps * 2)
        index = read_index(latents)
        loader = PlanLoader(index, cfg.data, 1, 0)
        collate = Collate(ByteTokenizer(cfg.text_encoder.max_len))
        peak = matmul_peak(args.threads)

        cached = [collate(loader(pa.table({"step": [s]}))) for s in range(steps)]
        flops = statistics.mean(step_flops(cfg, b) for b in cached[:2])
        rows_cached = run(cfg, lambda start: iter(cached[start:]), tmp / "cached")

        import ray

        ray.init(address="local", num_cpus=2, object_store_memory=300 * 2**20,
                 include_dashboard=False, log_to_driver=False)
        try:
            keep_order(ray.data.DataContext.get_current())
            no_progress_bars(ray.data.DataContext.get_current())
            ds = RankData(tmp / "real", index, cfg, 0)()
            stream = planned_batches(ds.iterator(), collate, cfg.data.prefetch_steps)
            rows_real = run(cfg, stream, tmp / "real")
        finally:
            ray.shutdown()

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows[warm:])

    t_cached, t_real = median(rows_cached, "step_s"), median(rows_real, "step_s")
    tokens = median(rows_cached, "tokens_per_s_per_worker")
    mfu = flops / t_cached / peak
    n_params = sum(p.numel() for p in Denoiser(cfg.model, cfg.text_encoder).parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s); model {n_params / 1e6:.2f}M "
          f"params (DiT hidden {cfg.model.hidden}, depth {cfg.model.depth}, "
          f"{cfg.model.layout}); global batch {cfg.data.batch_size}; latents "
          f"{', '.join(f'{b} {s}' for b, s in shapes.items())}; {steps} steps, medians after "
          f"{warm}")
    print(f"matmul peak (fp32, 1024^3, this run):  {peak / 1e9:8.1f} GFLOP/s")
    print(f"model FLOPs per step (fwd + bwd):      {flops / 1e9:8.3f} GFLOP")
    print(f"step time, cached in-memory batches:  {1e3 * t_cached:8.1f} ms")
    print(f"step time, real data via Ray Data:    {1e3 * t_real:8.1f} ms   "
          f"(data wait {1e3 * median(rows_real, 'data_s'):.1f} ms)")
    print(f"tokens/s per worker (cached):         {tokens:8.0f}")
    print(f"model FLOP utilisation (cached):      {mfu:8.1%}")
    print(f"real / cached step time:              {t_real / t_cached:8.3f}   "
          f"({'OK' if t_real / t_cached <= 1.1 else 'input-bound'}: target <= 1.1)")


if __name__ == "__main__":
    main()
