"""Small helpers shared by every phase: the 95% interval, running means, timers, seeding and RNG state, and the
atomic writes every file of a run goes through (:func:`atomic_write`: one-line :class:`WriteError` on a full disk, a
read-only folder or a permission error; :func:`remove_orphaned_temporaries` for what a killed writer left).

The confidence interval follows the official code (``pytorch/utils/misc.py`` L74-87): ``1.96 * std / sqrt(n)``
with the population standard deviation (``np.std``, ``ddof=0``), reported in the same unit as the mean.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import socket
import tempfile
import time
from typing import IO, Any, Callable, Sequence

import numpy as np
import torch

from utils.errors import UserError


def mean_ci(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and 95% confidence half-width of per-episode accuracies.

    Args:
        values: ``(n_episodes,)`` accuracies (any unit; the result is in the same unit).
    Returns:
        ``(mean, 1.96 * std / sqrt(n))`` with the population std, as the official code computes it.
    """
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("mean_ci needs at least one value")
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(a.size))


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval ``(low, high)`` of a proportion ``correct / n`` (fractions in [0, 1]).

    For the accuracy of one set of ``n`` labelled queries (``--phase predict``): each query is one Bernoulli trial,
    and the normal approximation of :func:`mean_ci` degenerates at 0 and 100% (a 15/15 result would be
    "100.00 +- 0.00"); the Wilson interval stays inside [0, 1] and is never empty (Wilson, JASA 1927).
    """
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n and n > 0, got {correct} of {n}")
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class Averager:
    """Running mean of scalars (loss, accuracy) over one epoch."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, value: float, n: int = 1) -> None:
        self.total += float(value) * n
        self.count += n

    def item(self) -> float:
        return self.total / self.count if self.count else float("nan")


class Timer:
    """Accumulates wall-clock seconds per named section (e.g. ``data`` vs ``compute``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def start(self, name: str) -> None:
        self._start[name] = time.perf_counter()

    def stop(self, name: str) -> float:
        dt = time.perf_counter() - self._start.pop(name)
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        return dt


def resolve_seed(seed: int) -> int:
    """The official meaning of ``--seed 0`` is "no fixed seed"; we draw one and record it so the run can
    still be repeated with ``--seed <that number>``."""
    if seed != 0:
        return seed
    return int.from_bytes(os.urandom(4), "little") % (2**31 - 1) + 1


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (CPU and CUDA). With ``deterministic`` also ask cuDNN / torch for
    deterministic kernels (slower on GPU; CPU kernels used here are deterministic already)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def get_rng_state() -> dict[str, Any]:
    """The global RNG states (Python, numpy legacy, torch CPU and CUDA) in a form that
    ``torch.load(weights_only=True)`` accepts (tensors, strings, lists)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": json.dumps([py[0], list(py[1]), py[2]]),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                             float(np_state[4])]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    v, internal, gauss = json.loads(state["python"])
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_state(gen: np.random.Generator) -> dict[str, Any]:
    """The state of a ``np.random.Generator(PCG64)`` as a dict that ``torch.load(weights_only=True)`` and JSON
    accept (its 128-bit integers as decimal strings). Inverse: :func:`set_generator_state`."""
    st = gen.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise ValueError(f"expected a PCG64 generator, got {st['bit_generator']}")
    return {"state": str(st["state"]["state"]), "inc": str(st["state"]["inc"]),
            "has_uint32": int(st["has_uint32"]), "uinteger": int(st["uinteger"])}


def set_generator_state(gen: np.random.Generator, s: dict[str, Any]) -> None:
    """Restore a :func:`generator_state` into ``gen`` (a ``np.random.Generator(PCG64)``)."""
    gen.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": int(s["state"]), "inc": int(s["inc"])},
                               "has_uint32": int(s["has_uint32"]), "uinteger": int(s["uinteger"])}


# Temporary files of atomic_write: ".tmp_<pid>@<host>+<random><suffix>", so that a later run can tell the orphans of a
# killed process (pid no longer alive on this host) from a live writer's, e.g. a meta_eval writing results.json beside
# a training. Files named ".tmp_<random>" (before the pid was in the name) are the orphans of an older version.
TMP_PREFIX = ".tmp_"
_TMP_OWNER = re.compile(r"^\.tmp_(\d+)@([A-Za-z0-9.-]*)\+")


def host_tag(name: str | None = None) -> str:
    """This host's name (or ``name``) as the names of temporary files carry it: letters, digits, ``.`` and ``-``
    (anything else becomes ``-``), at most 64 characters."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname() if name is None else name)[:64]


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _started_after(pid: int, mtime: float) -> bool:
    """True when process ``pid`` (Linux ``/proc``) started after ``mtime``: then it cannot have written a file last
    modified at ``mtime``, and the pid was reused. False when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as fh:
            btime = next(int(ln.split()[1]) for ln in fh if ln.startswith(b"btime"))
        start = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return start > mtime + 2.0  # /proc's start time is rounded to clock ticks and btime to seconds


def orphaned(pid: int, host: str | None, mtime: float) -> bool:
    """The one rule for a temporary file whose name carries the process that writes it (``pid``, ``host``): it is an
    orphan, left by a killed writer, when it was made on this host (``host`` None: a name of an older version, which
    named no host) and that process no longer runs, or its pid now belongs to a process that started after the file
    was last written (``mtime``: the pid was reused). This process's own files and other hosts' (whose processes
    cannot be seen from here) never are."""
    if host is not None and host_tag(host) != host_tag():
        return False
    if pid == os.getpid():
        return False
    return pid <= 0 or not pid_alive(pid) or _started_after(pid, mtime)  # (pid <= 0 names no process)


