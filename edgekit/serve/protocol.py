"""The pipe protocol between the daemon and a model worker: typed messages in length-prefixed frames on a Unix socket pair.

A frame is ``!II`` (header length, payload length), a JSON header holding one message below (tagged
by ``type``) and an optional binary payload (float32 arrays travel as raw bytes, not JSON numbers).
Every header is validated into its message class when it is read, on both sides; anything else is a
``ProtocolError`` (a bug or a crashed peer, never user input). The runtime's own types travel inside
the messages: ``Sampling`` in ``Generate``, ``Delta`` in ``DeltaMessage``, ``Finish`` in ``Done``.

A generation: daemon ``Generate`` -> worker ``Prompt`` (token count of the rendered prompt) -> daemon
``Proceed`` (the prompt fits the context; the daemon decides) or ``Cancel`` -> worker ``DeltaMessage``\\*
then exactly one ``Done`` or ``Error``. A ``Proceed`` with ``direct`` comes with the client's socket on a
second channel (``handoff.py``): the worker writes the deltas there itself, then answers ``HandBack`` and
``Done`` or ``Error``. An encoder job: ``Encode`` -> ``Result`` (+ payload) or ``Error``. ``Cancel`` may come
at any time, and so may ``Ping`` (the worker answers ``Pong``: its heartbeat); a job cancelled before it
produced anything ends with a ``Done`` whose finish reason is "cancelled". A load: the worker starts,
verifies and loads the bundle, reruns its golden checks if it has any, then sends ``Ready`` or
``LoadError`` (and exits). ``Shutdown`` asks the worker to finish what it runs; it answers ``Bye`` and exits.

Besides the pipe, the worker receives its ``WorkerConfig`` as JSON on its command line, and the
bundle verifier subprocess prints a ``VerifyStarted`` and then a ``Verified`` line per bundle.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgekit.runtime.llm import Delta, Finish, Sampling

_PREFIX = struct.Struct("!II")
MAX_HEADER = 64 * 1024 * 1024  # a generate request carries the prompt in its header
MAX_PAYLOAD = 1024 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol (a bug or a crashed peer, never user input)."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- what the daemon and the worker know about a bundle ----------------------------------------------------


class FileIdentity(Message):
    """One file of a bundle as the filesystem identifies it; any write to the file changes ctime (and mtime)."""

    path: str = Field(description="Path inside the bundle.")
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


class Verified(Message):
    """One line of the bundle verifier's output."""

    dir: str = Field(description="The bundle directory as given.")
    ok: bool
    name: str = Field(description="Bundle name from its manifest (the directory name when unreadable).")
    task: str | None = None
    format: str | None = None
    error: str | None = Field(None, description="Why the bundle is refused.")
    files: list[FileIdentity] | None = Field(
        None, description="Identity of the manifest and its files taken before they were hashed; a load whose files "
        "still have this identity needs no second full read.")


class VerifyStarted(Message):
    """The verifier's line before it starts on a bundle: the daemon times each bundle from here."""

    started: str = Field(description="The bundle directory as given.")


class WorkerConfig(Message):
    """How the daemon runs one worker (``--config`` JSON)."""

    n_ctx: int = Field(description="Context per generation slot, already capped at the model's training context.")
    threads: int | None = None
    cpus: list[int] | None = Field(None, description="CPUs the worker pins itself to before loading (None: inherited).")
    slots: int = Field(1, description="Generation slots (encoders: 1).")
    batch_max: int = Field(description="Most texts in one encoder run.")
    batch_max_tokens: int = Field(description="Most padded tokens in one encoder run.")
    max_prompt_chars: int = Field(description="Largest prompt a chat template may render.")
    plugins: list[str] = Field(default_factory=list, description="Modules imported before loading (runner registry).")
    special_in_content: bool = Field(False, description="Control tokens typed in chat message content are parsed as such.")
    prompt_cache_contexts: float = Field(0.0, description="RAM for saved prompts, in contexts' worth of KV cache.")
    verified: list[FileIdentity] | None = Field(
        None, description="Identity of the bundle's files when they were last hashed in full; None: verify now.")


