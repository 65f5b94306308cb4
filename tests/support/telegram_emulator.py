"""A Telegram Bot API emulator on 127.0.0.1 for tests: the bot's real HTTP stack talks to it.

It checks method names and parameters against the machine-readable Bot API spec, kept in
tests/data/telegram-bot-api.json (MIT; its source and licence are in tests/data/), accepts form, JSON
and multipart bodies, long-polls getUpdates with offsets, or, once the bot calls setWebhook, posts
updates to its webhook as Telegram does (JSON, the secret in X-Telegram-Bot-Api-Secret-Token, each
update posted again until it is answered with a 2xx, a chat's updates one after another), answers the
calls the bot makes with plausible objects, records every call, and can inject 429s, 5xx answers,
a proxy's HTML error pages, malformed (cut-off) answers, timeouts, refusals (400), a revoked token (401),
a deleted bot (404), blocked chats (403) and group-to-supergroup migrations. Several bot processes can use
it at once, each through a base URL of its own (`base_url_via`), so a test can tell their calls
apart and aim faults at one of them. Objects inside parameters (inline results,
keyboards, reply parameters) are checked field by field against the spec's types too. Tests can send
inline queries, chosen inline results and button presses. Group privacy mode is on, as a new bot's is:
text sent in a group reaches the bot only if it is a command, a reply to the bot or a mention of it;
`privacy_mode=False` lets every message through and says so in getMe (can_read_all_group_messages).

It also runs on its own for a bot in another process, such as the container image in CI:
`python tests/support/telegram_emulator.py --ask /speech` prints its base URL, sends the command once the
bot polls, prints the answer and exits (status 1 if none came).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import aiohttp
from aiohttp import web

# In the repository, so a plain clone checks calls as CI does: without the spec, form values (all
# strings) could not be decoded by their declared types, and reply_markup would stay a JSON string.
SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "telegram-bot-api.json"
TEXT_LIMIT = 4096
CALLBACK_DATA_LIMIT = 64  # bytes
TOAST_LIMIT = 200
SCALARS = {"String", "Integer", "Float", "Boolean", "True", "InputFile"}
# The Boolean fields a ChatMemberAdministrator must carry (Bot API 10.1).
ADMIN_FLAGS = (
    "can_be_edited",
    "is_anonymous",
    "can_manage_chat",
    "can_delete_messages",
    "can_manage_video_chats",
    "can_restrict_members",
    "can_promote_members",
    "can_change_info",
    "can_invite_users",
    "can_post_stories",
    "can_edit_stories",
    "can_delete_stories",
)
ANONYMOUS_ADMIN = {"id": 1087968824, "is_bot": True, "first_name": "Group", "username": "GroupAnonymousBot"}


@dataclass
class Call:
    """One request as the emulator saw it. `failure` names what was injected, if anything."""

    method: str
    params: dict
    status: int | None = None  # None while the request is still being answered
    result: object = None
    failure: str | None = None
    via: str | None = None  # the base_url_via label the bot used, if any
    at: float = field(default_factory=time.monotonic)  # when it arrived


@dataclass
class Fault:
    method: str
    # "429", "5xx", "page" (an HTML error page, as a proxy in front of the API sends), "malformed" (200 with a
    # cut-off JSON body), "timeout", "refused" (400), "unauthorized" (401: a revoked token), "not found" (404:
    # a deleted bot), "hold" (answered once release() is called)
    kind: str
    times: int
    status: int = 500
    retry_after: int = 1
    delay: float = 0.0
    chat_id: int | None = None
    via: str | None = None  # only calls through base_url_via(via)
    skip: int = 0  # matching calls that pass untouched before the fault starts


@dataclass
class Delivery:
    """One POST of an update to the webhook: the HTTP status, or the connection error instead."""

    update_id: int
    status: int | None
    error: str | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass
class Webhook:
    url: str
    secret_token: str | None
    allowed_updates: list[str] | None
    max_connections: int


@dataclass
class _Spec:
    methods: dict[str, dict] = field(default_factory=dict)
    types: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _Spec:
        if not path.is_file():
            raise FileNotFoundError(f"no Bot API spec at {path}; it is part of the repository (tests/data/README.md)")
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(methods=data["methods"], types=data["types"])


class ApiError(Exception):
    def __init__(self, status: int, description: str, parameters: dict | None = None):
        super().__init__(description)
        self.status, self.description, self.parameters = status, description, parameters


class RawAnswer(Exception):
    """An answer that is not the Bot API's JSON: what a proxy or a broken connection gives."""

    def __init__(self, status: int, body: str, content_type: str):
        super().__init__(body)
        self.status, self.body, self.content_type = status, body, content_type


