"""What the terminal shows of a Ray job: progress, not Ray's internals.

Worker output forwarded to the driver goes through `quiet_worker_logs`, which drops Ray's own
actors (Train controller, placement-group cleaner, split coordinator, ...) and its C++ / INFO
lines, and keeps what our stages and trainers print (and every Python traceback). Ray's C++
lines written to this process's own fd 2 go to a file (`divert_native_logs`). Nothing is lost:
Ray writes every process's full log under its session folder (`full_logs()`), printed when a
job starts Ray. `pipeline/runtime.py` calls these when it starts or joins Ray.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

from actors.workers.toolkit import quiet_ray_data_console

# Ray's own actors: their forwarded output is Ray's business (it stays in the log files).
RAY_INTERNAL_ACTORS = ("PlacementGroupCleaner", "TrainController", "SplitCoordinator",
                       "DatasetManager", "PreemptionWatcher", "StatsActor", "AutoscalingRequester",
                       "_StatsActor", "AutoscalingCoordinator")
# Lines Ray's libraries print from inside our workers: C++ glog lines ("[2026-12-02 19:57:50,220
# E 3093 3123] core_worker.cc:..."), Ray Train / Data set-up INFO, deprecation notices.
# A C++ glog line: "[2026-12-04 11:41:54,869 E 2816 2816] core_worker.cc:2465: ..."
GLOG = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]"
RAY_NOISE = re.compile(
    GLOG + r"|Setting up process group for|"
    r"RayDeprecationWarning|DeprecationWarning|^\s+self\.\w+ = \w+$|Progress bars disabled|"
    r"Starting execution of Dataset|Execution plan of Dataset|execution finished in|"
    r"Registered dataset logger|Full logs are in|Checkpoint successfully created at|"
    r"Reporting training result")


def keep_line(actor: str, line: str) -> bool:
    """Whether a forwarded worker line reaches the terminal."""
    return not any(actor.startswith(a) for a in RAY_INTERNAL_ACTORS) and not RAY_NOISE.search(
        line)


def quiet_worker_logs() -> None:
    """Replace Ray's driver-side printer of worker output with one that drops Ray's noise.

    Uses Ray's (private) stdstream dispatcher; if a Ray release moves it, output stays as Ray
    prints it."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def handler(data: dict) -> None:
        actor = data.get("actor_name") or data.get("task_name") or ""
        lines = [line for line in data.get("lines", []) if keep_line(actor, line)]
        if lines:
            ray_worker.print_to_stdstream({**data, "lines": lines}, ignore_prefix=False)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handler)
    quiet_ray_data_console()  # the driver's Ray Data console lines


class _DropAuthNotice(logging.Filter):
    """Ray's "Token authentication is enabled for this Ray cluster" notice at every local start
    is news only the first time; the README's cluster section explains token auth. The notice
    that auth is *disabled* still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


GLOG_LINE = re.compile(GLOG.encode())


def divert_native_logs(path: str, force: bool = False) -> None:
    """Ray's C++ core worker inside this (driver) process logs to file descriptor 2 (e.g. "Actor
    with class name ... has constructor arguments in the object store", once per job). Route
    fd 2 through a filter thread: glog lines are appended to `path` (in Ray's session logs),
    everything else reaches the terminal unchanged. Python's own `sys.stderr` is moved to a
    copy of the real descriptor first, so tracebacks never depend on the thread. Only where
    fd 2 is a terminal (or `force`): piped and captured output (CI, pytest) is left alone."""
    if getattr(divert_native_logs, "installed", False) or not (force or os.isatty(2)):
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
    except (OSError, ValueError, AttributeError):
        return
    sys.stderr = os.fdopen(os.dup(real), "w", buffering=1, errors="backslashreplace")

    def pump() -> None:
        pending = b""
        with open(read, "rb", buffering=0) as src:
            while chunk := src.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if GLOG_LINE.match(line):
                        with open(path, "ab") as log:
                            log.write(line + b"\n")
                    else:
                        os.write(real, line + b"\n")
                if pending and not pending.startswith(b"["):  # a progress bar, a prompt
                    os.write(real, pending)
                    pending = b""
            if pending:
                os.write(real, pending)

    threading.Thread(target=pump, daemon=True, name="tubelet-native-logs").start()
    divert_native_logs.installed = True


def full_logs() -> str:
    """Where Ray keeps every process's complete log for this session."""
    import ray

    try:
        return os.path.join(ray.get_runtime_context().get_node_id() and
                            ray._private.worker._global_node.get_session_dir_path(), "logs")
    except (AttributeError, RuntimeError):
        return "/tmp/ray/session_latest/logs"


def quiet_auth_notice() -> None:
    """Drop Ray's per-start "token authentication is enabled" notice (`_DropAuthNotice`)."""
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropAuthNotice) for f in auth_log.filters):
        auth_log.addFilter(_DropAuthNotice())