# ---- daemon -> worker ------------------------------------------------------------------------------------


class ChatTurn(Message):
    role: str
    content: str
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # calls of an assistant turn, for templates with a tool format
    tool_call_id: str | None = None


class Generate(Message):
    """Render (chat) or take (completion) the prompt, tokenize it, answer ``Prompt`` and wait for ``Proceed``."""

    type: Literal["generate"] = "generate"
    id: str
    prompt: str | None = None
    messages: list[ChatTurn] | None = None
    tools: list[dict[str, Any]] | None = None  # the chat template's tools variable
    sampling: Sampling


class Direct(Message):
    """How a worker writes a stream's text events to the client's socket itself (``edgekit.serve.handoff``)."""

    head: str = Field(description="What comes before the JSON string of a delta's text in its event.")
    tail: str = Field(description="What comes after it.")
    seconds: float = Field(ge=0, description="Time left until the request's deadline: how long the worker may wait for a "
                           "slow client.")


class Proceed(Message):
    """The prompt fits: generate. With ``direct``, the client's socket came on the handoff channel just before: the
    worker writes the deltas there and answers ``HandBack`` before its ``Done`` or ``Error``."""

    type: Literal["proceed"] = "proceed"
    id: str
    direct: Direct | None = None


class Encode(Message):
    """Embed or classify ``texts`` (one micro-batch of the daemon's batcher); a list of ints is one text's token ids.
    ``rerank``: ``texts`` is the query followed by the documents; one relevance score per document."""

    type: Literal["embed", "classify", "rerank"]
    id: str
    texts: list[str | list[int]]


class Cancel(Message):
    """Stop the job (between tokens for a generation); unknown or finished ids are ignored."""

    type: Literal["cancel"] = "cancel"
    id: str


class Ping(Message):
    """Are you alive? The worker's reader thread answers ``Pong`` at once, whatever its slots are doing."""

    type: Literal["ping"] = "ping"


class Shutdown(Message):
    """Finish the jobs that are running, answer ``Bye`` and exit."""

    type: Literal["shutdown"] = "shutdown"


# ---- worker -> daemon ------------------------------------------------------------------------------------


class Ready(Message):
    """The model is loaded and answers jobs."""

    type: Literal["ready"] = "ready"
    pid: int
    task: str
    load_seconds: float
    files: list[FileIdentity] | None = Field(None, description="Identity of the files this worker hashed in full, if it did.")
    n_ctx: int | None = Field(None, description="Context per generation slot (text generation).")
    chat: bool = Field(False, description="The model has a chat template.")
    max_length: int | None = Field(None, description="Tokens per text (encoders).")
    vocab_size: int | None = Field(None, description="Token ids run from 0 to this, exclusive (encoders).")
    labels: list[str] = Field(default_factory=list, description="Class names (classifiers).")
    threads: int | None = Field(None, description="Threads the runtime was given (llama.cpp's n_threads).")


class LoadError(Message):
    """The worker could not load the bundle, or the loaded model failed its golden checks; it exits after sending this."""

    type: Literal["load_error"] = "load_error"
    message: str
    kind: Literal["bundle", "backend", "golden"] = Field(
        description="bundle: it failed verification; backend: the runtime could not load it; golden: it loaded but does "
        "not reproduce the outputs recorded at export on this machine.")


class Prompt(Message):
    """The prompt is rendered and tokenized; the worker waits for ``Proceed`` or ``Cancel``."""

    type: Literal["prompt"] = "prompt"
    id: str
    tokens: int = Field(ge=0, description="Prompt tokens.")


class DeltaMessage(Message):
    """New text of a generation."""

    type: Literal["delta"] = "delta"
    id: str
    delta: Delta


