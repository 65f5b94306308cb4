"""The webhook server: updates Telegram posts over HTTP, each refused before its body is read unless it
carries the secret, and refused unread when it is larger than any update.

python-telegram-bot's own server (Application.run_webhook) reads a whole body, up to tornado's 100 MB
default, into memory before it looks at the secret header: six unauthenticated 90 MB posts took a bot
from 175 MB to 607 MB. This one is the same tornado, with the body streamed (`stream_request_body`), so
`prepare()` sees the headers before any of the body: a request without the secret is never kept, and one
larger than any update is answered 403 or 413 unread. What passes goes into the Application's update queue
as python-telegram-bot's handler puts it.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import tornado.web
from telegram import Update
from telegram.ext import Application
from tornado.httpserver import HTTPServer

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# The largest body accepted. Telegram's updates are a few kilobytes (a message's text is at most 4096
# characters, with its entities, reply and sender); docs/operations.md, "Webhook mode".
MAX_UPDATE_BYTES = 1024 * 1024

Deliver = Callable[[dict], Awaitable[None]]


@tornado.web.stream_request_body
class UpdateHandler(tornado.web.RequestHandler):
    """One POST from Telegram: the secret and the size are checked on the headers, before any of the body.

    A body over MAX_UPDATE_BYTES is answered at once and never read (tornado closes the connection after
    the answer). A smaller one without the secret is read and thrown away chunk by chunk, then answered
    403, so that clients and proxies that send the whole body before reading see the answer.
    """

    SUPPORTED_METHODS = ("POST",)

    def initialize(self, secret: str, deliver: Deliver) -> None:
        self.secret = secret.encode()
        self.deliver = deliver
        self.body = bytearray()
        self.refusal: HTTPStatus | None = None

    def prepare(self) -> None:
        headers = self.request.headers
        if not hmac.compare_digest(headers.get(SECRET_HEADER, "").encode(), self.secret):
            log.debug("Refused a webhook request from %s without the secret token", self.request.remote_ip)
            self.refusal = HTTPStatus.FORBIDDEN
        elif headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self.refusal = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
        declared = headers.get("Content-Length")
        if declared is not None and int(declared) > MAX_UPDATE_BYTES:  # tornado has checked it is a number
            raise tornado.web.HTTPError(self.refusal or HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        # A chunked body declares no length: tornado stops reading it past the same bound.
        self.request.connection.set_max_body_size(MAX_UPDATE_BYTES)

    def data_received(self, chunk: bytes) -> None:
        if self.refusal is None:
            self.body += chunk

    async def post(self) -> None:
        if self.refusal is not None:
            raise tornado.web.HTTPError(self.refusal)
        try:
            data = json.loads(self.body)
        except ValueError:
            log.warning("A webhook request with the secret token carried no JSON; ignored")
            raise tornado.web.HTTPError(HTTPStatus.BAD_REQUEST) from None
        await self.deliver(data)

    def log_exception(self, typ, value, tb) -> None:
        # HTTPErrors are answers, not faults; anything else is logged by deliver's caller or is a bug.
        if not isinstance(value, tornado.web.HTTPError):
            super().log_exception(typ, value, tb)


class WebhookServer:
    """Listens on WEBHOOK_LISTEN:WEBHOOK_PORT and puts each accepted update into `application`'s queue."""

    def __init__(self, application: Application, path: str, secret: str):
        self.application = application
        routes = [(rf"/{path.strip('/')}/?", UpdateHandler, {"secret": secret, "deliver": self.deliver})]
        # The server's own bound catches what a handler never sees (a path that is not the webhook's).
        self.http = HTTPServer(
            tornado.web.Application(routes, log_function=lambda _handler: None), max_body_size=MAX_UPDATE_BYTES
        )

    def listen(self, address: str, port: int) -> None:
        self.http.listen(port, address=address)

    async def deliver(self, data: dict) -> None:
        bot = self.application.bot
        try:
            update = Update.de_json(data, bot)
        except Exception as error:  # anything posted that is not an update
            log.warning("A webhook request was not an update (%s); ignored", error)
            raise tornado.web.HTTPError(HTTPStatus.BAD_REQUEST) from None
        bot.insert_callback_data(update)
        await self.application.update_queue.put(update)

    async def stop(self) -> None:
        self.http.stop()
        await self.http.close_all_connections()
