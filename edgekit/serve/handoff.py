"""A streamed generation's client socket, handed from the daemon to the worker that decodes it.

Relayed, every token wakes the daemon: a frame in from the worker, an SSE event out to the client.
On a 2-core board that wake-up (~0.4 ms of CPU, mostly a cold interpreter) pre-empts one of
llama.cpp's threads once per token, and the whole decode step waits for it. Handed over, the
worker writes each text event to the client as an HTTP/1.1 chunk itself and the daemon sleeps
until the generation ends; it still owns the connection: it wrote the headers and the first
event, it watches for the client leaving, and it writes the finish, usage and [DONE] events
after the worker's ``HandBack``.

The daemon hands a socket over only when nothing else can write to it meanwhile and the bytes
are plain HTTP/1.1 chunks on TCP: a response under uvicorn with an empty write buffer, no TLS.
Elsewhere (in-process test clients, a full buffer) it relays as before.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from typing import Any

TRANSPORT_KEY = "edgekit.transport"  # scope["extensions"][TRANSPORT_KEY]: the connection's asyncio transport
GIVE_UP_POLL_S = 0.1  # a worker waiting for a slow client notices a cancel this often
HAND_BACK_WAIT_S = 5.0  # a timed-out stream: how long the daemon waits for its worker to stop writing (between tokens)


def with_transport(app: Any, transport: Any) -> Any:
    """``app`` seeing the connection's transport in each request's scope (uvicorn's protocol adds it per connection)."""

    async def wrapped(scope, receive, send):
        scope.setdefault("extensions", {})[TRANSPORT_KEY] = transport
        await app(scope, receive, send)

    return wrapped


def _transport(scope: dict) -> Any:
    return (scope.get("extensions") or {}).get(TRANSPORT_KEY)


def client_socket(scope: dict) -> int | None:
    """The file descriptor of the request's TCP socket if a worker may write chunks to it now, else None."""
    transport = _transport(scope)
    if transport is None or scope.get("http_version") != "1.1" or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None or transport.get_write_buffer_size():
        return None  # TLS needs the daemon's encryption; buffered bytes would come after the worker's
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None


def drop_connection(scope: dict) -> None:
    """End the request's connection: what the worker wrote may stop inside an event, so nothing may follow it.
    ``shutdown`` sends the FIN even while the worker still holds a copy of the socket, and fails its next write."""
    transport = _transport(scope)
    if transport is None:
        return
    try:
        transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
    transport.close()


class ClientSink:
    """The worker's copy of a client socket: text events out as HTTP/1.1 chunks, never blocking the decode thread.

    The socket is non-blocking (the flag belongs to the connection the daemon's copy shares). What the client does not
    take at once waits in ``pending`` and goes with the next event; ``finish`` waits for a slow client at the end."""

    def __init__(self, fd: int, head: str, tail: str, deadline: float) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.head, self.tail = head.encode(), tail.encode()
        self.deadline = deadline  # time.monotonic() past which a slow client is given up on (the request's deadline)
        self.pending = bytearray()
        self.broken = False  # the client left (or reset the connection): later events go nowhere

    def write(self, text: str) -> None:
        if self.broken:
            return
        event = self.head + json.dumps(text, ensure_ascii=False).encode() + self.tail
        self.pending += b"%x\r\n%b\r\n" % (len(event), event)
        self._flush()

    def _flush(self) -> None:
        try:
            while self.pending:
                del self.pending[:self.sock.send(self.pending)]
        except BlockingIOError:
            pass
        except OSError:
            self.broken = True

    def finish(self, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Write what is left, waiting for a slow client until the deadline or ``give_up()`` (checked every
        ``GIVE_UP_POLL_S``); close this copy. True if every event went out."""
        writable = select.poll()
        writable.register(self.sock, select.POLLOUT)
        while self.pending and not self.broken and not give_up() and (left := self.deadline - time.monotonic()) > 0:
            writable.poll(min(left, GIVE_UP_POLL_S) * 1000)
            self._flush()
        complete = not self.pending and not self.broken
        self.sock.close()
        return complete
