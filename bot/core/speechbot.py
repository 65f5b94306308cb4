"""What the bot does, without any transport: commands in, reply text out.

Telegram (bot/telegram/), the terminal (`python -m bot console`) and the tests all drive this one class.
It parses and validates arguments (bot.core.commands), reads and writes chat settings, enforces the
per-chat cooldown (kept in the database, so replicas share it) and asks the chat's voice (bot.core.voices:
a generation engine per served model) for speeches. It never sends anything itself. Every store call is
awaited: the database runs off the loop.
Beside commands: the choices offered under each speech (Another, Calmer, Wilder), /speech in reply
to a message, inline mode's three short speeches (bot.core.inline, docs/interactive.md), and in groups
the unprompted interjections of /chatter (bot.core.groups, docs/groups.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy.exc import SQLAlchemyError

from bot.core.bounds import CHATTER_DAILY_CAP, INTERJECTION_LENGTH, LENGTH_MAX, LENGTH_MIN, PROMPT_MAX
from bot.core.commands import (
    CHANGING_COMMANDS,
    CHANGING_WITHOUT_ARGUMENTS,
    COMMANDS,
    ArgumentError,
    help_text,
    looks_like_number,
    parse_length,
    parse_temperature,
    shown,
    split_command,
)
from bot.core.dailytime import latest_due, local_date, parse_daily_time, resolve_time_zone
from bot.core.groups import (
    CHATTER_GAP,
    CHATTER_LIMITS,
    FORGET_CONFIRMATION,
    PRIVACY_MODE_NOTE,
    Chatter,
    forget_text,
    local_text,
    next_daily_post,
    parse_chatter_rate,
    parse_quiet,
    quiet_at,
    rate_text,
    stats_text,
)
from bot.core.inline import InlineSpeech, InlineSpeeches
from bot.core.speech import Speech, compose_speech, daily_speech, parse_choice, reply_room
from bot.core.voices import Voice, Voices
from bot.inference.api import EngineBusy
from db.database import describe, is_read_only
from db.models import utc_now
from db.store import ChatSettings, ChatStore
from model.sampling import TEMPERATURE_RANGE

log = logging.getLogger(__name__)

ENGINE_BUSY_REPLY = "I'm writing a lot of speeches right now. Please try again in a few seconds."
NO_TEXT_TO_CONTINUE = (
    "That message has no text for me to continue. Reply with /speech to a message with text or a caption."
)

AdminCheck = Callable[[], Awaitable[bool]]
# Shows the user that a speech is being written (Telegram's "typing…") for as long as it is entered.
TypingIndicator = Callable[[], contextlib.AbstractAsyncContextManager]
GROUP_TYPES = ("group", "supergroup")  # where Telegram's privacy mode hides ordinary messages


@dataclass(frozen=True)
class ChatRef:
    id: int
    type: str  # "private", "group", "supergroup", "channel" or "console"


async def _everyone_is_admin() -> bool:
    return True


def _reads_all_group_messages() -> bool:
    return True


def _nothing() -> None:
    pass


@contextlib.asynccontextmanager
async def _no_typing() -> AsyncIterator[None]:
    # A TypingIndicator may instead yield a callable: the speech is then streamed to it as it is written.
    yield


class SpeechBot:
    def __init__(
        self,
        store: ChatStore,
        voices: Voices,
        cooldown_seconds: float = 10.0,
        clock: Callable[[], datetime] = utc_now,
        on_schedule_change: Callable[[ChatSettings], None] | None = None,
        *,
        rng: random.Random | None = None,
        reads_all_group_messages: Callable[[], bool] = _reads_all_group_messages,
        on_forget: Callable[[int], None] | None = None,
        on_busy: Callable[[], None] = _nothing,
    ):
        """`voices` are the models it speaks with, the first by default; `rng` draws the chatter's choices (a
        seeded one repeats them); `reads_all_group_messages` says whether the transport shows the bot ordinary group
        messages (Telegram's privacy mode off); `on_forget` is told a chat id whose data /forget deleted;
        `on_busy` is told of every speech refused because the engine's queue is full (for the metrics)."""
        self.store = store
        self.voices = voices
        self.cooldown = timedelta(seconds=cooldown_seconds)
        self.clock = clock
        self.on_schedule_change = on_schedule_change
        self.reads_all_group_messages = reads_all_group_messages
        self.on_forget = on_forget
        self.on_busy = on_busy
        self.inline = InlineSpeeches(on_busy)
        self.chatter = Chatter(store, rng or random.Random(), clock)
        # The commands that answer with text, by name; /speech is dispatched on its own (it shows progress).
        self._commands: dict[str, Callable[[ChatRef, str], Awaitable[str]]] = {
            "start": self._start,
            "help": self._help,
            "settings": self._settings,
            "temperature": self._temperature,
            "length": self._length,
            "schedule": self._schedule,
            "unschedule": self._unschedule,
            "chatter": self._chatter,
            "quiet": self._quiet,
            "stats": self._stats,
            "voice": self._voice,
            "forget": self._forget,
        }

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
                return f"I don't know /{name}. {help_text()}"
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
        if name in CHANGING_COMMANDS and (args or name in CHANGING_WITHOUT_ARGUMENTS) and not await check_admin():
            return (
                f"Sorry, only this group's administrators can use /{name} to change things. "
                "Everyone can use /speech, /settings and /stats."
            )
        try:
            if name == "speech":
                return await self.speech(chat, args, show_typing)
            return await self._commands[name](chat, args)
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
        """Inline mode's three speeches for `query` (bot.core.inline.InlineSpeeches.answer), in the voice the
        user chose in their private chat with the bot (Telegram's private chat id is the user's id)."""
        voice = self.voices.default
        if len(self.voices) > 1:
            try:
                voice = self._voice_of(await self.store.find(user_id))
            except SQLAlchemyError as error:  # a speech in the default voice beats none
                log.warning("Inline speeches in the default voice: the database failed: %s", describe(error))
        return await self.inline.answer(user_id, query, voice)

    async def daily_speech(self, settings: ChatSettings) -> Speech:
        """The chat's scheduled post (bot.core.speech.daily_speech), in its voice."""
        return await daily_speech(self._voice_of(settings), settings)

    async def overheard(self, chat: ChatRef, text: str, show_typing: TypingIndicator = _no_typing) -> Speech | None:
        """An ordinary message in a group that nobody addressed to the bot (nor a bot sent): mostly None; now
        and then, by the chat's /chatter rate and limits, a short speech that replies to it, primed with the
        chat's last few messages. Never an error message: nobody asked."""
        try:
            if not await self.chatter.wants_to_speak(chat.id, text) or self.voices.all_full:
                return None
            now = self.clock()
            settings = await self.store.claim_interjection(chat.id, now, CHATTER_GAP, CHATTER_DAILY_CAP, self.cooldown)
            if settings is None:
                return None  # within the gap, over today's cap, cooling down, quiet or off after all
            try:
                voice = self._voice_of(settings)
                async with show_typing():
                    continuation = await voice.engine.agenerate(
                        self.chatter.recent.prompt(chat.id),
                        min(settings.length, INTERJECTION_LENGTH),
                        sampling=voice.sampling(settings.temperature),
                        end_sentence=True,
                        max_chars=reply_room(""),
                    )
            except EngineBusy:
                await self.store.cancel_cooldown(chat.id, now + self.cooldown)  # nothing was made
                return None
        except SQLAlchemyError as error:
            log.warning("No interjection in chat %s: the database failed: %s", chat.id, describe(error))
            return None
        if not continuation.strip():
            return None
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
        if self.voices.all_full:
            # Told at once, without the database: in a crowd of a thousand chats, the writes that start and
            # cancel a cooldown held "busy" up for seconds (docs/speed.md). A queue that is full or fills
            # after this (the chat's voice's, when another voice has room) still raises EngineBusy below.
            self.on_busy()
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
                    self._voice_of(settings), prompt, settings.length, temperature, on_text
                )
        except EngineBusy:
            self.on_busy()
            if cooling:
                await self.store.cancel_cooldown(chat.id, now + self.cooldown)  # nothing was made
            return ENGINE_BUSY_REPLY
        return Speech(compose_speech(prompt, continuation), temperature)

    async def _continue(
        self, voice: Voice, prompt: str, length: int, temperature: float, on_text: Callable[[str], object] | None
    ) -> str:
        """`voice`'s continuation of `prompt`, ended as a speech ends within one message; with `on_text`,
        streamed: it is called with the speech so far after every chunk the engine makes."""
        engine, sampling, room = voice.engine, voice.sampling(temperature), reply_room(prompt)
        if on_text is None:
            return await engine.agenerate(prompt, length, sampling=sampling, end_sentence=True, max_chars=room)
        parts: list[str] = []
        async for chunk in engine.astream(prompt, length, sampling=sampling, end_sentence=True, max_chars=room):
            parts.append(chunk)
            so_far = "".join(parts)
            if (prompt + so_far).strip():  # never a draft of nothing
                on_text(compose_speech(prompt, so_far))
        return "".join(parts)

    # ---- commands that answer at once ----

    async def _start(self, chat: ChatRef, _args: str) -> str:
        return (
            "Hello! I write speeches in the style of Donald Trump's 2016 campaign, one character at a "
            "time, with a small neural network. They are machine-made parody, not real quotes.\n\n" + help_text()
        )

    async def _help(self, chat: ChatRef, _args: str) -> str:
        return help_text()

    async def _settings(self, chat: ChatRef, _args: str) -> str:
        settings = await self.store.get(chat.id, chat.type)
        return "\n".join(
            [
                "Settings for this chat:",
                f"temperature: {settings.temperature:g} (change with /temperature, {TEMPERATURE_RANGE})",
                f"length: {settings.length} characters (change with /length, {LENGTH_MIN} to {LENGTH_MAX})",
                f"daily speech: {self._schedule_text(settings)}",
                f"voice: {self._voice_text(settings)}" + (" (change with /voice)" if len(self.voices) > 1 else ""),
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
            raise ArgumentError(f"{shown(words[0])} is not a time of day (24-hour HH:MM, 00:00 to 23:59). {usage}")
        zone = resolve_time_zone(words[1]) if len(words) == 2 else "UTC"
        if zone is None:
            raise ArgumentError(
                f"{shown(words[1])} is not a time zone I know. Use an IANA name such as UTC, Europe/London, "
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
        upcoming = next_daily_post(settings, self.clock())
        if upcoming is None:
            return "off"
        local = upcoming.astimezone(ZoneInfo(settings.time_zone))
        return f"{settings.daily_time:%H:%M} {settings.time_zone}, next on {local:%a %d %b %Y}"

    # ---- voices (bot.core.voices) ----

    def _voice_of(self, settings: ChatSettings | None) -> Voice:
        return self.voices.pick(None if settings is None else settings.voice)

    def _voice_text(self, settings: ChatSettings) -> str:
        """The chat's voice as /settings and /stats show it, saying so when its chosen one is no longer served."""
        voice = self._voice_of(settings)
        if settings.voice and self.voices.find(settings.voice) is None:
            return f"{voice.name} (its voice {settings.voice} is no longer served)"
        return voice.name

    async def _voice(self, chat: ChatRef, args: str) -> str:
        settings = await self.store.get(chat.id, chat.type)
        current = self._voice_of(settings)
        if not args:
            lines = [f"This chat's voice: {self._voice_text(settings)}."]
            if len(self.voices) == 1:
                return lines[0] + " It is the only voice I have."
            for voice in self.voices:
                mark = "•" if voice is current else "◦"
                lines.append(f"{mark} {voice.name}" + (f": {voice.description}" if voice.description else ""))
            lines.append(f"Change it with /voice NAME, e.g. /voice {self.voices.names[-1]}.")
            return "\n".join(lines)
        wanted = self.voices.find(args)
        if wanted is None:
            raise ArgumentError(
                f"I have no voice called {shown(args)}. "
                + (
                    f"My voices: {', '.join(self.voices.names)}; e.g. /voice {self.voices.names[-1]}."
                    if len(self.voices) > 1
                    else f"I have one voice, {self.voices.default.name}."
                )
            )
        await self.store.update(chat.id, voice=wanted.name)
        return f"Voice set to {wanted.name}." + (f" {wanted.description}" if wanted.description else "")

    # ---- groups: chatter, quiet, stats, forget (bot.core.groups) ----

    def _privacy_note(self, chat: ChatRef) -> str:
        """What keeps chatter from showing in this chat, if anything does."""
        if chat.type == "private":
            return "\n\nHere every message of yours is a prompt I answer; chatter shows in groups."
        return f"\n\n{PRIVACY_MODE_NOTE}" if chat.type in GROUP_TYPES and not self.reads_all_group_messages() else ""

    async def _chatter(self, chat: ChatRef, args: str) -> str:
        settings = await self.store.get(chat.id, chat.type)
        if not args:
            return (
                f"Chatter is {rate_text(settings.chatter_rate)}. In groups I answer on my own now and then: "
                "/chatter 1/20 for about one message in 20, /chatter off to stop." + self._privacy_note(chat)
            )
        if len(args.split()) > 1 and "/" not in args:
            raise ArgumentError(
                "/chatter takes one rate, e.g. /chatter 1/20, /chatter 20, /chatter 0.05 or /chatter off."
            )
        rate = parse_chatter_rate(args)
        await self.store.update(chat.id, chatter_rate=rate)
        if rate is None:
            self.chatter.forget(chat.id)  # its recent messages are no longer needed
            return "Chatter is off: I speak only when asked."
        self.chatter.changed(chat.id)
        return (
            f"Chatter is on: I answer on my own {rate_text(rate)}, {CHATTER_LIMITS}. "
            "/quiet 1h pauses me, /chatter off stops it." + self._privacy_note(chat)
        )

    async def _quiet(self, chat: ChatRef, args: str) -> str:
        settings = await self.store.get(chat.id, chat.type)
        duration = parse_quiet(args)
        now = self.clock()
        if duration is None:
            if not quiet_at(settings, now):
                return "I'm not being quiet here. /quiet 2h keeps me from chatter and daily speeches for two hours."
            await self.store.update(chat.id, quiet_until=None)
            self.chatter.changed(chat.id)
            return "Quiet time is over: chatter and daily speeches are back."
        until = now + duration
        await self.store.update(chat.id, quiet_until=until)
        self.chatter.changed(chat.id)
        return (
            f"Quiet until {local_text(until, settings.time_zone)}: no chatter and no daily speech until then. "
            "/speech still works; /quiet off ends the quiet sooner."
        )

    async def _stats(self, chat: ChatRef, _args: str) -> str:
        settings = await self.store.get(chat.id, chat.type)
        return stats_text(settings, self.clock(), self._voice_text(settings), self._schedule_text(settings))

    async def _forget(self, chat: ChatRef, args: str) -> str:
        if not args:
            return FORGET_CONFIRMATION
        if args.strip().lower() != "yes":
            raise ArgumentError(f"/forget takes nothing or yes. {FORGET_CONFIRMATION}")
        forgotten = await self.store.forget(chat.id)
        recent_messages = self.chatter.forget(chat.id)
        if self.on_forget is not None:
            self.on_forget(chat.id)
        return forget_text(forgotten.settings, forgotten.inbox_entries, recent_messages)
