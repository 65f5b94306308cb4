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
# Groups (docs/groups.md). Chatter: an unprompted reply (an interjection) to about one ordinary message in N,
# N from CHATTER_EVERY_MIN to CHATTER_EVERY_MAX; at most one per CHATTER_GAP_SECONDS and CHATTER_DAILY_CAP a
# UTC day per chat, each at most INTERJECTION_LENGTH characters.
CHATTER_EVERY_MIN, CHATTER_EVERY_MAX = 2, 1000
CHATTER_GAP_SECONDS = 300
CHATTER_DAILY_CAP = 20
INTERJECTION_LENGTH = 200
# What primes an interjection, held in memory only: the last CHATTER_CONTEXT_MESSAGES messages of each chat
# with chatter on, each cut to CHATTER_MESSAGE_CHARS, for the CHATTER_CHATS_TRACKED chats heard most recently.
CHATTER_CONTEXT_MESSAGES = 5
CHATTER_MESSAGE_CHARS = 300
CHATTER_CHATS_TRACKED = 5_000
# How long a chat's chatter rate and quiet time are taken from memory before the database is asked again
# (a change made through another replica shows after this long; one made here, at once).
CHATTER_STATE_SECONDS = 60
# /quiet: its length when none is given, and the longest.
QUIET_DEFAULT_MINUTES = 60
QUIET_MAX_DAYS = 7
