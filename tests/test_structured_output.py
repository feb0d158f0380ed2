"""Structured output: response_format json_object / json_schema enforced by llama.cpp grammars, failing closed.

Unit tests pin the schema checks (every keyword the grammar converter would ignore is refused by name; hostile
schemas are bounded: docs/reliability.md cases 37 and 38). Real-model tests run the packaged SmolLM2 Q4_K_M bundle in
both decode paths (one llama.cpp context per slot, and the batched context of ``--slots 2``), validate every
response with the ``jsonschema`` library, streamed or not, greedy or sampled, and drive the official ``openai``
client's ``chat.completions.parse`` with pydantic models against the daemon as a real process.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field
from serve_fixtures import Q4KM

from edgekit.runtime.structured import (
    MAX_OPTIONAL_PROPERTIES,
    MAX_REPEAT,
    MAX_SCHEMA_DEPTH,
    SUPPORTED,
    UnsupportedSchema,
    schema_grammar,
)

PERSON = [{"role": "user", "content": "Give me a JSON record for Alice, 30 years old, from Paris."}]

# ---- the keyword table: refused by name, never ignored (docs/reliability.md case 37) ----------------------------

REFUSED = [
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "number", "multipleOf": 2}, "multipleOf"),
    ({"type": "string", "pattern": "^a+$"}, "pattern"),
    ({"type": "string", "format": "email"}, "format"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
    ({"allOf": [{"type": "object"}]}, "allOf"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "string", "nullable": True}, "nullable"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": MAX_REPEAT + 1}, "maxItems"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True}, "additionalProperties"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 1}, "minProperties"),
    ({"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a", "maxLength": 3}, "maxLength"),
    ({"type": "string", "enum": ["a", 1]}, "enum"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"$ref": "#/$defs/missing"}, "$ref"),
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_OPTIONAL_PROPERTIES + 1)}}, "properties"),
]


@pytest.mark.parametrize(("schema", "keyword"), REFUSED, ids=[k for _, k in REFUSED])
def test_a_keyword_the_grammar_does_not_enforce_is_refused_by_name(schema, keyword):
    with pytest.raises(UnsupportedSchema) as caught:
        schema_grammar(schema)
    assert caught.value.keyword == keyword
    assert keyword in str(caught.value)


LOOPS = {
    "self": {"$ref": "#"},
    "two-defs": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "through-anyOf": {"$defs": {"a": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},
    "through-a-property": {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]},
}


@pytest.mark.parametrize("schema", LOOPS.values(), ids=LOOPS.keys())
def test_a_ref_loop_is_refused(schema):
    """docs/reliability.md case 37."""
    with pytest.raises(UnsupportedSchema) as caught:
        schema_grammar(schema)
    assert caught.value.keyword == "$ref"
    assert "loop" in caught.value.message


def keywords_schema(count: int) -> dict:
    return {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(count // 2)}}


def test_hostile_sizes_are_refused_before_conversion():
    """docs/reliability.md case 38."""
    with pytest.raises(UnsupportedSchema, match="more than 4096 keywords"):
        schema_grammar(keywords_schema(20_000))
    deep: dict = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        deep = {"type": "array", "items": deep}
    with pytest.raises(UnsupportedSchema, match="nested more than"):
        schema_grammar(deep)


def test_supported_keywords_are_the_table():
    assert set(SUPPORTED) == {"type", "properties", "required", "additionalProperties", "items", "prefixItems",
                              "minItems", "maxItems", "minLength", "maxLength", "format", "enum", "const", "anyOf", "$ref"}


def test_a_ref_gets_its_own_rule_even_when_a_property_has_its_name():
    # Upstream reuses any rule named after the pointer's last segment: here the string property "Item".
    grammar = schema_grammar({"$defs": {"Item": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}},
                              "type": "object", "properties": {"Item": {"type": "string", "maxLength": 3},
                                                               "list": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
                              "required": ["Item", "list"]})
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    assert rules["doc-list-item"] == "ref0-def"
    assert rules["ref0-def"] == "ref0-def-body"
    assert '"\\"x\\""' in rules["ref0-def-body-x-kv"]


def test_a_property_named_like_nothing_stays_a_property():
    rules = dict(line.split(" ::= ", 1) for line in schema_grammar(
        {"type": "object", "properties": {"": {"type": "integer"}}, "required": [""]}).splitlines())
    assert rules["root"] == "doc"
    assert rules["doc"].startswith('"{" space')


def test_string_characters_exclude_raw_control_characters():
    rules = dict(line.split(" ::= ", 1) for line in schema_grammar({"type": "string"}).splitlines())
    assert rules["char"].startswith(r'[^"\\\x7F\x00-\x1F]')


# ---- real model: every response validates -----------------------------------------------------------------------


class Capital(BaseModel):
    city: str = Field(max_length=40)
    country: str = Field(max_length=40)
    is_capital: bool
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]


class Trip(BaseModel):
    traveller: str = Field(max_length=30)
    stops: list[Capital] = Field(min_length=1, max_length=3)
    note: str | None = Field(max_length=40)


PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}, "city": {"enum": ["Paris", "Lyon", "Nice"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    "path": {"const": "C:\\temp\\\"x\""}}, "required": ["name", "age", "city", "tags", "path"]}
SCHEMAS = {
    "person": PERSON_SCHEMA,
    "trip-with-defs": Trip.model_json_schema(),
    "ref-named-like-a-property": {
        "$defs": {"Item": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}},
        "type": "object", "properties": {"Item": {"type": "string", "maxLength": 8},
                                         "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 2}},
        "required": ["Item", "items"]},
    "tuple-and-union": {"type": "array", "prefixItems": [
        {"type": "integer"}, {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]}]},
}


def json_schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def sse_text(response) -> tuple[str, str | None]:
    """Content and finish reason of a streamed chat completion."""
    text, reason = [], None
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[len("data: "):])
            for choice in event["choices"]:
                text.append(choice["delta"].get("content") or "")
                reason = choice["finish_reason"] or reason
    return "".join(text), reason


@pytest.fixture(scope="module", params=[1, 2], ids=["one-context-per-slot", "batched-slots"])
def client(request, q4km_clients):
    """The exported sample bundle without its golden record, in-process (serve_fixtures.q4km_clients, shared with
    test_tool_calls.py)."""
    return q4km_clients(request.param)


def chat(client: TestClient, response_format: dict, **body):
    return client.post("/v1/chat/completions", json={"model": Q4KM, "messages": PERSON, "temperature": 0, "max_tokens": 200,
                                                      "response_format": response_format, **body})


def assert_validates(response, name: str, stream: bool) -> None:
    """A 200 that ends with "stop" and whose text validates against SCHEMAS[name]."""
    assert response.status_code == 200, response.text
    if stream:
        text, reason = sse_text(response)
    else:
        choice = response.json()["choices"][0]
        text, reason = choice["message"]["content"], choice["finish_reason"]
    assert reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS[name])
    if name == "person":
        assert json.loads(text)["path"] == "C:\\temp\\\"x\""


# Every schema whole and streamed; the person schema's whole answer is the one the bad-schemas test gets after its 400s.
WHOLE_AND_STREAMED = [(name, stream) for name in SCHEMAS for stream in (False, True) if (name, stream) != ("person", False)]


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize(("name", "stream"), WHOLE_AND_STREAMED,
                         ids=[f"{'streamed' if stream else 'whole'}-{name}" for name, stream in WHOLE_AND_STREAMED])
def test_every_response_validates_against_its_schema(client, name, stream):
    assert_validates(chat(client, json_schema_format(SCHEMAS[name]), stream=stream), name, stream)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("seed", range(4))
def test_sampled_responses_validate_too(client, seed):
    response = chat(client, json_schema_format(PERSON_SCHEMA), temperature=1.0, seed=seed)
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON_SCHEMA)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_object_mode_gives_an_object(client, stream):
    response = chat(client, {"type": "json_object"}, stream=stream)
    text = sse_text(response)[0] if stream else response.json()["choices"][0]["message"]["content"]
    assert isinstance(json.loads(text), dict)


@pytest.mark.slow
@pytest.mark.real_model
def test_bad_schemas_are_400_naming_the_param_and_the_daemon_serves_on(client):
    """docs/reliability.md cases 37 and 38; the good request after them is test_every_response_validates_against_its_schema's
    whole person answer."""
    cases = {
        "$ref": LOOPS["two-defs"],
        "minimum": {"type": "integer", "minimum": 1},
        "keywords": keywords_schema(20_000),
    }
    for keyword, schema in cases.items():
        response = chat(client, json_schema_format(schema))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "response_format.json_schema.schema"
        assert error["code"] == "unsupported_schema"
        assert keyword in error["message"]
    missing = chat(client, {"type": "json_schema", "json_schema": {"name": "x"}})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "response_format.json_schema.schema"
    unknown = chat(client, {"type": "yaml"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"].startswith("response_format")
    assert_validates(chat(client, json_schema_format(PERSON_SCHEMA)), "person", stream=False)  # the whole person answer
    assert client.get("/health").json()["status"] == "ok"


# ---- the official openai client against the daemon as a process ----------------------------------------------


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("model", [Capital, Trip], ids=["flat", "nested-with-defs"])
def test_openai_client_parse_with_a_pydantic_model(smollm2_daemon, model):
    """The daemon process serving the sample bundle as exported (serve_fixtures.smollm2_daemon, shared with
    test_tool_formats.py's tool loops)."""
    import openai

    daemon = smollm2_daemon
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "Paris is the capital of France. Describe it as JSON."}]
    completion = client.chat.completions.parse(model=Q4KM, messages=messages, response_format=model, temperature=0,
                                               max_tokens=300)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, model)
    jsonschema.validate(json.loads(message.content), model.model_json_schema())
    health = httpx.get(f"{daemon.url}/health", timeout=10).json()
    assert health["status"] == "ok"
