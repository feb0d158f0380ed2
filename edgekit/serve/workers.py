"""The daemon's side of a model worker: start the subprocess, route its frames to requests, notice its death."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import BundleError, RuntimeBackendError
from edgekit.serve.errors import ApiError
from edgekit.serve.protocol import (
    Bye,
    Cancel,
    Direct,
    Done,
    Error,
    FrameBuffer,
    LoadError,
    Message,
    Ping,
    Pong,
    Proceed,
    ProtocolError,
    Ready,
    Result,
    Shutdown,
    ToDaemon,
    WorkerConfig,
    encode_frame,
)

log = logging.getLogger("edgekit.serve")

HUNG_RETRY_AFTER_S = 2


@dataclass(frozen=True)
class WorkerGone:
    """Put on every open request stream when the worker's pipe closes (never sent by a worker)."""

    returncode: int | None
    hung: bool = False  # the daemon killed it for missing its heartbeat


Frame = tuple[ToDaemon | WorkerGone, bytes]


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "an unknown status"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class GoldenCheckFailed(RuntimeBackendError):
    """The model loaded but does not reproduce its golden record on this machine."""


class WorkerCrashed(ApiError):
    """The worker died while this request was in flight."""

    def __init__(self, model: str, returncode: int | None) -> None:
        super().__init__(
            502,
            f"the worker running model {model!r} stopped with {describe_exit(returncode)} during this request; "
            "the daemon restarts it and keeps serving",
            code="worker_crashed",
        )
        self.returncode = returncode


class RequestStream:
    """Frames of one request as the worker sends them; ``close()`` cancels it if unfinished."""

    def __init__(self, worker: WorkerProcess, rid: str) -> None:
        self.worker = worker
        self.id = rid
        self.queue: asyncio.Queue[Frame] = asyncio.Queue()
        self.finished = False

    async def next(self) -> tuple[ToDaemon, bytes]:
        """The next message for this request; a worker's Error or death is raised as the client's error."""
        message, payload = await self.queue.get()
        if isinstance(message, WorkerGone):
            self.finished = True
            if message.hung:
                raise ApiError(503, f"the worker running model {self.worker.name!r} stopped answering and was restarted; "
                               "retry shortly", code="worker_hung", headers={"Retry-After": str(HUNG_RETRY_AFTER_S)})
            raise WorkerCrashed(self.worker.name, message.returncode)
        if isinstance(message, Error):
            self.finished = True
            raise ApiError(message.status, message.message, param=message.param, code=message.code)
        if isinstance(message, (Done, Result)):
            self.finished = True
        return message, payload

    def cancel(self) -> None:
        if not self.finished:
            self.worker.send(Cancel(id=self.id))

    def close(self) -> None:
        self.cancel()
        self.finished = True
        self.worker.pending.pop(self.id, None)


