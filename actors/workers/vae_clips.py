"""A VAE training worker's clips: decoded clips streamed into memory beside training.

`ClipBuffer` holds decoded clips (uint8 T, H, W, 3, from the decode stage) up to a byte budget,
filled from a stream of Arrow blocks by a background thread so that decoding overlaps training,
and samples random crops from them. `ClipStream` feeds it one pass over the videos at a time and
keeps the passes' bookkeeping, on every rank at once (actors/workers/train_vae.py's loop).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.common.tensors import unpack
from actors.common.video import to_video
from actors.workers.toolkit import Backend, reduce_sum


class ClipBuffer:
    """Decoded clips in memory, filled from a stream of Arrow blocks by a background thread."""

    def __init__(self, max_bytes: int, crop: tuple[int, int, int], seed: int = 0):
        self.max_bytes, self.crop = max_bytes, crop
        self.clips: list[torch.Tensor] = []  # uint8 (T, H, W, 3) each
        self.nbytes = self.seen = self.too_small = 0
        self.done = True  # no pass in flight
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.clips)

    def start(self, blocks: Iterator[pa.Table]) -> None:
        """Consume one pass of `blocks` in the background."""
        self.done = False
        threading.Thread(target=self._consume, args=(blocks,), daemon=True).start()

    def _consume(self, blocks: Iterator[pa.Table]) -> None:
        try:
            for table in blocks:
                for frames in unpack(table, "frames", np.uint8):
                    self.add(frames)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self.error = e
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def add(self, frames: np.ndarray) -> None:
        T, H, W, _ = frames.shape
        ct, cs, _ = self.crop
        self.seen += 1
        if T < ct or H < cs or W < cs:
            self.too_small += 1
            return
        clip = torch.from_numpy(np.array(frames))  # own copy: Arrow buffers are read-only
        with self.cond:
            if self.clips and self.nbytes + clip.numel() > self.max_bytes:
                i = self.rng.randrange(len(self.clips))  # full: replace a random clip
                self.nbytes -= self.clips[i].numel()
                self.clips[i] = clip
            else:
                self.clips.append(clip)
            self.nbytes += clip.numel()
            self.cond.notify_all()

    def wait(self) -> None:
        """Block until the buffer holds a clip or the pass has ended."""
        with self.cond:
            self.cond.wait_for(lambda: self.clips or self.done or self.error is not None)
        if self.error is not None:
            raise RuntimeError(f"the clip stream failed: {self.error}") from self.error

    def sample(self, n: int, flip: bool, g: torch.Generator,
               crop: tuple[int, int, int] | None = None) -> torch.Tensor:
        """n random crops (of `crop`, default the buffer's) -> float (n, 3, T, H, W)."""
        ct, ch, cw = crop or self.crop
        with self.cond:
            clips = [self.clips[int(i)] for i in torch.randint(len(self.clips), (n,),
                                                               generator=g)]
        out = []
        for clip in clips:
            T, H, W, _ = clip.shape
            t0, y0, x0 = (int(torch.randint(m + 1, (1,), generator=g))
                          for m in (T - ct, H - ch, W - cw))
            crop = clip[t0:t0 + ct, y0:y0 + ch, x0:x0 + cw]  # (T, H, W, 3)
            if flip and float(torch.rand(1, generator=g)) < 0.5:
                crop = crop.flip(2)
            out.append(crop)
        return to_video(torch.stack(out))  # (n, 3, T, H, W)


class ClipStream:
    """This worker's clips: a ClipBuffer fed by passes over `source()` (one per call), and the
    passes' bookkeeping, which `ready` does on every rank at once. `data`: the loop's
    `VAEDataConfig` (buffer_mb, passes, crop sizes)."""

    def __init__(self, data: Any, source: Callable[[], Iterator[pa.Table]],
                 backend: Backend, seed: int):
        self.data, self.source = data, source
        self.rank, self.world_size = backend.rank, backend.world_size
        self.buffer = ClipBuffer(data.buffer_mb * 2**20, data.largest_crop(), seed + self.rank)
        self.passes, self.streaming = 0, True
        self.buffer.start(source())

    def ready(self, device: torch.device) -> None:
        """Wait for a clip or this pass's end. A collective: once the pass has ended on every
        worker, all start the next (`data.passes`; 0 = keep re-reading), and if then no worker
        has a clip, every pass ended empty: a clear error."""
        buffer, d = self.buffer, self.data
        buffer.wait()
        with_clips, ended = reduce_sum([float(len(buffer) > 0), float(buffer.done)],
                                       device).tolist()
        if self.streaming and ended == self.world_size:
            self.passes += 1
            self.streaming = d.passes == 0 or self.passes < d.passes
            if self.streaming:  # every rank at once: the split's next epoch
                buffer.start(self.source())
        if with_clips == 0:
            raise RuntimeError(
                f"no usable clips after a full pass ({buffer.seen} decoded on rank {self.rank}, "
                f"{buffer.too_small} smaller than the crop {d.crop_frames}x{d.crop_size}"
                f"x{d.crop_size}); see RUN/errors, or lower data.crop_*")
