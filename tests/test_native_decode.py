"""The runtime's decode loop runs in llama.cpp (its sampler chain, one-token batches) and picks the tokens
llama-cpp-python's own generate() picks; the KV cache it leaves serves the next request's common prefix."""

from __future__ import annotations

import pytest

from edgekit.runtime.llm import DEFAULT_MIN_P, DEFAULT_TOP_K, Delta, Finish, GgufModel, Sampling

N = 24


@pytest.fixture(scope="module")
def model(sample_store) -> GgufModel:
    from serve_fixtures import smollm_gguf

    return GgufModel(smollm_gguf(sample_store), n_ctx=512, threads=1)


def prompt_of(model: GgufModel, text: str) -> list[int]:
    return model.tokenize(model.render_chat([{"role": "user", "content": text}]), chat=True)


def reference_ids(model: GgufModel, prompt: list[int], sampling: Sampling) -> list[int]:
    """llama-cpp-python's Llama.generate with the settings the daemon used before its own loop, from an empty cache."""
    llm = model.llm
    llm.reset()
    llm.set_seed(sampling.seed)
    ids = []
    for token in llm.generate(prompt, top_k=DEFAULT_TOP_K, top_p=sampling.top_p, min_p=DEFAULT_MIN_P,
                              temp=sampling.temperature, repeat_penalty=1.0):
        ids.append(token)
        if len(ids) == N:
            break
    llm.reset()
    return ids