def _decode(value, types: list[str]):
    """Turn a form value (always a string) into what its declared types say it is."""
    if not isinstance(value, str):
        return value
    if "String" in types or "InputFile" in types:
        if "Integer" in types and value.lstrip("-").isdigit():
            return int(value)
        return value
    if types == ["Integer"]:
        return int(value)
    if types == ["Float"]:
        return float(value)
    if types == ["Boolean"]:
        return {"true": True, "false": False}[value.lower()]
    return json.loads(value)


class TelegramEmulator:
    """Serve with `async with TelegramEmulator(token) as emulator:`; point the bot at `.base_url`."""

    def __init__(
        self,
        token: str,
        bot_username: str = "SpeechTestBot",
        spec_path: Path = SPEC_PATH,
        port: int = 0,
        first_update_id: int = 1,
        privacy_mode: bool = True,
    ):
        """`first_update_id`: emulators standing in for one bot's updates split between replicas must not
        repeat each other's ids, as Telegram numbers a bot's updates once. `privacy_mode`: as set with
        @BotFather (Group Privacy)."""
        self.token = token
        self.port = port  # 0: any free port
        self.bot_user = {
            "id": int(token.split(":")[0]),
            "is_bot": True,
            "first_name": "Speech Bot",
            "username": bot_username,
            "can_join_groups": True,
            "can_read_all_group_messages": not privacy_mode,
            "supports_inline_queries": True,
        }
        self.spec = _Spec.load(spec_path)
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.admins: dict[int, list[dict]] = {}
        self.blocked: set[int] = set()
        self.migrated: dict[int, int] = {}
        self.commands: list[dict] = []
        self.withheld: list[dict] = []  # group messages privacy mode kept from the bot
        self._updates: list[dict] = []
        self.pushed_at: dict[int, float] = {}  # update_id -> time.monotonic() when a test pushed it
        self.webhook: Webhook | None = None
        # Where webhook updates are really posted, if not to the registered URL: Telegram posts to an https://
        # address, a test's reverse proxy listens on plain http on 127.0.0.1.
        self.deliver_to: str | None = None
        self.webhook_retry_delay = 0.2  # seconds before an update that was not answered with a 2xx is posted again
        self.deliveries: list[Delivery] = []
        self._deliveries: set[asyncio.Task] = set()
        self._chat_turns: defaultdict[object, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._webhook_slots = asyncio.Semaphore(1)
        self._client: aiohttp.ClientSession | None = None
        self._update_ids = itertools.count(first_update_id)
        self._message_ids = itertools.count(1000)
        self._query_ids = itertools.count(5000)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self._released = asyncio.Event()
        self.base_url = ""

    async def __aenter__(self) -> TelegramEmulator:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_route("*", "/via/{via}/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/bot"
        return self

    def base_url_via(self, label: str) -> str:
        """A base URL for one bot process among several: its calls are recorded with `via=label`."""
        return self.base_url.removesuffix("/bot") + f"/via/{label}/bot"

    async def __aexit__(self, *_exc) -> None:
        self._closing = True
        for delivery in list(self._deliveries):
            delivery.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        await self._notify()  # pending long polls answer now instead of at their timeout
        await self._runner.cleanup()

    # ---- what tests do to the emulated world ----

    def inject(self, method: str, kind: str, times: int = 1, **options) -> None:
        """Make the next `times` calls of `method` fail as `kind` (Fault.kind lists them)."""
        self.faults.append(Fault(method=method, kind=kind, times=times, **options))

    def release(self) -> None:
        """Answer the calls held by a "hold" fault, and any held later."""
        self._released.set()

    def push_update(self, payload: dict) -> int:
        """Queue an update (`payload` is everything but update_id); returns its update_id."""
        update_id = next(self._update_ids)
        update = {"update_id": update_id, **payload}
        self._updates.append(update)
        self.pushed_at[update_id] = time.monotonic()
        if self.webhook is not None:
            self._start_delivery(update)
        asyncio.get_running_loop().create_task(self._notify())
        return update_id

    def message(self, chat: dict, sender: dict | None, text: str, **extra) -> dict:
        """A text message as Telegram would deliver it, with command and mention entities."""
        message = {"message_id": next(self._message_ids), "date": int(time.time()), "chat": chat, "text": text}
        if sender is not None:
            message["from"] = sender
        entities = []
        if text.startswith("/"):
            entities.append({"type": "bot_command", "offset": 0, "length": len(text.split()[0])})
        mention = "@" + self.bot_user["username"]
        if mention in text and not text.startswith("/"):
            entities.append({"type": "mention", "offset": text.index(mention), "length": len(mention)})
        if entities:
            message["entities"] = entities
        return message | extra

    def inline_query(self, sender: dict, query: str, chat_type: str = "sender") -> str:
        """`@Bot query` typed by `sender` in some chat; returns the query's id."""
        query_id = str(next(self._query_ids))
        self.push_update(
            {"inline_query": {"id": query_id, "from": sender, "query": query, "offset": "", "chat_type": chat_type}}
        )
        return query_id

    def choose_inline_result(self, sender: dict, result_id: str, query: str) -> None:
        """The user picked one of the results (sent only with /setinlinefeedback on)."""
        self.push_update({"chosen_inline_result": {"result_id": result_id, "from": sender, "query": query}})

    def press(self, message: dict, sender: dict, data: str) -> str:
        """`sender` presses the button with callback `data` under `message` (a sent message's result)."""
        query_id = str(next(self._query_ids))
        self.push_update(
            {
                "callback_query": {
                    "id": query_id,
                    "from": sender,
                    "message": message,
                    "chat_instance": f"instance{message['chat']['id']}",
                    "data": data,
                }
            }
        )
        return query_id

    def answer_to(self, method: str, query_id: str) -> Call | None:
        """The successful answerInlineQuery / answerCallbackQuery for `query_id`, if there was one."""
        key = "inline_query_id" if method == "answerInlineQuery" else "callback_query_id"
        return next((call for call in self.sent(method) if str(call.params[key]) == query_id), None)

    def send_text(self, chat: dict, sender: dict | None, text: str, **extra) -> dict:
        """`text` from `sender` in `chat`, delivered to the bot unless privacy mode keeps it away."""
        message = self.message(chat, sender, text, **extra)
        if self._seen_by_bot(message):
            self.push_update({"message": message})
        else:
            self.withheld.append(message)
        return message

    def _seen_by_bot(self, message: dict) -> bool:
        """What Telegram shows a bot in privacy mode: in groups, commands, replies to it and mentions of it."""
        if not self.bot_user["can_read_all_group_messages"] and message["chat"]["type"] in ("group", "supergroup"):
            replied = message.get("reply_to_message", {}).get("from", {})
            mentioned = any(entity["type"] == "mention" for entity in message.get("entities", []))
            return message["text"].startswith("/") or replied.get("id") == self.bot_user["id"] or mentioned
        return True

    def sent(self, method: str = "sendMessage", chat_id: int | None = None) -> list[Call]:
        """Calls of `method` that succeeded, optionally only those to `chat_id`."""
        return [
            call
            for call in self.calls
            if call.method == method
            and call.status == 200
            and call.failure is None  # a malformed answer is 200 too
            and (chat_id is None or int(call.params.get("chat_id", 0)) == chat_id)
        ]

    async def wait_for(self, predicate: Callable[[Call], bool], since: int = 0, timeout: float = 15.0) -> Call:
        """The first call recorded at index `since` or later that matches `predicate`, waiting if needed."""

        def find() -> Call | None:
            return next((call for call in self.calls[since:] if predicate(call)), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(find), timeout)
            return find()

    async def ask(self, chat: dict, sender: dict | None, text: str, timeout: float = 15.0, **extra) -> str:
        """Send a text message and return the text of the bot's answer in that chat."""
        since = len(self.calls)
        self.send_text(chat, sender, text, **extra)
        answer = await self.wait_for(
            lambda call: (
                call.method == "sendMessage"
                and call.status == 200
                and call.failure is None
                and int(call.params["chat_id"]) == chat["id"]
            ),
            since,
            timeout,
        )
        return answer.params["text"]

    async def settle(self, seconds: float = 0.3) -> None:
        """Let the bot work for a moment (used where a test checks that nothing happened)."""
        await asyncio.sleep(seconds)

    # ---- the HTTP side ----

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._read_params(request)
        call = Call(method=method, params=params, via=request.match_info.get("via"))
        self.calls.append(call)  # recorded on arrival, so a test sees calls the client gave up on
        await self._notify()
        try:
            if request.match_info["token"] != self.token:
                raise ApiError(401, "Unauthorized")
            self._check(method, params)
            await self._apply_faults(call)
            call.result = await self._answer(method, params)
            body = {"ok": True, "result": call.result}
            call.status = 200
        except ApiError as error:
            call.status = error.status
            body = {"ok": False, "error_code": error.status, "description": error.description}
            if error.parameters:
                body["parameters"] = error.parameters
        except RawAnswer as answer:
            call.status = answer.status
            return web.Response(text=answer.body, status=answer.status, content_type=answer.content_type)
        finally:
            await self._notify()
        return web.json_response(body, status=call.status)

    async def _read_params(self, request: web.Request) -> dict:
        params: dict = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.can_read_body:
            for name, value in (await request.post()).items():
                params[name] = value if isinstance(value, str) else value.file.read()
        return params

    # ---- webhook delivery ----

    def _start_delivery(self, update: dict) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(update))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    @staticmethod
    def _chat_of(update: dict) -> object:
        for kind in ("message", "edited_message", "channel_post", "my_chat_member", "chat_member"):
            if kind in update and "chat" in update[kind]:
                return update[kind]["chat"]["id"]
        query = update.get("callback_query", {})
        if "message" in query:
            return query["message"]["chat"]["id"]
        return ("update", update["update_id"])  # no chat: nothing to keep in order with

    def _allowed(self, update: dict, allowed: list[str] | None) -> bool:
        return allowed is None or not allowed or any(kind in update for kind in allowed)

    async def _deliver(self, update: dict) -> None:
        """Post `update` to the webhook until it is answered with a 2xx or the webhook is deleted; a chat's
        updates go one after another (Telegram keeps their order), different chats' side by side."""
        async with self._chat_turns[self._chat_of(update)], self._webhook_slots:
            while self.webhook is not None and not self._closing:
                webhook = self.webhook
                if not self._allowed(update, webhook.allowed_updates):
                    break
                headers = {"Content-Type": "application/json"}
                if webhook.secret_token:
                    headers["X-Telegram-Bot-Api-Secret-Token"] = webhook.secret_token
                try:
                    async with self._client.post(
                        self.deliver_to or webhook.url, data=json.dumps(update), headers=headers
                    ) as response:
                        delivery = Delivery(update["update_id"], response.status)
                except (aiohttp.ClientError, TimeoutError) as error:
                    delivery = Delivery(update["update_id"], None, f"{type(error).__name__}: {error}")
                self.deliveries.append(delivery)
                if delivery.status is not None and 200 <= delivery.status < 300:
                    self._updates = [other for other in self._updates if other is not update]
                    break
                await asyncio.sleep(self.webhook_retry_delay)
        await self._notify()

    def _set_webhook(self, params: dict) -> bool:
        url = str(params["url"])
        if not url:
            return self._delete_webhook(params)
        if not url.startswith("https://"):
            raise ApiError(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
        connections = int(params.get("max_connections", 40))
        if not 1 <= connections <= 100:
            raise ApiError(400, "Bad Request: bad webhook: max_connections must be between 1 and 100")
        if params.get("drop_pending_updates"):
            self._updates = []
        had_one = self.webhook is not None
        self.webhook = Webhook(url, params.get("secret_token"), params.get("allowed_updates"), connections)
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._webhook_slots = asyncio.Semaphore(connections)
        if not had_one:
            for update in self._updates:
                self._start_delivery(update)
        return True

    def _delete_webhook(self, params: dict) -> bool:
        self.webhook = None
        if params.get("drop_pending_updates"):
            self._updates = []
        return True

    def _check(self, method: str, params: dict) -> None:
        spec = self.spec.methods.get(method)
        if spec is None:
            raise ApiError(404, "Not Found: method not found")
        fields = {entry["name"]: entry for entry in spec.get("fields", [])}
        for name in params:
            if name not in fields:
                raise ApiError(400, f"Bad Request: {method} has no parameter {name!r}")
        for name, entry in fields.items():
            if entry["required"] and name not in params:
                raise ApiError(400, f"Bad Request: {method} needs parameter {name!r}")
            if name in params:
                try:
                    params[name] = _decode(params[name], entry["types"])
                except (ValueError, KeyError) as error:
                    raise ApiError(400, f"Bad Request: {name!r} is not {entry['types']}: {error}") from None
                problem = self._problem(params[name], entry["types"])
                if problem:
                    raise ApiError(400, f"Bad Request: {method} parameter {name!r}: {problem}")

    def _problem(self, value, types: list[str]) -> str | None:
        """Why `value` fits none of the spec `types` (objects checked field by field), or None if it fits one."""
        problems = []
        for kind in types:
            if kind in SCALARS:
                return None  # scalars were decoded (and so checked) by _decode
            if kind.startswith("Array of "):
                if not isinstance(value, list):
                    problems.append(f"{kind} expected")
                    continue
                inner = [self._problem(item, [kind.removeprefix("Array of ")]) for item in value]
                problem = next((p for p in inner if p), None)
                if problem is None:
                    return None
                problems.append(problem)
                continue
            spec = self.spec.types.get(kind)
            if spec is None:
                return None
            if "subtypes" in spec:
                problem = self._problem(value, spec["subtypes"])
            elif not isinstance(value, dict):
                problem = f"{kind} expected"
            else:
                fields = {entry["name"]: entry for entry in spec.get("fields", [])}
                problem = next((f"{kind} has no field {key!r}" for key in value if key not in fields), None)
                problem = problem or next(
                    (f"{kind} needs {name!r}" for name, e in fields.items() if e["required"] and name not in value),
                    None,
                )
                problem = problem or next(
                    (p for key, item in value.items() if (p := self._problem(item, fields[key]["types"]))), None
                )
            if problem is None:
                return None
            problems.append(problem)
        return "; ".join(problems)

    async def _apply_faults(self, call: Call) -> None:
        for fault in self.faults:
            if fault.method != call.method or fault.times <= 0:
                continue
            if fault.chat_id is not None and int(call.params.get("chat_id", 0)) != fault.chat_id:
                continue
            if fault.via is not None and call.via != fault.via:
                continue
            if fault.skip > 0:
                fault.skip -= 1
                continue
            fault.times -= 1
            call.failure = fault.kind
            if fault.kind == "429":
                raise ApiError(
                    429,
                    f"Too Many Requests: retry after {fault.retry_after}",
                    {"retry_after": fault.retry_after},
                )
            if fault.kind == "5xx":
                raise ApiError(fault.status, "Internal Server Error")
            if fault.kind == "refused":
                raise ApiError(400, f"Bad Request: {call.method} is not available")
            if fault.kind == "hold":
                # Not answered until the test calls release(); then answered as usual: late, but no failure.
                await self._released.wait()
                call.failure = None
                return
            if fault.kind == "page":
                title = f"{fault.status} {HTTPStatus(fault.status).phrase}"
                raise RawAnswer(
                    fault.status,
                    f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>",
                    "text/html",
                )
            if fault.kind == "malformed":
                raise RawAnswer(200, '{"ok": true, "result": [{"update_id": ', "application/json")
            if fault.kind == "unauthorized":
                raise ApiError(401, "Unauthorized")
            if fault.kind == "not found":
                raise ApiError(404, "Not Found")
            if fault.kind == "timeout":
                # Hold the connection past the client's read timeout; the client gives up first.
                await asyncio.sleep(fault.delay)
                raise ApiError(504, "Gateway Timeout")
            raise ValueError(f"unknown fault kind {fault.kind!r}")

    async def _answer(self, method: str, params: dict):
        if method == "getMe":
            return self.bot_user
        if method == "getUpdates":
            if self.webhook is not None:
                raise ApiError(
                    409,
                    "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete "
                    "the webhook first",
                )
            return await self._get_updates(params)
        if method == "setWebhook":
            return self._set_webhook(params)
        if method == "deleteWebhook":
            return self._delete_webhook(params)
        if method == "getWebhookInfo":
            info = {"url": "", "has_custom_certificate": False, "pending_update_count": len(self._updates)}
            return info | (
                {"url": self.webhook.url, "max_connections": self.webhook.max_connections} if self.webhook else {}
            )
        if method == "sendMessage":
            return self._send_message(params)
        if method == "sendMessageDraft":
            if int(params["chat_id"]) <= 0:
                raise ApiError(400, "Bad Request: drafts can be sent to private chats only")
            if len(str(params.get("text", ""))) > TEXT_LIMIT:
                raise ApiError(400, "Bad Request: message is too long")
            return True
        if method == "answerCallbackQuery" and len(str(params.get("text", ""))) > TOAST_LIMIT:
            raise ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        if method == "getChatAdministrators":
            return [
                self._administrator(user, owner=index == 0)
                for index, user in enumerate(self.admins.get(int(params["chat_id"]), []))
            ]
        if method == "setMyCommands":
            self.commands = params["commands"]
            return True
        if method == "getMyCommands":
            return self.commands
        return True

    async def _get_updates(self, params: dict) -> list[dict]:
        offset = int(params.get("offset", 0))
        limit = int(params.get("limit", 100))
        timeout = float(params.get("timeout", 0))
        allowed = params.get("allowed_updates") or None
        # An offset confirms (forgets) every update before it, as Telegram does.
        self._updates = [update for update in self._updates if update["update_id"] >= offset]

        def pending() -> list[dict]:
            return [update for update in self._updates if allowed is None or any(kind in update for kind in allowed)][
                :limit
            ]

        if not pending() and timeout > 0:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(lambda: pending() or self._closing), timeout)
        return pending()

    def _send_message(self, params: dict) -> dict:
        chat_id = int(params["chat_id"])
        if chat_id in self.migrated:
            raise ApiError(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                {"migrate_to_chat_id": self.migrated[chat_id]},
            )
        if chat_id in self.blocked:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        text = str(params["text"]).strip()
        if not text:
            raise ApiError(400, "Bad Request: message text is empty")
        if len(text) > TEXT_LIMIT:
            raise ApiError(400, "Bad Request: message is too long")
        markup = params.get("reply_markup")
        for row in (markup or {}).get("inline_keyboard", []):
            for button in row:
                if len(button.get("callback_data", "").encode()) > CALLBACK_DATA_LIMIT:
                    raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
        chat_type = "private" if chat_id > 0 else ("supergroup" if chat_id < -(10**12) else "group")
        message = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": chat_type},
            "from": self.bot_user,
            "text": text,
        }
        return message | ({"reply_markup": markup} if markup else {})

    @staticmethod
    def _administrator(user: dict, owner: bool) -> dict:
        if owner:
            return {"status": "creator", "user": user, "is_anonymous": False}
        return {"status": "administrator", "user": user} | dict.fromkeys(ADMIN_FLAGS, False)


async def _serve(args: argparse.Namespace) -> int:
    async with TelegramEmulator(args.token, port=args.port) as emulator:
        print(emulator.base_url, flush=True)
        if args.ask is None:
            await asyncio.Event().wait()  # until interrupted
        try:
            await emulator.wait_for(lambda call: call.method == "getUpdates", timeout=args.timeout)
            user = {"id": 4242, "is_bot": False, "first_name": "Operator"}
            answer = await emulator.ask({"id": user["id"], "type": "private", "first_name": "Operator"}, user, args.ask)
        except TimeoutError:
            print(f"no answer to {args.ask!r}; calls seen: {[call.method for call in emulator.calls]}", flush=True)
            return 1
        print(json.dumps({"sendMessage": answer}, ensure_ascii=False), flush=True)
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve the Bot API emulator on 127.0.0.1 for a bot in another process."
    )
    parser.add_argument("--token", default="123456:emulator-token-for-a-bot-in-another-process")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (the first line printed is the URL)")
    parser.add_argument("--ask", help="send this text from a private chat once the bot polls, print the answer, exit")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the bot's first poll")
    try:
        return asyncio.run(_serve(parser.parse_args(argv)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