class HandBack(Message):
    """The worker closed its copy of a stream's client socket; ``complete``: every delta reached the socket."""

    type: Literal["hand_back"] = "hand_back"
    id: str
    complete: bool


class Done(Message):
    """A generation ended."""

    type: Literal["done"] = "done"
    id: str
    finish: Finish


class TokenLabel(Message):
    """One token of a token-classification result."""

    token: str
    start: int
    end: int
    label: str
    score: float


class Result(Message):
    """Encoder output: float32 rows in the payload (``shape``), or token labels per text (``entities``)."""

    type: Literal["result"] = "result"
    id: str
    tokens: list[int] = Field(description="Tokens of each text after truncation.")
    shape: list[int] | None = None
    entities: list[list[TokenLabel]] | None = None


class Error(Message):
    """A job failed; ``status``, ``code`` and ``param`` are what the HTTP client gets."""

    type: Literal["error"] = "error"
    id: str | None
    status: int
    code: str
    message: str
    param: str | None = None


class Pong(Message):
    """The answer to ``Ping``."""

    type: Literal["pong"] = "pong"


class Bye(Message):
    """The worker finished after ``Shutdown`` and exits."""

    type: Literal["bye"] = "bye"


ToWorker = Annotated[Generate | Proceed | Encode | Cancel | Ping | Shutdown, Field(discriminator="type")]
ToDaemon = Annotated[Ready | LoadError | Prompt | DeltaMessage | HandBack | Done | Result | Error | Pong | Bye, Field(discriminator="type")]
TO_WORKER: TypeAdapter[ToWorker] = TypeAdapter(ToWorker)
TO_DAEMON: TypeAdapter[ToDaemon] = TypeAdapter(ToDaemon)


# ---- frames ----------------------------------------------------------------------------------------------


def encode_frame(message: Message, payload: bytes = b"") -> bytes:
    head = message.model_dump_json().encode("utf-8")
    return _PREFIX.pack(len(head), len(payload)) + head + payload


def _decode(head: bytes, adapter: TypeAdapter) -> Any:
    try:
        return adapter.validate_json(head)
    except ValidationError as exc:
        raise ProtocolError(f"bad frame header: {exc}") from exc


def _check(head_len: int, payload_len: int) -> None:
    if head_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
        raise ProtocolError(f"frame too large ({head_len} + {payload_len} bytes)")


def read_frame_sync(stream: BinaryIO) -> tuple[ToWorker, bytes] | None:
    """Blocking read of one frame from the daemon (inside the worker); None at end of stream."""
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
    return _decode(head, TO_WORKER), payload


class FrameBuffer:
    """The daemon's side of a worker's socket: bytes in as they arrive, whole frames out.

    Parsing in the socket's ``data_received`` callback costs one event-loop turn per token, where a
    reader task on an asyncio.StreamReader costs two (the daemon's per-token CPU is on the decode's
    critical path on a 2-core board)."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> list[tuple[ToDaemon, bytes]]:
        """The frames ``data`` completes, in order; raises ProtocolError on a bad one."""
        self._data += data
        frames = []
        while len(self._data) >= _PREFIX.size:
            head_len, payload_len = _PREFIX.unpack_from(self._data)
            _check(head_len, payload_len)
            head_end = _PREFIX.size + head_len
            end = head_end + payload_len
            if len(self._data) < end:
                break
            frames.append((_decode(bytes(self._data[_PREFIX.size:head_end]), TO_DAEMON), bytes(self._data[head_end:end])))
            del self._data[:end]
        return frames

    def close(self) -> None:
        """The stream ended: raises ProtocolError if it stopped inside a frame."""
        if self._data:
            raise ProtocolError(f"truncated frame ({len(self._data)} bytes left at end of stream)")


class FrameSender:
    """Thread-safe blocking sender used inside the worker (slot threads share one socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, message: Message, payload: bytes = b"") -> None:
        data = encode_frame(message, payload)
        with self._lock:
            self._sock.sendall(data)
