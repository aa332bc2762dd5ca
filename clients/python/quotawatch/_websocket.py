"""A small RFC 6455 WebSocket client, without dependencies.

The protocol itself (:class:`Protocol`: framing, masking, fragmentation,
ping/pong, the closing handshake) does no IO, so that the asyncio client
(:class:`AsyncWebSocket`) and the blocking one (:class:`WebSocket`) share it
and tests can drive it with bytes. Only what quotawatch needs is here: text
and binary messages, no extensions, no subprotocols.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

from ._errors import WebSocketError, error_from_answer

#: The GUID RFC 6455 appends to the key to prove the server understood.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPCODES = (TEXT, BINARY)
_CONTROL_OPCODES = (CLOSE, PING, PONG)

#: Close codes (RFC 6455, section 7.4.1).
NORMAL_CLOSURE = 1000
PROTOCOL_ERROR = 1002
NO_STATUS = 1005
ABNORMAL_CLOSURE = 1006
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009

#: Status documents are a few kilobytes; anything near this is a broken peer.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: The most a response head may take before it counts as broken.
_MAX_HEAD_BYTES = 64 * 1024


class WebSocketClosed(WebSocketError):
    """The connection is closed; ``close_code`` and ``reason`` say how."""

    def __init__(self, close_code: int, reason: str = "") -> None:
        text = f"the WebSocket was closed ({close_code}{': ' + reason if reason else ''})"
        super().__init__(text, close_code=close_code)
        self.reason = reason


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask_key: Optional[bytes] = None) -> bytes:
    """One frame. Clients must mask every frame (``mask_key``, four bytes);
    servers send theirs unmasked (``mask_key=None``)."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask_key is not None else 0
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    if mask_key is None:
        return head + payload
    return head + mask_key + apply_mask(payload, mask_key)


