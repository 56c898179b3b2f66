"""The driver's C++ log lines (Ray's core worker writes them to fd 2) go to a file in Ray's
session logs, not to the terminal; every other line, and Python's own stderr, still shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import os, sys, time
from pipeline.logs import divert_native_logs
divert_native_logs(sys.argv[1], force=True)
os.write(2, b"[2026-12-04 11:41:54,869 E 2816 2816] core_worker.cc:2465: Actor with class name\n")
os.write(2, b"a line of ours on fd 2\n")
os.write(2, b"50% progress\r")
print("python stderr", file=sys.stderr)
time.sleep(0.5)  # the filter thread forwards
"""


def test_glog_lines_go_to_the_log_file_and_the_rest_to_stderr(tmp_path):
    log = tmp_path / "driver-native.log"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "core_worker.cc" not in res.stderr
    assert "a line of ours on fd 2" in res.stderr and "50% progress" in res.stderr
    assert "python stderr" in res.stderr
    assert "core_worker.cc:2465" in log.read_text()
