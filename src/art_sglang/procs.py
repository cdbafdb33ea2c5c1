"""What the server and the trainer workers share about owning processes (Linux /proc): stopping a process group,
stopping everything at interpreter exit, free ports."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import time
import weakref
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# SGLang also binds port + 10000 (gRPC) and refuses to start when that exceeds 65535.
MAX_PORT = 55535


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
    """In a child before exec: get SIGKILL if the process that started it dies, even by kill -9.

    SIGKILL, not SIGTERM: SGLang's launcher answers SIGTERM with a graceful exit that waits for running requests,
    which never come back once we are gone; its own children SIGKILL themselves when it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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


def stop_group(pgid: int, grace: float, what: str) -> None:
    """SIGTERM process group `pgid`, SIGKILL it if anything of it is left after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while process_group_members(pgid):
        if time.monotonic() > deadline:
            log.warning("%s did not stop within %.0f s of SIGTERM; sending SIGKILL", what, grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.05)


def kill_group(pgid: int, what: str, timeout: float = 10.0) -> None:
    """SIGKILL process group `pgid` and wait until none of it is left (so that its ports and files are free)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while process_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if left := process_group_members(pgid):
        log.warning("%s: processes %s still there %.0f s after SIGKILL", what, sorted(left), timeout)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below MAX_PORT (so a server may also claim port + 10000) and below the ephemeral range: polling
    a port in that range before its server listens can connect the socket to itself (TCP self-connect), which then
    holds the port so that the server cannot bind it: the likely cause of a server that once failed to bind its
    port in a CI run ("address already in use")."""
    high = min(MAX_PORT, _ephemeral_low())
    if high - 20000 < 1000:
        high = MAX_PORT
    for _ in range(200):
        port = random.randrange(20000, high)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found on {host} in 20000..{high}")


class Stoppable(Protocol):
    def stop(self) -> None: ...


_owned: weakref.WeakSet[Stoppable] = weakref.WeakSet()


def own(thing: Stoppable) -> None:
    """Stop `thing` at interpreter exit unless it was released before."""
    _owned.add(thing)


def release(thing: Stoppable) -> None:
    _owned.discard(thing)


@atexit.register
def _stop_owned() -> None:
    for thing in list(_owned):
        with contextlib.suppress(Exception):
            thing.stop()
