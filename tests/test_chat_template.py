"""docs/reliability.md case 2: chat templates from model files render only in a sandbox; escapes fail, the process lives."""

from __future__ import annotations

import pytest
from helpers import SMOLLM

from edgekit.errors import BundleError, RuntimeBackendError
from edgekit.runtime.chat_template import ChatTemplate, ChatTemplateError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ESCAPES = {
    "class mro subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals via cycler": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "attr filter to dunder": "{{ ''|attr('__class__') }}",
    "format string attribute": "{{ '{0.__class__}'.format('') }}",
    "mutating a message list": "{{ messages.append({'role': 'system', 'content': 'owned'}) }}",
    "dict update": "{% set d = {} %}{{ d.update(a=1) }}",
    "func globals of raise_exception": "{{ raise_exception.__globals__ }}",
}


def test_chatml_renders_exactly():
    template = ChatTemplate(CHATML)
    prompt = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀 中文"}])
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 😀 中文<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert template.render([{"role": "user", "content": "x"}], add_generation_prompt=False) == "<|im_start|>user\nx<|im_end|>\n"


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_escape_attempts_fail_in_the_sandbox(case):
    template = ChatTemplate(ESCAPES[case])
    with pytest.raises(ChatTemplateError) as caught:
        template.render([{"role": "user", "content": "hi"}])
    assert "forbids" in str(caught.value) or "unsafe" in str(caught.value)
    assert caught.value.client_error is False
    assert isinstance(caught.value, RuntimeBackendError)
    # The process lives and the same object still renders other requests' errors cleanly.
    with pytest.raises(ChatTemplateError):
        template.render([])


def test_message_content_is_data_not_code():
    prompt = ChatTemplate(CHATML).render([{"role": "user", "content": "{{ ''.__class__.__mro__ }}{% for x in range(9) %}"}])
    assert "{{ ''.__class__.__mro__ }}{% for x in range(9) %}" in prompt
    assert "<class" not in prompt


def test_runaway_output_is_cut_off():
    template = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}0123456789{% endfor %}{% endfor %}",
                            max_chars=10_000)
    with pytest.raises(ChatTemplateError, match="exceeds 10000 characters") as caught:
        template.render([])
    assert caught.value.client_error is True


def test_template_refusals_are_client_errors():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok")
    assert template.render([{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="refused the messages: Conversation must start with user") as caught:
        template.render([{"role": "assistant", "content": "a"}])
    assert caught.value.client_error is True
    with pytest.raises(ChatTemplateError, match="IndexError|UndefinedError") as caught:
        template.render([])
    assert caught.value.client_error is True


def test_template_that_does_not_compile_is_a_bundle_error():
    with pytest.raises(BundleError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m }", origin="model.gguf chat template")


def test_tojson_and_helpers_match_transformers_conventions():
    template = ChatTemplate("{{ messages[0] | tojson }}|{{ bos_token }}|{{ eos_token }}|{% generation %}g{% endgeneration %}",
                            bos_token="<s>", eos_token="</s>")
    assert template.render([{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"}|<s>|</s>|g'


@pytest.mark.slow
def test_smollm2_template_matches_transformers(sample_store):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sample_store / SMOLLM)
    template = ChatTemplate(tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "emoji 😀 and 中文"}],
    ]
    for messages in conversations:
        for generation in (True, False):
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            assert template.render(messages, add_generation_prompt=generation) == expected
