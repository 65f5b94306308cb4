"""The heartbeat file: the running bot rewrites it from its event loop, `python -m bot healthcheck` reads its age.

A file that cannot be written is found at start (check_writable), not 30 seconds later as a job's
traceback while the container's healthcheck slowly turns the bot "unhealthy".
"""

from __future__ import annotations

import time
from pathlib import Path

HEARTBEAT_SECONDS = 30
HEALTHY_AGE = 120.0  # seconds: four missed beats


class HeartbeatError(ValueError):
    """A HEARTBEAT_FILE the bot cannot write."""


def beat(path: Path) -> None:
    path.write_text(f"{time.time():.0f}\n")


def check_writable(path: Path) -> None:
    """Raise HeartbeatError unless `path` can be written, without making an old heartbeat look fresh."""
    existed = path.exists()
    try:
        # Append mode creates a missing file but leaves an existing one (and its mtime) as it is.
        with path.open("a"):
            pass
    except OSError as error:
        raise HeartbeatError(
            f"HEARTBEAT_FILE={str(path)!r} cannot be written ({error.strerror}); "
            "use a file in an existing folder the bot may write, e.g. /tmp/speechbot.heartbeat"
        ) from None
    if not existed:
        # A file made now would count as a beat before the bot is up.
        path.unlink()


def age(path: Path) -> float | None:
    """Seconds since the last beat, or None if there is no heartbeat file."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
