"""A fake text-generation model for the daemon's admission, queueing, cancellation and crash tests.

A model worker imports this module when the daemon runs with ``worker_plugins=["fake_runner"]`` (and
the tests directory on its PYTHONPATH). Importing it registers ``FakeGenerationRunner`` for gguf
bundles through the same registry the built-in runners use, so the daemon, the worker process, the
pipe protocol, admission and cancellation are the real code and only llama.cpp is replaced (it is
never imported). The fake is deterministic and is steered by its prompt and a gates directory
(``$EDGEKIT_FAKE_GATES``) that the test controls:

- the prompt's tokens are its words; the completion is " t1 t2 ... tN", N = max_tokens or the room left
  in the context window (then finish_reason "length");
- ``hold:NAME@K`` in the prompt (``@K`` optional, default 0): after K completion tokens the model creates
  ``NAME.waiting`` in the gates directory and waits until the file ``NAME`` exists; a cancel ends the
  wait and the generation (finish_reason "cancelled", K completion tokens);
- ``crash@K``: after K completion tokens the worker aborts with SIGABRT (a native crash);
- a bundle whose ``load-<bundle name>.hold`` file exists in the gates directory loads only once the file
  ``load-<bundle name>`` exists (it creates ``load-<bundle name>.waiting`` meanwhile);
- the bundle verifier (which loads the plugin too) waits the same way at ``verify-<bundle name>`` when
  ``verify-<bundle name>.hold`` exists, and aborts on a bundle whose ``verify-<bundle name>.crash`` exists.

Every wait is bounded by ``GATE_LIMIT_S`` so a broken test fails instead of hanging.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import edgekit.runtime.verify as verify_module
from edgekit.errors import EdgekitError
from edgekit.runtime.llm import Delta, Finish, Sampling
from edgekit.serve.runners import GenerationRunner, register_runner

GATES_ENV = "EDGEKIT_FAKE_GATES"
GATE_LIMIT_S = 120.0
POLL_S = 0.002
HOLD = re.compile(r"^hold:([\w.-]+)(?:@(\d+))?$")
CRASH = re.compile(r"^crash@(\d+)$")


def gates_dir() -> Path:
    return Path(os.environ[GATES_ENV])


def pass_gate(name: str, cancelled: Callable[[], bool] = lambda: False) -> bool:
    """Say the gate is reached, then wait until the test opens it; False when cancelled first."""
    root = gates_dir()
    (root / f"{name}.waiting").touch()
    deadline = time.monotonic() + GATE_LIMIT_S
    while not (root / name).exists():
        if cancelled():
            return False
        if time.monotonic() > deadline:
            raise EdgekitError(f"fake model: gate {name!r} was not opened within {GATE_LIMIT_S:.0f} s")
        time.sleep(POLL_S)
    return True


class FakeTemplate:
    """Stands for a chat template: the model is a chat model."""

    @staticmethod
    def render(messages: list[dict[str, Any]]) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class FakeModel:
    """The GgufModel interface the generation runner uses, with words as tokens."""

    add_bos = False
    bos_text = ""

    def __init__(self, n_ctx: int, threads: int | None = None) -> None:
        self.n_ctx = n_ctx
        self.threads = threads
        self.template = FakeTemplate()
        self.words: dict[str, int] = {}
        self.vocab: list[str] = []
        self.llm = self  # chat prompts are tokenized through llm.tokenize(bytes, add_bos=, special=)

    def check_template(self) -> None:
        pass

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        return self.template.render(messages)

    def tokenize(self, text: str | bytes, *, chat: bool = False, add_bos: bool = False, special: bool = True) -> list[int]:
        if isinstance(text, bytes):  # called as llama-cpp-python's Llama.tokenize
            text = text.decode("utf-8")
        ids = []
        for word in text.split():
            if word not in self.words:
                self.words[word] = len(self.vocab)
                self.vocab.append(word)
            ids.append(self.words[word])
        return ids

    def generate(self, prompt: list[int], sampling: Sampling,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Delta | Finish]:
        words = [self.vocab[token] for token in prompt]
        holds = [(m[1], int(m[2] or 0)) for m in map(HOLD.match, words) if m]
        crash = next((int(m[1]) for m in map(CRASH.match, words) if m), None)
        room = self.n_ctx - len(prompt)
        limit = min(sampling.max_tokens or room, room)
        produced = 0
        while True:
            if crash == produced:
                os.abort()
            for name, at in holds:
                if at == produced and not pass_gate(name, cancelled):
                    yield Finish("cancelled", len(prompt), produced)
                    return
            if produced >= limit:
                yield Finish("length", len(prompt), produced)
                return
            if cancelled():
                yield Finish("cancelled", len(prompt), produced)
                return
            produced += 1
            yield Delta(f" t{produced}", produced)


class FakeGenerationRunner(GenerationRunner):
    """The real generation runner (slots, prompt checks, message flow) over fake models."""

    @staticmethod
    def open_model(path: Path, manifest, config) -> FakeModel:
        if (gates_dir() / f"load-{manifest.name}.hold").exists():
            pass_gate(f"load-{manifest.name}")
        return FakeModel(config.n_ctx, config.threads)


register_runner("gguf", FakeGenerationRunner, replace=True)


def _gated_gguf_check(check: Callable[..., None]) -> Callable[..., None]:
    """The real gguf header check behind the verification gates: ``verify-<name>.crash`` aborts the verifier,
    ``verify-<name>.hold`` makes it wait at the gate ``verify-<name>``."""
    def gated(bundle_dir: Path, manifest) -> None:
        if GATES_ENV in os.environ:
            if (gates_dir() / f"verify-{manifest.name}.crash").exists():
                os.abort()
            if (gates_dir() / f"verify-{manifest.name}.hold").exists():
                pass_gate(f"verify-{manifest.name}")
        check(bundle_dir, manifest)
    gated.gated = True
    return gated


if not getattr(verify_module.check_gguf_bundle, "gated", False):  # the format spec looks the check up by name on each use
    verify_module.check_gguf_bundle = _gated_gguf_check(verify_module.check_gguf_bundle)
