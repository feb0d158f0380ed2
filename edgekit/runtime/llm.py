"""Run a GGUF bundle with llama-cpp-python: chat prompt, cancellable prefill, streamed text deltas.

Board side. The file must have passed ``verify_bundle`` and ``read_gguf_header`` first: llama.cpp's
own parser is the attack surface, and some malformed vocabularies abort the whole process inside
llama.cpp (``std::out_of_range`` at tokenization) — which is why the daemon runs this in a worker.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgekit.errors import EdgekitError, RuntimeBackendError
from edgekit.runtime.chat_template import ChatTemplate
from edgekit.runtime.llama_params import FLASH_ATTENTION, PREFILL_CHUNK

# llama.cpp server defaults for the samplers the OpenAI API does not expose (tools/server/README.md).
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed
# A context holding at least this many tokens that a new prompt would drop is saved first (one copy of its KV
# cells); shorter ones are cheap to prefill again and would only push longer ones out of the cache.
PROMPT_CACHE_MIN_TOKENS = 256

FinishReason = Literal["stop", "length", "cancelled"]


class PromptTooLong(EdgekitError):
    """The prompt does not leave room for one generated token in the context window."""

    def __init__(self, prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"the prompt has {prompt_tokens} tokens; this model's context window is {n_ctx} tokens",
            hint="shorten the messages or start the daemon with a larger --n-ctx (up to the model's training context)",
        )
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked; temperature 0 is greedy (deterministic)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF every completion must match (edgekit.runtime.structured builds it)
    control_text: bool = False  # keep control tokens' text (tool formats whose markers are control tokens)


@dataclass(frozen=True)
class Delta:
    """New text of the completion; ``tokens`` counts completion tokens so far."""

    text: str
    tokens: int


@dataclass(frozen=True)
class Finish:
    """End of a generation."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    decode_seconds: float = 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class SavedPrompt:
    """A context's KV cells (llama_state_seq_get_data of sequence 0) and the tokens they hold."""

    tokens: list[int]
    buffer: Any
    llama_state_size: int  # the name llama_cpp.LlamaRAMCache sums for its capacity


