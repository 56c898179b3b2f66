"""Fault injection for integration tests: SIGKILL a busy Ray Data stage actor mid-job.

Ray names each worker process after what it runs (`setproctitle`): a Ray Data actor of stage
class `DecodeStage` is `ray::MapWorker(MapBatches(DecodeStage))` while idle and
`...(DecodeStage)).submit` while it works on a batch. `busy_actor_pids` reads those titles from
/proc (no dashboard, no state API needed), and `Killer` kills one busy actor of each listed
stage, in order, each once its `when` condition holds (e.g. "two latent files exist"), so the
kill lands mid-job with work in flight. The test then checks the job still finished with every
item exactly once and that each kill really happened (`Killer.killed`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path


def ray_processes() -> dict[int, str]:
    """pid -> process title of every Ray worker process on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if title.startswith("ray::"):
            found[int(entry.name)] = title
    return found


def busy_actor_pids(stage: str) -> list[int]:
    """Pids of actors of the Ray Data stage class `stage` that are running a batch now."""
    mark = f"MapBatches({stage})).submit"
    return sorted(pid for pid, title in ray_processes().items() if mark in title)


class Killer(threading.Thread):
    """Kill one busy actor of each `(stage, when)` in turn, `when()` gating each kill."""

    def __init__(self, plan: list[tuple[str, Callable[[], bool]]], timeout: float = 300):
        super().__init__(daemon=True)
        self.plan = plan
        self.deadline = time.time() + timeout
        self.killed: dict[str, int] = {}  # stage -> pid killed (the last, if listed twice)
        self.kills = 0  # kills done, in all
        self.stop = threading.Event()

    def run(self) -> None:
        for stage, when in self.plan:
            while not self.stop.is_set() and time.time() < self.deadline:
                pids = busy_actor_pids(stage) if when() else []
                if pids:
                    try:
                        os.kill(pids[0], signal.SIGKILL)
                    except ProcessLookupError:  # it finished and exited meanwhile
                        continue
                    self.killed[stage] = pids[0]
                    self.kills += 1
                    break
                time.sleep(0.05)

    def __enter__(self) -> Killer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(timeout=10)


def parent_pid(pid: int) -> int | None:
    """The parent of process `pid` (a Ray worker's is its node's raylet), or None if gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def raylet_pid(node) -> int:
    """The raylet process of a `ray.cluster_utils.Cluster` node."""
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


class NodeRemover(threading.Thread):
    """Remove (`allow_graceful=False`: raylet and workers killed) the worker node of `cluster`
    that runs a busy actor of Ray Data stage `stage`, once `when()` holds; `removed` holds the
    node id (empty if no busy actor of that stage ran on one of `workers` in time)."""

    def __init__(self, cluster, workers: list, stage: str, when: Callable[[], bool],
                 timeout: float = 300):
        super().__init__(daemon=True)
        self.cluster, self.workers, self.stage, self.when = cluster, workers, stage, when
        self.deadline = time.time() + timeout
        self.removed: list[str] = []

    def run(self) -> None:
        while time.time() < self.deadline and not self.removed:
            for pid in busy_actor_pids(self.stage) if self.when() else []:
                parent = parent_pid(pid)
                node = next((n for n in self.workers if raylet_pid(n) == parent), None)
                if node is not None:
                    self.removed.append(node.node_id)
                    self.cluster.remove_node(node, allow_graceful=False)
                    return
            time.sleep(0.05)
