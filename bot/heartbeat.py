"""The heartbeat file: the running bot rewrites it from its event loop, `python -m bot healthcheck` reads its age.

A file that cannot be written is found at start (check_writable), not 30 seconds later as a job's
traceback while the container's healthcheck slowly turns the bot "unhealthy". The bot removes the file
when it stops, so a stopped bot never looks healthy.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

HEARTBEAT_SECONDS = 30
HEALTHY_AGE = 120.0  # seconds: four missed beats
# A beat is dated by the clock that reads it, so only a clock set back (or a file touched by hand) dates one
# later than now; a second covers file systems that round timestamps up.
FUTURE_SLACK = 1.0


class HeartbeatError(ValueError):
    """A HEARTBEAT_FILE the bot cannot write or healthcheck cannot read."""


def _refused(path: Path, error: OSError, doing: str) -> HeartbeatError:
    return HeartbeatError(
        f"HEARTBEAT_FILE={str(path)!r} cannot be {doing} ({error.strerror}); "
        "use a file in an existing folder the bot may write, e.g. /tmp/speechbot.heartbeat"
    )


def beat(path: Path) -> None:
    path.write_text(f"{time.time():.0f}\n")


def stop(path: Path) -> None:
    """Remove the heartbeat: the bot is no longer serving."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def check_writable(path: Path) -> None:
    """Raise HeartbeatError unless `path` can be written, without making an old heartbeat look fresh."""
    try:
        existed = path.exists()
        # Append mode creates a missing file but leaves an existing one (and its mtime) as it is.
        with path.open("a"):
            pass
    except OSError as error:
        raise _refused(path, error, "written") from None
    if not existed:
        # A file made now would count as a beat before the bot is up.
        path.unlink()


def age(path: Path) -> float | None:
    """Seconds since the last beat (negative if dated in the future), or None if there is no heartbeat file."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError as error:
        raise _refused(path, error, "read") from None


def unhealthy(path: Path, max_age: float) -> str | None:
    """Why the bot behind `path` is not healthy, or None if it beat within `max_age` seconds."""
    seconds = age(path)
    if seconds is None:
        return f"no heartbeat file at {path}"
    if seconds < -FUTURE_SLACK:
        return f"the last heartbeat is dated {-seconds:.0f} s in the future (was the clock set back?)"
    if seconds > max_age:
        return f"last heartbeat {seconds:.0f} s ago"
    return None
