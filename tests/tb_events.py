"""Read the scalars of a TensorBoard log folder with nothing but tensorboardX's own protobufs.

An event file is a sequence of TFRecords (uint64 length, uint32 masked CRC of the length, the serialized
``Event``, uint32 masked CRC of the data). A ``SessionLog(START)`` at step ``s`` (what ``purge_step=s`` writes)
drops the points of earlier files at steps >= ``s``, as TensorBoard's own reader does: that is how a resumed run
hides what a killed run logged after its last checkpoint.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def read_events(path: str | os.PathLike) -> list[event_pb2.Event]:
    """Every ``Event`` of one event file, in order (the CRCs are not checked; a truncated tail is an error)."""
    data = Path(path).read_bytes()
    events, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        start = pos + 12
        if start + n + 4 > len(data):
            raise ValueError(f"{path}: truncated record at byte {pos}")
        events.append(event_pb2.Event.FromString(data[start:start + n]))
        pos = start + n + 4
    return events


def tb_scalars(tb_dir: str | os.PathLike, skip_time: bool = True) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of every scalar under ``tb_dir`` (files in the order they were written).

    ``skip_time``: leave out the wall-time scalars (``*time*`` tags), which differ between two runs.
    """
    files = sorted(Path(tb_dir).glob("events.out.tfevents.*"), key=lambda p: read_events(p)[0].wall_time)
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        for ev in read_events(f):
            if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                out = {t: [(s, v) for s, v in pts if s < ev.step] for t, pts in out.items()}
            if ev.HasField("summary"):
                for val in ev.summary.value:
                    if val.HasField("simple_value") and not (skip_time and "time" in val.tag):
                        out.setdefault(val.tag, []).append((int(ev.step), float(val.simple_value)))
    return {t: pts for t, pts in out.items() if pts}
