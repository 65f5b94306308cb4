"""What the bot does in groups besides answering: its unprompted interjections (/chatter), quiet times
(/quiet), and the words of /stats and /forget (docs/groups.md).

Chatter decides, for every ordinary message of a chat that nobody addressed to the bot, whether the bot
chimes in: never while chatter is off or the chat is quiet, else with the chat's rate, drawn from an
injectable random generator, so a seeded one repeats its choices. A yes is only a wish: the chat's row
then decides for good in one conditional UPDATE (ChatStore.claim_interjection: the minimum gap, the daily
cap, the cooldown), which replicas share. The last few messages of chats with chatter on are kept here, in
memory only, to prime the interjection; nothing of them is ever written to the database.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from bot.core.bounds import (
    CHATTER_CHATS_TRACKED,
    CHATTER_CONTEXT_MESSAGES,
    CHATTER_DAILY_CAP,
    CHATTER_EVERY_MAX,
    CHATTER_EVERY_MIN,
    CHATTER_GAP_SECONDS,
    CHATTER_MESSAGE_CHARS,
    CHATTER_STATE_SECONDS,
    QUIET_DEFAULT_MINUTES,
    QUIET_MAX_DAYS,
)
from bot.core.commands import ArgumentError, shown
from bot.core.dailytime import local_date, next_due
from db.store import ChatSettings, ChatStore, utc_day

CHATTER_GAP = timedelta(seconds=CHATTER_GAP_SECONDS)
QUIET_DEFAULT = timedelta(minutes=QUIET_DEFAULT_MINUTES)
QUIET_MAX = timedelta(days=QUIET_MAX_DAYS)
CHATTER_LIMITS = (
    f"at most one every {CHATTER_GAP_SECONDS // 60} minutes and {CHATTER_DAILY_CAP} a day, "
    "never while a speech's cooldown runs"
)
PRIVACY_MODE_NOTE = (
    "Note: I can't see ordinary messages in this group, because my privacy mode is on, so I have nothing "
    "to chime in on. My operator can turn it off with @BotFather (/mybots, Bot Settings, Group Privacy, "
    "Turn off); then remove me from this group and add me again."
)

_FRACTION = re.compile(r"^(\d{1,9})\s*/\s*(\d{1,9})$")
_WHOLE = re.compile(r"^\d{1,9}$")
_DECIMAL = re.compile(r"^(\d*[.,]\d+|\d+[.,]?\d*)\s*(%?)$")
_DURATION_PART = re.compile(r"(\d{1,6})\s*(d|h|m)")
_DURATION = re.compile(r"^(\s*\d{1,6}\s*[dhm])+\s*$")


# ---- parsing and wording ----


def parse_chatter_rate(text: str) -> float | None:
    """`1/20`, `20`, `0.05` or `5%` as the chance of chiming in on a message; None for `off`."""
    usage = (
        f"Use /chatter 1/20 (about one message in 20; from 1/{CHATTER_EVERY_MIN} to 1/{CHATTER_EVERY_MAX}), "
        "/chatter 20, /chatter 0.05, or /chatter off"
    )
    word = text.strip().lower()
    if word == "off":
        return None
    if fraction := _FRACTION.match(word):
        numerator, denominator = int(fraction[1]), int(fraction[2])
        rate = numerator / denominator if denominator else None
    elif _WHOLE.match(word):
        rate = 1 / int(word) if int(word) else None
    elif decimal := _DECIMAL.match(word):
        rate = float(decimal[1].replace(",", ".")) / (100 if decimal[2] else 1)
    else:
        raise ArgumentError(f"{shown(text)} is not a chatter rate. {usage}.")
    if rate is None or not 1 / CHATTER_EVERY_MAX <= rate <= 1 / CHATTER_EVERY_MIN:
        raise ArgumentError(f"Chatter rate {shown(text)} is out of range. {usage}.")
    return rate


def rate_text(rate: float | None) -> str:
    if rate is None:
        return "off"
    return f"about 1 message in {1 / rate:.0f} ({rate * 100:.3g}%)"


def parse_quiet(text: str) -> timedelta | None:
    """`30m`, `2h`, `1d` or `1h30m` as a quiet time (QUIET_DEFAULT when empty); None for `off`."""
    usage = f"Use /quiet 30m, /quiet 2h or /quiet 1d (at most {QUIET_MAX_DAYS}d), or /quiet off"
    word = text.strip().lower()
    if not word:
        return QUIET_DEFAULT
    if word == "off":
        return None
    if not _DURATION.match(word):
        raise ArgumentError(f"{shown(text)} is not a duration. {usage}.")
    units = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}
    duration = sum((int(count) * units[unit] for count, unit in _DURATION_PART.findall(word)), timedelta())
    if not timedelta(minutes=1) <= duration <= QUIET_MAX:
        raise ArgumentError(f"Quiet time {shown(text)} is out of range. {usage}.")
    return duration


def quiet_at(settings: ChatSettings, moment: datetime) -> bool:
    """Whether the chat is quiet at `moment`: then it gets no interjection, and no daily post due then."""
    return settings.quiet_until is not None and moment < settings.quiet_until


def local_text(moment: datetime, zone: str) -> str:
    """`moment` as the chat reads it: `14:30 Europe/Berlin, Mon 01 Jun 2026`."""
    local = moment.astimezone(ZoneInfo(zone))
    return f"{local:%H:%M} {zone}, {local:%a %d %b %Y}"


def next_daily_post(settings: ChatSettings, now: datetime) -> datetime | None:
    """When the chat's next daily speech will be posted: the next due time after `now` whose day has no post
    yet and which the chat's quiet time does not cover; None without a schedule."""
    if not settings.schedule_enabled or settings.daily_time is None:
        return None
    upcoming = next_due(now, settings.daily_time, settings.time_zone)
    last = settings.last_daily_post
    while (last is not None and local_date(upcoming, settings.time_zone) <= last) or quiet_at(settings, upcoming):
        upcoming = next_due(upcoming, settings.daily_time, settings.time_zone)
    return upcoming


