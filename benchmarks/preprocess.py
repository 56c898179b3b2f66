"""Preprocess benchmark: same-run ratios for `tubelet preprocess` (not part of the tests).

  python benchmarks/preprocess.py [--videos 16] [--scale 10] [--big-videos 48]

1. decode stage (Ray actor, Arrow batches) vs a plain single-process PyAV loop doing the
   identical decode + resize + crop of the same clips            target >= 0.8
2. end-to-end pipeline vs the slowest stage run alone (stages overlap)  target >= 0.85;
   also the graph with `fuse_decode` (decode inside the VAE actors: no frames in the object
   store) against the two-pool graph, and the frame bytes the two-pool graph moves
3. peak memory (RSS of the driver and every Ray process it started, sampled) with `scale`x
   more input videos                                              target <= 1.3x
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pyarrow as pa
import ray

from actors.common.stage import run_here
from actors.decode import DecodeStage, decode_clip
from actors.vae_encode import VAEEncodeStage
from pipeline.config import load_config
from pipeline.pools import sized
from pipeline.preprocess import preprocess_stages, run_preprocess
from pipeline.sources import list_sources
from pipeline.streams import PreprocessConfig, plan_stages, stream
from pipeline.synth import SynthConfig, synthesize

ROOT = Path(__file__).resolve().parents[1]


def config(*overrides: str) -> PreprocessConfig:
    """The shipped config on a local 2-CPU Ray, its pools sized as `tubelet preprocess` does."""
    cfg = load_config(PreprocessConfig, ROOT / "configs/preprocess/default.yaml",
                      ["ray.num_cpus=2", "ray.object_store_mb=400", *overrides])
    return sized("benchmark", cfg, lambda c: preprocess_stages(c, Path("unused")), None)


def plan_clips(cfg: PreprocessConfig, src: Path) -> pa.Table:
    return run_here(list_sources(src), plan_stages(cfg, None))


def plain_loop(clips: pa.Table) -> tuple[float, int]:
    start, frames = time.perf_counter(), 0
    for c in clips.to_pylist():
        frames += len(decode_clip(c["path"], c["start"], c["fps"], c["num_frames"], c["height"],
                                  c["width"], c["rotation"], threads=1))
    return time.perf_counter() - start, frames


def timed(ds, frames_of=lambda b: int(sum(b.column("num_frames").to_pylist()))
          ) -> tuple[float, float]:
    """(total seconds, steady-state frames/s). Steady state runs from the first output batch
    to the last, so actor start-up (model load, process spawn) is not counted as throughput."""
    start = time.perf_counter()
    first, frames = None, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if first is None:
            first = time.perf_counter()
        else:
            frames += frames_of(batch)
    end = time.perf_counter()
    return end - start, frames / max(end - first, 1e-9)


def stage_alone(cfg: PreprocessConfig, clips: pa.Table, stage: str) -> tuple[float, float]:
    """Seconds for one stage over pre-computed inputs held in the object store."""
    import ray.data

    decode = DecodeStage.spec(replace(cfg, decode_threads=1), None)
    if stage == "decode":
        ds = ray.data.from_arrow([clips.slice(i, 2) for i in range(0, clips.num_rows, 2)])
        return timed(decode.apply(ds))
    decoded = decode.build()(clips)
    ds = ray.data.from_arrow([decoded.slice(i, 2) for i in range(0, decoded.num_rows, 2)])
    return timed(VAEEncodeStage.spec(cfg, None).apply(ds))


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants (the local Ray)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--big-videos", type=int, default=48,
                    help="640x360 videos for the throughput ratios (start-up amortised)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tubelet-bench-"))
    synth = SynthConfig(num_videos=args.videos * args.scale, seed=0)
    synthesize(synth, tmp / "all")
    small = tmp / "small"
    small.mkdir()
    for p in sorted((tmp / "all").glob("*.mp4"))[: args.videos]:
        (small / p.name).symlink_to(p)
    # Throughput: 640x360, 5 s videos into 256px buckets of 33 frames: per-clip work of the
    # size real footage has, so per-batch overheads are weighed against real work.
    big = tmp / "big"
    synthesize(SynthConfig(num_videos=args.big_videos, seed=1, sizes=[(640, 360), (360, 640)],
                           min_seconds=4.5, max_seconds=5.0), big)
    cfg = config("buckets.resolutions=[{name: 256px, pixels: 65536, batch_sizes: {33: 4}}]",
                 "decode.batch_size=4", "encode.batch_size=4")
    small, memory_src = big, small
    clips = plan_clips(cfg, small)
    frames = int(sum(clips.column("num_frames").to_pylist()))
    print(f"{args.videos} videos -> {clips.num_rows} clips, {frames} frames "
          f"(buckets: {sorted(set(clips.column('bucket').to_pylist()))})")

    plain_s, _ = plain_loop(clips)
    ray.init(num_cpus=2, object_store_memory=400 * 2**20, include_dashboard=False)
    decode_s = stage_alone(cfg, clips, "decode")
    encode_s = stage_alone(cfg, clips, "encode")
    e2e_ds = stream(cfg, list_sources(small), preprocess_stages(cfg, tmp / "e2e"))
    e2e_s = timed(e2e_ds, frames_of=lambda b: int(sum(b.column("frames").to_pylist())))
    fused_cfg = replace(cfg, fuse_decode=True)
    fused_ds = stream(fused_cfg, list_sources(small), preprocess_stages(fused_cfg, tmp / "fused"))
    fused_s = timed(fused_ds, frames_of=lambda b: int(sum(b.column("frames").to_pylist())))
    ray.shutdown()
    plain = frames / plain_s
    # End to end is compared on totals, start-up included on both sides: the writer's stats
    # rows arrive in bursts, so a first-to-last-batch rate means nothing for it.
    slowest = max(decode_s[0], encode_s[0])
    print(f"plain PyAV loop        {plain:8.1f} frames/s")
    print(f"decode stage (Ray)     {decode_s[1]:8.1f} frames/s steady ({frames / decode_s[0]:.1f} "
          f"incl. start-up)   ratio {decode_s[1] / plain:.2f}  (target >= 0.8)")
    print(f"encode stage alone     {encode_s[1]:8.1f} frames/s steady ({frames / encode_s[0]:.1f} "
          "incl. start-up)")
    print(f"end to end             {frames / e2e_s[0]:8.1f} frames/s incl. start-up, "
          f"{clips.num_rows / e2e_s[0]:.2f} clips/s   ratio vs slowest stage alone "
          f"{slowest / e2e_s[0]:.2f}  (target >= 0.85)")
    frame_bytes = sum(r["num_frames"] * r["height"] * r["width"] * 3 for r in clips.to_pylist())
    print(f"fused decode+encode    {frames / fused_s[0]:8.1f} frames/s incl. start-up, "
          f"{clips.num_rows / fused_s[0]:.2f} clips/s   time fused / two pools "
          f"{fused_s[0] / e2e_s[0]:.2f}; decoded frames kept out of the object store: "
          f"{frame_bytes / 2**20:.0f} MiB")

    peaks = {}
    for name, src in (("1x", memory_src), (f"{args.scale}x", tmp / "all")):
        with PeakRSS() as rss:
            summary = run_preprocess(config(), str(src), tmp / f"mem-{name}", progress=False)
        peaks[name] = rss.peak
        print(f"peak RSS {name:>4}: {rss.peak / 2**20:8.0f} MiB for {summary['clips_written']} "
              f"clips ({summary['clips_per_second']} clips/s, {summary['frames_per_second']} "
              "frames/s)")
    ratio = peaks[f"{args.scale}x"] / peaks["1x"]
    print(f"peak memory ratio {args.scale}x inputs / 1x: {ratio:.2f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