def remove_orphaned_files(folder: str, owner: Callable[[str], tuple[int, str | None] | None]) -> list[tuple[str, int]]:
    """Remove the files of ``folder`` that :func:`orphaned` says a killed writer left: ``owner(name)`` is the
    ``(pid, host)`` a temporary file's name carries, or None for any other file (left alone). Returns ``[(path,
    bytes on disk)]`` of the files removed; a folder that cannot be listed, and a file that cannot be removed, are
    left as they are (the caller reports what it cannot do)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    removed = []
    for name in names:
        tag = owner(name)
        if tag is None:
            continue
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)
            if not orphaned(tag[0], tag[1], st.st_mtime):
                continue
            os.remove(path)
        except OSError:
            continue
        removed.append((path, int(st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size)))
    return removed


class WriteError(UserError):
    """A file could not be written (disk full, read-only or permission denied, a file in the way): ``path`` (the
    file meant), ``reason`` (the system's words) and ``fix`` (what to do about it). ``str()`` is one line."""

    def __init__(self, path: str, reason: str, fix: str):
        self.path, self.reason, self.fix = path, reason, fix
        super().__init__(f"cannot write {path}: {reason} ({fix}, or write somewhere else)")


def write_error(path: str, e: OSError) -> WriteError:
    """The :class:`WriteError` for ``e`` raised while writing ``path``, with the fix its errno calls for."""
    folder = os.path.dirname(os.path.abspath(path))
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on its disk"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"make {folder} writable"
    elif code in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        where = e.filename if isinstance(getattr(e, "filename", None), str) else path
        fix = f"move {where} out of the way"
    else:
        fix = f"check {folder} and its disk"
    return WriteError(path, e.strerror or type(e).__name__, fix)


class _Recorder:
    """The open file as the writer sees it, keeping the first :class:`OSError` of a write: ``torch.save`` turns a
    failed write (a full disk) into a ``RuntimeError`` ("unexpected pos ...") that has lost the errno."""

    def __init__(self, f: IO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync, then ``os.replace``: a crash at any
    moment leaves either the old file or the new one, never half a file. ``write`` gets the open file. The file
    gets the permissions a plain ``open(path, "w")`` would give it (0666 less the umask; not ``mkstemp``'s 0600, which
    would hide a run's checkpoints from the other users of a shared group folder).

    A failure to write (disk full, read-only folder, permission denied, a file where the folder should be) raises a
    one-line :class:`WriteError` naming ``path``; the temporary file is removed on every exit path (an interrupt
    included), and the file already at ``path`` is untouched."""
    atomic_write_many([(path, write, binary)])


def _write_temporary(path: str, write: Callable[[IO], None], binary: bool, made: list[str]) -> str:
    """Write a new temporary file beside ``path`` (its name appended to ``made`` at once, so that the caller
    removes it on any failure), fsynced; returns its name. One-line :class:`WriteError` naming ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    rec = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f"{TMP_PREFIX}{os.getpid()}@{host_tag()}+",
                                   suffix=os.path.splitext(path)[1])
        made.append(tmp)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb" if binary else "w") as f:
            rec = _Recorder(f)
            write(rec)
            rec.flush()
            os.fsync(f.fileno())
        return tmp
    except OSError as e:
        raise write_error(path, e) from e
    except Exception as e:
        if rec is not None and rec.error is not None:  # e.g. torch.save's RuntimeError over a full disk
            raise write_error(path, rec.error) from e
        raise


def atomic_write_many(files: Sequence[tuple[str, Callable[[IO], None], bool]]) -> None:
    """:func:`atomic_write` for a set of files that belong together (``(path, write, binary)`` each, e.g. the
    predictions' csv, json and png): every file is written to its temporary name first, and only when all of them
    were written whole are they moved into place, so a failure (a full disk at the second file) leaves every file
    that was there before untouched and no new one; the temporary files are removed on every exit path."""
    made: list[str] = []
    try:
        temps = [_write_temporary(path, write, binary, made) for path, write, binary in files]
        for (path, _, _), tmp in zip(files, temps):
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise write_error(path, e) from e
            made.remove(tmp)
    finally:
        for tmp in made:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _atomic_write_owner(name: str) -> tuple[int, str] | None:
    """The writer an :func:`atomic_write` temporary names: ``(pid, host)``."""
    m = _TMP_OWNER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def _unowned(name: str) -> tuple[int, None] | None:
    """A ``.tmp_<random>`` temporary of an older version: it names no writer (pid 0, which is no process)."""
    return (0, None) if name.startswith(TMP_PREFIX) and not _TMP_OWNER.match(name) else None


def remove_orphaned_temporaries(folder: str, legacy: bool = False) -> list[str]:
    """Remove the temporary files of :func:`atomic_write` in ``folder`` that a killed process left behind
    (:func:`orphaned`: the process of this host its name carries no longer runs; ``legacy``: also the
    ``.tmp_<random>`` names of older versions, which carry no owner; only safe where no other writer can be at work,
    i.e. with the run folder's lock held). A file of a live process or of another host is left alone. Returns the
    names removed."""
    removed = [os.path.basename(p) for p, _ in remove_orphaned_files(folder, _atomic_write_owner)]
    if legacy:
        removed += [os.path.basename(p) for p, _ in remove_orphaned_files(folder, _unowned)]
    return sorted(removed)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1))


def listing(names: Sequence[str], most: int = 4) -> str:
    """``'a, b, c, d and 3 more'``: the first ``most`` names of a list a message names."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def format_acc(mean: float, ci: float) -> str:
    """``61.83 ± 0.79`` from fractions (0.6183, 0.0079)."""
    return f"{100 * mean:.2f} ± {100 * ci:.2f}"
