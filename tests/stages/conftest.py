"""Fixtures for stage tests: a small synthetic dataset with ground truth, broken inputs, and
a video with a short keyframe interval (for seeking)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.synth import SynthConfig, synthesize
from tests.badfiles import bad_inputs, write_video


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    """8 captioned videos on plain backgrounds: every aspect ratio of the synth config
    (2.35:1, 16:9, 4:3, 1:1, 3:4, 9:16), 24 / 25 / 30 fps, 1.1 to 2.7 s. Returns
    (folder, captions.jsonl rows)."""
    out = tmp_path_factory.mktemp("synth")
    rows = synthesize(SynthConfig(num_videos=8, seed=5, workers=1), out)
    return out, rows


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """{kind: path} for every kind in tests.badfiles.BAD_INPUT_STAGE."""
    return bad_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="session")
def gop_video(tmp_path_factory) -> Path:
    """96x64, 30 fps, 90 frames (3 s), a keyframe exactly every 10 frames."""
    return write_video(tmp_path_factory.mktemp("gop") / "gop10.mp4", width=96, height=64,
                       fps=30, num_frames=90, gop=10)
