"""The hostile-video corpus: built fresh by each test run (the files are never committed).

`build_corpus(root)` writes one input per way a scraped video can be odd or hostile and
returns {name: Case}. `Case.expect` is what `preprocess` must make of it:
  "clip"   a supported video: processed, at the bucket's size, the right way up (every frame
           has the red marker of `tests.badfiles.frame_image` in its top-left corner)
  "probe" / "bucket"   one row in the errors table, from that stage
  "decode" one row per planned clip, from decode (none of its clips decodes)
  "any"    damaged data FFmpeg may or may not decode (flipped bytes): clips, one probe or
           bucket row (a damaged header), or decode rows for the clips that fail (others may
           decode); never a crash, a hang or a duplicate clip
`python -m tests.hostile DIR` writes the corpus to DIR to look at or to feed `tubelet
preprocess` by hand.

Codecs and containers come from PyAV's own wheel (libx264, libx265, libvpx-vp9, libsvtav1,
mpeg4, ffv1 in mp4 / mkv / webm / mov / avi); odd layouts are written by the encoders
(10-bit, 4:4:4, interlaced, 17x9) or patched into headers where no encoder writes them
(mirrored display matrix, claimed durations and sizes, an H.264 SPS's picture size).
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from tests.badfiles import frame_image, write_rawvideo_claiming


@dataclass(frozen=True)
class Case:
    path: Path
    expect: str  # "clip", "probe", "bucket", "decode" or "any"
    why: str


def encode(path: Path, codec: str, width: int = 96, height: int = 64, fps: int = 24,
           num_frames: int = 36, pix_fmt: str = "yuv420p", options: dict | None = None,
           fmt: str | None = None, pts: list[int] | None = None,
           time_base: Fraction | None = None, image=frame_image,
           matrix: tuple[int, int, int, int] | None = None) -> Path:
    """Write `frame_image` frames with any PyAV encoder; pts/time_base: explicit timestamps
    (variable frame rate); matrix: the (a, b, c, d) of a display matrix (FFmpeg's layout)."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options or {}
        stream.codec_context.thread_count = 1
        if matrix is not None:
            a, b, c, d = (v * 65536 for v in matrix)
            stream.set_display_matrix([a, b, 0, c, d, 0, 0, 0, 1 << 30])
        if time_base is not None:
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(image(i, width, height), format="rgb24")
            if pix_fmt != "rgb24":
                frame = frame.reformat(format=pix_fmt)
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# display matrices (a, b, c, d) and how the stored picture must look for the shown one to be
# `frame_image`, the right way up: the inverse of what the matrix does to it
LAYOUTS = {
    "rotated90": ((0, -1, 1, 0), lambda img: np.rot90(img, -1)),
    "rotated180": ((-1, 0, 0, -1), lambda img: np.rot90(img, 2)),
    "rotated270": ((0, 1, -1, 0), lambda img: np.rot90(img, 1)),
    "mirrored": ((-1, 0, 0, 1), lambda img: img[:, ::-1]),
    "flipped_upside_down": ((1, 0, 0, -1), lambda img: img[::-1]),
    "transposed": ((0, 1, 1, 0), lambda img: img.transpose(1, 0, 2)),
    "transverse": ((0, -1, -1, 0), lambda img: img.transpose(1, 0, 2)[::-1, ::-1]),
}


def stored_as(layout: str, width: int, height: int):
    """Frame function writing `frame_image` (shown width x height) as `layout` stores it."""
    inverse = LAYOUTS[layout][1]
    return lambda i, w, h: np.ascontiguousarray(inverse(frame_image(i, width, height)))


def patch_duration(path: Path, factor: int) -> Path:
    """Multiply the durations claimed in an mp4's `mvhd`, `tkhd` and `mdhd` (version 0) by
    `factor`: the header claims a far longer video (and frame count) than the data holds."""
    data = bytearray(path.read_bytes())
    for box, offset in ((b"mvhd", 16), (b"mdhd", 16), (b"tkhd", 20)):
        at = data.find(box)
        if at < 0 or data[at + 4] != 0:
            continue
        field = at + 4 + offset
        value = struct.unpack(">I", data[field:field + 4])[0]
        data[field:field + 4] = struct.pack(">I", min(value * factor, 2**32 - 1))
    path.write_bytes(bytes(data))
    return path


def flip_bytes(path: Path, out: Path, every: int = 97, start: float = 0.3) -> Path:
    """Copy `path` with one bit flipped every `every` bytes from `start` of the file on."""
    data = bytearray(path.read_bytes())
    for i in range(int(len(data) * start), len(data), every):
        data[i] ^= 0x10
    out.write_bytes(bytes(data))
    return out


# H.264 profiles whose SPS carries chroma format and bit depths (ITU-T H.264 7.3.2.1.1)
_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def _read_ue(bits: str, i: int) -> tuple[int, int]:
    """One unsigned exp-Golomb value of a bit string at `i`: (value, position after it)."""
    zeros = 0
    while bits[i + zeros] == "0":
        zeros += 1
    return int(bits[i + zeros:i + 2 * zeros + 1], 2) - 1, i + 2 * zeros + 1


def _ue(value: int) -> str:
    code = bin(value + 1)[2:]
    return "0" * (len(code) - 1) + code


def _emulation(data: bytes, add: bool) -> bytes:
    """Insert (add) or remove the emulation-prevention bytes (00 00 03) of H.264 / HEVC."""
    out, zeros = bytearray(), 0
    for byte in data:
        if zeros >= 2 and (byte <= 3 if add else byte == 3):
            zeros = 0
            if add:
                out.append(3)
            else:
                continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _h264_size(bits: str, profile: int) -> tuple[int, int]:
    """Bit span of pic_width_in_mbs_minus1 .. pic_height_in_map_units_minus1 in an H.264 SPS
    RBSP (progressive, no scaling matrices, as libx264 writes it; H.264 7.3.2.1.1)."""
    _, i = _read_ue(bits, 24)  # after profile, constraint flags, level: seq_parameter_set_id
    if profile in _HIGH_PROFILES:
        chroma, i = _read_ue(bits, i)
        i += chroma == 3  # separate_colour_plane_flag
        i = _read_ue(bits, _read_ue(bits, i)[1])[1] + 1  # bit depths, transform bypass
        assert bits[i] == "0", "SPS with scaling matrices"
        i += 1
    i = _read_ue(bits, i)[1]  # log2_max_frame_num_minus4
    poc_type, i = _read_ue(bits, i)
    assert poc_type in (0, 2), "SPS with pic_order_cnt_type 1"
    if poc_type == 0:
        i = _read_ue(bits, i)[1]
    i = _read_ue(bits, i)[1] + 1  # max_num_ref_frames, gaps_in_frame_num_allowed_flag
    return i, _read_ue(bits, _read_ue(bits, i)[1])[1]


def _hevc_size(bits: str) -> tuple[int, int]:
    """Bit span of pic_width_in_luma_samples .. pic_height_in_luma_samples in an HEVC SPS RBSP
    (H.265 7.3.2.2.1; profile_tier_level with its sub-layers skipped)."""
    sub_layers = int(bits[4:7], 2)  # sps_max_sub_layers_minus1
    i = 8 + 96  # vps id, sub layers, nesting flag; the general profile, tier and level
    present = bits[i:i + 2 * sub_layers]
    i += 2 * sub_layers + (2 * (8 - sub_layers) if sub_layers else 0)
    for k in range(sub_layers):
        i += 88 * (present[2 * k] == "1") + 8 * (present[2 * k + 1] == "1")
    i = _read_ue(bits, i)[1]  # sps_seq_parameter_set_id
    chroma, i = _read_ue(bits, i)
    i += chroma == 3  # separate_colour_plane_flag
    return i, _read_ue(bits, _read_ue(bits, i)[1])[1]


def sps_claiming(sps: bytes, width: int, height: int) -> bytes:
    """An H.264 or HEVC SPS NAL unit with its picture size rewritten to width x height
    (multiples of 16), every other field kept bit for bit."""
    hevc = (sps[0] >> 1) & 0x3F == 33  # H.264's SPS header byte is 0x67 (type 7)
    header = 2 if hevc else 1
    rbsp = _emulation(sps[header:], add=False)
    bits = "".join(f"{b:08b}" for b in rbsp)
    bits = bits[:bits.rindex("1")]  # without the stop bit and its alignment
    if hevc:
        (at, end), size = _hevc_size(bits), _ue(width) + _ue(height)
    else:
        (at, end), size = _h264_size(bits, rbsp[0]), _ue(width // 16 - 1) + _ue(height // 16 - 1)
    new = bits[:at] + size + bits[end:] + "1"
    new += "0" * (-len(new) % 8)
    return sps[:header] + _emulation(int(new, 2).to_bytes(len(new) // 8, "big"), add=True)


def _sps_span(data: bytearray, config: int) -> tuple[int, int]:
    """(offset, length) of the first SPS in an mp4 `avcC` or `hvcC` box at `config`."""
    if data[config + 4:config + 8] == b"avcC":
        return config + 16, struct.unpack(">H", data[config + 14:config + 16])[0]
    at = config + 8 + 22  # hvcC: the fixed part, then arrays of NAL units by type
    arrays, at = data[at], at + 1
    for _ in range(arrays):
        kind, count = data[at] & 0x3F, struct.unpack(">H", data[at + 1:at + 3])[0]
        at += 3
        for _ in range(count):
            length = struct.unpack(">H", data[at:at + 2])[0]
            if kind == 33:
                return at + 2, length
            at += 2 + length
    raise AssertionError("no SPS in hvcC")


def patch_sps_size(path: Path, width: int, height: int) -> Path:
    """Rewrite the picture size inside the H.264 / HEVC bitstream of an mp4 (the SPS in `avcC`
    / `hvcC`), the container's own boxes still claiming the encoded size: the box sizes on the
    way there grow with it (the index sits after `mdat`, so no chunk offset moves)."""
    data = bytearray(path.read_bytes())
    header = {b"stsd": 16, b"avc1": 86, b"hev1": 86, b"hvc1": 86}  # bytes before children
    chain, start, end = [], 0, len(data)
    for kinds in ((b"moov",), (b"trak",), (b"mdia",), (b"minf",), (b"stbl",), (b"stsd",),
                  (b"avc1", b"hev1", b"hvc1"), (b"avcC", b"hvcC")):
        while bytes(data[start + 4:start + 8]) not in kinds:
            start += struct.unpack(">I", data[start:start + 4])[0]
            assert start < end, f"no {kinds} box"
        chain.append(start)
        size = struct.unpack(">I", data[start:start + 4])[0]
        start, end = start + header.get(bytes(data[start + 4:start + 8]), 8), start + size
    assert data.find(b"mdat") < chain[0], "moov before mdat"
    at, length = _sps_span(data, chain[-1])
    sps = sps_claiming(bytes(data[at:at + length]), width, height)
    data[at - 2:at + length] = struct.pack(">H", len(sps)) + sps
    for box in chain:
        size = struct.unpack(">I", data[box:box + 4])[0]
        data[box:box + 4] = struct.pack(">I", size + len(sps) - length)
    path.write_bytes(bytes(data))
    return path


def grows_midstream(path: Path, width: int, height: int, before: int = 2,
                    after: int = 34) -> Path:
    """An H.264 stream in Matroska whose first `before` frames are 96x64 and whose second IDR
    carries an SPS claiming width x height: the header (and so the probe) says 96x64, the
    decoder meets the huge size only mid-way. Two Annex B streams, the second's SPS patched,
    joined and remuxed (stream copy, one frame per packet, 24 fps)."""
    parts = []
    for name, frames in (("head", before), ("tail", after)):
        raw = encode(path.with_suffix(f".{name}.h264"), "libx264", fmt="h264",
                     num_frames=frames, options={"bframes": "0"})
        parts.append(raw.read_bytes())
        raw.unlink()
    start = parts[1].find(b"\x00\x00\x01\x67") + 3  # the tail's SPS NAL unit
    end = parts[1].find(b"\x00\x00\x01", start)
    end -= parts[1][end - 1] == 0  # a 4-byte start code: its leading zero
    parts[1] = (parts[1][:start] + sps_claiming(parts[1][start:end], width, height)
                + parts[1][end:])
    joined = path.with_suffix(".h264")
    joined.write_bytes(b"".join(parts))
    tick = Fraction(1, 24)
    with av.open(str(joined), format="h264") as src, av.open(str(path), "w") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for i, packet in enumerate(p for p in src.demux(video=0) if p.size):
            packet.stream, packet.time_base = out, tick
            packet.pts = packet.dts = i
            packet.duration = 1
            dst.mux(packet)
    joined.unlink()
    return path


def build_corpus(root: str | Path) -> dict[str, Case]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}

    def add(name: str, expect: str, why: str, path: Path | None = None) -> Path:
        p = path or root / name
        cases[name] = Case(p, expect, why)
        return p

    quiet_x265 = {"x265-params": "log-level=none"}
    # codecs x containers, all supported
    encode(add("vp9.webm", "clip", "VP9 in WebM"), "libvpx-vp9",
           options={"deadline": "realtime", "cpu-used": "8"})
    encode(add("hevc.mkv", "clip", "HEVC in Matroska"), "libx265", options=quiet_x265)
    encode(add("hevc.mov", "clip", "HEVC in QuickTime"), "libx265", options=quiet_x265)
    encode(add("av1.mp4", "clip", "AV1 (SVT) in mp4"), "libsvtav1",
           options={"preset": "12"})
    encode(add("mpeg4.avi", "clip", "MPEG-4 part 2 in AVI"), "mpeg4")
    encode(add("mpeg4.mov", "clip", "MPEG-4 part 2 in QuickTime"), "mpeg4")
    encode(add("ffv1.mkv", "clip", "FFV1 (lossless) in Matroska"), "ffv1")
    encode(add("vp9_in.mp4", "clip", "VP9 in mp4"), "libvpx-vp9",
           options={"deadline": "realtime", "cpu-used": "8"})
    encode(add("hevc.mp4", "clip", "HEVC in mp4"), "libx265", options=quiet_x265)
    encode(add("av1.mkv", "clip", "AV1 (SVT) in Matroska"), "libsvtav1", options={"preset": "12"})
    encode(add("av1.webm", "clip", "AV1 (SVT) in WebM"), "libsvtav1", options={"preset": "12"})
    encode(add("mpeg4.mp4", "clip", "MPEG-4 part 2 in mp4"), "mpeg4")
    encode(add("mpeg4.mkv", "clip", "MPEG-4 part 2 in Matroska"), "mpeg4")
    # (FFmpeg's mov muxer does not take FFV1: FFV1 lives in mkv / avi)
    encode(add("ffv1.avi", "clip", "FFV1 (lossless) in AVI"), "ffv1")
    # pixel formats
    encode(add("h264_10bit.mkv", "clip", "10-bit 4:2:0 H.264"), "libx264",
           pix_fmt="yuv420p10le")
    encode(add("h264_444.mp4", "clip", "4:4:4 H.264"), "libx264", pix_fmt="yuv444p")
    encode(add("ffv1_444_10bit.mkv", "clip", "10-bit 4:4:4 FFV1"), "ffv1",
           pix_fmt="yuv444p10le")
    encode(add("hevc_10bit.mkv", "clip", "10-bit HEVC"), "libx265", pix_fmt="yuv420p10le",
           options=quiet_x265)
    # layouts
    encode(add("interlaced.mp4", "clip", "interlaced H.264 (field coding)"), "libx264",
           options={"x264-params": "interlaced=1:tff=1"})
    for layout, ext in (("rotated90", "mp4"), ("rotated180", "mov"), ("rotated270", "mp4"),
                        ("mirrored", "mp4"), ("flipped_upside_down", "mov"),
                        ("transposed", "mp4"), ("transverse", "mov")):
        turned = LAYOUTS[layout][0][0] == 0  # stored on its side: shown 64x96 is 96x64
        w, h = (96, 64) if turned else (64, 96)
        encode(add(f"{layout}.{ext}", "clip", f"display matrix: {layout}"), "libx264",
               width=w, height=h, image=stored_as(layout, h if turned else w,
                                                  w if turned else h),
               matrix=LAYOUTS[layout][0])
    vfr = [round(1000 * (i / 24 + (0.02 if i % 3 == 1 else 0))) for i in range(36)]
    encode(add("vfr.mkv", "clip", "variable frame rate (irregular timestamps)"), "libx264",
           pts=vfr, time_base=Fraction(1, 1000))
    encode(add("odd_99x67.mkv", "clip", "odd size 99x67"), "ffv1", width=99, height=67)
    webm = encode(root / "tmp.webm", "libvpx-vp9",
                  options={"deadline": "realtime", "cpu-used": "8"})
    webm.rename(add("webm_named.mp4", "clip", "a WebM file named .mp4"))
    encode(add("long_stream.mp4", "clip", "2400 frames at 480 fps (decodes to thousands)"),
           "libx264", fps=480, num_frames=2400, options={"preset": "ultrafast"})
    # too small or too short for any bucket: probed, then a skip row
    encode(add("tiny_1x1.mkv", "bucket", "1x1 picture"), "ffv1", width=1, height=1)
    encode(add("tiny_2x2.mkv", "bucket", "2x2 picture"), "ffv1", width=2, height=2)
    encode(add("odd_17x9.mkv", "bucket", "17x9 picture"), "ffv1", width=17, height=9)
    patch_duration(encode(add("claims_zero.mp4", "clip", "header claims zero duration"),
                          "libx264"), 0)
    encode(add("one_frame.mp4", "bucket", "one frame: zero duration"), "libx264",
           num_frames=1)
    # headers that lie
    claim = encode(add("claims_long.mp4", "clip",
                       "header claims 1000x the duration and frame count"), "libx264")
    patch_duration(claim, 1000)
    write_rawvideo_claiming(add("claims_huge.avi", "probe", "header claims 12000x12000"),
                            12000, 12000)
    # the H.264 bitstream's own SPS lies (the mp4 boxes still say 96x64): FFmpeg takes the SPS
    patch_sps_size(encode(add("sps_claims_huge.mp4", "probe",
                              "H.264 SPS claims 12000x8000, over the pixel budget"), "libx264"),
                   12000, 8000)
    patch_sps_size(encode(add("sps_claims_wide.mp4", "bucket",
                              "H.264 SPS claims 8000x16: no bucket's aspect ratio"), "libx264"),
                   8000, 16)
    patch_sps_size(encode(add("sps_claims_impossible.mp4", "decode",
                              "H.264 SPS claims 20000x20000: FFmpeg refuses the SPS, probe "
                              "sees the mp4's 96x64, every clip fails to decode"), "libx264"),
                   20000, 20000)
    patch_sps_size(encode(add("hevc_sps_claims_huge.mp4", "probe",
                              "HEVC SPS claims 12000x8000, over the pixel budget"), "libx265",
                          options=quiet_x265), 12000, 8000)
    grows_midstream(add("sps_grows_midstream.mkv", "decode",
                        "96x64 for 2 frames, then an IDR whose SPS claims 12000x8000: over "
                        "decode_budget.pixels, every clip fails instead of allocating it"),
                    12000, 8000)
    # broken files
    good = encode(root / "source.mp4", "libx264", num_frames=48)
    data = good.read_bytes()
    add("truncated.mp4", "probe", "cut at 40% (index at the end)").write_bytes(
        data[:int(len(data) * 0.4)])
    flip_bytes(good, add("flipped.mp4", "any", "a bit flipped every 97 bytes"))
    add("empty_stream.mkv", "probe", "zero bytes").write_bytes(b"")
    add("text.webm", "probe", "a text file named .webm").write_text("not a video\n" * 50)
    good.unlink()
    os.symlink(root / "no_such_file.mp4", add("dangling.mp4", "probe", "dangling symlink"))
    # not regular files
    loop_a = add("loop_a.mp4", "probe", "symlink loop (a -> b)")
    loop_b = add("loop_b.mp4", "probe", "symlink loop (b -> a)")
    os.symlink(loop_b, loop_a)
    os.symlink(loop_a, loop_b)
    os.mkfifo(add("fifo.mp4", "probe", "a FIFO: opening it would block forever"))
    return cases


if __name__ == "__main__":
    for name, case in build_corpus(sys.argv[1]).items():
        print(f"{case.expect:7} {name:22} {case.why}")
