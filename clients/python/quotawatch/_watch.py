"""Following a workspace live over the WebSocket, the way the JavaScript
client does: a single-use ticket for each connection (the key never goes in
a URL), a ping when the line is quiet and a reconnect when it stays silent,
reconnects with exponential back-off and jitter, and the active
notifications fetched again after every (re)connect and resync, since
messages may have been missed meanwhile."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import ssl
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Optional, Union
from urllib.parse import urlencode

from ._errors import AuthenticationError, PermissionDeniedError, QuotawatchError
from ._models import Event
from ._websocket import AsyncWebSocket, WebSocket, WebSocketClosed

if TYPE_CHECKING:
    from ._client import AsyncClient, Client

#: A close code that says reconnecting with the same key is pointless: the
#: key was revoked or the workspace deleted.
POLICY_VIOLATION = 1008

DEFAULT_HEARTBEAT = 15.0
DEFAULT_BACKOFF_INITIAL = 0.5
DEFAULT_BACKOFF_MAX = 30.0


def backoff_delay(
    attempt: int,
    initial: float = DEFAULT_BACKOFF_INITIAL,
    maximum: float = DEFAULT_BACKOFF_MAX,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds before reconnect attempt ``attempt`` (1, 2, ...): exponential,
    capped, with jitter so that many clients do not reconnect at once."""
    ceiling = min(maximum, initial * 2 ** max(0, attempt - 1))
    return ceiling / 2 + rand() * ceiling / 2


class Follower:
    """The decisions of a watch, without IO: what a message means, when to
    ping, whether a failure ends the watch or waits for a reconnect."""

    def __init__(self, *, heartbeat: float, reconnect: bool, backoff_initial: float, backoff_max: float) -> None:
        self.heartbeat = heartbeat
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.pending: Deque[Event] = collections.deque()
        self.attempt = 0
        self.retry_at = 0.0
        self.last_heard = 0.0
        self.pinged_at = 0.0
        self.closed = False
        #: Set when the notifications must be fetched again.
        self.resync = False

    def connected(self, now: float) -> None:
        self.attempt = 0
        self.last_heard = now
        self.pinged_at = now
        self.resync = True

    def received(self, text: Union[str, bytes], now: float) -> None:
        self.last_heard = now
        try:
            message = json.loads(text)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        event = Event.from_message(message)
        if event is not None:
            self.pending.append(event)
            if event.resync:
                self.resync = True

    def lost(self, error: BaseException, now: float) -> None:
        """The connection (or the ticket for it) failed: raises ``error`` if
        retrying cannot help, or schedules the next attempt."""
        final = isinstance(error, (AuthenticationError, PermissionDeniedError)) or (
            isinstance(error, WebSocketClosed) and error.close_code == POLICY_VIOLATION
        )
        if final or not self.reconnect:
            self.closed = True
            raise error
        self.attempt += 1
        self.retry_at = now + backoff_delay(self.attempt, self.backoff_initial, self.backoff_max)

    def silent_too_long(self, now: float) -> bool:
        """Nothing heard for two heartbeats: the connection is dead even if
        the socket has not noticed."""
        return now - self.last_heard > 2 * self.heartbeat

    def pinged(self, now: float) -> None:
        self.pinged_at = now

    def wait(self, now: float, deadline: Optional[float]) -> float:
        """How long to wait for the next message before pinging: a
        heartbeat after the last message or ping, whichever came later."""
        wait = max(self.last_heard, self.pinged_at) + self.heartbeat - now
        if deadline is not None:
            wait = min(wait, deadline - now)
        # A zero timeout would make a blocking socket non-blocking.
        return max(wait, 0.001)

    def ping_due(self, now: float) -> bool:
        return now >= max(self.last_heard, self.pinged_at) + self.heartbeat


def _url(settings: Any, ticket: str) -> str:
    # The ticket stands for the key; a service key's connection names its
    # workspace in the query, as the JavaScript client does.
    query = {"ticket": ticket}
    if settings.workspace is not None:
        query["workspace"] = settings.workspace
    return f"{settings.websocket_url()}?{urlencode(query)}"