def stats_text(settings: ChatSettings, now: datetime, voice: str, schedule: str) -> str:
    """/stats: the chat's speeches, voice, chatter, quiet time and next daily speech."""
    today = utc_day(now)
    chatter = rate_text(settings.chatter_rate)
    if settings.chatter_rate is not None:
        chatted = settings.chatter_today if settings.chatter_day == today else 0
        chatter += f"; {chatted} of at most {CHATTER_DAILY_CAP} today"
    quiet = f"until {local_text(settings.quiet_until, settings.time_zone)}" if quiet_at(settings, now) else "no"
    return "\n".join(
        [
            "Stats for this chat:",
            f"speeches today (UTC): {settings.speeches_on(today)}",
            f"speeches in all: {settings.speeches_total}",
            f"voice: {voice}",
            f"chatter: {chatter}",
            f"quiet: {quiet}",
            f"daily speech: {schedule}",
        ]
    )


def forget_text(settings: ChatSettings | None, inbox_entries: int, recent_messages: int) -> str:
    """/forget yes: what was deleted."""
    if settings is None and not inbox_entries and not recent_messages:
        return "I had nothing stored about this chat."
    deleted = []
    if settings is not None:
        chatter = "off" if settings.chatter_rate is None else f"1 in {1 / settings.chatter_rate:.0f}"
        deleted.append(
            f"its settings (temperature {settings.temperature:g}, length {settings.length}, daily speech "
            f"{'on' if settings.schedule_enabled else 'off'}, chatter {chatter}, quiet time), its cooldown and "
            f"its count of {settings.speeches_total} speech{'es' * (settings.speeches_total != 1)}"
        )
    if inbox_entries:
        deleted.append(f"{inbox_entries} record{'s' * (inbox_entries != 1)} of requests (this one included)")
    if recent_messages:
        deleted.append(f"{recent_messages} recent message{'s' * (recent_messages != 1)} I held in memory for chatter")
    return "Deleted what I stored about this chat: " + "; ".join(deleted) + ". From now on it starts afresh."


