"""Decoding straight from an object store: the decode stage reading videos from a local
S3-compatible server (moto on loopback, tests/s3.py) against the same files on local disk,
in the same run, and the GET requests per video.

    python benchmarks/storage.py [--videos 8] [--repeats 3]

Videos: `tubelet synth --kind photos` (pans and zooms over natural photos: real-sized files)
of 1280x720, 8-10 s at 30 fps, crf 12 (the default preprocess buckets cut two clips from
each, downscaled by the decoder). The probe and bucket stages plan the clips once per
location (their plans are the same); then the decode stage (`DecodeStage`, in this process,
one thread) decodes every clip, `--repeats` times, from local paths and from `s3://` URIs
(its `RemoteFile`: 4 MiB ranged GETs, seeks, no local copy). Printed: frames/s of both and
their ratio (s3 / local; 1.0: no cost), and the requests the server saw per video for one
probe + decode pass: HEAD and GET, with tubelet's buffer and, for comparison, with pyarrow's
input file handed to PyAV as it is.
Loopback has no network latency: against a real store each GET costs a round trip (tens of
ms), which is why the count matters more than the loopback time.
Not a test; a shared 2-core box is noisy (run twice).
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere

from actors.common.stage import run_here  # noqa: E402
from actors.common.storage import resolve  # noqa: E402
from actors.decode import DecodeStage  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.sources import list_sources  # noqa: E402
from pipeline.streams import PreprocessConfig, plan_stages  # noqa: E402
from pipeline.synth import SynthConfig, synthesize  # noqa: E402
from tests.s3 import aws_env, new_bucket, s3_server  # noqa: E402


class Requests(logging.Handler):
    """Counts the requests moto's server logs (one werkzeug record each), by method."""

    def __init__(self):
        super().__init__()
        self.seen: Counter = Counter()

    LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|HEAD|PUT|POST) /')  # colour codes on 206

    def emit(self, record: logging.LogRecord) -> None:
        found = self.LINE.search(record.getMessage())
        if found:
            self.seen[found.group(1)] += 1


def plan(cfg: PreprocessConfig, src: str, fs=None):
    return run_here(list_sources(src, storage=cfg.storage), plan_stages(cfg, None, fs=fs))


def decode_rate(clips, fs, repeats: int) -> tuple[float, int]:
    """Median frames/s of the decode stage over the plan, and frames per pass."""
    stage = DecodeStage(None, threads=1, fs=fs)
    rates, frames = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = stage(clips)
        frames = sum(s[0] for s in out.column("frames_shape").to_pylist())
        rates.append(frames / (time.perf_counter() - t0))
    return statistics.median(rates), frames


def raw_pyarrow_requests(store, counter: Requests) -> Counter:
    """Requests of decoding one video through pyarrow's input file as it is (no buffer)."""
    import av

    counter.seen.clear()
    with store.fs.open_input_file(store.path) as f, av.open(f) as container:
        for _ in container.decode(video=0):
            pass
    return Counter(counter.seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    cfg = load_config(PreprocessConfig, ROOT / "configs/preprocess/default.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(SynthConfig(num_videos=args.videos, seed=7, workers=1, sizes=[(1280, 720)],
                               min_seconds=8.0, max_seconds=10.0, kind="photos", crf=12,
                               fps=[30]), root / "videos")
        size = sum(p.stat().st_size for p in (root / "videos").glob("*.mp4"))
        counter = Requests()
        logging.getLogger("werkzeug").addHandler(counter)
        logging.getLogger("werkzeug").setLevel(logging.INFO)
        with s3_server(verbose=True) as endpoint, aws_env(endpoint, root):
            bucket = new_bucket(endpoint)
            src = bucket.put_tree(root / "videos", "videos")
            fs = resolve(src).fs
            local_plan = plan(cfg, str(root / "videos"))
            counter.seen.clear()
            remote_plan = plan(cfg, src, fs)
            probe_requests = Counter(counter.seen)
            assert remote_plan.num_rows == local_plan.num_rows
            counter.seen.clear()
            DecodeStage(None, threads=1, fs=fs)(remote_plan)
            decode_requests = Counter(counter.seen)
            local_rate, frames = decode_rate(local_plan, None, args.repeats)
            remote_rate, _ = decode_rate(remote_plan, fs, args.repeats)
            first = resolve(remote_plan.column("path")[0].as_py())
            raw = raw_pyarrow_requests(first, counter)
            one = first.info().size
    n = args.videos
    print(f"{n} photo videos of 1280x720, 8-10 s ({size / n / 2**20:.2f} MiB each), "
          f"{local_plan.num_rows} clips, {frames} frames per pass; decode stage, 1 thread, "
          f"median of {args.repeats}:")
    print("  source            frames/s")
    print(f"  local disk        {local_rate:8.1f}")
    print(f"  s3 (loopback)     {remote_rate:8.1f}   s3 / local = {remote_rate / local_rate:.2f}")
    print("requests per video (probe + bucket, then decode of its clips):")
    print(f"  probe   HEAD {probe_requests['HEAD'] / n:.1f}  GET {probe_requests['GET'] / n:.1f}"
          f"   (listing included)")
    print(f"  decode  HEAD {decode_requests['HEAD'] / n:.1f}  GET {decode_requests['GET'] / n:.1f}")
    print(f"one video ({one / 2**20:.2f} MiB) decoded through pyarrow's input file as it is: "
          f"HEAD {raw['HEAD']}, GET {raw['GET']}")


if __name__ == "__main__":
    main()
