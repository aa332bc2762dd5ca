"""The WebSocket client's framing and handshake, without quotawatch: the
protocol fed with bytes, and both clients against a scripted server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import ssl
import struct
import subprocess
import threading
from typing import List, Optional, Tuple

import pytest

from quotawatch import AuthenticationError, WebSocketError
from quotawatch._websocket import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    AsyncWebSocket,
    Closed,
    Handshake,
    Message,
    Protocol,
    WebSocket,
    WebSocketClosed,
    apply_mask,
    encode_frame,
)


def server_frame(opcode, payload=b"", fin=True):
    return encode_frame(opcode, payload, fin=fin)


def read_client_frames(data: bytes) -> List[Tuple[bool, int, bytes]]:
    """Client frames as a server reads them; every one must be masked."""
    frames = []
    while data:
        first, second = data[0], data[1]
        assert second & 0x80, "client frames are masked"
        length, offset = second & 0x7F, 2
        if length == 126:
            (length,), offset = struct.unpack_from("!H", data, 2), 4
        elif length == 127:
            (length,), offset = struct.unpack_from("!Q", data, 2), 10
        key = data[offset : offset + 4]
        payload = apply_mask(data[offset + 4 : offset + 4 + length], key)
        frames.append((bool(first & 0x80), first & 0x0F, payload))
        data = data[offset + 4 + length :]
    return frames


def test_a_fragmented_message_is_joined_around_a_ping():
    protocol = Protocol()
    received = protocol.receive_data(
        server_frame(TEXT, b'{"type":', fin=False)
        + server_frame(PING, b"are you there")
        + server_frame(CONTINUATION, b'"st', fin=False)
    )
    assert received == [], "nothing until the last fragment"
    # The ping is answered at once, in the middle of the message.
    assert read_client_frames(protocol.data_to_send()) == [(True, PONG, b"are you there")]
    received = protocol.receive_data(server_frame(CONTINUATION, 'atus"} é'.encode("utf-8")))
    assert received == [Message('{"type":"status"} é')]


def test_frames_split_anywhere_are_reassembled():
    payload = ("x" * 70_000).encode()
    data = server_frame(TEXT, payload) + server_frame(BINARY, b"\x00\x01")
    protocol = Protocol()
    received = []
    for start in range(0, len(data), 1000):
        received += protocol.receive_data(data[start : start + 1000])
    assert received == [Message("x" * 70_000), Message(b"\x00\x01")]


def test_the_client_masks_and_sizes_what_it_sends():
    protocol = Protocol()
    protocol.send_text("hi")
    protocol.send_text("y" * 300)
    protocol.send_text("z" * 70_000)
    frames = read_client_frames(protocol.data_to_send())
    assert frames == [(True, TEXT, b"hi"), (True, TEXT, b"y" * 300), (True, TEXT, b"z" * 70_000)]


def test_a_close_is_echoed_and_ends_the_connection():
    protocol = Protocol()
    received = protocol.receive_data(server_frame(CLOSE, struct.pack("!H", 1001) + b"going away"))
    assert received == [Closed(1001, "going away")]
    assert protocol.closed
    assert read_client_frames(protocol.data_to_send()) == [(True, CLOSE, struct.pack("!H", 1001))]
    with pytest.raises(WebSocketClosed):
        protocol.send_text("too late")


def test_a_close_without_a_code_is_answered_normally():
    protocol = Protocol()
    assert protocol.receive_data(server_frame(CLOSE)) == [Closed(1005, "")]
    assert read_client_frames(protocol.data_to_send()) == [(True, CLOSE, struct.pack("!H", 1000))]


@pytest.mark.parametrize(
    "data, code",
    [
        (encode_frame(TEXT, b"masked", mask_key=b"abcd"), 1002),
        (bytes([0x80 | 0x40 | TEXT, 0]), 1002),
        (server_frame(CONTINUATION, b"orphan"), 1002),
        (server_frame(TEXT, b"a", fin=False) + server_frame(TEXT, b"b"), 1002),
        (server_frame(PING, b"x", fin=False), 1002),
        (server_frame(PING, b"x" * 126), 1002),
        (server_frame(0x3, b""), 1002),
        (server_frame(TEXT, b"\xff\xfe"), 1007),
        (server_frame(CLOSE, b"\x03"), 1002),
    ],
)
def test_protocol_violations_close_with_the_matching_code(data, code):
    protocol = Protocol()
    with pytest.raises(WebSocketError) as error:
        protocol.receive_data(data)
    assert error.value.close_code == code
    sent = read_client_frames(protocol.data_to_send())
    assert sent[-1][1] == CLOSE and struct.unpack("!H", sent[-1][2][:2])[0] == code


def test_a_message_over_the_limit_is_refused_before_it_is_buffered():
    protocol = Protocol(max_message_bytes=100)
    with pytest.raises(WebSocketError) as error:
        # Only the header of a 1 MiB frame has arrived.
        protocol.receive_data(server_frame(TEXT, b"x" * (1 << 20))[:10])
    assert error.value.close_code == 1009


def test_the_accept_key_is_checked():
    handshake = Handshake("ws://example.test/api/quota/ws?ticket=t")
    # The example of RFC 6455, section 1.3.
    handshake.key = "dGhlIHNhbXBsZSBub25jZQ=="
    assert handshake.expected_accept() == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    good = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-accept": "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="}
    handshake.check_upgrade(good)
    with pytest.raises(WebSocketError, match="Sec-WebSocket-Accept"):
        handshake.check_upgrade({**good, "sec-websocket-accept": "d3Jvbmc="})
    with pytest.raises(WebSocketError, match="upgrade"):
        handshake.check_upgrade({**good, "upgrade": "h2c"})
    request = handshake.request().decode()
    assert request.startswith("GET /api/quota/ws?ticket=t HTTP/1.1\r\nHost: example.test\r\n")
    assert "Sec-WebSocket-Version: 13\r\n" in request


class ScriptedServer:
    """A WebSocket server on the loopback that answers one handshake, sends
    ``frames`` in the same packet as its answer (so the client must keep
    what arrived with the head), sends ``reply`` (ending with its close
    frame) once the client sent a text message, and records what the client
    sends until the client's close frame, which it answers when it has no
    reply."""

    def __init__(
        self,
        frames: bytes = b"",
        reply: bytes = b"",
        *,
        accept: str = "",
        status: str = "101 Switching Protocols",
        tls: Optional[ssl.SSLContext] = None,
        body: bytes = b"",
    ):
        self.frames = frames
        self.reply = reply
        self.accept = accept
        self.status = status
        self.body = body
        self.received: List[Tuple[bool, int, bytes]] = []
        self.request = b""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.tls = tls
        self.tls_error: Optional[ssl.SSLError] = None
        scheme = "wss" if tls else "ws"
        self.url = f"{scheme}://127.0.0.1:{self._listener.getsockname()[1]}/api/quota/ws?ticket=t"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _answer(self) -> bytes:
        if not self.status.startswith("101"):
            head = (
                f"HTTP/1.1 {self.status}\r\nContent-Type: application/json\r\nContent-Length: {len(self.body)}\r\n\r\n"
            )
            return head.encode() + self.body
        key = next(
            line.split(":", 1)[1].strip()
            for line in self.request.decode().split("\r\n")
            if line.lower().startswith("sec-websocket-key:")
        )
        accept = (
            self.accept
            or base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
        )
        head = f"HTTP/1.1 {self.status}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        return head.encode() + self.frames

    def _serve(self):
        connection, _ = self._listener.accept()
        if self.tls:
            try:
                connection = self.tls.wrap_socket(connection, server_side=True)
            except ssl.SSLError as error:
                self.tls_error = error
                connection.close()
                self._listener.close()
                return
        with connection, self._listener:
            connection.settimeout(10)
            while b"\r\n\r\n" not in self.request:
                self.request += connection.recv(4096)
            connection.sendall(self._answer())
            data = b""
            while not any(opcode == CLOSE for _, opcode, _ in self.received):
                chunk = connection.recv(65536)
                if not chunk:
                    return
                data += chunk
                complete, data = _complete_frames(data)
                frames = read_client_frames(complete)
                if self.reply and any(opcode == TEXT for _, opcode, _ in frames):
                    connection.sendall(self.reply)
                self.received += frames
            if not self.reply:
                # The client closed first: the closing handshake's answer.
                connection.sendall(server_frame(CLOSE, struct.pack("!H", 1000)))

    def join(self):
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the scripted server finished"


def _complete_frames(data: bytes) -> Tuple[bytes, bytes]:
    """Splits ``data`` into whole client frames and the rest."""
    end = 0
    while len(data) - end >= 2:
        length, offset = data[end + 1] & 0x7F, 2
        if length == 126:
            if len(data) - end < 4:
                break
            (length,), offset = struct.unpack_from("!H", data, end + 2), 4
        elif length == 127:
            if len(data) - end < 10:
                break
            (length,), offset = struct.unpack_from("!Q", data, end + 2), 10
        if len(data) - end < offset + 4 + length:
            break
        end += offset + 4 + length
    return data[:end], data[end:]


OPENING = (
    server_frame(TEXT, b'{"type":"sta', fin=False) + server_frame(PING, b"p1") + server_frame(CONTINUATION, b'tus"}')
)
REPLY = server_frame(TEXT, b"second") + server_frame(CLOSE, struct.pack("!H", 1001) + b"shutting down")


def test_the_blocking_client_reads_fragments_answers_pings_and_closes():
    server = ScriptedServer(OPENING, REPLY)
    ws = WebSocket.connect(server.url, headers={"X-Quotawatch-Workspace": "acme"})
    assert ws.recv(timeout=5) == '{"type":"status"}'
    ws.send("hello")
    assert ws.recv(timeout=5) == "second"
    with pytest.raises(WebSocketClosed) as closed:
        ws.recv(timeout=5)
    assert (closed.value.close_code, closed.value.reason) == (1001, "shutting down")
    server.join()
    assert b"X-Quotawatch-Workspace: acme\r\n" in server.request
    assert server.received == [
        (True, PONG, b"p1"),
        (True, TEXT, b"hello"),
        (True, CLOSE, struct.pack("!H", 1001)),
    ]


def test_the_asyncio_client_reads_fragments_answers_pings_and_closes():
    server = ScriptedServer(OPENING, REPLY)

    async def scenario():
        ws = await AsyncWebSocket.connect(server.url)
        first = await asyncio.wait_for(ws.recv(), 5)
        await ws.send("hello")
        second = await asyncio.wait_for(ws.recv(), 5)
        with pytest.raises(WebSocketClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        return first, second, closed.value

    first, second, closed = asyncio.run(scenario())
    assert (first, second) == ('{"type":"status"}', "second")
    assert closed.close_code == 1001
    server.join()
    assert server.received == [
        (True, PONG, b"p1"),
        (True, TEXT, b"hello"),
        (True, CLOSE, struct.pack("!H", 1001)),
    ]


def test_a_client_close_waits_for_the_servers_close():
    server = ScriptedServer()
    ws = WebSocket.connect(server.url)
    ws.close(1000, "bye")
    server.join()
    assert server.received == [(True, CLOSE, struct.pack("!H", 1000) + b"bye")]


def test_a_wrong_accept_key_fails_the_handshake():
    server = ScriptedServer(accept="d3Jvbmc=")
    with pytest.raises(WebSocketError, match="Sec-WebSocket-Accept"):
        WebSocket.connect(server.url)


def test_a_refused_handshake_raises_the_servers_error():
    body = b'{"error":{"message":"the ticket is unknown, used or expired","type":"invalid_request_error","param":null,"code":"invalid_ticket"}}'
    server = ScriptedServer(status="401 Unauthorized", body=body)

    async def scenario():
        await AsyncWebSocket.connect(server.url)

    with pytest.raises(AuthenticationError) as refused:
        asyncio.run(scenario())
    assert refused.value.code == "invalid_ticket"


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1 and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    return server_side, ssl.create_default_context(cafile=str(cert))


def test_wss_works_over_tls_with_both_clients(certificate):
    server_side, client_side = certificate
    server = ScriptedServer(OPENING, REPLY, tls=server_side)
    ws = WebSocket.connect(server.url, ssl_context=client_side)
    assert ws.recv(timeout=5) == '{"type":"status"}'
    ws.send("hello")
    assert ws.recv(timeout=5) == "second"
    server.join()

    server = ScriptedServer(OPENING, REPLY, tls=server_side)

    async def scenario():
        ws = await AsyncWebSocket.connect(server.url, ssl_context=client_side)
        first = await asyncio.wait_for(ws.recv(), 5)
        await ws.send("hello")
        await asyncio.wait_for(ws.recv(), 5)
        await ws.close()
        return first

    assert asyncio.run(scenario()) == '{"type":"status"}'
    server.join()
    assert server.received[:2] == [(True, PONG, b"p1"), (True, TEXT, b"hello")]


def test_wss_refuses_a_certificate_it_does_not_trust(certificate):
    server_side, _ = certificate
    server = ScriptedServer(OPENING, REPLY, tls=server_side)
    with pytest.raises(ssl.SSLCertVerificationError):
        WebSocket.connect(server.url)
    server.join()
    assert "unknown ca" in str(server.tls_error)
