"""Test inputs for the preprocess stages: a small video writer and a set of broken inputs.

`bad_inputs(tmp_path)` writes one file (or non-file) per way an input can be broken and
returns {kind: path}; `BAD_INPUT_STAGE[kind]` is the stage that must turn it into an error
row ("probe" refuses it from the headers; "decode" gets past the probe and fails while
decoding, e.g. a truncated mp4 whose index sits at the front). Importable from stage and
integration tests alike (`from tests.badfiles import bad_inputs`).
"""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# kind -> the stage that must report it
BAD_INPUT_STAGE: dict[str, str] = {
    "missing": "probe",  # no such file
    "directory": "probe",  # a folder named like a video
    "empty": "probe",  # zero bytes
    "random_bytes": "probe",  # noise named .mp4
    "text": "probe",  # a text file named .mp4
    "audio_only": "probe",  # aac in .mp4, no video stream
    "truncated": "probe",  # first 40% of an mp4 whose index (moov) is at the end
    "huge_dims": "probe",  # header claims 12000x12000 (over max_pixels)
    "huge_side": "probe",  # header claims 20000x64 (over max_side)
    "absurd_dims": "probe",  # header claims 40000x40000; FFmpeg reports 0x0, logs the size
    "truncated_faststart": "decode",  # cut 40% into the frames of an mp4 indexed up front
    "corrupt": "decode",  # 25-60% of the h264 data zeroed, index intact
}

# kinds that a directory scan never lists (no file there / not a file): only a manifest or
# an explicit path can name them
NOT_LISTED = ("missing", "directory")


def frame_image(i: int, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 frame i: a white square moving right 2 px a frame on a gradient,
    and a red marker in the top-left corner (to check rotation)."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (x * 200 // max(width - 1, 1)).astype(np.uint8)
    img[..., 1] = (y * 200 // max(height - 1, 1)).astype(np.uint8)
    img[..., 2] = 60
    size = max(4, height // 4)
    x0 = (2 * i) % max(width - size, 1)
    y0 = (height - size) // 2
    img[y0:y0 + size, x0:x0 + size] = 255
    m = max(2, min(width, height) // 8)
    img[:m, :m] = (255, 0, 0)
    return img


def write_video(path: str | Path, width: int = 64, height: int = 48, fps: int = 30,
                num_frames: int = 60, gop: int | None = None, faststart: bool = False,
                rotation: int = 0, sar: Fraction | None = None) -> Path:
    """Write an h264 mp4 of `frame_image` frames. gop: keyframe interval (None = x264's
    default); faststart: index (moov) before the data; rotation: display matrix,
    counter-clockwise degrees as PyAV's `VideoFrame.rotation` reads it back; sar: sample
    aspect ratio (the shown width of a stored pixel over its height; None = square)."""
    path = Path(path)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        if gop is not None:  # fixed keyframe interval, no scene-cut keyframes
            stream.options = {**stream.options, "g": str(gop), "keyint_min": str(gop),
                              "sc_threshold": "0"}
        stream.codec_context.thread_count = 1
        if rotation:
            stream.set_display_rotation(rotation)
        if sar is not None:  # x264 writes it into the SPS, the mp4 muxer into `pasp`
            stream.codec_context.sample_aspect_ratio = sar
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: str | Path, seconds: float = 0.5) -> Path:
    """An aac file with no video stream."""
    path = Path(path)
    rate, chunk = 16000, 1024
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        t = np.arange(int(rate * seconds)) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for i in range(0, len(tone) - chunk + 1, chunk):
            frame = av.AudioFrame.from_ndarray(tone[None, i:i + chunk], format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_rawvideo_claiming(path: str | Path, claim_w: int, claim_h: int) -> Path:
    """A tiny 48x32 rawvideo AVI whose headers (avih and the stream's BITMAPINFOHEADER) are
    patched to claim claim_w x claim_h. FFmpeg reports the claimed size as long as it passes
    its own av_image_check_size (about 16k x 16k), and 0x0 beyond that."""
    path = Path(path)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("rawvideo", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "bgr24"
        for i in range(3):
            img = np.full((32, 48, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(path.read_bytes())
    i = data.index(b"strf") + 8  # BITMAPINFOHEADER: biSize, biWidth, biHeight (< 0: top-down)
    assert struct.unpack("<ii", data[i + 4:i + 12]) == (48, -32), "unexpected AVI layout"
    data[i + 4:i + 12] = struct.pack("<ii", claim_w, -claim_h)
    i = data.index(b"avih") + 8 + 32  # MainAVIHeader: dwWidth, dwHeight at offset 32
    assert struct.unpack("<II", data[i:i + 8]) == (48, 32), "unexpected AVI layout"
    data[i:i + 8] = struct.pack("<II", claim_w, claim_h)
    path.write_bytes(bytes(data))
    return path


def bad_inputs(tmp_path: str | Path) -> dict[str, Path]:
    """Write every kind in BAD_INPUT_STAGE under tmp_path/bad; returns {kind: path}."""
    root = Path(tmp_path) / "bad"
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {"missing": root / "missing.mp4"}

    out["directory"] = root / "folder.mp4"
    out["directory"].mkdir(exist_ok=True)
    out["empty"] = root / "empty.mp4"
    out["empty"].write_bytes(b"")
    out["random_bytes"] = root / "random.mp4"
    out["random_bytes"].write_bytes(np.random.default_rng(0).bytes(4096))
    out["text"] = root / "notes.mp4"
    out["text"].write_text("a red circle moving left on a dark background\n" * 20)
    out["audio_only"] = write_audio_only(root / "audio_only.mp4")

    # 192x144 (4:3), 4 s at 30 fps: big and long enough for the default buckets (128px,
    # 17 frames at 8 fps = the first 2.1 s), so the damage lands inside the planned clip
    full = write_video(root / "full.mp4", width=192, height=144, num_frames=120)
    data = full.read_bytes()
    assert data.rfind(b"moov") > data.find(b"mdat"), "expected the index at the end"
    out["truncated"] = root / "truncated.mp4"
    out["truncated"].write_bytes(data[:int(len(data) * 0.4)])

    fast = write_video(root / "fast_full.mp4", width=192, height=144, num_frames=120,
                       faststart=True).read_bytes()
    assert fast.find(b"moov") < fast.find(b"mdat"), "expected the index at the front"
    out["truncated_faststart"] = root / "truncated_faststart.mp4"
    mdat = fast.find(b"mdat")  # cut 40% into the frame data, past the index
    out["truncated_faststart"].write_bytes(fast[:mdat + int((len(fast) - mdat) * 0.4)])

    # zero 25-60% of the h264 data; the index (moov, at the end) stays intact
    mdat, moov = data.find(b"mdat"), data.rfind(b"moov")
    a = mdat + (moov - mdat) // 4
    b = mdat + 3 * (moov - mdat) // 5
    out["corrupt"] = root / "corrupt.mp4"
    out["corrupt"].write_bytes(data[:a] + bytes(b - a) + data[b:])
    full.unlink()
    (root / "fast_full.mp4").unlink()

    out["huge_dims"] = write_rawvideo_claiming(root / "huge_dims.avi", 12000, 12000)
    out["huge_side"] = write_rawvideo_claiming(root / "huge_side.avi", 20000, 64)
    out["absurd_dims"] = write_rawvideo_claiming(root / "absurd_dims.avi", 40000, 40000)
    assert set(out) == set(BAD_INPUT_STAGE)
    return out