@dataclass
class StopScanner:
    """Holds back text that could be the start of a stop string, so a stop string is never streamed."""

    stops: Sequence[str]
    pending: str = field(default="")

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was hit (everything from it on is dropped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for stop in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for n in range(min(len(stop) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(stop[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TokenSampler:
    """One generation's sampler: llama.cpp's chain, and a grammar (llama.cpp's grammar sampler) checking its draws.

    As llama.cpp's own common sampler does, the chain draws from the whole vocabulary first and the grammar checks
    that one token; only a token the grammar rejects makes it filter every candidate before the chain draws again.
    Greedy decoding gets the token a grammar-first chain would, for one check per token instead of a grammar pass
    over ~50,000 candidates (which halved decode speed on the sample model)."""

    def __init__(self, chain: Any, grammar: Any, n_vocab: int, greedy: bool = False) -> None:
        import llama_cpp
        import numpy as np

        self._llama_cpp = llama_cpp
        self._as_array = np.ctypeslib.as_array  # greedy reads the logits in place (see ``sample``)
        self.greedy = greedy
        self.chain = chain  # llama_cpp._internals.LlamaSampler; owns its stages
        self.grammar = grammar  # llama_sampler_p or None; owned here
        self.n_vocab = n_vocab
        self._one = llama_cpp.llama_token_data()
        self._one_array = llama_cpp.llama_token_data_array(data=ctypes.pointer(self._one), size=1)
        self._candidates = None  # every token's logit, filled only when the grammar rejects a draw

    def sample(self, ctx: Any, index: int, logits: Any = None) -> int:
        """The next token from the logits of output ``index`` of the last llama_decode (-1: the last output);
        ``logits``: that output's row, when the caller already holds a view of every row (``BatchedGguf`` does)."""
        llama_cpp = self._llama_cpp
        if self.greedy:  # llama_sampler_sample would first copy all ~50,000 logits into candidates: 50 us vs 6 us a token
            if logits is None:
                logits = self._as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
            token = int(logits.argmax())
        else:
            token = llama_cpp.llama_sampler_sample(self.chain.sampler, ctx, index)
        if self.grammar is None:
            return token
        one, array = self._one, self._one_array
        one.id, one.logit, one.p = token, 0.0, 0.0
        array.size, array.selected, array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        if one.logit == float("-inf"):
            token = self._draw_allowed(ctx, index)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        return token

    def _draw_allowed(self, ctx: Any, index: int) -> int:
        """The chain's draw among the tokens the grammar allows (the stages here keep no state between draws, so the
        rejected draw the chain already saw changes nothing but the random state)."""
        import numpy as np

        llama_cpp = self._llama_cpp
        if self._candidates is None:
            self._candidates = np.zeros(self.n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            self._ids = np.arange(self.n_vocab, dtype="<i4")
        candidates = self._candidates
        candidates["id"] = self._ids  # the stages sort and cut the array in place
        candidates["logit"] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p), size=self.n_vocab, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self.chain.sampler, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeBackendError("the grammar allows no token here")
        return int(array.data[array.selected].id)

    def close(self) -> None:
        if self.grammar is not None:
            self._llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
        self.chain.close()


class GgufModel:
    """A loaded GGUF bundle: one llama.cpp context (one generation slot)."""

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int,
        threads: int | None = None,
        chat_template: str | None = None,
        max_prompt_chars: int = 1_000_000,
        prompt_cache_contexts: float = 1.0,
    ) -> None:
        """``prompt_cache_contexts``: RAM for saved prompts, in full contexts' worth of KV cache (0: none)."""
        from edgekit.runtime.placement import bound_openmp_spin

        bound_openmp_spin()
        import llama_cpp

        self._llama_cpp = llama_cpp
        self._ctypes = ctypes
        self._pieces: dict[tuple[int, bool], bytes] = {}
        if threads is None:  # llama-cpp-python's own default is half the logical CPUs: one thread on a 2-core board
            from edgekit.runtime.placement import plan_threads

            threads = plan_threads().threads
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_batch=PREFILL_CHUNK,
                n_ubatch=PREFILL_CHUNK,
                n_threads=threads,
                n_threads_batch=threads,
                # llama-server's default on CPU: prompt evaluation stays fast as the KV pool fills (1,000 tokens: 5 s vs
                # 6-14 s on 2 loaded cores with 0-3,000 cells of other sequences), and no n_kv x n_tokens score matrices.
                flash_attn=FLASH_ATTENTION,
                verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python raises ValueError when llama.cpp returns NULL
            raise RuntimeBackendError(f"{model_path}: llama.cpp could not load the model: {exc}") from exc
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        self.threads: int = llama_cpp.llama_n_threads(self.llm.ctx)  # what llama.cpp runs with
        # llama.cpp pads the context it allocates (to 256); llama-cpp-python's token buffer has the size asked for.
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self.n_ctx_train = self.llm._model.n_ctx_train()
        self.prompt_cache = None
        if prompt_cache_contexts > 0:
            from llama_cpp.llama_cache import LlamaRAMCache  # longest-prefix lookup, LRU eviction by bytes

            self.prompt_cache = LlamaRAMCache(int(prompt_cache_contexts * self.n_ctx * self.kv_bytes_per_token))
        self._vocab = self.llm._model.vocab
        self.add_bos = self.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.bos_text = self._token_text(self.llm.token_bos())
        self.eos_text = self._token_text(self.llm.token_eos())
        source = chat_template or self.metadata.get("tokenizer.chat_template")
        self.template = (
            ChatTemplate(source, bos_token=self.bos_text, eos_token=self.eos_text, max_chars=max_prompt_chars,
                         origin=f"chat template of {Path(model_path).name}")
            if source else None
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes of one token: K and V of every layer, f16 (llama.cpp's default cache type)."""
        llama_cpp, model = self._llama_cpp, self.llm.model
        head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
        return llama_cpp.llama_model_n_layer(model) * 2 * llama_cpp.llama_model_n_head_kv(model) * head_dim * 2

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for (may be part of a UTF-8 character); cached, pieces never change."""
        key = (token, special)
        cached = self._pieces.get(key)
        if cached is None:
            cached = self._pieces[key] = self._token_to_piece(token, special)
        return cached

    def _token_to_piece(self, token: int, special: bool) -> bytes:
        ctypes = self._ctypes
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, special)
            if n >= 0:
                return buffer.raw[:n]
            size = -n  # llama.cpp returns minus the size it needs

    def _token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def check_template(self) -> None:
        """Render a probe conversation once at load: a template that breaks the sandbox unconditionally is refused."""
        from edgekit.errors import BundleError
        from edgekit.runtime.chat_template import ChatTemplateError

        if self.template is None:
            return
        try:
            self.template.render([{"role": "system", "content": "probe"}, {"role": "user", "content": "probe"}])
        except ChatTemplateError as exc:
            if not exc.client_error:  # the sandbox stopped it: the bundle is hostile or broken, not the probe
                raise BundleError(str(exc), hint=exc.hint) from exc

    def render_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text for chat ``messages`` (sandboxed template; ChatTemplateError on failure); ``tools``: the
        template's ``tools`` variable (templates with their own tool format list them)."""
        if self.template is None:
            raise RuntimeBackendError("this model has no chat template; use /v1/completions")
        return self.template.render(messages, add_generation_prompt=True, tools=tools)

    def tokenize(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are parsed (templates emit them as text)."""
        data = text.encode("utf-8")
        add_bos = self.add_bos and not (chat and self.bos_text and text.startswith(self.bos_text))
        return self.llm.tokenize(data, add_bos=add_bos, special=True)

    def prefill(self, prompt: list[int], cancelled: Callable[[], bool] = lambda: False) -> int | None:
        """Decode the prompt, reusing the longest cached prefix (the KV cache or a saved prompt); returns tokens reused.

        None when cancelled part-way. At least one token is always decoded so the logits are fresh.
        """
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens].tolist()
        keep = common_prefix(cached, prompt)
        if self.prompt_cache is not None:
            keep = self._swap_prompt(cached, prompt, keep)
        keep = min(keep, len(prompt) - 1)
        if keep and not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0  # this architecture cannot drop a KV suffix: decode from scratch
        if not keep:
            llm.reset()
        llm.n_tokens = keep
        for start in range(keep, len(prompt), PREFILL_CHUNK):
            if cancelled():
                llm.n_tokens = start  # what is in the cache is valid up to here
                return None
            llm.eval(prompt[start : start + PREFILL_CHUNK])
        return keep

    def _swap_prompt(self, cached: list[int], prompt: list[int], keep: int) -> int:
        """Save the context this prompt would overwrite when it is long; load a saved one that shares more. Returns
        the prefix of ``prompt`` now in the KV cache.

        A context holds one conversation: a request with another system prompt in between would otherwise cost
        the next request of the first conversation its whole prefill (llama-server keeps one per slot and in RAM).
        """
        llama_cpp, llm, cache = self._llama_cpp, self.llm, self.prompt_cache
        try:
            saved = cache[prompt]  # the saved prompt sharing the longest prefix; before saving, which may push it out
        except KeyError:
            saved = None
        if len(cached) - keep >= PROMPT_CACHE_MIN_TOKENS:
            size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
            if size <= cache.capacity_bytes:
                buffer = (self._ctypes.c_uint8 * size)()
                written = llama_cpp.llama_state_seq_get_data(llm.ctx, buffer, size, 0)
                cache[cached] = SavedPrompt(cached, buffer, written)
        if saved is None:
            return keep
        shared = common_prefix(saved.tokens, prompt)
        if shared <= keep + PROMPT_CACHE_MIN_TOKENS // 4:  # not worth a copy of the saved KV
            return keep
        if llama_cpp.llama_state_seq_set_data(llm.ctx, saved.buffer, saved.llama_state_size, 0) == 0:
            llm.reset()
            return 0
        llm.input_ids[: len(saved.tokens)] = saved.tokens
        llm.n_tokens = len(saved.tokens)
        return shared

    def sampler(self, sampling: Sampling) -> TokenSampler:
        """llama.cpp's own sampler chain for ``sampling``: greedy at temperature 0 (drawn as the largest logit where
        llama_decode left it, the token llama.cpp's greedy stage picks), else top-k, top-p, min-p,
        temperature and a seeded draw (llama-cpp-python's chain minus its stages that are no-ops at these settings),
        with the grammar, if any, checking what the chain draws."""
        from llama_cpp._internals import LlamaSampler

        grammar = None
        if sampling.grammar is not None:
            from edgekit.runtime.structured import grammar_sampler

            grammar = grammar_sampler(self._vocab, sampling.grammar)
        chain = LlamaSampler()
        if sampling.temperature == 0:
            chain.add_greedy()
        else:
            chain.add_top_k(DEFAULT_TOP_K)
            chain.add_top_p(sampling.top_p, 1)
            chain.add_min_p(DEFAULT_MIN_P, 1)
            chain.add_temp(sampling.temperature)
            chain.add_dist(RANDOM_SEED if sampling.seed is None else sampling.seed)
        return TokenSampler(chain, grammar, self._llama_cpp.llama_vocab_n_tokens(self._vocab), greedy=sampling.temperature == 0)

    def steps(self, sampling: Sampling) -> Iterator[int]:
        """Tokens sampled after the prefilled prompt, one per step; asking for the next decodes the last one.

        The loop runs in llama.cpp: its sampler chain reads the logits where llama_decode left them (no copy
        to Python), and a token is one llama_decode of a one-token batch whose position llama.cpp assigns.
        Closing the generator keeps the KV cache and ``llm.input_ids`` in step for the next request's prefix.
        """
        llama_cpp, llm = self._llama_cpp, self.llm
        chain = self.sampler(sampling)
        ctx, sample, decode = llm.ctx, chain.sample, llama_cpp.llama_decode
        token_buffer = (llama_cpp.llama_token * 1)()
        batch = llama_cpp.llama_batch_get_one(token_buffer, 1)
        start, decoded = llm.n_tokens, []
        try:
            while True:
                token = sample(ctx, -1)
                yield token
                token_buffer[0] = token
                status = decode(ctx, batch)
                if status != 0:
                    raise RuntimeBackendError(f"llama_decode failed with status {status}")
                decoded.append(token)
        finally:
            llm.input_ids[start : start + len(decoded)] = decoded
            llm.n_tokens = start + len(decoded)
            chain.close()

    def generate(
        self,
        prompt: list[int],
        sampling: Sampling,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[Delta | Finish]:
        """Stream ``Delta``s and end with one ``Finish``. ``cancelled`` is polled between tokens."""
        import time

        if not prompt:
            raise RuntimeBackendError("empty prompt")
        if len(prompt) >= self.n_ctx:
            raise PromptTooLong(len(prompt), self.n_ctx)
        room = self.n_ctx - len(prompt)  # tokens that still fit; reaching it ends with "length"
        limit = min(sampling.max_tokens or room, room)
        cached = self.prefill(prompt, cancelled)
        if cached is None:
            yield Finish("cancelled", len(prompt), 0)
            return
        text = TextStream(self, sampling.stop, limit, sampling.control_text)
        started = time.perf_counter()
        tokens = self.steps(sampling)
        try:
            for token in tokens:
                delta, done = text.feed(token)
                if delta is not None:
                    yield delta
                if done:
                    break
                if cancelled():
                    text.reason = "cancelled"
                    break
        finally:
            tokens.close()
        if (tail := text.tail()) is not None:
            yield tail
        yield Finish(text.reason or "stop", len(prompt), text.produced, cached, time.perf_counter() - started)


class TextStream:
    """A generation's text from its tokens: whole UTF-8 characters, stop strings held back, the token limit."""

    def __init__(self, model: GgufModel, stops: Sequence[str], limit: int, control_text: bool = False) -> None:
        self.model, self.limit, self.control_text = model, limit, control_text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds partial UTF-8 sequences
        self.scanner = StopScanner(stops)
        self.produced = 0
        self.reason: FinishReason | None = None
        self.stop_string = False

    def feed(self, token: int) -> tuple[Delta | None, bool]:
        """The text to send for ``token`` (None: nothing yet) and whether the generation is over."""
        model = self.model
        if model._llama_cpp.llama_vocab_is_eog(model._vocab, token):
            self.reason = "stop"
            return None, True
        self.produced += 1
        text, hit = self.scanner.feed(self.decoder.decode(model.piece(token, special=self.control_text)))
        delta = Delta(text, self.produced) if text else None
        if hit:
            self.reason, self.stop_string = "stop", True
        elif self.produced >= self.limit:
            self.reason = "length"
        return delta, self.reason is not None

    def tail(self) -> Delta | None:
        """Text held back at the end (an incomplete UTF-8 sequence, a partial stop string); None after a stop or cancel."""
        if self.stop_string or self.reason == "cancelled":
            return None
        tail, hit = self.scanner.feed(self.decoder.decode(b"", final=True))
        tail += "" if hit else self.scanner.flush()
        return Delta(tail, self.produced) if tail else None