@pytest.mark.parametrize("sampling", [Sampling(temperature=0.0, seed=0), Sampling(temperature=0.8, top_p=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_native_loop_picks_llama_cpp_pythons_tokens(model, sampling):
    prompt = prompt_of(model, "Tell me a story about a cat who learns to sail.")
    model.llm.reset()
    model.prefill(prompt)
    steps = model.steps(sampling)
    ours = [next(steps) for _ in range(N)]
    steps.close()
    assert ours == reference_ids(model, prompt, sampling)


def test_cache_after_a_generation_serves_the_next_prompts_prefix(model):
    """After a request the cache holds its prompt and every decoded token: a follow-up turn re-decodes only the new part."""
    first = prompt_of(model, "Name three colours.")
    events = list(model.generate(first, Sampling(max_tokens=8, temperature=0)))
    assert events[-1] == Finish("length", len(first), 8, events[-1].cached_tokens, events[-1].decode_seconds)
    assert model.llm.n_tokens == len(first) + 7  # the 8th token was sampled, never decoded
    completion = [int(t) for t in model.llm.input_ids[len(first): len(first) + 7]]
    follow_up = first + completion + model.tokenize("\nAnd three more.")
    finish = list(model.generate(follow_up, Sampling(max_tokens=2, temperature=0)))[-1]
    assert finish.cached_tokens == len(first) + 7


def test_cancel_and_limits_end_the_native_loop(model):
    prompt = prompt_of(model, "Tell me a long story about a lighthouse keeper.")
    deltas: list[Delta] = []
    finish = None
    for event in model.generate(prompt, Sampling(max_tokens=50, temperature=0), lambda: len(deltas) >= 3):
        if isinstance(event, Delta):
            deltas.append(event)
        else:
            finish = event
    assert finish.reason == "cancelled" and finish.completion_tokens == deltas[-1].tokens  # polled after every token
    assert len(deltas) == 3
    events = list(model.generate(prompt, Sampling(max_tokens=5, temperature=0)))
    assert (events[-1].reason, events[-1].completion_tokens) == ("length", 5)


def test_a_saved_prompt_survives_a_request_with_another_system_prompt(model, sample_store):
    """One context holds one conversation; the prompt another system prompt overwrites is saved in RAM first and
    loaded back for the next request that shares it: only the new turn is decoded, and the text is unchanged."""
    from serve_fixtures import smollm_gguf

    from edgekit.runtime.llm import PROMPT_CACHE_MIN_TOKENS

    story = ("The ferry to the island ran only twice a day, and Mira missed the morning one by less than a minute. " * 12)
    other = "A lighthouse keeper counts the ships that pass his rock every night."  # overwrites the story all the same

    def prompt(system: str, user: str) -> list[int]:
        return model.tokenize(model.render_chat([{"role": "system", "content": system}, {"role": "user", "content": user}]),
                              chat=True)

    first, between, again = prompt(story, "Who is Mira?"), prompt(other, "Who is Mira?"), prompt(story, "Where is the ferry?")
    assert len(first) > PROMPT_CACHE_MIN_TOKENS
    for p in (first, between):
        list(model.generate(p, Sampling(max_tokens=4, temperature=0)))
    events = list(model.generate(again, Sampling(max_tokens=6, temperature=0)))
    shared = next(i for i, (a, b) in enumerate(zip(first, again)) if a != b)
    assert events[-1].cached_tokens == shared
    # The same history without the saved-prompt cache: ``again`` reuses ``first``'s cells in place, so its prefix comes
    # from the same micro-batch as the restored one (a prefix decoded in another split may differ in the last bits and
    # flip a near tie of the greedy draw).
    plain = GgufModel(smollm_gguf(sample_store), n_ctx=512, threads=1, prompt_cache_contexts=0)
    list(plain.generate(first, Sampling(max_tokens=4, temperature=0)))
    reference = list(plain.generate(again, Sampling(max_tokens=6, temperature=0)))
    assert reference[-1].cached_tokens == shared
    assert [e.text for e in events if isinstance(e, Delta)] == [e.text for e in reference if isinstance(e, Delta)]
    assert plain.prompt_cache is None


def test_a_grammar_checking_draws_picks_the_tokens_of_a_grammar_first_chain(model, monkeypatch):
    """The grammar checks the token the chain drew and filters the vocabulary only when it rejects it: greedy decoding
    picks the ids a chain with the grammar as its first stage picks, and the rejected draws did happen."""
    import llama_cpp
    from llama_cpp._internals import LlamaSampler

    from edgekit.runtime.llm import TokenSampler
    from edgekit.runtime.structured import grammar_sampler, schema_grammar

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "hobbies": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "age", "hobbies"]}
    sampling = Sampling(temperature=0.0, grammar=schema_grammar(schema))
    prompt = prompt_of(model, "Give me a JSON record for Alice, 30 years old, with her hobbies.")

    def decode(steps) -> list[int]:
        model.llm.reset()
        model.prefill(prompt)
        tokens = model.steps(sampling)
        ids = [next(tokens) for _ in range(steps)]
        tokens.close()
        return ids

    redraws = []
    draw_allowed = TokenSampler._draw_allowed
    monkeypatch.setattr(TokenSampler, "_draw_allowed", lambda self, ctx, index: redraws.append(index) or draw_allowed(self, ctx, index))
    checked = decode(40)

    def grammar_first(sampling: Sampling) -> TokenSampler:
        chain = LlamaSampler()
        llama_cpp.llama_sampler_chain_add(chain.sampler, grammar_sampler(model._vocab, sampling.grammar))
        chain.add_greedy()
        return TokenSampler(chain, None, llama_cpp.llama_vocab_n_tokens(model._vocab))

    monkeypatch.setattr(model, "sampler", grammar_first)
    assert checked == decode(40)
    assert len(redraws) >= 1
    assert model.llm.detokenize(checked).decode().startswith('{ "name": "')


def test_control_tokens_keep_their_text_only_when_asked(model):
    """Tool requests keep the text of control tokens (the markers of Mistral's tool formats are control tokens); other
    requests never show it. SmolLM2's <|im_start|> is such a token."""
    from edgekit.runtime.llm import TextStream

    (start,) = model.tokenize("<|im_start|>", chat=True)
    (word,) = model.tokenize("hello")
    kept, dropped = TextStream(model, (), 8, control_text=True), TextStream(model, (), 8)
    assert [kept.feed(t)[0] for t in (start, word)] == [Delta("<|im_start|>", 1), Delta("hello", 2)]
    assert [dropped.feed(t)[0] for t in (start, word)] == [None, Delta("hello", 2)]
