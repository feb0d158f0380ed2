"""The pipe protocol between the daemon and a model worker: length-prefixed frames on a Unix socket pair.

A frame is ``!II`` (header length, payload length), a JSON header and an optional binary payload
(float32 arrays travel as raw bytes, not JSON numbers). Messages, by header ``type``:

daemon -> worker: ``generate`` (id, prompt or messages, sampling), ``embed`` / ``classify`` (id, texts),
``cancel`` (id), ``shutdown``.
worker -> daemon: ``ready`` (model facts), ``start`` (id, prompt_tokens), ``delta`` (id, text, tokens),
``done`` (id, finish_reason, usage), ``result`` (id, shape, payload), ``error`` (id, status, code, message).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any, BinaryIO

_PREFIX = struct.Struct("!II")
MAX_HEADER = 64 * 1024 * 1024  # a generate request carries the prompt in its header
MAX_PAYLOAD = 1024 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something that is not a frame (a bug or a crashed peer, never user input)."""


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _PREFIX.pack(len(head), len(payload)) + head + payload


def _decode(head: bytes) -> dict[str, Any]:
    try:
        header = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"bad frame header: {exc}") from exc
    if not isinstance(header, dict) or "type" not in header:
        raise ProtocolError("frame header is not an object with a type")
    return header


def _check(head_len: int, payload_len: int) -> None:
    if head_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
        raise ProtocolError(f"frame too large ({head_len} + {payload_len} bytes)")


def read_frame_sync(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """Blocking read of one frame; None at end of stream."""
    prefix = stream.read(_PREFIX.size)
    if not prefix:
        return None
    if len(prefix) != _PREFIX.size:
        raise ProtocolError("truncated frame prefix")
    head_len, payload_len = _PREFIX.unpack(prefix)
    _check(head_len, payload_len)
    head = stream.read(head_len)
    payload = stream.read(payload_len) if payload_len else b""
    if len(head) != head_len or len(payload) != payload_len:
        raise ProtocolError("truncated frame")
    return _decode(head), payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes] | None:
    """Read one frame; None at end of stream (the worker exited)."""
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("truncated frame prefix") from exc
        return None
    head_len, payload_len = _PREFIX.unpack(prefix)
    _check(head_len, payload_len)
    try:
        head = await reader.readexactly(head_len)
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("truncated frame") from exc
    return _decode(head), payload


class FrameSender:
    """Thread-safe blocking sender used inside the worker (slot threads share one socket)."""

    def __init__(self, sock: socket.socket) -> None:
        import threading

        self._sock = sock
        self._lock = threading.Lock()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        data = encode_frame(header, payload)
        with self._lock:
            self._sock.sendall(data)
