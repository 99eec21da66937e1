"""One run per run folder: a lock file held for the run's whole life, and no silent overwrite of a finished run.

``RunLock(folder)`` creates ``<folder>/.lock`` atomically (``O_CREAT | O_EXCL``) holding the process id, the host and
the start time, and removes it on every exit path (``with`` block: normal end, error, Ctrl-C). A lock left by a
process that no longer exists on this host (a ``kill -9``, a crash) is stale: it is taken over, with one printed
line saying so. A lock of a live process, or of another host (whose processes cannot be checked from here), stops
the second run at once with one line naming the folder and the other process.

:func:`move_aside` moves an earlier run's files out of a folder (``--overwrite``): nothing is deleted.

:func:`claim_owned_folder` is for a folder that one command owns whole (``run_experiment.py DEMO`` and ``ABLATION``
own their log roots): each start keeps the previous content as ``<folder>.previous`` and deletes the one before, so
repeated runs do not pile up ``.old-<time>`` folders. It deletes only what carries its owner's mark (``.owner``).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import time

from utils.errors import UserError
from utils.misc import pid_alive

__all__ = ["RunLock", "RUN_FILES", "holds_run", "move_aside", "claim_owned_folder", "OWNER_NAME"]

LOCK_NAME = ".lock"
OWNER_NAME = ".owner"  # {"owner": NAME, "created": TIME}: the folder is NAME's (claim_owned_folder)
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
        self.held = True  # ours from here on: a signal while it is being written must not leave it behind
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
        except BaseException:
            self.release()
            raise
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
        except ValueError:  # our own lock, interrupted before its content was written (no other run takes it over)
            mine = True
        except OSError:
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


def _owner(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, OWNER_NAME)) as f:
            return json.load(f).get("owner")
    except (OSError, ValueError, AttributeError):
        return None


def _live_lock(folder: str) -> dict | None:
    """The holder of a lock anywhere under ``folder`` whose process is alive (or on another host), else None."""
    host = socket.gethostname()
    for dirpath, _, files in os.walk(folder):
        if LOCK_NAME in files:
            info = RunLock(dirpath)._read()
            if info and not (info.get("host") == host and isinstance(info.get("pid"), int)
                             and not pid_alive(info["pid"])):
                return info
    return None


def claim_owned_folder(folder: str, owner: str, legacy: tuple[str, ...] = ()) -> str:
    """Make ``folder`` a fresh folder of ``owner`` (e.g. ``"DEMO"``), keeping only its previous content, as
    ``<folder>.previous``; returns the one line to print about it.

    * ``folder`` missing or empty: created, marked (``.owner``).
    * ``folder`` is ``owner``'s (its ``.owner`` names it, or it has no ``.owner`` and holds only the entries in
      ``legacy``: what ``owner`` wrote before folders were marked): an older ``<folder>.previous`` of ``owner`` is
      deleted, ``folder`` becomes ``<folder>.previous``, and a new marked ``folder`` is made.
    * Otherwise nothing is moved or deleted (the line says why): files ``owner`` did not write, a
      ``<folder>.previous`` that is not ``owner``'s, or a run in the folder that is still going on (the command's
      own run lock then refuses it, with its usual message).
    """
    folder = folder.rstrip(os.sep) or os.sep
    prev = folder + ".previous"

    def mark(line: str) -> str:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, OWNER_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"owner": owner, "created": _dt.datetime.now().isoformat(timespec="seconds")}, f)
        os.replace(tmp, os.path.join(folder, OWNER_NAME))
        return line

    if os.path.lexists(folder) and not os.path.isdir(folder):
        return f"{folder} is not a folder: nothing is moved or deleted"
    try:
        return _claim(folder, prev, owner, legacy, mark)
    except OSError as e:  # the run's own first write then fails with its usual one-line message
        return f"{folder} could not be prepared ({e.strerror or e}): nothing more is moved or deleted"


def _claim(folder: str, prev: str, owner: str, legacy: tuple[str, ...], mark) -> str:
    entries = [e for e in os.listdir(folder) if e != OWNER_NAME] if os.path.isdir(folder) else []
    if not entries:
        return mark(f"{owner} owns {folder} (no earlier run there): the next {owner} keeps this one's files as {prev} "
                    "and deletes older ones")
    ours = _owner(folder) == owner or (not os.path.exists(os.path.join(folder, OWNER_NAME))
                                       and set(entries) <= set(legacy))
    if not ours:
        return (f"{folder} holds files that no {owner} wrote (no {OWNER_NAME} naming {owner}): nothing is moved or "
                "deleted; an earlier run in a run folder is moved aside to <folder>.old-<time> (--overwrite)")
    busy = _live_lock(folder)
    if busy:
        return f"{folder} is in use by {_describe(busy)}: nothing is moved or deleted"
    deleted = os.path.lexists(prev)
    if deleted and not (os.path.isdir(prev) and not os.path.islink(prev) and _owner(prev) == owner):
        return (f"{prev} is not an earlier {owner}'s folder (no {OWNER_NAME} naming {owner}): nothing is moved or "
                "deleted; an earlier run in a run folder is moved aside to <folder>.old-<time> (--overwrite)")
    if deleted:  # out of the way in one step first, so that an interrupted delete leaves no half .previous
        os.replace(prev, f"{prev}.deleting-{os.getpid()}")
    parent = os.path.dirname(prev) or "."
    for name in os.listdir(parent):  # this delete, and any that an interrupted start left
        doomed = os.path.join(parent, name)
        if name.startswith(os.path.basename(prev) + ".deleting-") and _owner(doomed) == owner:
            shutil.rmtree(doomed)
    if _owner(folder) != owner:
        mark("")  # a legacy folder: marked before it becomes .previous, so the next start may delete it
    os.replace(folder, prev)
    return mark(f"{owner} owns {folder}: the previous {owner}'s files are now {prev}"
                + (" (the one before was deleted)" if deleted else "") + f"; a {owner} keeps only the previous one")
