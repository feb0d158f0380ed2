"""Every setting of the daemon, declared once: environment (``EDGEKIT_*``), CLI flags and defaults come from here.

``edgekit serve`` builds its flags from ``ServeSettings.model_fields`` (as llama-cpp-python's server
does with its pydantic settings), so a new setting is one field below.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgekit.paths import kit_paths
from edgekit.runtime.placement import WORKER_OMP_SPIN_COUNT

# asyncio accepts up to ``backlog`` connections in one go, and a socket the connection cap closes is released a
# few loop turns later: the listen backlog is kept small and a few bursts are counted in the descriptors the cap
# needs, so the cap closes sockets before accept() runs out of descriptors.
ACCEPT_BACKLOG = 16
FD_RESERVE = 64 + 4 * ACCEPT_BACKLOG  # workers' sockets, bundle files, logs, the verifier, and accept bursts in flight


class ServeSettings(BaseSettings):
    """Settings of `edgekit serve` (env prefix EDGEKIT_, e.g. EDGEKIT_PORT=9000)."""

    model_config = SettingsConfigDict(env_prefix="EDGEKIT_", extra="forbid", frozen=True, env_parse_none_str="null")

    models: Path = Field(
        default_factory=lambda: kit_paths().bundles,
        description="Directory of bundles to serve (where `edgekit export` writes by default).",
    )
    host: str = Field("127.0.0.1", description="Address to bind. Anything but loopback requires --api-key-file.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: pick a free one).")
    api_key_file: Path | None = Field(
        None, description="File holding the API key clients send as 'Authorization: Bearer KEY'; /health stays open."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Extra Host header names accepted on a loopback bind (localhost, 127.0.0.1 and ::1 always are); "
        "guards against DNS rebinding.",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Web origins (scheme://host[:port]) whose pages may call the API from a browser; requests carrying "
        "any other Origin header get 403.",
    )
    device: str | None = Field(
        None, description="Device profile id (devices/*.yaml) whose usable RAM is the memory budget; default: this host."
    )
    memory_budget_mb: int | None = Field(
        None, ge=16, description="Memory for loaded models in MiB; overrides --device and the host's available RAM."
    )
    preload: list[str] = Field(
        default_factory=list, description="Models to load at start (by bundle name); others load on first request."
    )
    idle_unload_s: float = Field(900.0, ge=0, description="Unload a model after this many idle seconds (0: never).")
    slots: int = Field(
        4, ge=1, le=16, description="Requests one model runs at once. A GGUF model's streams decode together, one batch "
        "per step, as sequences of one llama.cpp context sharing one KV pool of --n-ctx cells (idle sequences keep their "
        "prompts there for the next request that shares them), so more slots cost no KV memory."
    )
    queue_size: int = Field(16, ge=0, le=4096, description="Requests that may wait per model; beyond it: 503 + Retry-After.")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still running after this long is cancelled (504).")
    load_timeout_s: float = Field(120.0, gt=0, description="Give up on a model that takes longer than this to load.")
    verify_timeout_s: float = Field(
        600.0, gt=0, description="Most seconds one bundle's verification (sha256 of every file, header checks) may take; "
        "a bundle that takes longer is rejected and the others go on."
    )
    max_connections: int = Field(
        128, ge=1, le=65536, description="Open connections at most; past it the oldest one still waiting for its request "
        "head is closed (the file limit is raised to fit, or the cap lowered)."
    )
    header_timeout_s: float = Field(10.0, gt=0, description="A connection must send its whole request head within this.")
    body_timeout_s: float = Field(60.0, gt=0, description="A request's body must arrive in full within this.")
    idle_timeout_s: float = Field(5.0, gt=0, description="Close a keep-alive connection idle this long between requests.")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body; larger ones get 413 before they are read."
    )
    max_input_chars: int = Field(
        100_000, ge=1, description="Most characters of text one request may carry, checked before tokenizing (400)."
    )
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_embedding_inputs: int = Field(2048, ge=1, description="Most texts in one embeddings/classify request, and documents in one rerank request (OpenAI's limit).")
    n_ctx: int = Field(
        4096, ge=64, description="Context window of a GGUF model in tokens: its KV pool, shared by its slots, and the longest "
        "conversation one request may have (capped at the model's training context)."
    )
    batch_max: int = Field(32, ge=1, le=1024, description="Largest micro-batch of embeddings/classify texts run together.")
    batch_max_tokens: int = Field(
        4096, ge=16, description="Most tokens (texts x longest text, padded) an encoder runs at once; bounds its activation memory."
    )
    batch_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="How long a micro-batch waits for more requests once the model is free."
    )
    prompt_cache_contexts: float = Field(
        1.0, ge=0, le=4, description="RAM each GGUF worker keeps for saved prompts, in contexts' worth of KV cache (1: one "
        "full context; charged by the memory budget and `edgekit fit`). When a request starts, the prompts of idle slots "
        "move there, so a returning system prompt is not evaluated again and idle cells do not slow "
        "decoding. 0: idle slots keep their prompts in the KV pool instead, until it needs the cells."
    )
    allow_control_tokens_in_content: bool = Field(
        False, description="Parse control tokens (e.g. <|im_start|>) typed in chat message content as control tokens; by "
        "default content is tokenized as text, so users cannot forge system turns. The template's own markup is always parsed."
    )
    threads: int | None = Field(
        None, ge=1,
        description="CPU threads per model worker. Default: the board's cores, i.e. the cores --device's profile counts "
        "(the big cores on big.LITTLE boards), else the physical cores this process may use (CPU affinity, one per SMT "
        "pair); on CPUs with core clusters of different speed, workers are pinned to the fastest cores. /health and the "
        "startup log line state the value in use.",
    )
    omp_spin_count: int | None = Field(
        WORKER_OMP_SPIN_COUNT,
        ge=0,
        description="GOMP_SPINCOUNT of model workers: how many turns llama.cpp's OpenMP threads spin at a barrier before "
        "they sleep (given with OMP_WAIT_POLICY=ACTIVE). The default, libgomp's own as llama-server runs, keeps them awake "
        "between decode steps; unless this is given, a models directory holding several GGUF bundles at start gets 1000 "
        "(~25 us on x86), as two llama.cpp workers decoding at once would wait on each other's spinning threads; set 1000 "
        "too where other work shares the cores; 0 sleeps at once; EDGEKIT_OMP_SPIN_COUNT=null passes the environment's "
        "OpenMP settings on (with none, a worker bounds its spin as the CLI tools do, 1000 turns).",
    )
    worker_plugins: list[str] = Field(
        default_factory=list,
        description="Python modules each model worker imports before loading a bundle; a module may register a runner "
        "for a bundle format (edgekit.serve.runners.register_runner). The test suite loads its fake model this way.",
    )
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often the daemon pings each model worker.")
    heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="A worker silent this long (no answer to its pings, no output) is hung: it is killed and "
        "restarted, and its requests get 503 + Retry-After."
    )
    restart_max: int = Field(
        5, ge=0, description="Worker crashes tolerated per model within --restart-window-s before it is marked failed."
    )
    restart_window_s: float = Field(300.0, gt=0, description="Window over which worker crashes are counted.")
    version_poll_s: float = Field(
        2.0, ge=0, description="How often the daemon checks whether a model's link (switched by `edgekit update`) points at "
        "another version; a switched model is reloaded in place without dropping requests (0: only on SIGHUP)."
    )
    grace_s: float = Field(10.0, ge=0, description="On SIGTERM: how long in-flight requests may finish before they are cancelled.")
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("use one of debug, info, warning, error, critical")
        return value.lower()

    @property
    def loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve anywhere
