"""Fault injection for the reliability tests (SPEC §8): crash a process role once, on purpose.

``TVKD_FAULT=<role>:<n>:<marker>`` makes the process playing ``role`` (teacher, reference,
trainer) exit abruptly when its counter reaches ``n``, once: the marker file records that the
fault fired, so the restarted actor or worker runs on normally. Unset, this does nothing.
"""

import os
from pathlib import Path


def maybe_crash(role: str, count: int) -> None:
    spec = os.environ.get("TVKD_FAULT")
    if not spec:
        return
    fault_role, n, marker = spec.split(":", 2)
    if fault_role != role or count != int(n):
        return
    try:
        # O_EXCL: exactly one process fires the fault, even with several actors in the pool.
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{role} pid {os.getpid()} crashed at {count}\n".encode())
    os.close(fd)
    Path(marker).touch()
    os._exit(1)
