"""Pixel budgets benchmark: what `max_pixels` / `decode_budget.pixels` (handed to FFmpeg's own
decoders) cost on good videos and save on hostile ones (not part of the tests).

  python benchmarks/budgets.py [--videos 16] [--repeats 11]

1. decode time of the same clips of good videos, `decode_budget.pixels` on vs off (0), median
                                                                   target <= 1.05x
2. peak RSS of one process probing a file whose H.264 SPS claims 12000x8000: the probe as it
   runs (max_pixels reaches the decoder FFmpeg runs while opening) vs a plain `av.open`
3. peak RSS of one process decoding a file that grows to 12000x8000 at its second IDR
   (the probe sees 96x64): `decode_budget.pixels` on vs off
Each memory case runs in a fresh process whose peak RSS is reset after its imports
(/proc/self/clear_refs), so a row is what that one file cost.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

BUDGET = 8192 * 8192


def _peak_mib(case: str, path: str, queue) -> None:
    import av
    import pyarrow as pa

    from actors.decode import ClipError, DecodeBudget, decode_clip
    from actors.probe import VideoRejected, probe_video

    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: not the imports'
    base = _vm("VmRSS")
    outcome = "ok"
    try:
        if case == "plain av.open":
            with av.open(path) as c:
                outcome = f"opened, {c.streams.video[0].codec_context.width} px wide"
        elif case == "probe":
            probe_video(path, max_pixels=BUDGET)
        else:
            pixels = BUDGET if case == "decode, pixels on" else 0
            decode_clip(path, 0.0, 8.0, 9, 64, 96, threads=1,
                        budget=DecodeBudget(seconds=60, frames=2000, pixels=pixels))
            outcome = "a clip"
    except (VideoRejected, ClipError) as e:
        outcome = f"refused: {str(e)[:60]}"
    del pa
    queue.put((base, _vm("VmHWM"), outcome))


def _vm(field: str) -> float:
    """A /proc/self/status memory field of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak(case: str, path: Path) -> tuple[float, float, str]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_peak_mib, args=(case, str(path), queue))
    p.start()
    got = queue.get(timeout=300)
    p.join()
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()

    from actors.decode import DecodeBudget, DecodeStage
    from benchmarks.preprocess import config, plan_clips
    from pipeline.synth import SynthConfig, synthesize
    from tests.hostile import encode, grows_midstream, patch_sps_size

    tmp = Path(tempfile.mkdtemp(prefix="tubelet-budgets-"))
    # 640x360, 5 s videos into 256px buckets of 33 frames (benchmarks/preprocess.py's
    # throughput set): per-clip decoding work of the size real footage has
    synthesize(SynthConfig(num_videos=args.videos, seed=1, sizes=[(640, 360), (360, 640)],
                           min_seconds=4.5, max_seconds=5.0, workers=1), tmp / "good")
    clips = plan_clips(config("buckets.resolutions=[{name: 256px, pixels: 65536, "
                              "batch_sizes: {33: 4}}]"), tmp / "good")
    frames = int(sum(clips.column("num_frames").to_pylist()))
    times: dict[int, list[float]] = {BUDGET: [], 0: []}
    for r in range(args.repeats):  # alternating order; medians: this machine's noise is ~20%
        for pixels in (BUDGET, 0) if r % 2 else (0, BUDGET):
            stage = DecodeStage(threads=1, budget=DecodeBudget(120, 20000, pixels))
            start = time.perf_counter()
            out = stage(clips)
            times[pixels].append(time.perf_counter() - start)
            assert out.num_rows == clips.num_rows and not stage.errors.rows
    on, off = statistics.median(times[BUDGET]), statistics.median(times[0])
    print(f"{args.videos} good videos -> {clips.num_rows} clips, {frames} frames")
    print(f"decode, decode_budget.pixels on  {on:6.2f} s (median of {args.repeats})")
    print(f"decode, decode_budget.pixels off {off:6.2f} s   ratio on / off {on / off:.3f}  "
          "(target <= 1.05)")

    huge = patch_sps_size(encode(tmp / "sps_claims_huge.mp4", "libx264"), 12000, 8000)
    grows = grows_midstream(tmp / "sps_grows_midstream.mkv", 12000, 8000)
    rows = [("probe", huge), ("plain av.open", huge),
            ("decode, pixels on", grows), ("decode, pixels off", grows)]
    peaks = {}
    for case, path in rows:
        base, top, outcome = peak(case, path)
        peaks[case] = top - base
        print(f"{path.name:26} {case:20} peak RSS {top:7.0f} MiB (+{top - base:5.0f} over "
              f"the imports)  {outcome}")
    probe = peaks["probe"] / max(peaks["plain av.open"], 1)
    decode = peaks["decode, pixels on"] / max(peaks["decode, pixels off"], 1)
    print(f"memory over the imports: huge SPS, probe / plain open {probe:.2f}x; grown stream, "
          f"decode with / without the pixel budget {decode:.2f}x")

if __name__ == "__main__":
    main()
