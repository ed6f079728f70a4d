"""Typed NATS messaging: publish, subscribe, serve and request with protocol messages.

Handlers see protocol messages, never raw NATS objects. Every request carries an explicit deadline (the
nats-py default of 0.5 s is never right for a prefill). A malformed or unknown message is logged and
dropped; a handler that raises answers with an ErrorReply instead of leaving the caller to time out.
The W3C `traceparent` of the current request rides in a NATS header both ways (see tracecontext.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Awaitable, Callable, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATSClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from pdserve import nats_auth, subjects, tracecontext
from pdserve.config import BusOptions
from pdserve.protocol import ErrorReply, InvalidMessage, Message, decode, encode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
_AUTH_VIOLATION = "Authorization Violation"  # the server's -ERR for missing or wrong credentials
R = TypeVar("R", bound=Message)


class BusError(Exception):
    pass


class BusTimeout(BusError):
    """No answer within the deadline."""


class NoResponders(BusError):
    """Nobody listens on the subject: the worker is gone."""


class PayloadTooLarge(BusError):
    """The message is larger than the NATS server's max_payload."""


class RemoteError(BusError):
    """The other side answered with an ErrorReply."""

    def __init__(self, reply: ErrorReply):
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


class Bus:
    """One NATS connection of one service."""

    def __init__(self, nc: NATSClient, name: str, on_reconnect: list[Callable[[], None]] | None = None):
        self._nc = nc
        self.name = name
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task] = set()
        # Called after a lost connection was made again (subscriptions are back): what was published in
        # between, by us or to us, may be lost.
        self.on_reconnect: list[Callable[[], None]] = on_reconnect if on_reconnect is not None else []

    @classmethod
    async def connect(
        cls,
        servers: str | list[str],
        name: str,
        *,
        connect_timeout_s: float = 10.0,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> "Bus":
        """Connect, retrying until connect_timeout_s (services may start before NATS); reconnect forever after.

        Credentials the server refuses end the wait at once (retrying cannot fix them), with a BusError that
        names the flags to set; so does every other failure, once connect_timeout_s has passed.
        """

        async def on_disconnect() -> None:
            if not nc.is_closed and not nc.is_draining:
                log.warning("%s: disconnected from NATS; reconnecting", name)

        reconnect_hooks: list[Callable[[], None]] = []

        async def on_reconnect() -> None:
            log.warning("%s: reconnected to NATS at %s", name, nc.connected_url.netloc if nc.connected_url else "?")
            for hook in list(reconnect_hooks):
                try:
                    hook()
                except Exception:
                    log.exception("%s: reconnect hook failed", name)

        connected = False
        refused = asyncio.Event()
        reported: list[Exception] = []  # errors nats-py reported while it retried by itself

        async def on_error(e: Exception) -> None:
            # Before `connected`, the connect loop reports the last error; while reconnecting, every failed
            # attempt (two a second) would repeat the disconnect warning, so those go to DEBUG.
            if not connected:
                reported[:] = [e]
                if _AUTH_VIOLATION in str(e):
                    refused.set()
            if connected and nc.is_connected:
                log.warning("%s: NATS error: %s", name, e)
            else:
                log.debug("%s: NATS error: %s", name, e)

        where = servers if isinstance(servers, str) else ", ".join(servers)
        deadline = time.monotonic() + connect_timeout_s
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            nc = NATSClient()
            # nats-py keeps retrying a first connection by itself; bound it by our deadline.
            connecting = asyncio.create_task(nc.connect(
                servers=servers,
                name=name,
                connect_timeout=max(1, min(5, int(deadline - time.monotonic()))),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
                user=user,
                password=password,
                token=token,
                tls=tls,
                inbox_prefix=nats_auth.inbox_prefix(user),
            ))
            refusal = asyncio.create_task(refused.wait())
            try:
                await asyncio.wait({connecting, refusal}, timeout=max(0.5, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                refusal.cancel()
            if connecting.done():
                last_error = connecting.exception()
                if last_error is None:
                    connected = True
                    return cls(nc, name, on_reconnect=reconnect_hooks)
                if not isinstance(last_error, (OSError, nats.errors.Error, asyncio.TimeoutError)):
                    raise last_error
            else:
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError, nats.errors.Error):
                    await connecting
                last_error = reported[0] if reported else asyncio.TimeoutError()
            await nc.close()
            if refused.is_set():
                given = "the credentials given were refused" if (user or token) else "it requires credentials"
                raise BusError(
                    f"{name}: NATS at {where} refused the connection (Authorization Violation): {given}; pass "
                    "--nats-user and --nats-password (PDSERVE_NATS_USER / PDSERVE_NATS_PASSWORD) or --nats-token "
                    "(PDSERVE_NATS_TOKEN) as the server is configured"
                )
            await asyncio.sleep(0.25)
        if isinstance(last_error, ssl.SSLError):
            raise BusError(
                f"{name}: TLS with NATS at {where} failed ({last_error}); pass --nats-tls-ca (PDSERVE_NATS_TLS_CA) "
                "with the CA that signed the server's certificate, and --nats-tls-cert/--nats-tls-key if the server "
                "verifies clients"
            )
        cause = "no connection" if last_error is None or isinstance(last_error, asyncio.TimeoutError) else repr(last_error)
        raise BusError(
            f"{name}: cannot reach NATS at {where} within {connect_timeout_s:.0f}s ({cause}); "
            "start nats-server or pass the right --nats URL"
        )

    @classmethod
    async def connect_with(cls, options: BusOptions, name: str, *, connect_timeout_s: float | None = None) -> "Bus":
        """Connect as a service's BusOptions say: servers, credentials, TLS, start-up timeout."""
        return await cls.connect(
            options.nats_servers, name,
            connect_timeout_s=options.connect_timeout_s if connect_timeout_s is None else connect_timeout_s,
            user=options.nats_user, password=options.nats_password, token=options.nats_token,
            tls=tls_context(options),
        )

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    @property
    def max_payload(self) -> int:
        """The largest message the NATS server takes (its max_payload; 1 MiB unless configured)."""
        return int(self._nc.max_payload)

    @property
    def num_reconnects(self) -> int:
        """How often the connection was lost and made again (NATS restarts, network blips)."""
        return int(self._nc.stats["reconnects"])

    async def close(self) -> None:
        """Drain: finish handlers in flight, flush what is published, then close."""
        if self._nc.is_closed:
            return
        if self._nc.is_connected:
            try:
                await asyncio.wait_for(self._nc.drain(), timeout=5)
                return
            except (asyncio.TimeoutError, nats.errors.Error, OSError) as e:
                log.warning("%s: NATS drain did not finish (%s); closing", self.name, e)
        try:  # NATS is gone (or the drain failed): nothing can be flushed, just stop reconnecting
            await asyncio.wait_for(self._nc.close(), timeout=5)
        except (asyncio.TimeoutError, nats.errors.Error, OSError) as e:
            log.warning("%s: NATS connection closed uncleanly: %s", self.name, e)

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Return once NATS has everything published or subscribed so far."""
        await self._sync_with_server(timeout_s)

    # ------------------------------------------------------------------------------------- publish

    async def publish(self, subject: str, msg: Message, *, request_id: str | None = None) -> None:
        try:
            await self._nc.publish(subject, encode(msg), headers=_headers(request_id))
        except nats.errors.MaxPayloadError as e:
            raise self._too_large(subject) from e

    def _too_large(self, subject: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"a message on {subject} is larger than the NATS server's max_payload of "
                               f"{self.max_payload} bytes; raise max_payload in nats-server's configuration")

    # ------------------------------------------------------------------------------------ subscribe

    async def subscribe(
        self, subject: str, cls: type[M], handler: Callable[[M], Awaitable[None]], *, queue: str = "",
        subject_of: Callable[[M], str] | None = None,
    ) -> Subscription:
        """Deliver each valid `cls` message on subject to handler, in order; drop and log invalid ones.

        subject_of: the subject a message must have arrived on (heartbeats on their sender's own subject): NATS
        permissions decide who may publish on a subject, so a message that claims another sender is dropped.
        """

        async def on_msg(raw: Msg) -> None:
            msg = self._decode(raw, cls)
            if msg is None:
                return
            if subject_of is not None and subject_of(msg) != raw.subject:
                log.warning("%s: dropped a %s on %s that claims to be from %s", self.name, msg.type,
                            raw.subject[:200], subject_of(msg)[:200])
                return
            with tracecontext.use(raw.headers):
                try:
                    await handler(msg)
                except Exception:
                    log.exception("%s: handler for %s failed on %s", self.name, subject, _request_id_of(msg))

        return await self._subscribe(subject, queue, on_msg)

    async def serve(
        self, subject: str, cls: type[M], handler: Callable[[M], Awaitable[Message]], *, queue: str = ""
    ) -> Subscription:
        """Answer each valid request with handler's reply; an exception answers an ErrorReply.

        Requests are handled concurrently (nats-py runs one callback at a time per subscription, so each
        request gets its own task; references are kept until it ends).
        """

        async def on_msg(raw: Msg) -> None:
            task = asyncio.create_task(handle(raw))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        async def handle(raw: Msg) -> None:
            msg = self._decode(raw, cls)
            if msg is None:
                if raw.reply:
                    await self._reply(raw, ErrorReply(code="bad_request", message="malformed message", retryable=False))
                return
            with tracecontext.use(raw.headers):
                try:
                    reply = await handler(msg)
                except Exception as e:
                    log.exception("%s: handler for %s failed on %s", self.name, subject, _request_id_of(msg))
                    reply = ErrorReply(code="handler_failed", message=f"{type(e).__name__}: {e}")
            if raw.reply:
                await self._reply(raw, reply)

        return await self._subscribe(subject, queue, on_msg)

    async def request(
        self, subject: str, msg: Message, reply_cls: type[R], *, timeout_s: float, request_id: str | None = None
    ) -> R:
        """Send msg and wait at most timeout_s for a `reply_cls`.

        Raises BusTimeout, NoResponders, RemoteError (an ErrorReply came back) or BusError (bad reply).
        """
        assert timeout_s > 0, "every request needs a positive deadline"
        try:
            raw = await self._nc.request(subject, encode(msg), timeout=timeout_s, headers=_headers(request_id))
        except nats.errors.NoRespondersError as e:
            raise NoResponders(f"no service listens on {subject}") from e
        except nats.errors.MaxPayloadError as e:
            raise self._too_large(subject) from e
        except (nats.errors.TimeoutError, asyncio.TimeoutError) as e:
            raise BusTimeout(f"no answer on {subject} within {timeout_s:.1f}s") from e
        try:
            return decode(raw.data, reply_cls)
        except InvalidMessage as e:
            try:
                error = decode(raw.data, ErrorReply)
            except InvalidMessage:
                raise BusError(f"bad reply on {subject}: {e}") from e
            raise RemoteError(error) from None

    async def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        try:
            await sub.unsubscribe()
        except nats.errors.Error as e:  # connection closed or reconnecting: the server forgets it anyway
            log.debug("%s: unsubscribe: %s", self.name, e)

    # ------------------------------------------------------------------------------------- internal

    async def _subscribe(self, subject: str, queue: str, on_msg: Callable[[Msg], Awaitable[None]]) -> Subscription:
        sub = await self._nc.subscribe(subject, queue=queue, cb=on_msg)
        self._subs.append(sub)
        await self._sync_with_server()
        return sub

    async def _sync_with_server(self, timeout_s: float = 5.0) -> None:
        """Return once the server has processed everything sent so far (a SUB above all).

        nats-py (2.16) writes a flush's PING straight to the socket while a SUB still waits in its pending
        buffer for the flusher task, so the PONG can come back before the server knows the subscription: a
        request from another connection then gets "no responders" (measured: 8 in 2000 on an idle loopback).
        Waiting for the buffer to drain first puts the PING behind the SUB on the wire.
        """
        deadline = time.monotonic() + timeout_s
        while self._nc.pending_data_size > 0:
            if time.monotonic() > deadline:
                raise BusError(f"{self.name}: NATS send buffer did not drain within {timeout_s:.0f}s; is NATS reachable?")
            await asyncio.sleep(0.0005)
        await self._nc.flush(timeout=max(0.5, deadline - time.monotonic()))

    def _decode(self, raw: Msg, cls: type[M]) -> M | None:
        try:
            return decode(raw.data, cls)
        except InvalidMessage as e:
            log.warning("%s: dropped invalid message on %s: %s", self.name, raw.subject, e)
            return None

    async def _reply(self, raw: Msg, reply: Message) -> None:
        try:
            await raw.respond(encode(reply))
        except nats.errors.Error as e:
            log.warning("%s: could not reply on %s: %s", self.name, raw.subject, e)


def tls_context(options: BusOptions) -> ssl.SSLContext | None:
    """The TLS context for NATS, or None for a plain connection.

    --nats-tls-ca verifies the server against that CA (instead of the system's); --nats-tls-cert/--nats-tls-key
    present a client certificate. A tls:// URL alone uses the system's CAs.
    """
    if not options.nats_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=options.nats_tls_ca)
    if options.nats_tls_cert and options.nats_tls_key:
        context.load_cert_chain(options.nats_tls_cert, options.nats_tls_key)
    return context


def _headers(request_id: str | None) -> dict[str, str] | None:
    headers = {}
    traceparent = tracecontext.current()
    if traceparent:
        headers[subjects.HEADER_TRACEPARENT] = traceparent
    if request_id:
        headers[subjects.HEADER_REQUEST_ID] = request_id
    return headers or None


def _request_id_of(msg: Message) -> str:
    return getattr(msg, "request_id", "-")
