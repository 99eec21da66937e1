"""One run per run folder: a lock file held for the run's whole life, and no silent overwrite of a finished run.

``RunLock(folder)`` creates ``<folder>/.lock`` atomically (``O_CREAT | O_EXCL``) holding the process id, the host and
the start time, and removes it on every exit path (``with`` block: normal end, error, Ctrl-C). A lock left by a
process that no longer exists on this host (a ``kill -9``, a crash) is stale: it is taken over, with one printed
line saying so. A lock of a live process, or of another host (whose processes cannot be checked from here), stops
the second run at once with one line naming the folder and the other process.

:func:`move_aside` moves an earlier run's files out of a folder (``--overwrite``): nothing is deleted.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time

from utils.errors import UserError
from utils.misc import pid_alive

__all__ = ["RunLock", "RUN_FILES", "holds_run", "move_aside"]

LOCK_NAME = ".lock"
# The files that make a folder hold a run (finished or interrupted): what a later run would overwrite.
RUN_FILES = ("resume.pth", "last.pth", "max_acc.pth", "trlog.json")


def _describe(info: dict) -> str:
    return f"process {info.get('pid')} on {info.get('host')} (started {info.get('started')})"


class RunLock:
    """``with RunLock(folder):`` holds ``<folder>/.lock`` for the block (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": _dt.datetime.now().isoformat(timespec="seconds")}
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
        return True

    def _read(self) -> dict:
        for _ in range(20):  # a lock being written this instant reads empty: wait for its content
            try:
                with open(self.path) as f:
                    text = f.read()
                if text:
                    return json.loads(text)
            except FileNotFoundError:
                return {}
            except ValueError:
                pass
            time.sleep(0.05)
        return {"pid": None, "host": "?", "started": "?"}

    def acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                return
            other = self._read()
            if not other:
                continue  # released between our two calls: try again
            if other.get("host") == self.info["host"] and isinstance(other.get("pid"), int) \
                    and not pid_alive(other["pid"]):
                print(f"taking over the stale lock of {_describe(other)} in {self.folder}: that process no longer "
                      "exists", flush=True)
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            raise UserError(f"the run folder {self.folder} is in use by {_describe(other)}; wait for it to end, or "
                            "give this run another folder (--log_root, --meta_label or --pre_label)")
        raise UserError(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            with open(self.path) as f:
                mine = json.load(f).get("pid") == self.info["pid"]
        except (OSError, ValueError):
            mine = False
        if mine:
            os.unlink(self.path)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holds_run(folder: str) -> bool:
    """Whether ``folder`` holds the files of a finished or interrupted run (:data:`RUN_FILES`)."""
    return any(os.path.exists(os.path.join(folder, f)) for f in RUN_FILES)


def move_aside(folder: str) -> str:
    """Move every entry of ``folder`` but its lock into a new sibling ``<folder>.old-<YYYYmmdd-HHMMSS>[-N]``;
    returns that folder. Nothing is deleted."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest, n = f"{folder.rstrip(os.sep)}.old-{stamp}", 1
    while os.path.exists(dest):
        n += 1
        dest = f"{folder.rstrip(os.sep)}.old-{stamp}-{n}"
    os.makedirs(dest)
    for name in sorted(os.listdir(folder)):
        if name != LOCK_NAME:
            os.replace(os.path.join(folder, name), os.path.join(dest, name))
    return dest
