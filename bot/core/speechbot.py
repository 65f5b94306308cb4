"""What the bot does, without any transport: commands in, reply text out.

Telegram (bot/telegram/app.py), the terminal (`python -m bot console`) and the tests all drive
this one class. It parses and validates arguments, reads and writes chat settings, enforces the
per-chat cooldown (kept in the database, so replicas share it) and asks the generation engine for
speeches. It never sends anything itself. Every store call is awaited: the database runs off the loop.
Beside commands: the choices offered under each speech (Another, Calmer, Wilder), /speech in reply
to a message, and inline mode's three short speeches (docs/interactive.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from aiolimiter import AsyncLimiter
from sqlalchemy.exc import SQLAlchemyError

from bot.config import LENGTH_MAX, LENGTH_MIN
from bot.core.dailytime import latest_due, local_date, next_due, parse_daily_time, resolve_time_zone
from bot.inference.api import EngineBusy
from db.database import describe, is_read_only
from db.store import ChatSettings, ChatStore
from model.sampling import TEMPERATURE_MAX, TEMPERATURE_RANGE, InvalidSampling, SamplingParams

log = logging.getLogger(__name__)

PROMPT_MAX = 1000
MESSAGE_MAX = 4096  # Telegram's limit for one text message
SHOWN_ARGUMENT_MAX = 24  # how much of a bad argument a reply quotes back
ENGINE_BUSY_REPLY = "I'm writing a lot of speeches right now. Please try again in a few seconds."
# Inline mode: shorter speeches, so three come back well within the second users wait (docs/interactive.md).
INLINE_LENGTH = 300
INLINE_STYLES = (("Calm", 0.5), ("Classic", 0.9), ("Wild", 1.2))
# One user may start a burst of this many inline batches, then one per INLINE_RATE_PERIOD seconds; a query
# over the limit waits its turn, and a newer query of the same user replaces it while it waits.
INLINE_RATE_BURST = 4
INLINE_RATE_PERIOD = 0.5
INLINE_USERS_TRACKED = 10_000  # the per-user limiters kept, least recently used dropped first
TEMPERATURE_STEP = 0.2  # one press of Calmer or Wilder
CHOICE_PREFIX = "speech:"  # callback data of the buttons under a speech: CHOICE_PREFIX + temperature
STALE_CHOICE = "That button no longer works. Send /speech for a new speech."
NO_TEXT_TO_CONTINUE = (
    "That message has no text for me to continue. Reply with /speech to a message with text or a caption."
)

# Shown by /help and registered with setMyCommands, in this order.
COMMANDS = {
    "speech": "a speech: /speech [temperature] [prompt], or as a reply to continue that message",
    "temperature": f"show or set the temperature ({TEMPERATURE_RANGE})",
    "length": f"show or set the speech length ({LENGTH_MIN}-{LENGTH_MAX} characters)",
    "schedule": "a daily speech: /schedule HH:MM [time zone]",
    "unschedule": "stop the daily speech",
    "settings": "this chat's settings",
    "help": "what this bot does and how to use it",
    "start": "say hello",
}
# Commands that change a chat: in groups only administrators may use them with arguments.
CHANGING_COMMANDS = {"temperature", "length", "schedule", "unschedule"}

_COMMAND = re.compile(r"^/([A-Za-z0-9_]+)(?:@\S+)?(?:\s+(.*))?$", re.DOTALL)
_NUMBER = re.compile(r"^[+-]?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?$|^[+-]?(nan|inf|infinity)$", re.IGNORECASE)

AdminCheck = Callable[[], Awaitable[bool]]
# Shows the user that a speech is being written (Telegram's "typing…") for as long as it is entered.
TypingIndicator = Callable[[], contextlib.AbstractAsyncContextManager]


class Engine(Protocol):
    """The part of bot.inference.engine.GenerationEngine the core uses."""

    @property
    def full(self) -> bool: ...

    async def agenerate(self, prompt: str = "", length: int = 500, temperature: float = 0.9, **options) -> str: ...

    def astream(
        self, prompt: str = "", length: int = 500, temperature: float = 0.9, **options
    ) -> AsyncIterator[str]: ...


class ArgumentError(ValueError):
    """A bad argument; the message is the reply, naming what was wrong and the valid form."""


@dataclass(frozen=True)
class ChatRef:
    id: int
    type: str  # "private", "group", "supergroup", "channel" or "console"


async def _everyone_is_admin() -> bool:
    return True


@contextlib.asynccontextmanager
async def _no_typing() -> AsyncIterator[None]:
    # A TypingIndicator may instead yield a callable: the speech is then streamed to it as it is written.
    yield


class Speech(str):
    """A speech's text, knowing the temperature it was written at (the choices under it step from there)."""

    temperature: float

    def __new__(cls, text: str, temperature: float) -> Speech:
        speech = super().__new__(cls, text)
        speech.temperature = temperature
        return speech