def _headers(settings: Any) -> Dict[str, str]:
    # The key itself stays out of the handshake: the ticket stands for it.
    headers = settings.headers()
    headers.pop("Authorization", None)
    headers.pop("Accept", None)
    return headers


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _expired(deadline: Optional[float]) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class Watch:
    """Live events of a :class:`Client`'s workspace: iterate it
    (``for event in client.watch()``), or call :meth:`next` with a timeout.
    Use it as a context manager, or call :meth:`close`, to end it."""

    def __init__(
        self,
        client: "Client",
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        reconnect: bool = True,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self._client = client
        self._ssl_context = ssl_context
        self._socket: Optional[WebSocket] = None
        self._follower = Follower(
            heartbeat=heartbeat, reconnect=reconnect, backoff_initial=backoff_initial, backoff_max=backoff_max
        )

    def __iter__(self) -> "Watch":
        return self

    def __next__(self) -> Event:
        if self._follower.closed:
            raise StopIteration
        return self.next()

    def next(self, timeout: Optional[float] = None) -> Event:
        """The next event, waiting at most ``timeout`` seconds (None: as
        long as it takes) before raising :class:`TimeoutError`."""
        deadline = _deadline(timeout)
        follower = self._follower
        while not follower.pending:
            if follower.closed:
                raise QuotawatchError("the watch is closed")
            if _expired(deadline):
                raise TimeoutError("no event arrived in time")
            if self._socket is None:
                self._connect(deadline)
                continue
            if follower.resync:
                self._fetch_notifications()
                continue
            try:
                text = self._socket.recv(timeout=follower.wait(time.monotonic(), deadline))
            except TimeoutError:
                self._heartbeat()
            except (OSError, QuotawatchError) as error:
                self._drop(error)
            else:
                follower.received(text, time.monotonic())
        return follower.pending.popleft()

    def close(self) -> None:
        self._follower.closed = True
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _connect(self, deadline: Optional[float]) -> None:
        follower = self._follower
        wait = follower.retry_at - time.monotonic()
        if wait > 0:
            # Back-off before the next attempt, cut short by the caller's
            # deadline (the loop then reports the timeout).
            time.sleep(wait if deadline is None else max(min(wait, deadline - time.monotonic()), 0))
            if follower.retry_at > time.monotonic():
                return
        settings = self._client._settings
        try:
            ticket = self._client.ticket()
            self._socket = WebSocket.connect(
                _url(settings, ticket),
                headers=_headers(settings),
                timeout=settings.timeout,
                ssl_context=self._ssl_context,
            )
        except (OSError, QuotawatchError) as error:
            follower.lost(error, time.monotonic())
            return
        follower.connected(time.monotonic())

    def _fetch_notifications(self) -> None:
        self._follower.resync = False
        try:
            self._follower.pending.append(Event.snapshot(self._client.notifications()))
        except QuotawatchError:
            # Live messages keep flowing; the next reconnect tries again.
            pass

    def _heartbeat(self) -> None:
        assert self._socket is not None
        now = time.monotonic()
        if self._follower.silent_too_long(now):
            self._drop(TimeoutError("the WebSocket stopped answering pings"))
            return
        if not self._follower.ping_due(now):
            return
        try:
            self._socket.send(json.dumps({"type": "ping"}))
        except (OSError, QuotawatchError) as error:
            self._drop(error)
            return
        self._follower.pinged(time.monotonic())

    def _drop(self, error: BaseException) -> None:
        if self._socket is not None:
            self._socket.close(timeout=0)
            self._socket = None
        self._follower.lost(error, time.monotonic())


class AsyncWatch:
    """Live events of an :class:`AsyncClient`'s workspace:
    ``async for event in client.watch()``, or ``await watch.next(timeout)``.
    Use it as an async context manager, or call :meth:`aclose`, to end it."""

    def __init__(
        self,
        client: "AsyncClient",
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        reconnect: bool = True,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self._client = client
        self._ssl_context = ssl_context
        self._socket: Optional[AsyncWebSocket] = None
        self._follower = Follower(
            heartbeat=heartbeat, reconnect=reconnect, backoff_initial=backoff_initial, backoff_max=backoff_max
        )

    def __aiter__(self) -> "AsyncWatch":
        return self

    async def __anext__(self) -> Event:
        if self._follower.closed:
            raise StopAsyncIteration
        return await self.next()

    async def next(self, timeout: Optional[float] = None) -> Event:
        """The next event, waiting at most ``timeout`` seconds (None: as
        long as it takes) before raising :class:`TimeoutError`."""
        deadline = _deadline(timeout)
        follower = self._follower
        while not follower.pending:
            if follower.closed:
                raise QuotawatchError("the watch is closed")
            if _expired(deadline):
                raise TimeoutError("no event arrived in time")
            if self._socket is None:
                await self._connect(deadline)
                continue
            if follower.resync:
                await self._fetch_notifications()
                continue
            try:
                text = await asyncio.wait_for(self._socket.recv(), follower.wait(time.monotonic(), deadline))
            except asyncio.TimeoutError:
                await self._heartbeat()
            except (OSError, QuotawatchError) as error:
                await self._drop(error)
            else:
                follower.received(text, time.monotonic())
        return follower.pending.popleft()

    async def aclose(self) -> None:
        self._follower.closed = True
        if self._socket is not None:
            await self._socket.close()
            self._socket = None

    async def __aenter__(self) -> "AsyncWatch":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def _connect(self, deadline: Optional[float]) -> None:
        follower = self._follower
        wait = follower.retry_at - time.monotonic()
        if wait > 0:
            # Back-off before the next attempt, cut short by the caller's
            # deadline (the loop then reports the timeout).
            await asyncio.sleep(wait if deadline is None else max(min(wait, deadline - time.monotonic()), 0))
            if follower.retry_at > time.monotonic():
                return
        settings = self._client._settings
        try:
            ticket = await self._client.ticket()
            self._socket = await AsyncWebSocket.connect(
                _url(settings, ticket),
                headers=_headers(settings),
                timeout=settings.timeout,
                ssl_context=self._ssl_context,
            )
        except (OSError, asyncio.TimeoutError, QuotawatchError) as error:
            follower.lost(error, time.monotonic())
            return
        follower.connected(time.monotonic())

    async def _fetch_notifications(self) -> None:
        self._follower.resync = False
        try:
            self._follower.pending.append(Event.snapshot(await self._client.notifications()))
        except QuotawatchError:
            # Live messages keep flowing; the next reconnect tries again.
            pass

    async def _heartbeat(self) -> None:
        assert self._socket is not None
        now = time.monotonic()
        if self._follower.silent_too_long(now):
            await self._drop(TimeoutError("the WebSocket stopped answering pings"))
            return
        if not self._follower.ping_due(now):
            return
        try:
            await self._socket.send(json.dumps({"type": "ping"}))
        except (OSError, QuotawatchError) as error:
            await self._drop(error)
            return
        self._follower.pinged(time.monotonic())

    async def _drop(self, error: BaseException) -> None:
        if self._socket is not None:
            await self._socket.close(timeout=0)
            self._socket = None
        self._follower.lost(error, time.monotonic())
