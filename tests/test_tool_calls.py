"""Tool calls: tools + tool_choice answered as OpenAI tool_calls, in llama.cpp's generic format under a grammar, one call
or several in an answer (parallel_tool_calls).

SmolLM2's chat template has no tool syntax, so the generic format is what the sample model runs. Unit tests pin
the request checks (docs/reliability.md cases 39 and 40) and how calls and results are rendered back into the
prompt; real-model tests run both decode paths in-process (the official ``openai`` client's tool loop in this format
runs against the daemon as a real process in test_tool_formats.py, whose daemon serves both formats). Every call's
arguments are validated with ``jsonschema``.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient
from serve_fixtures import Q4KM

from edgekit.runtime.structured import parse_answer, tool_plan, tools_of
from edgekit.runtime.tool_formats import ParsedCall
from edgekit.serve.errors import ApiError
from edgekit.serve.schemas import ChatBody

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}}, "required": ["timezone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone", "parameters": TIME}},
]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "Call get_weather for Paris in celsius."}]
# What makes the 135M sample model choose a call under tool_choice auto (with ASK it answers in text).
AUTO_ASK = [{"role": "user", "content": "Use a tool: get_weather(city='Paris', unit='celsius')"}]


def body(**fields) -> ChatBody:
    return ChatBody.model_validate({"model": "m", "messages": ASK, "tools": TOOLS, **fields})


# ---- request checks (no model) -------------------------------------------------------------------------------


BAD = {
    "parameters-not-an-object-schema": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
                                        "tools[0].function.parameters"),
    "parameters-a-list": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "items": {}}}}]},
                          "tools[0].function.parameters"),
    "parameters-unenforceable": ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}]}, "tools[1].function.parameters"),
    "choice-names-a-missing-function": ({"tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
                                        "tool_choice.function.name"),
    "required-without-tools": ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    "duplicate-names": ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    "tools-and-json-schema": ({"response_format": {"type": "json_object"}}, "response_format"),
}


@pytest.mark.parametrize("fields,param", BAD.values(), ids=BAD.keys())
def test_bad_tool_requests_are_400_naming_the_param(fields, param):
    """docs/reliability.md cases 39 and 40."""
    with pytest.raises(ApiError) as caught:
        body(**fields).structured()
    assert caught.value.status == 400
    assert caught.value.param == param


def test_tool_choice_none_and_no_tools_build_no_grammar():
    assert body(tool_choice="none").structured().grammar is None
    assert ChatBody.model_validate({"model": "m", "messages": ASK}).structured().grammar is None
    plan = body().structured()  # tools without tool_choice: auto
    assert plan.tools and "`response`" in plan.system and "get_time" in plan.system


def test_calls_and_results_render_back_into_the_prompt():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    chat = body(messages=messages)
    turns = chat.template_messages(chat.structured())
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "tool"]
    assert json.loads(turns[2]["content"]) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
    assert json.loads(turns[3]["content"]) == {"tool_response": {"content": "18 degrees", "tool_call_id": "call_1"}}


def test_answers_parse_into_calls_or_text_and_a_cut_answer_is_neither():
    assert parse_answer('{"tool_call": {"name": "f", "arguments": {"a": 1}}}').calls == (ParsedCall("f", '{"a": 1}'),)
    two = '{"tool_calls": [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]}'
    assert parse_answer(two).calls == (ParsedCall("f", '{"a": 1}'), ParsedCall("g", "{}"))
    assert parse_answer('{"response": "hi"}').content == "hi"
    assert parse_answer('{"tool_call": {"name": "f", "argu') is None
    assert parse_answer(two[:-2]) is None


def test_each_choice_has_its_grammar():
    tools = tools_of([t["function"] for t in TOOLS])
    auto, required, named = (tool_plan(tools, c).grammar for c in ("auto", "required", "get_time"))
    assert '"\\"response\\""' in auto and '"\\"response\\""' not in required
    assert '"\\"get_weather\\""' in required and '"\\"get_weather\\""' not in named


# ---- real model ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 2], ids=["one-context-per-slot", "batched-slots"])
def client(request, q4km_clients):
    """The exported sample bundle without its golden record, in-process (serve_fixtures.q4km_clients, shared with
    test_structured_output.py)."""
    return q4km_clients(request.param)


def post(client: TestClient, **fields):
    return client.post("/v1/chat/completions", json={"model": Q4KM, "messages": ASK, "tools": TOOLS, "temperature": 0,
                                                      "max_tokens": 120, **fields})


def assert_valid_call(call: dict, name: str | None = None) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    function = call["function"]
    assert function["name"] in PARAMETERS and (name is None or function["name"] == name)
    jsonschema.validate(json.loads(function["arguments"]), PARAMETERS[function["name"]])


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["auto", "required", "named"])
def test_the_call_comes_back_as_tool_calls(client, choice):
    response = post(client, tool_choice=choice, messages=AUTO_ASK if choice == "auto" else ASK, parallel_tool_calls=False)
    assert response.status_code == 200, response.text
    choice_out = response.json()["choices"][0]
    assert choice_out["finish_reason"] == "tool_calls"
    message = choice_out["message"]
    assert message["content"] is None and len(message["tool_calls"]) == 1
    assert_valid_call(message["tool_calls"][0], choice["function"]["name"] if isinstance(choice, dict) else None)


@pytest.mark.slow
@pytest.mark.real_model
def test_parallel_calls_come_back_as_separate_tool_calls_and_stream_in_fragments(client):
    """Bad tool requests first (docs/reliability.md cases 39 and 40): each a 400 with its param, and the daemon serves
    the next request. parallel_tool_calls is on by default: asked for the weather, the sample model also calls get_time
    in the same answer (the generic format's tool_calls list); each call is its own entry with its own id. Streamed,
    per call, in order: the name first (with index, id, type), then the arguments in fragments adding up to the
    non-streamed ones; the index goes 0, 1, ... call by call. (One answer serves all three checks: at temperature 0
    the same request gets the same answer.)"""
    for fields, param in BAD.values():
        response = post(client, **fields)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    good = post(client, tool_choice="required")
    assert good.status_code == 200
    whole = good.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in whole] == ["get_weather", "get_time"]
    assert len({c["id"] for c in whole}) == len(whole)
    for call in whole:
        assert_valid_call(call)
    assert client.get("/health").json()["status"] == "ok"

    response = post(client, tool_choice="required", stream=True)
    events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    heads = [c for c in calls if "id" in c]
    assert [c["index"] for c in heads] == list(range(len(whole))) and len(whole) == 2
    assert len({c["id"] for c in heads}) == len(heads)
    indexes = [c["index"] for c in calls]
    assert indexes == sorted(indexes)  # a call's fragments all come before the next call's head
    for head, expected in zip(heads, whole, strict=True):
        assert head == {"index": head["index"], "id": head["id"], "type": "function",
                        "function": {"name": expected["function"]["name"], "arguments": ""}}
        fragments = [c for c in calls if c["index"] == head["index"] and c is not head]
        assert len(fragments) > 1 and all(c == {"index": head["index"], "function": {"arguments": c["function"]["arguments"]}}
                                          for c in fragments)
        arguments = "".join(c["function"]["arguments"] for c in fragments)
        assert arguments == expected["function"]["arguments"]  # byte for byte, temperature 0
        assert_valid_call({**head, "function": {"name": head["function"]["name"], "arguments": arguments}})
    assert not any(d.get("content") for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.slow
@pytest.mark.real_model
def test_tool_choice_none_answers_in_text(client):
    message = post(client, tool_choice="none", max_tokens=16).json()["choices"][0]["message"]
    assert message["content"] and "tool_calls" not in message
