"""The step numbers a rank's planned training stream reads (pipeline/train.py's `RankData`).

Its own module because it subclasses Ray Data's `Datasource`: pipeline/train.py is also
imported by the one-process runner (pipeline/local.py) where Ray is not installed.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


class StepSource(Datasource):
    """Ray Data source of the step numbers [start, end), one block per step, in order."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def estimate_inmemory_data_size(self) -> int:
        return 8 * (self.end - self.start)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        n = max(1, min(parallelism, self.end - self.start, 8))  # few, lazy: see bound_read_ahead
        cuts = [self.start + (self.end - self.start) * i // n for i in range(n + 1)]
        return [ReadTask(lambda lo=lo, hi=hi: (pa.table({"step": [s]}) for s in range(lo, hi)),
                         BlockMetadata(hi - lo, 8 * (hi - lo), None, None))
                for lo, hi in zip(cuts[:-1], cuts[1:], strict=True) if hi > lo]