@dataclass(frozen=True)
class Choice:
    """One option under a speech: a button in Telegram, a numbered line in the console."""

    label: str
    temperature: float

    @property
    def data(self) -> str:
        """Telegram's callback data (at most 64 bytes): all the next speech needs."""
        return f"{CHOICE_PREFIX}{self.temperature:g}"


@dataclass(frozen=True)
class InlineSpeech:
    style: str
    temperature: float
    text: str


def utc_now() -> datetime:
    return datetime.now(UTC)


def split_command(text: str) -> tuple[str, str] | None:
    """`/speech@Bot 0.5 We will` -> ("speech", "0.5 We will"); None if `text` is no command."""
    match = _COMMAND.match(text.strip())
    return (match[1].lower(), (match[2] or "").strip()) if match else None


def _shown(argument: str) -> str:
    return repr(argument if len(argument) <= SHOWN_ARGUMENT_MAX else argument[:SHOWN_ARGUMENT_MAX] + "…")


def looks_like_number(word: str) -> bool:
    return bool(_NUMBER.match(word))


def parse_temperature(text: str) -> float:
    example = f"Use a number {TEMPERATURE_RANGE}, e.g. /temperature 0.8 or /speech 1.2"
    if not looks_like_number(text):
        raise ArgumentError(f"{_shown(text)} is not a temperature. {example}.")
    try:
        return SamplingParams(temperature=float(text.replace(",", "."))).temperature
    except InvalidSampling:
        raise ArgumentError(f"Temperature {_shown(text)} is out of range. {example}.") from None


def parse_length(text: str) -> int:
    example = f"Use a whole number of characters from {LENGTH_MIN} to {LENGTH_MAX}, e.g. /length 600"
    if not re.fullmatch(r"[+-]?\d{1,9}", text):
        raise ArgumentError(f"{_shown(text)} is not a length. {example}.")
    value = int(text)
    if not LENGTH_MIN <= value <= LENGTH_MAX:
        raise ArgumentError(f"Length {value} is out of range. {example}.")
    return value


def speech_choices(temperature: float) -> tuple[Choice, Choice, Choice]:
    """Another (same temperature), Calmer and Wilder (one step down or up, staying within (0, 2])."""
    calmer = max(round(temperature - TEMPERATURE_STEP, 2), round(temperature / 2, 3))
    wilder = min(round(temperature + TEMPERATURE_STEP, 2), TEMPERATURE_MAX)
    calmer = calmer if calmer > 0 else temperature  # already as calm as a rounded step allows
    return Choice("Another", temperature), Choice("Calmer", calmer), Choice("Wilder", wilder)


def parse_choice(data: str) -> float:
    """The temperature a choice's callback data carries; ArgumentError(STALE_CHOICE) for anything else."""
    if not data.startswith(CHOICE_PREFIX):
        raise ArgumentError(STALE_CHOICE)
    try:
        return parse_temperature(data.removeprefix(CHOICE_PREFIX))
    except ArgumentError:
        raise ArgumentError(STALE_CHOICE) from None


