"""Pickle payloads for the untrusted-file tests : each creates a file when
unpickled, so a test proves a loader ran nothing by the file not being there."""

from __future__ import annotations

import pickle
from pathlib import Path


class CreatesFile:
    """Unpickling this calls open(path, "w"): the file appearing is the proof code ran."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def payload(marker: str | Path) -> bytes:
    return pickle.dumps(CreatesFile(marker))
