"""Process-tree helpers shared by the server and the trainer workers (Linux /proc)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from pathlib import Path


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # after the parenthesised command: state, ppid, pgrp, ...


def process_group_members(pgid: int) -> set[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    members = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields and int(fields[2]) == pgid and fields[0] != "Z":
                members.add(int(entry.name))
    return members


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM if the process that started it dies, even by kill -9."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def mapped_shm_files(pids: set[int]) -> set[Path]:
    """Files under /dev/shm that these processes map (shared-memory segments and named semaphores)."""
    found = set()
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/") and not fields[5].endswith("(deleted)"):
                found.add(Path(fields[5]))
    return found
