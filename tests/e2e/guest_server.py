"""A web server for inside a capsule (the guest has python3 and no pip packages: stdlib only),
uploaded through the files API and run in the background by the e2e tests.

`python3 guest_server.py PORT` listens on every address. Plain HTTP requests are answered
200 with JSON saying what arrived (method, request target, Host, body length and SHA-256,
and the headers), so a test sees exactly what the port proxy forwarded. A WebSocket upgrade
(RFC 6455) is accepted; the server sends one text frame `{"target": …}` and then echoes every
text and binary frame with the same opcode, answers pings, and answers a close with a close.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if headers.get("upgrade", "").lower() == "websocket":
            await websocket(reader, writer, target, headers)
        else:
            await http(reader, writer, method, target, headers)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
               target: str, headers: dict[str, str]) -> None:  # fmt: skip
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    answer = json.dumps({
        "method": method, "target": target, "host": headers.get("host"),
        "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
        "headers": headers,
    }).encode()  # fmt: skip
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(
        answer
    )
    writer.write(head + b"Connection: close\r\n\r\n" + answer)
    await writer.drain()


async def websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str,
                    headers: dict[str, str]) -> None:  # fmt: skip
    key = headers["sec-websocket-key"].encode()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    send(writer, TEXT, json.dumps({"target": target}).encode())
    await writer.drain()
    while True:
        opcode, payload = await receive(reader)
        if opcode == CLOSE:
            send(writer, CLOSE, payload[:2])
            await writer.drain()
            return
        if opcode == PING:
            send(writer, PONG, payload)
        elif opcode in (TEXT, BINARY):
            send(writer, opcode, payload)
        await writer.drain()


async def receive(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One whole message (continuation frames joined); client frames are masked."""
    opcode, message = 0, b""
    while True:
        b0, b1 = await reader.readexactly(2)
        size = b1 & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await reader.readexactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", await reader.readexactly(8))
        mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
        data = await reader.readexactly(size)
        keys = (mask * (size // 4 + 1))[:size]
        plain = (int.from_bytes(data, "big") ^ int.from_bytes(keys, "big")).to_bytes(size, "big")
        opcode = opcode or b0 & 0x0F
        message += plain
        if b0 & 0x80:
            return opcode, message


def send(writer: asyncio.StreamWriter, opcode: int, payload: bytes) -> None:
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    writer.write(head + payload)


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, host="0.0.0.0", port=port)
    print(f"listening on {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
