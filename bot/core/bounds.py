"""The domain's bounds: what a chat may set and ask for. The commands, the configuration and the adapters
read them from here (sampling's own bounds live with SamplingParams in model/sampling.py)."""

from __future__ import annotations

LENGTH_MIN, LENGTH_MAX = 20, 3000  # a speech's length, in characters
PROMPT_MAX = 1000  # characters of a prompt
MESSAGE_MAX = 4096  # Telegram's limit for one text message
TEMPERATURE_STEP = 0.2  # one press of Calmer or Wilder
# Inline mode: shorter speeches, so three come back well within the second users wait (docs/interactive.md).
INLINE_LENGTH = 300
INLINE_STYLES = (("Calm", 0.5), ("Classic", 0.9), ("Wild", 1.2))
# One user may start a burst of this many inline batches, then one per INLINE_RATE_PERIOD seconds; a query
# over the limit waits its turn, and a newer query of the same user replaces it while it waits.
INLINE_RATE_BURST = 4
INLINE_RATE_PERIOD = 0.5
INLINE_USERS_TRACKED = 10_000  # the per-user limiters kept, least recently used dropped first