def compose_speech(prompt: str, continuation: str) -> str:
    """The reply: the prompt as it was sent and its continuation, which the engine ended as a speech ends
    within what one Telegram message holds (speech_options)."""
    # A lone surrogate in the prompt (JSON allows "\ud800") cannot be encoded, so the whole reply would fail to send.
    prompt, continuation = (
        part.encode("utf-16", "surrogatepass").decode("utf-16", "replace") for part in (prompt, continuation)
    )
    text = (prompt + continuation).rstrip() if prompt else continuation.strip()
    return text or "…"  # Telegram rejects empty messages


def speech_options(prompt: str) -> dict:
    """Engine options for a reply that continues `prompt`: end at a sentence, fit one message."""
    return {"end_sentence": True, "max_chars": max(1, MESSAGE_MAX - len(prompt))}


class SpeechBot:
    def __init__(
        self,
        store: ChatStore,
        engine: Engine,
        cooldown_seconds: float = 10.0,
        clock: Callable[[], datetime] = utc_now,
        on_schedule_change: Callable[[ChatSettings], None] | None = None,
    ):
        self.store = store
        self.engine = engine
        self.cooldown = timedelta(seconds=cooldown_seconds)
        self.clock = clock
        self.on_schedule_change = on_schedule_change
        self._inline: dict[int, asyncio.Task] = {}  # each user's inline batch still running
        self._inline_limits: OrderedDict[int, AsyncLimiter] = OrderedDict()

    # ---- entry points ----

    async def handle_text(
        self,
        chat: ChatRef,
        text: str,
        check_admin: AdminCheck = _everyone_is_admin,
        show_typing: TypingIndicator = _no_typing,
    ) -> str | None:
        """A command or, failing that, a prompt. None for an unknown command outside private chats."""
        parsed = split_command(text)
        if parsed is None:
            return await self.prompt(chat, text, show_typing)
        name, args = parsed
        if name not in COMMANDS:
            if chat.type in ("private", "console"):
                return f"I don't know /{name}. {self.help_text()}"
            return None
        return await self.command(chat, name, args, check_admin, show_typing)

    async def command(
        self,
        chat: ChatRef,
        name: str,
        args: str,
        check_admin: AdminCheck = _everyone_is_admin,
        show_typing: TypingIndicator = _no_typing,
    ) -> str:
        if name in CHANGING_COMMANDS and (args or name == "unschedule") and not await check_admin():
            return (
                f"Sorry, only this group's administrators can use /{name} to change things. "
                "Everyone can use /speech and /settings."
            )
        try:
            if name == "speech":
                return await self.speech(chat, args, show_typing)
            return await getattr(self, f"_{name}")(chat, args)
        except ArgumentError as error:
            return str(error)
        except SQLAlchemyError as error:
            return self._database_failed(error)

    async def prompt(self, chat: ChatRef, text: str, show_typing: TypingIndicator = _no_typing) -> str:
        """A plain message: the speech continues it."""
        try:
            return await self._generate(chat, None, text.strip(), show_typing)
        except ArgumentError as error:
            return str(error)
        except SQLAlchemyError as error:
            return self._database_failed(error)

    @staticmethod
    def _database_failed(error: SQLAlchemyError) -> str:
        # The chat gets an answer that says what failed; the operator's log gets one line, the traceback at DEBUG.
        log.error("The database failed: %s", describe(error))
        log.debug("Database failure", exc_info=error)
        if is_read_only(error):
            return (
                "I can't save that: my settings database is read-only right now. "
                "Everything that changes nothing still works, e.g. /speech and /settings."
            )
        return f"My settings database cannot be used right now ({describe(error)[:200]}). Please tell my operator."

    async def speech(self, chat: ChatRef, args: str, show_typing: TypingIndicator = _no_typing) -> str:
        first, *rest = args.split(maxsplit=1) or [""]
        if looks_like_number(first):
            return await self._generate(chat, parse_temperature(first), "".join(rest), show_typing)
        return await self._generate(chat, None, args, show_typing)

    async def reply_speech(
        self, chat: ChatRef, args: str, replied_text: str | None, show_typing: TypingIndicator = _no_typing
    ) -> str:
        """/speech [temperature] sent as a reply: the speech continues the replied-to message's text (or
        caption). A prompt given after the command still wins over it."""
        if not (replied_text or "").strip():
            return NO_TEXT_TO_CONTINUE
        first, *rest = args.split(maxsplit=1) or [""]
        try:
            temperature = parse_temperature(first) if looks_like_number(first) else None
            own_prompt = "".join(rest) if temperature is not None else args
            # The continuation only needs the message's end, so a long message is not refused.
            return await self._generate(
                chat, temperature, own_prompt or replied_text[-PROMPT_MAX:].strip(), show_typing
            )
        except ArgumentError as error:
            return str(error)
        except SQLAlchemyError as error:
            return self._database_failed(error)

    async def choice(self, chat: ChatRef, data: str, show_typing: TypingIndicator = _no_typing) -> str:
        """A choice under a speech (Choice.data): a new speech at the temperature it carries, with the cooldown
        as for /speech. Never changes the chat's settings. Anything but a Speech back is a short refusal."""
        try:
            return await self._generate(chat, parse_choice(data), "", show_typing)
        except ArgumentError as error:
            return str(error)
        except SQLAlchemyError as error:
            return self._database_failed(error)

    async def inline_speeches(self, user_id: int, query: str) -> list[InlineSpeech] | None:
        """Inline mode: one speech per INLINE_STYLES, continuing `query`, at most INLINE_LENGTH characters
        after it and ending on a sentence, made in one engine batch. None when a newer query of the same user
        superseded this one (its engine requests are cancelled); [] when the engine is too busy."""
        previous = self._inline.get(user_id)
        if previous is not None:
            previous.cancel()  # the engine drops its requests at their next chunk
        task = asyncio.ensure_future(self._inline_batch(user_id, query.strip()[:PROMPT_MAX]))
        self._inline[user_id] = task
        try:
            await asyncio.wait([task])
        finally:
            task.cancel()  # no effect once done; stops the work if this caller itself was cancelled
            if self._inline.get(user_id) is task:
                del self._inline[user_id]
        return None if task.cancelled() else task.result()

    async def _inline_batch(self, user_id: int, prompt: str) -> list[InlineSpeech]:
        await self._inline_limit(user_id).acquire()
        # Submitted together, the three requests join one batch of the engine.
        requests = [
            asyncio.ensure_future(
                self.engine.agenerate(
                    prompt=prompt,
                    length=INLINE_LENGTH,
                    temperature=temperature,
                    end_sentence=True,
                    max_chars=INLINE_LENGTH,
                )
            )
            for _, temperature in INLINE_STYLES
        ]
        try:
            continuations = await asyncio.gather(*requests)
        except EngineBusy:
            for request in requests:
                request.cancel()  # gather leaves the others running
            return []
        return [
            InlineSpeech(style, temperature, compose_speech(prompt, continuation))
            for (style, temperature), continuation in zip(INLINE_STYLES, continuations, strict=True)
        ]

    def _inline_limit(self, user_id: int) -> AsyncLimiter:
        limiter = self._inline_limits.pop(user_id, None) or AsyncLimiter(
            INLINE_RATE_BURST, INLINE_RATE_BURST * INLINE_RATE_PERIOD
        )
        self._inline_limits[user_id] = limiter  # most recently used last
        if len(self._inline_limits) > INLINE_USERS_TRACKED:
            self._inline_limits.popitem(last=False)
        return limiter

    async def daily_speech(self, settings: ChatSettings) -> str:
        """The scheduled post; no cooldown, since the schedule itself limits it."""
        continuation = await self.engine.agenerate(
            length=settings.length, temperature=settings.temperature, **speech_options("")
        )
        return Speech(compose_speech("", continuation), settings.temperature)

    # ---- generation ----

    async def _generate(
        self, chat: ChatRef, temperature: float | None, prompt: str, show_typing: TypingIndicator
    ) -> str:
        if len(prompt) > PROMPT_MAX:
            raise ArgumentError(
                f"That prompt has {len(prompt)} characters; the most I take is {PROMPT_MAX}. "
                "Send the first few sentences and I'll continue from there."
            )
        if self.engine.full:
            # Told at once, without the database: in a crowd of a thousand chats, the writes that start and
            # cancel a cooldown held "busy" up for seconds (docs/speed.md). A queue that fills after this
            # still raises EngineBusy below.
            return ENGINE_BUSY_REPLY
        now = self.clock()
        try:
            settings, ready_at = await self.store.start_speech(chat.id, chat.type, now, self.cooldown)
            cooling = True
        except SQLAlchemyError as error:
            if not is_read_only(error):
                raise
            # The cooldown lives in the database, so a read-only one cannot hold it: speeches go on without.
            settings, ready_at, cooling = await self.store.get(chat.id, chat.type), None, False
        if ready_at is not None:
            seconds = math.ceil((ready_at - now).total_seconds())
            return f"One speech at a time, please. Try again in {seconds} second{'s' * (seconds != 1)}."
        temperature = settings.temperature if temperature is None else temperature
        try:
            async with show_typing() as on_text:
                continuation = await self._continue(
                    prompt, on_text, length=settings.length, temperature=temperature, **speech_options(prompt)
                )
        except EngineBusy:
            if cooling:
                await self.store.cancel_cooldown(chat.id, now + self.cooldown)  # nothing was made
            return ENGINE_BUSY_REPLY
        return Speech(compose_speech(prompt, continuation), temperature)

    async def _continue(self, prompt: str, on_text: Callable[[str], object] | None, **options) -> str:
        """The engine's continuation of `prompt`; with `on_text`, streamed: it is called with the speech so far
        after every chunk the engine makes."""
        if on_text is None:
            return await self.engine.agenerate(prompt=prompt, **options)
        parts: list[str] = []
        async for chunk in self.engine.astream(prompt=prompt, **options):
            parts.append(chunk)
            so_far = "".join(parts)
            if (prompt + so_far).strip():  # never a draft of nothing
                on_text(compose_speech(prompt, so_far))
        return "".join(parts)

    # ---- commands that answer at once ----

    async def _start(self, chat: ChatRef, _args: str) -> str:
        return (
            "Hello! I write speeches in the style of Donald Trump's 2016 campaign, one character at a "
            "time, with a small neural network. They are machine-made parody, not real quotes.\n\n" + self.help_text()
        )

    async def _help(self, chat: ChatRef, _args: str) -> str:
        return self.help_text()

    @staticmethod
    def help_text() -> str:
        return (
            "Commands:\n"
            "/speech - a speech. /speech 0.5 - calmer; /speech 1.3 - wilder; "
            "/speech 0.9 We will build - continues your words; sent as a reply to a message, /speech continues "
            "that message\n"
            f"/temperature 0.8 - this chat's default temperature ({TEMPERATURE_RANGE})\n"
            f"/length 600 - speech length in characters ({LENGTH_MIN} to {LENGTH_MAX})\n"
            "/schedule 08:30 Europe/Berlin - a speech every day at that local time (zone optional, default UTC)\n"
            "/unschedule - stop the daily speech\n"
            "/settings - this chat's settings\n\n"
            "In a private chat, any text you send is a prompt. In a group, reply to one of my "
            "messages or mention me. In groups only administrators can change settings.\n\n"
            "Under each speech: Another, Calmer and Wilder ask for a new one (anyone may press them). "
            "In any chat, type my @username and a few words to pick one of three short speeches."
        )

    async def _settings(self, chat: ChatRef, _args: str) -> str:
        settings = await self.store.get(chat.id, chat.type)
        return "\n".join(
            [
                "Settings for this chat:",
                f"temperature: {settings.temperature:g} (change with /temperature, {TEMPERATURE_RANGE})",
                f"length: {settings.length} characters (change with /length, {LENGTH_MIN} to {LENGTH_MAX})",
                f"daily speech: {self._schedule_text(settings)}",
                f"cooldown between speeches: {self.cooldown.total_seconds():g} seconds",
            ]
        )

    async def _temperature(self, chat: ChatRef, args: str) -> str:
        settings = await self.store.get(chat.id, chat.type)
        if not args:
            return f"Temperature is {settings.temperature:g}. Change it with /temperature 0.8 ({TEMPERATURE_RANGE})."
        if len(args.split()) > 1:
            raise ArgumentError(f"/temperature takes one number, {TEMPERATURE_RANGE}, e.g. /temperature 0.8.")
        value = parse_temperature(args)
        await self.store.update(chat.id, temperature=value)
        return f"Temperature set to {value:g}."

    async def _length(self, chat: ChatRef, args: str) -> str:
        settings = await self.store.get(chat.id, chat.type)
        if not args:
            return (
                f"Speeches are {settings.length} characters long. "
                f"Change it with /length 600 ({LENGTH_MIN} to {LENGTH_MAX})."
            )
        if len(args.split()) > 1:
            raise ArgumentError(f"/length takes one whole number from {LENGTH_MIN} to {LENGTH_MAX}, e.g. /length 600.")
        value = parse_length(args)
        await self.store.update(chat.id, length=value)
        return f"Speech length set to {value} characters."

    async def _schedule(self, chat: ChatRef, args: str) -> str:
        settings = await self.store.get(chat.id, chat.type)
        usage = "Use /schedule HH:MM [time zone], e.g. /schedule 08:30 or /schedule 20:00 America/New_York."
        words = args.split()
        if not words:
            return f"Daily speech: {self._schedule_text(settings)}. {usage}"
        if len(words) > 2:
            raise ArgumentError(f"/schedule takes a time and an optional time zone. {usage}")
        daily_time = parse_daily_time(words[0])
        if daily_time is None:
            raise ArgumentError(f"{_shown(words[0])} is not a time of day (24-hour HH:MM, 00:00 to 23:59). {usage}")
        zone = resolve_time_zone(words[1]) if len(words) == 2 else "UTC"
        if zone is None:
            raise ArgumentError(
                f"{_shown(words[1])} is not a time zone I know. Use an IANA name such as UTC, Europe/London, "
                "America/New_York or Asia/Tokyo."
            )
        now = self.clock()
        # A time already past today starts tomorrow: mark today's occurrence as done, so a restart
        # inside the missed-post grace window does not post it late.
        already_due = local_date(latest_due(now, daily_time, zone), zone)
        last = settings.last_daily_post
        settings = await self.store.update(
            chat.id,
            daily_time=daily_time,
            time_zone=zone,
            schedule_enabled=True,
            last_daily_post=already_due if last is None or last < already_due else last,
        )
        self._schedule_changed(settings)
        reply = f"Daily speech set for {self._schedule_text(settings)}."
        if chat.type == "console":
            reply += " Only Telegram chats get daily posts: run the bot with `python -m bot run` for them."
        return reply

    async def _unschedule(self, chat: ChatRef, _args: str) -> str:
        settings = await self.store.get(chat.id, chat.type)
        if not settings.schedule_enabled:
            return "There is no daily speech to remove. Set one with /schedule 08:30 Europe/Berlin."
        self._schedule_changed(await self.store.update(chat.id, schedule_enabled=False))
        return "Daily speech removed."

    def _schedule_changed(self, settings: ChatSettings) -> None:
        if self.on_schedule_change is not None:
            self.on_schedule_change(settings)

    def _schedule_text(self, settings: ChatSettings) -> str:
        if not settings.schedule_enabled or settings.daily_time is None:
            return "off"
        upcoming = next_due(self.clock(), settings.daily_time, settings.time_zone)
        last = settings.last_daily_post
        while last is not None and local_date(upcoming, settings.time_zone) <= last:
            upcoming = next_due(upcoming, settings.daily_time, settings.time_zone)
        local = upcoming.astimezone(ZoneInfo(settings.time_zone))
        return f"{settings.daily_time:%H:%M} {settings.time_zone}, next on {local:%a %d %b %Y}"
