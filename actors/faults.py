"""Fault injection for the reliability tests (SPEC §8): crash a process role once, on purpose.

The fault is ``<role>:<n>:<marker>[:hang]``, read from ``$TVKD_FAULT`` or from the file named by
``$TVKD_FAULT_FILE`` (a file lets a test arm a fault on a cluster that is already running). The
process playing ``role`` (teacher, reference, trainer) exits abruptly when its counter reaches
``n``, once: the marker file records that the fault fired, so the restarted actor or worker runs
on normally. With ``:hang`` the process stops there instead of exiting, so a test can stop the
whole run from outside (SIGTERM) at a known point. With ``:delay=<seconds>`` it never crashes:
every call from the n-th on sleeps that long (no marker), so a fast tiny teacher still streams
while a test removes its node. With neither variable set this does nothing.
"""

import os
import time
from pathlib import Path


def _fault_spec() -> str:
    spec = os.environ.get("TVKD_FAULT", "")
    path = os.environ.get("TVKD_FAULT_FILE")
    if not spec and path and os.path.exists(path):
        spec = Path(path).read_text().strip()
    return spec


def maybe_crash(role: str, count: int) -> None:
    spec = _fault_spec()
    if not spec:
        return
    fault_role, n, marker, *action = spec.split(":", 3)
    if fault_role != role:
        return
    if action and action[0].startswith("delay="):
        if count >= int(n):
            time.sleep(float(action[0].removeprefix("delay=")))
        return
    if count != int(n):
        return
    try:
        # O_EXCL: exactly one process fires the fault, even with several actors in the pool.
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{role} pid {os.getpid()} crashed at {count}\n".encode())
    os.close(fd)
    if action == ["hang"]:
        while True:
            time.sleep(60)
    os._exit(1)