FORGET_CONFIRMATION = (
    "This deletes everything I store about this chat: its settings (temperature, length, daily speech, "
    "chatter, quiet time), its cooldown and speech counts, my records of its requests, and the recent "
    "messages I hold in memory for chatter. Send /forget yes to delete it all."
)


# ---- the decision ----


@dataclass(frozen=True)
class _ChatterState:
    rate: float | None
    quiet_until: datetime | None
    fresh_until: datetime


class RecentMessages:
    """The last messages of chats with chatter on, to prime interjections: in memory only, bounded per chat
    (CHATTER_CONTEXT_MESSAGES, each cut to CHATTER_MESSAGE_CHARS) and in total (CHATTER_CHATS_TRACKED chats,
    the one heard from least recently dropped first)."""

    def __init__(self) -> None:
        self._chats: OrderedDict[int, deque[str]] = OrderedDict()

    def add(self, chat_id: int, text: str) -> None:
        messages = self._chats.pop(chat_id, None) or deque(maxlen=CHATTER_CONTEXT_MESSAGES)
        # The end of a long message: an interjection continues from there.
        messages.append(" ".join(text.split())[-CHATTER_MESSAGE_CHARS:])
        self._chats[chat_id] = messages  # most recently heard last
        if len(self._chats) > CHATTER_CHATS_TRACKED:
            self._chats.popitem(last=False)

    def prompt(self, chat_id: int) -> str:
        """The chat's recent messages, one a line and the newest last, ending where a reply begins."""
        return "".join(f"{message}\n" for message in self._chats.get(chat_id, ()))

    def drop(self, chat_id: int) -> int:
        """Forget the chat's messages; returns how many there were."""
        return len(self._chats.pop(chat_id, ()))


class Chatter:
    """Which overheard messages the bot would like to answer, from each chat's rate and quiet time."""

    def __init__(self, store: ChatStore, rng: random.Random, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.rng = rng
        self.clock = clock
        self.recent = RecentMessages()
        # Each chat's rate and quiet time, read at most every CHATTER_STATE_SECONDS: a group where the bot
        # reads every message would otherwise cost a database read per message.
        self._states: OrderedDict[int, _ChatterState] = OrderedDict()

    async def wants_to_speak(self, chat_id: int, text: str) -> bool:
        """Hear an ordinary message nobody addressed to the bot: kept to prime a later interjection if the chat
        has chatter on; True if, by the chat's rate, the bot would like to chime in on it now."""
        now = self.clock()
        state = await self._state(chat_id, now)
        if state.rate is None:
            return False
        self.recent.add(chat_id, text)
        if state.quiet_until is not None and now < state.quiet_until:
            return False
        return self.rng.random() < state.rate

    def changed(self, chat_id: int) -> None:
        """The chat's chatter or quiet time changed here: read them again at its next message."""
        self._states.pop(chat_id, None)

    def forget(self, chat_id: int) -> int:
        """Drop everything held about the chat; returns how many recent messages there were."""
        self.changed(chat_id)
        return self.recent.drop(chat_id)

    async def _state(self, chat_id: int, now: datetime) -> _ChatterState:
        state = self._states.pop(chat_id, None)
        if state is None or state.fresh_until <= now:
            # find, not get: a group the bot merely reads gets no row.
            settings = await self.store.find(chat_id)
            fresh_until = now + timedelta(seconds=CHATTER_STATE_SECONDS)
            if settings is None:
                state = _ChatterState(None, None, fresh_until)
            else:
                state = _ChatterState(settings.chatter_rate, settings.quiet_until, fresh_until)
            if state.rate is None:
                self.recent.drop(chat_id)  # turned off, perhaps through another replica: nothing to prime
        self._states[chat_id] = state  # most recently used last
        if len(self._states) > CHATTER_CHATS_TRACKED:
            self._states.popitem(last=False)
        return state
