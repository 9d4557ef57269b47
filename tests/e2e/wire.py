"""Raw HTTP/1.1 and WebSocket clients for the tests about the wire: the request target and every
header go out exactly as given (nothing between the test and the server normalises a path or
adds a header), and what comes back is read byte by byte."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import struct
from typing import Any

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
TIMEOUT_S = 60.0


def request(
    base: str,
    target: bytes,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """`target` sent exactly as given; (status, headers, body)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        headers = dict(headers or {})
        conn.putrequest(method, target.decode("latin-1"), skip_host="Host" in headers,
                        skip_accept_encoding=True)  # fmt: skip
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
            headers["Content-Length"] = str(len(body))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def error_code(body: bytes) -> str:
    doc: dict[str, Any] = json.loads(body)
    return str(doc["error"]["code"])


class RawWebSocket:
    """A WebSocket client over a plain socket (RFC 6455: masked client frames)."""

    def __init__(self, sock: socket.socket, buffered: bytes, response_head: bytes) -> None:
        self.sock = sock
        self.buffer = buffered
        self.response_head = response_head

    @classmethod
    def connect(cls, port: int, target: bytes, headers: dict[str, str]) -> RawWebSocket:
        """Open the upgrade on 127.0.0.1:`port`; fails unless the answer is a 101 whose
        Sec-WebSocket-Accept matches the key sent."""
        key = base64.b64encode(os.urandom(16))
        lines = [b"GET " + target + b" HTTP/1.1", b"Upgrade: websocket", b"Connection: Upgrade",
                 b"Sec-WebSocket-Key: " + key, b"Sec-WebSocket-Version: 13"]  # fmt: skip
        lines += [f"{k}: {v}".encode("latin-1") for k, v in headers.items()]
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        try:
            sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"closed during the handshake: {data!r}")
                data += chunk
            head, rest = data.split(b"\r\n\r\n", 1)
            status = head.split(b"\r\n", 1)[0]
            assert status.startswith(b"HTTP/1.1 101 "), head
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            fields = {ln.split(b":", 1)[0].strip().lower(): ln.split(b":", 1)[1].strip()
                      for ln in head.split(b"\r\n")[1:] if b":" in ln}  # fmt: skip
            assert fields.get(b"sec-websocket-accept") == accept, head
        except BaseException:
            sock.close()
            raise
        return cls(sock, rest, head)

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        keys = (mask * (size // 4 + 1))[:size]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(
            size, "big"
        )
        self.sock.sendall(head + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"the socket closed with {len(self.buffer)}/{n} bytes")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def receive(self) -> tuple[int, bytes]:
        """One whole message (server frames are not masked; continuations joined)."""
        opcode, message = 0, b""
        while True:
            b0, b1 = self._read(2)
            assert not b1 & 0x80, "a server frame must not be masked"
            size = b1 & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", self._read(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", self._read(8))
            opcode = opcode or b0 & 0x0F
            message += self._read(size)
            if b0 & 0x80:
                return opcode, message

    def close(self) -> tuple[int, bytes]:
        """Send a close (1000) and return the server's answering frame."""
        self.send(CLOSE, struct.pack("!H", 1000))
        try:
            return self.receive()
        finally:
            self.sock.close()