def apply_mask(payload: bytes, mask_key: bytes) -> bytes:
    """XORs the payload with the repeated four-byte key (masking and
    unmasking are the same operation)."""
    if not payload:
        return b""
    repeated = (mask_key * (len(payload) // 4 + 1))[: len(payload)]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return masked.to_bytes(len(payload), "big")


@dataclass(frozen=True)
class Message:
    """A complete data message: ``str`` for text, ``bytes`` for binary."""

    data: Union[str, bytes]


@dataclass(frozen=True)
class Closed:
    """The peer closed the connection (its close frame arrived)."""

    code: int
    reason: str


class Protocol:
    """The client side of RFC 6455 over any byte stream.

    Feed what arrives to :meth:`receive_data`, which answers the complete
    messages (and a :class:`Closed` when the peer closes); send what
    :meth:`data_to_send` answers, which includes the pongs and the close
    reply the protocol owes the peer.
    """

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._fragments: List[bytes] = []
        self._fragment_opcode: Optional[int] = None
        self._fragment_bytes = 0
        self.close_sent = False
        self.close_received: Optional[Closed] = None

    @property
    def closed(self) -> bool:
        """Both sides have sent their close frames (or the peer has, and the
        reply is queued)."""
        return self.close_received is not None

    def send_text(self, text: str) -> None:
        self._send(TEXT, text.encode("utf-8"))

    def send_ping(self, payload: bytes = b"") -> None:
        self._send(PING, payload)

    def send_close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        """Starts the closing handshake; nothing may be sent after it."""
        if not self.close_sent:
            self._send(CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:123])
            self.close_sent = True

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes) -> List[Union[Message, Closed]]:
        """Reads frames out of ``data`` (and what was left of earlier
        calls). Raises :class:`WebSocketError` when the peer breaks the
        protocol; a close frame with the matching code is then queued."""
        self._buffer += data
        received: List[Union[Message, Closed]] = []
        while self.close_received is None:
            frame = self._next_frame()
            if frame is None:
                break
            fin, opcode, payload = frame
            event = self._handle(fin, opcode, payload)
            if event is not None:
                received.append(event)
        return received

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.close_sent:
            raise WebSocketClosed(NORMAL_CLOSURE, "this side closed the connection")
        self._outgoing += encode_frame(opcode, payload, mask_key=os.urandom(4))

    def _fail(self, code: int, message: str) -> WebSocketError:
        if not self.close_sent:
            self.send_close(code, message[:120])
        return WebSocketError(message, close_code=code)

    def _next_frame(self) -> Optional[Tuple[bool, int, bytes]]:
        """The next whole frame of the buffer, or None until more arrives."""
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        if first & 0x70:
            raise self._fail(PROTOCOL_ERROR, "a frame used reserved bits without an extension")
        if second & 0x80:
            raise self._fail(PROTOCOL_ERROR, "the server masked a frame")
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack_from("!H", buffer, 2)
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buffer, 2)
            offset = 10
        # Checked before the payload is buffered, so that a peer cannot make
        # this client hold more than the limit.
        if self._fragment_bytes + length > self.max_message_bytes:
            raise self._fail(MESSAGE_TOO_BIG, f"a message is larger than {self.max_message_bytes} bytes")
        if len(buffer) < offset + length:
            return None
        payload = bytes(buffer[offset : offset + length])
        del buffer[: offset + length]
        return bool(first & 0x80), first & 0x0F, payload

    def _handle(self, fin: bool, opcode: int, payload: bytes) -> Optional[Union[Message, Closed]]:
        if opcode in _CONTROL_OPCODES:
            if not fin or len(payload) > 125:
                raise self._fail(PROTOCOL_ERROR, "a control frame was fragmented or too long")
            return self._control(opcode, payload)
        if opcode == CONTINUATION:
            if self._fragment_opcode is None:
                raise self._fail(PROTOCOL_ERROR, "a continuation frame without a message to continue")
        elif opcode in _DATA_OPCODES:
            if self._fragment_opcode is not None:
                raise self._fail(PROTOCOL_ERROR, "a new message began before the last one ended")
            self._fragment_opcode = opcode
        else:
            raise self._fail(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        self._fragments.append(payload)
        self._fragment_bytes += len(payload)
        if not fin:
            return None
        data = b"".join(self._fragments)
        kind = self._fragment_opcode
        self._fragments, self._fragment_opcode, self._fragment_bytes = [], None, 0
        if kind == BINARY:
            return Message(data)
        try:
            return Message(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise self._fail(INVALID_DATA, "a text message was not UTF-8") from None

    def _control(self, opcode: int, payload: bytes) -> Optional[Closed]:
        if opcode == PING:
            if not self.close_sent:
                self._send(PONG, payload)
            return None
        if opcode == PONG:
            return None
        if len(payload) == 1:
            raise self._fail(PROTOCOL_ERROR, "a close frame had a one-byte payload")
        code = struct.unpack("!H", payload[:2])[0] if payload else NO_STATUS
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(INVALID_DATA, "a close reason was not UTF-8") from None
        # The closing handshake: echo the code, then the connection is done.
        self.send_close(NORMAL_CLOSURE if code == NO_STATUS else code)
        self.close_received = Closed(code, reason)
        return self.close_received


class Handshake:
    """The opening handshake of one connection to a ``ws://`` or ``wss://``
    URL."""

    def __init__(self, url: str, headers: Optional[Mapping[str, str]] = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        self.secure = parts.scheme == "wss"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.secure else 80)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = self.port == (443 if self.secure else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.headers = dict(headers or {})
        self.key = base64.b64encode(os.urandom(16)).decode("ascii")

    def request(self) -> bytes:
        lines = [
            f"GET {self.target} HTTP/1.1",
            f"Host: {self.host_header}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def expected_accept(self) -> str:
        digest = hashlib.sha1(self.key.encode("ascii") + _ACCEPT_GUID).digest()
        return base64.b64encode(digest).decode("ascii")

    @staticmethod
    def parse_head(head: bytes) -> Tuple[int, Dict[str, str]]:
        """The status and headers (lower-case names) of a response head."""
        lines = head.decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/1.") or not status_line[1].isdigit():
            raise WebSocketError(f"not an HTTP response: {lines[0][:80]!r}")
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(status_line[1]), headers

    def check_upgrade(self, headers: Mapping[str, str]) -> None:
        """Raises unless a 101 answer's headers accept this handshake."""
        if headers.get("upgrade", "").lower() != "websocket":
            raise WebSocketError("the server did not upgrade to WebSocket")
        if "upgrade" not in headers.get("connection", "").lower():
            raise WebSocketError("the server's answer lacks Connection: Upgrade")
        if headers.get("sec-websocket-accept") != self.expected_accept():
            raise WebSocketError("the server's Sec-WebSocket-Accept does not match the key sent")
        if headers.get("sec-websocket-extensions"):
            raise WebSocketError("the server chose an extension this client did not offer")


def _body_length(headers: Mapping[str, str]) -> int:
    try:
        return min(int(headers.get("content-length", "0")), _MAX_HEAD_BYTES)
    except ValueError:
        return 0


def _tls_context(ssl_context: Optional[ssl.SSLContext]) -> ssl.SSLContext:
    return ssl_context if ssl_context is not None else ssl.create_default_context()


class AsyncWebSocket:
    """A client connection over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: Protocol) -> None:
        self._reader = reader
        self._writer = writer
        self._protocol = protocol
        self._received: List[Union[Message, Closed]] = []

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        headers: Optional[Mapping[str, str]] = None,
        timeout: float = 10.0,
        ssl_context: Optional[ssl.SSLContext] = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> "AsyncWebSocket":
        handshake = Handshake(url, headers)
        tls = _tls_context(ssl_context) if handshake.secure else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                handshake.host, handshake.port, ssl=tls, server_hostname=handshake.host if tls else None
            ),
            timeout,
        )
        try:
            writer.write(handshake.request())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            status, answer = Handshake.parse_head(head)
            if status != 101:
                body = await asyncio.wait_for(reader.read(_body_length(answer)), timeout)
                raise error_from_answer(status, answer, body)
            handshake.check_upgrade(answer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            writer.close()
            raise WebSocketError("the handshake answer was cut off or too long") from error
        except BaseException:
            writer.close()
            raise
        # Frames that arrived with the head stay in the reader's buffer.
        return cls(reader, writer, Protocol(max_message_bytes=max_message_bytes))

    async def recv(self) -> Union[str, bytes]:
        """The next message; raises :class:`WebSocketClosed` once the
        connection is closed."""
        while not self._received:
            if self._protocol.closed:
                raise self._closed_error()
            data = await self._reader.read(65536)
            if not data:
                self._writer.close()
                raise WebSocketClosed(ABNORMAL_CLOSURE, "the connection ended without a close frame")
            try:
                self._received += self._protocol.receive_data(data)
            finally:
                await self._flush()
        event = self._received.pop(0)
        if isinstance(event, Closed):
            self._writer.close()
            raise self._closed_error()
        return event.data

    async def send(self, text: str) -> None:
        self._protocol.send_text(text)
        await self._flush()

    async def ping(self, payload: bytes = b"") -> None:
        self._protocol.send_ping(payload)
        await self._flush()

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "", *, timeout: float = 5.0) -> None:
        """Closes cleanly: sends a close frame and waits (up to ``timeout``)
        for the peer's, then ends the connection."""
        try:
            if not self._protocol.close_sent:
                self._protocol.send_close(code, reason)
                await self._flush()
            deadline = asyncio.get_running_loop().time() + timeout
            while not self._protocol.closed:
                left = deadline - asyncio.get_running_loop().time()
                data = await asyncio.wait_for(self._reader.read(65536), max(left, 0))
                if not data:
                    break
                self._protocol.receive_data(data)
        except (asyncio.TimeoutError, OSError, WebSocketError):
            pass
        finally:
            self._writer.close()

    async def _flush(self) -> None:
        data = self._protocol.data_to_send()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    def _closed_error(self) -> WebSocketClosed:
        closed = self._protocol.close_received
        return WebSocketClosed(closed.code, closed.reason) if closed else WebSocketClosed(ABNORMAL_CLOSURE)


class WebSocket:
    """A blocking client connection over a socket."""

    def __init__(self, sock: socket.socket, protocol: Protocol, pending: bytes) -> None:
        self._socket = sock
        self._protocol = protocol
        self._received: List[Union[Message, Closed]] = []
        if pending:
            # Frames that arrived with the handshake's answer.
            self._received += protocol.receive_data(pending)
            self._flush()

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        headers: Optional[Mapping[str, str]] = None,
        timeout: float = 10.0,
        ssl_context: Optional[ssl.SSLContext] = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> "WebSocket":
        handshake = Handshake(url, headers)
        sock = socket.create_connection((handshake.host, handshake.port), timeout=timeout)
        try:
            if handshake.secure:
                sock = _tls_context(ssl_context).wrap_socket(sock, server_hostname=handshake.host)
            sock.sendall(handshake.request())
            received = bytearray()
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(65536)
                if not chunk or len(received) > _MAX_HEAD_BYTES:
                    raise WebSocketError("the handshake answer was cut off or too long")
                received += chunk
            head, _, rest = bytes(received).partition(b"\r\n\r\n")
            status, answer = Handshake.parse_head(head)
            if status != 101:
                wanted = _body_length(answer)
                while len(rest) < wanted:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
                raise error_from_answer(status, answer, rest[:wanted])
            handshake.check_upgrade(answer)
        except socket.timeout as error:
            sock.close()
            raise TimeoutError("the WebSocket handshake timed out") from error
        except BaseException:
            sock.close()
            raise
        return cls(sock, Protocol(max_message_bytes=max_message_bytes), rest)

    def recv(self, timeout: Optional[float] = None) -> Union[str, bytes]:
        """The next message, waiting at most ``timeout`` seconds (None: no
        limit) before raising :class:`TimeoutError`; raises
        :class:`WebSocketClosed` once the connection is closed."""
        # Control frames (the server's pings) may keep arriving without a
        # message: the timeout bounds the whole wait, not each read.
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._received:
            if self._protocol.closed:
                raise self._closed_error()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no WebSocket message arrived in time")
                self._socket.settimeout(left)
            else:
                self._socket.settimeout(None)
            try:
                data = self._socket.recv(65536)
            except socket.timeout as error:
                raise TimeoutError("no WebSocket message arrived in time") from error
            if not data:
                self._socket.close()
                raise WebSocketClosed(ABNORMAL_CLOSURE, "the connection ended without a close frame")
            try:
                self._received += self._protocol.receive_data(data)
            finally:
                self._flush()
        event = self._received.pop(0)
        if isinstance(event, Closed):
            self._socket.close()
            raise self._closed_error()
        return event.data

    def send(self, text: str) -> None:
        self._protocol.send_text(text)
        self._flush()

    def ping(self, payload: bytes = b"") -> None:
        self._protocol.send_ping(payload)
        self._flush()

    def close(self, code: int = NORMAL_CLOSURE, reason: str = "", *, timeout: float = 5.0) -> None:
        """Closes cleanly: sends a close frame and waits (up to ``timeout``)
        for the peer's, then ends the connection."""
        try:
            if not self._protocol.close_sent:
                self._protocol.send_close(code, reason)
                self._flush()
            self._socket.settimeout(timeout)
            while not self._protocol.closed:
                data = self._socket.recv(65536)
                if not data:
                    break
                self._protocol.receive_data(data)
        except (OSError, WebSocketError):
            pass
        finally:
            self._socket.close()

    def _flush(self) -> None:
        data = self._protocol.data_to_send()
        if data:
            self._socket.sendall(data)

    def _closed_error(self) -> WebSocketClosed:
        closed = self._protocol.close_received
        return WebSocketClosed(closed.code, closed.reason) if closed else WebSocketClosed(ABNORMAL_CLOSURE)
