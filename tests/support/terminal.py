"""`python -m bot` at a terminal: a pseudo-terminal that is the process's controlling terminal.

What a test writes to it is typed at a keyboard: the terminal driver turns b"\\x03" (Ctrl-C) into a SIGINT
for the process, as for a person, and readline edits the lines. Everything the process prints, stderr
included, is read back as it comes, so the process never blocks on a full terminal.

Keys are typed once the prompt is shown and the process sleeps waiting for them (wait_for_prompt), as a
person types: CPython's readline acts on a signal that interrupts its wait for a key, so a Ctrl-C that
comes in the instant between the prompt and that wait is only acted upon at the next key (Python's own
prompt does the same). Typed any earlier, a Ctrl-D could also reach the terminal before readline takes it
over, and be lost.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

CTRL_C, CTRL_D, CTRL_P = b"\x03", b"\x04", b"\x10"  # Ctrl-P: readline's previous line, whatever TERM is
# Only safety nets against a hung process: a loaded machine can be slow to start Python and load the model.
PATIENCE = 300


def _take_the_terminal() -> None:
    # In the child, after setsid: its stdin, the pseudo-terminal, becomes its controlling terminal.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    # As a shell at a terminal starts it: with Ctrl-C's SIGINT at its default. pytest started in the
    # background (`nohup ... &`) ignores SIGINT, an ignored signal stays ignored across exec, and Python
    # then installs no handler, so Ctrl-C would do nothing.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """`python -m bot ARGS` in cwd, its stdin, stdout and stderr a new pseudo-terminal; killed, if it still
    runs, when the `with` block ends."""

    def __init__(self, cwd: Path, environment: dict[str, str], *args: str):
        self._keyboard, far_side = os.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot", *args],
            stdin=far_side,
            stdout=far_side,
            stderr=far_side,
            cwd=cwd,
            env=environment,
            start_new_session=True,
            preexec_fn=_take_the_terminal,
        )
        os.close(far_side)
        self._shown = b""
        self._closed = False

    @property
    def shown(self) -> str:
        """All the process wrote so far (the terminal turns each "\\n" into "\\r\\n")."""
        return self._shown.decode(errors="replace")

    def type(self, keys: bytes) -> None:
        os.write(self._keyboard, keys)

    def wait_for(self, text: str) -> None:
        """Read until `text` is shown; fails, showing the output, if the process ends or hangs first."""
        deadline = time.monotonic() + PATIENCE
        while text not in self.shown:
            assert not self._closed and time.monotonic() < deadline, f"{text!r} never came:\n{self.shown}"
            self._read(deadline)

    def wait_for_prompt(self, text: str = "> ") -> None:
        """wait_for(text), which ends in a prompt, then until the process sleeps waiting for a key."""
        self.wait_for(text)
        deadline = time.monotonic() + PATIENCE
        while not self._waits_for_a_key():
            assert time.monotonic() < deadline, f"never waited for a key after {text!r}:\n{self.shown}"
            time.sleep(0.01)

    def _waits_for_a_key(self) -> bool:
        # Linux's state of the main thread, which reads the keys: /proc/PID/stat is "PID (NAME) STATE ...".
        # Asleep (S) is not enough: on a busy machine the main thread also sleeps waiting for the GIL (a
        # futex) on its way to readline, and a Ctrl-C then would wait for the next key. readline waits for
        # keys in select(), which Linux shows as the thread's wait channel (wchan), where it shows them.
        proc = Path(f"/proc/{self.process.pid}")
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        channel = (proc / "wchan").read_text()
        return state == "S" and (channel in ("", "0") or "poll" in channel or "select" in channel)

    def end(self) -> int:
        """Read to the end of the output; the return code. Fails if the process does not end."""
        deadline = time.monotonic() + PATIENCE
        while not self._closed and time.monotonic() < deadline:
            self._read(deadline)
        try:
            return self.process.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {PATIENCE} s later:\n{self.shown}") from None

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self._keyboard)

    def _read(self, deadline: float) -> None:
        ready, _, _ = select.select([self._keyboard], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            return
        try:
            chunk = os.read(self._keyboard, 65536)
        except OSError:  # EIO: every process holding the far side has closed it
            chunk = b""
        self._shown += chunk
        self._closed = not chunk
