"""Connection limits uvicorn does not have: header and body deadlines and a connection cap, plus rate-limited warnings.

uvicorn closes a connection that idles between requests (``timeout_keep_alive``) and answers 503
past ``limit_concurrency`` once a request has arrived, but a connection that never sends a full
request head, or never finishes its body, stays open, and every open socket is a file descriptor.
``GuardedH11Protocol`` is uvicorn's h11 protocol with two deadlines (the request head within
``header_timeout_s`` of its first byte or of the connection, the body within ``body_timeout_s``) and
a cap on open connections: past the cap the oldest connection still waiting for its request head
is closed, so slow or idle clients cannot lock real ones out; only when every connection is
running a request is the new one closed instead. Limit hits are counted in /metrics and logged at
most once per ``LOG_EVERY_S`` per kind.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgekit.serve.handoff import with_transport
from edgekit.serve.settings import FD_RESERVE

log = logging.getLogger("edgekit.serve")

LOG_EVERY_S = 10.0


class RateLimitedLog(logging.Filter):
    """Passes a record at most once per ``every`` seconds per (logger, message template); says how many it held back."""

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        super().__init__()
        self.every = every
        self.last: dict[tuple[str, str], float] = {}
        self.held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self.last.get(key, -self.every) < self.every:
            self.held[key] = self.held.get(key, 0) + 1
            return False
        self.last[key] = now
        if held := self.held.pop(key, 0):
            record.msg = f"{record.msg} (and {held} more like it in the last {self.every:.0f} s)"
        return True


@dataclass
class ConnectionLimits:
    """The limits of one server and what they did (``closed`` by reason, read by /metrics)."""

    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    metrics: object | None = None
    warnings: RateLimitedLog = field(default_factory=RateLimitedLog)

    def closed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_closed.labels(reason=reason).inc()
        record = logging.LogRecord(log.name, logging.WARNING, __file__, 0, "closing connections: %s", (reason,), None)
        if self.warnings.filter(record):
            log.handle(record)


def fit_to_file_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE toward the hard one if the cap needs it; the cap that fits (with a reserve)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitted = max(1, soft - FD_RESERVE)
        log.warning("the file limit (%d) leaves room for %d connections, not --max-connections %d", soft, fitted,
                    max_connections)
        return fitted
    return max_connections


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with request-head and body deadlines and a connection cap (``limits``)."""

    limits: ConnectionLimits  # set on the subclass ``protocol_class`` makes

    def connection_made(self, transport) -> None:
        self.app = with_transport(self.app, transport)  # a streamed generation may hand the socket to its worker
        self._timer = None
        self._phase: str | None = None
        self.opened = time.monotonic()
        super().connection_made(transport)
        open_now = sum(1 for c in self.connections if getattr(c, "_phase", None) != "closed")
        if open_now > self.limits.max_connections and not self._make_room():
            self.limits.closed("connection cap, all busy")
            transport.close()
            return
        self._watch()

    def _make_room(self) -> bool:
        """Close the oldest connection still waiting for its request head; False if every other one is busy."""
        waiting = [c for c in self.connections if c is not self and getattr(c, "_phase", None) == "headers"]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.opened)
        oldest._close("connection cap")
        return True

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase != "closed":
            self._set_phase(None)  # idle until the next byte: uvicorn's keep-alive timeout covers that

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, "closed"
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline of the phase the connection is in: reading a head, reading a body, or neither."""
        if self._phase == "closed" or self.transport is None or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            # a fresh connection, or bytes of a next request after a response
            self._set_phase("headers" if self._phase in (None, "headers") and (self.cycle is None or self._buffered()) else None)
        elif state is h11.SEND_BODY:
            self._set_phase("body")
        else:
            self._set_phase(None)

    def _buffered(self) -> bool:
        return bool(self.conn.trailing_data[0])

    def _set_phase(self, phase: str | None) -> None:
        if phase == self._phase and (phase is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        if phase is not None:
            limit = self.limits.header_timeout_s if phase == "headers" else self.limits.body_timeout_s
            self._timer = self.loop.call_later(limit, self._close, f"{phase} timeout")

    def _close(self, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, "closed"  # until connection_lost, which may come a few accepts later
        if self.transport is not None and not self.transport.is_closing():
            self.limits.closed(reason)
            self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, bound to this server's ``limits``."""
    return type("EdgekitH11Protocol", (GuardedH11Protocol,), {"limits": limits})
