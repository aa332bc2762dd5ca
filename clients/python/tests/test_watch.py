"""Following a workspace over the WebSocket of a real quotawatch."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time

import httpx
import pytest

from quotawatch import APIConnectionError, AsyncClient, AuthenticationError, Client, WebSocketClosed
from quotawatch._watch import Follower, backoff_delay
from quotawatch._websocket import CLOSE, TEXT, Handshake, encode_frame

#: How long a test waits for an event before it fails.
DEADLINE = 15.0


def _warning_workspace(server):
    # Two requests a day, warning at half: one reported call turns it to warning.
    return server.workspace(limits={"requests_per_day": 2, "requests_per_minute": None}, warn_at=0.5)


def next_matching(events, predicate, deadline=DEADLINE):
    """The first event matching ``predicate``, failing after ``deadline``
    seconds."""
    until = time.monotonic() + deadline
    while True:
        left = until - time.monotonic()
        if left <= 0:
            pytest.fail(f"no matching event within {deadline} s")
        try:
            event = events.next(timeout=left)
        except TimeoutError:
            pytest.fail(f"no matching event within {deadline} s")
        if predicate(event):
            return event


async def next_matching_async(events, predicate, deadline=DEADLINE):
    until = time.monotonic() + deadline
    while True:
        left = until - time.monotonic()
        if left <= 0:
            pytest.fail(f"no matching event within {deadline} s")
        try:
            event = await events.next(timeout=left)
        except TimeoutError:
            pytest.fail(f"no matching event within {deadline} s")
        if predicate(event):
            return event


def test_watch_sees_the_status_change_a_usage_report_causes(server):
    workspace = _warning_workspace(server)
    with Client(server.url, workspace.key) as quota, quota.watch() as events:
        # On connect: the status, and the active notifications fetched anew.
        first = {event.type: event for event in (events.next(timeout=DEADLINE), events.next(timeout=DEADLINE))}
        assert first["status"].workspace == workspace.id
        assert first["status"].status.status == "normal"
        assert first["notification"].action == "snapshot"
        assert first["notification"].notifications == []

        quota.usage(usage={"prompt_tokens": 3, "completion_tokens": 1})

        # The new status and the notification it raises, in either order.
        seen = {}
        while len(seen) < 2:
            event = next_matching(
                events,
                lambda e: (
                    (e.type == "status" and e.status.status == "warning")
                    or (e.type == "notification" and e.action == "raised")
                ),
            )
            seen[event.type] = event
        assert seen["status"].status.limits["requests_per_day"].used == 1
        assert seen["notification"].notification.kind == "approaching_limit"
        assert seen["notification"].notification.workspace == workspace.id


def test_watch_answers_the_servers_pings(server, workspace):
    # The server (started with QUOTAWATCH_WS_PING_INTERVAL=1s) closes a peer
    # that leaves its pings unanswered for two intervals. Without reconnects,
    # a watch that did not answer them would end within this quiet spell;
    # the span is the behaviour under test, not a wait for readiness.
    with Client(server.url, workspace.key) as quota, quota.watch(reconnect=False) as events:
        next_matching(events, lambda e: e.type == "status")
        quiet_until = time.monotonic() + 3.5
        with pytest.raises(TimeoutError):
            while True:
                events.next(timeout=max(quiet_until - time.monotonic(), 0.001))
        quota.usage(usage={"prompt_tokens": 5})
        moved = next_matching(events, lambda e: e.type in ("usage", "status") and e.status.usage.today.requests == 1)
        assert moved.workspace == workspace.id


def test_watch_ends_when_the_key_is_revoked(server):
    workspace = _warning_workspace(server)
    with Client(server.url, workspace.key) as quota, quota.watch() as events:
        next_matching(events, lambda e: e.type == "status")
        server.admin("DELETE", f"/api/workspaces/{workspace.id}/keys/{workspace.key_id}")
        with pytest.raises(WebSocketClosed) as closed:
            next_matching(events, lambda e: False)
    assert closed.value.close_code == 1008


def test_async_watch_sees_the_status_change_a_usage_report_causes(server):
    workspace = _warning_workspace(server)

    async def scenario():
        async with AsyncClient(server.url, workspace.key) as quota:
            async with quota.watch() as events:
                snapshot = await next_matching_async(events, lambda e: e.type == "status")
                assert snapshot.status.status == "normal"
                await quota.usage(usage={"prompt_tokens": 3})
                change = await next_matching_async(
                    events, lambda e: e.type == "status" and e.status.status == "warning"
                )
                return change

    change = asyncio.run(scenario())
    assert change.workspace == workspace.id
    assert change.status.reasons == ["requests_per_day_approaching"]


def test_async_watch_is_an_async_iterator(server, workspace):
    async def scenario():
        async with AsyncClient(server.url, workspace.key) as quota:
            watch = quota.watch()
            seen = []
            async for event in watch:
                seen.append(event.type)
                if "status" in seen and "notification" in seen:
                    break
            await watch.aclose()
            return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), DEADLINE))
    assert set(seen) == {"status", "notification"}


def test_reconnects_back_off_exponentially_with_jitter():
    assert backoff_delay(1, rand=lambda: 0.0) == 0.25
    assert backoff_delay(1, rand=lambda: 1.0) == 0.5
    assert backoff_delay(4, rand=lambda: 1.0) == 4.0
    assert backoff_delay(20, rand=lambda: 1.0) == 30.0, "capped"
    assert backoff_delay(20, rand=lambda: 0.0) == 15.0


def test_only_failures_that_retrying_can_fix_are_retried():
    follower = Follower(heartbeat=15, reconnect=True, backoff_initial=0.5, backoff_max=30)
    follower.lost(WebSocketClosed(1006), now=100.0)
    assert follower.attempt == 1 and 100.25 <= follower.retry_at <= 100.5
    follower.lost(APIConnectionError("down"), now=200.0)
    assert follower.attempt == 2 and 200.5 <= follower.retry_at <= 201.0
    for final in (
        WebSocketClosed(1008, "key revoked or workspace deleted"),
        AuthenticationError(401, "the API key is not valid", code="invalid_api_key"),
    ):
        follower = Follower(heartbeat=15, reconnect=True, backoff_initial=0.5, backoff_max=30)
        with pytest.raises(type(final)):
            follower.lost(final, now=0.0)
        assert follower.closed


class DroppingServer:
    """A WebSocket server on the loopback for two connections: each gets one
    ``removed`` message naming the connection's number; the first then
    ends without a close frame, as a dropped connection does."""

    def __init__(self):
        self.requests = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        with self._listener:
            for number in (1, 2):
                connection, _ = self._listener.accept()
                with connection:
                    connection.settimeout(10)
                    request = b""
                    while b"\r\n\r\n" not in request:
                        request += connection.recv(4096)
                    self.requests.append(request.split(b"\r\n")[0].decode())
                    key = next(
                        line.split(":", 1)[1].strip()
                        for line in request.decode().split("\r\n")
                        if line.lower().startswith("sec-websocket-key:")
                    )
                    accept = Handshake("ws://unused/")
                    accept.key = key
                    head = (
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Accept: {accept.expected_accept()}\r\n\r\n"
                    )
                    message = json.dumps({"type": "removed", "workspace": f"connection-{number}"}).encode()
                    connection.sendall(head.encode() + encode_frame(TEXT, message))
                    if number == 2:
                        # Open until the client's close frame, then the answer to it.
                        while (connection.recv(65536) or bytes([CLOSE]))[0] & 0x0F != CLOSE:
                            pass
                        connection.sendall(encode_frame(CLOSE, struct.pack("!H", 1000)))

    def join(self):
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the server saw both connections end"


def http_for(tickets):
    """Answers tickets (counting them in ``tickets``) and an empty list of
    notifications, as quotawatch would."""

    def answer(request):
        if request.url.path == "/api/quota/ws-ticket":
            tickets.append(f"wst_{len(tickets) + 1}")
            return httpx.Response(200, json={"ticket": tickets[-1], "expires_at": "2026-12-02T09:30:00.000Z"})
        return httpx.Response(200, json={"workspace": "w", "status": "normal", "notifications": []})

    return httpx.MockTransport(answer)


EXPECTED_AFTER_A_DROP = [
    ("notification", None),
    ("removed", "connection-1"),
    ("notification", None),
    ("removed", "connection-2"),
]


def test_a_dropped_connection_is_reopened_with_a_fresh_ticket():
    server = DroppingServer()
    tickets = []
    with httpx.Client(transport=http_for(tickets)) as http:
        quota = Client(server.base_url, "qw_key", http_client=http)
        with quota.watch(backoff_initial=0.01) as events:
            seen = [events.next(timeout=DEADLINE) for _ in EXPECTED_AFTER_A_DROP]
    server.join()
    assert [(e.type, e.workspace if e.type == "removed" else None) for e in seen] == EXPECTED_AFTER_A_DROP
    assert tickets == ["wst_1", "wst_2"]
    assert server.requests == ["GET /api/quota/ws?ticket=wst_1 HTTP/1.1", "GET /api/quota/ws?ticket=wst_2 HTTP/1.1"]


def test_an_async_watch_reopens_a_dropped_connection():
    server = DroppingServer()
    tickets = []

    async def scenario():
        async with httpx.AsyncClient(transport=http_for(tickets)) as http:
            quota = AsyncClient(server.base_url, "qw_key", http_client=http)
            async with quota.watch(backoff_initial=0.01) as events:
                return [await events.next(timeout=DEADLINE) for _ in EXPECTED_AFTER_A_DROP]

    seen = asyncio.run(scenario())
    server.join()
    assert [(e.type, e.workspace if e.type == "removed" else None) for e in seen] == EXPECTED_AFTER_A_DROP
    assert tickets == ["wst_1", "wst_2"]