class WorkerProcess:
    """One model in its own process; ``on_exit`` is called when it dies without being asked to."""

    def __init__(self, name: str, bundle_dir: Path, config: WorkerConfig, on_exit: Callable[[WorkerProcess], None],
                 env: dict[str, str] | None = None, heartbeat: tuple[float, float] | None = None) -> None:
        self.name = name
        self.heartbeat = heartbeat  # (ping every, dead after) in seconds; None: never checked
        self.hung = False
        self.last_heard = 0.0
        self._heartbeat_task: asyncio.Task | None = None
        self.env = env or {}
        self.bundle_dir = Path(bundle_dir)
        self.config = config
        self.on_exit = on_exit
        self.pending: dict[str, RequestStream] = {}
        self.facts: Ready | None = None
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.alive = False
        self.stopping = False
        self._transport: asyncio.Transport | None = None
        self._handoff: socket.socket | None = None  # client sockets go to the worker on this datagram pair (handoff.py)
        self._pipe: _WorkerPipe | None = None
        self._first: asyncio.Future | None = None  # the worker's first frame, None if it closed first, or its ProtocolError
        self._ended: asyncio.Future | None = None  # done once its socket closed and its exit was handled
        self._ending: asyncio.Task | None = None  # the task handling its exit, held so it is not garbage-collected

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, timeout: float) -> Ready:
        """Spawn, wait for ``Ready``; a load failure raises BundleError / RuntimeBackendError with the worker's reason."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._handoff, handoff_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._handoff.setblocking(False)
        env = dict(os.environ)
        env["GGML_NO_BACKTRACE"] = "1"  # ggml would attach gdb to print a backtrace on abort
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(self.env)
        command = [sys.executable, "-m", "edgekit.serve.worker", "serve", "--fd", str(child.fileno()), "--handoff-fd",
                   str(handoff_child.fileno()), "--bundle", str(self.bundle_dir), "--config", self.config.model_dump_json()]
        try:
            self.proc = subprocess.Popen(command, pass_fds=(child.fileno(), handoff_child.fileno()),
                                         stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            parent.close()
            self._handoff.close()
            raise
        finally:
            child.close()
            handoff_child.close()
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._ended = loop.create_future()
        self._transport, self._pipe = await loop.create_unix_connection(lambda: _WorkerPipe(self), sock=parent)
        try:
            frame = await asyncio.wait_for(asyncio.shield(self._first), timeout)
        except TimeoutError:
            await self.kill()
            raise RuntimeBackendError(f"model {self.name!r} did not load within {timeout:.0f} s",
                                      hint="raise --load-timeout-s or check the machine's load") from None
        if isinstance(frame, ProtocolError):
            await self.kill()
            raise RuntimeBackendError(f"model {self.name!r}: worker protocol error: {frame}") from frame
        if frame is None:
            code = await self._reap(5.0)
            raise RuntimeBackendError(f"the worker for model {self.name!r} stopped with {describe_exit(code)} while loading")
        message, _ = frame
        if isinstance(message, LoadError):
            await self._reap(5.0)
            raise {"bundle": BundleError, "backend": RuntimeBackendError, "golden": GoldenCheckFailed}[message.kind](message.message)
        if not isinstance(message, Ready):
            await self.kill()
            raise RuntimeBackendError(f"model {self.name!r}: the worker sent {message.type!r} before it was ready")
        self.facts = message
        self.alive = True
        self.last_heard = loop.time()
        if self.heartbeat is not None:
            self._heartbeat_task = asyncio.create_task(self._watch_heartbeat(*self.heartbeat), name=f"heartbeat-{self.name}")
        return message

    async def _watch_heartbeat(self, every: float, limit: float) -> None:
        """Ping the worker; one that has said nothing for ``limit`` seconds is hung: kill it (its exit is handled as a crash)."""
        loop = asyncio.get_running_loop()
        while self.alive and not self.stopping:
            self.send(Ping())
            await asyncio.sleep(every)
            silent = loop.time() - self.last_heard
            if silent > limit and self.alive and not self.stopping:
                self.hung = True
                log.error("model %s: worker (pid %s) did not answer its heartbeat for %.0f s; killing it", self.name,
                          self.pid, silent)
                if self.proc is not None and self.proc.poll() is None:
                    self.proc.kill()
                return

    def _received(self, message: ToDaemon, payload: bytes) -> None:
        """A frame from the worker (called from the socket's data_received)."""
        self.last_heard = asyncio.get_running_loop().time()
        if not self._first.done():
            self._first.set_result((message, payload))
        elif isinstance(message, Bye):
            self._transport.close()
        elif not isinstance(message, Pong):
            stream = self.pending.get(getattr(message, "id", None))
            if stream is not None:  # else: a request that was closed; its late frames are dropped
                stream.queue.put_nowait((message, payload))

    def _lost(self, error: ProtocolError | None) -> None:
        """The worker's socket closed (it exited, was killed, or broke the protocol)."""
        if error is not None:
            log.error("model %s: worker protocol error: %s", self.name, error)
        if not self._first.done():
            self._first.set_result(error)
        if self.alive:
            self.alive = False
            self._ending = asyncio.create_task(self._gone(), name=f"worker-{self.name}-gone")
        elif not self._ended.done():
            self._ended.set_result(None)

    async def _gone(self) -> None:
        try:
            if self._heartbeat_task is not None:
                self._heartbeat_task.cancel()
            code = await self._reap(2.0 if self.stopping else 10.0)
            for stream in list(self.pending.values()):
                stream.queue.put_nowait((WorkerGone(code, hung=self.hung), b""))
            if not self.stopping:
                log.error("model %s: worker (pid %s) stopped with %s", self.name, self.pid, describe_exit(code))
                self.on_exit(self)
        finally:
            self._ended.set_result(None)

    async def _reap(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            self.returncode = await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = await asyncio.to_thread(self.proc.wait)
        if self._transport is not None:
            self._transport.close()
        if self._handoff is not None:
            self._handoff.close()
        return self.returncode

    def _open(self) -> bool:
        return self.alive and self._transport is not None and not self._transport.is_closing()

    def send(self, message: Message, payload: bytes = b"") -> None:
        if self._open():
            self._transport.write(encode_frame(message, payload))

    def hand_over(self, rid: str, fd: int, direct: Direct) -> bool:
        """Send the client socket ``fd`` to the worker and let request ``rid`` proceed writing to it; False (nothing
        sent) when the worker's handoff channel is full."""
        if not self._open():
            return False
        try:
            socket.send_fds(self._handoff, [rid.encode()], [fd])
        except OSError:
            return False
        self.send(Proceed(id=rid, direct=direct))
        return True

    async def submit(self, job: Callable[..., Message], payload: bytes = b"") -> RequestStream:
        """Send ``job(id=...)`` under a new request id (e.g. ``partial(Encode, type="embed", texts=...)``); its messages
        arrive on the returned stream."""
        if not self.alive:
            raise WorkerCrashed(self.name, self.returncode)
        stream = RequestStream(self, uuid.uuid4().hex)
        self.pending[stream.id] = stream
        self.send(job(id=stream.id), payload)
        await self._pipe.drained()
        return stream

    async def stop(self, grace: float) -> None:
        """Ask the worker to finish what it runs and exit; kill it after ``grace`` seconds."""
        self.stopping = True
        if self.alive:
            self.send(Shutdown())
        if self._ended is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._ended), grace)
            except TimeoutError:
                await self.kill()
        elif self.proc is not None and self.proc.poll() is None:
            await self.kill()

    async def kill(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        await self._reap(5.0)
        if self._ended is not None:
            await asyncio.shield(self._ended)

    def rss(self) -> int:
        if not self.alive or self.proc is None:
            return 0
        import psutil

        try:
            return psutil.Process(self.proc.pid).memory_info().rss
        except psutil.Error:
            return 0


class _WorkerPipe(asyncio.Protocol):
    """The daemon's end of a worker's socket: frames go to the worker as they complete; writes wait when its buffer is full."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.frames = FrameBuffer()
        self.transport: asyncio.Transport | None = None
        self._error: ProtocolError | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            for message, payload in self.frames.feed(data):
                self.worker._received(message, payload)
        except ProtocolError as exc:
            self._error = exc
            self.frames = FrameBuffer()  # what follows a bad frame is not read
            self.transport.abort()

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        error = self._error
        if error is None:
            try:
                self.frames.close()
            except ProtocolError as truncated:
                error = truncated
        self._writable.set()
        self.worker._lost(error)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def drained(self) -> None:
        await self._writable.wait()
