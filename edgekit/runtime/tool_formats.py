"""Tool-call formats: how a chat template asks a model to call a tool, and how the daemon reads the call back.

One row per format (``FORMATS``), tried in order against the bundle's chat template text; the first whose markers
all appear is used, and the generic format (llama.cpp's, for templates without tool syntax) is the fallback. A row
says how to detect it, whether the template renders the tools (its ``tools`` variable) and the calls and results
itself (``native``), the GBNF wrapper around the call object the schema machinery of ``structured`` builds, and
how a generation is read back: ``CallReader`` takes the text as it is generated and gives the call's name as soon
as it is complete, then the arguments' raw JSON text fragment by fragment; a non-streamed answer is the same
reader fed the whole text, so streamed and non-streamed arguments are the same bytes.

Fail closed: under a grammar a call can only be written in the format, and a text answer (tool_choice auto) can
never hold the start of a call, so a call is always read as a call, never passed on as text.

Formats, with their source:
- ``generic``: llama.cpp ``common/chat.cpp`` ``common_chat_params_init_generic``: ``{"tool_call": {"name", "arguments"}}``
  or ``{"response": "..."}``; the tools are described in a system message.
- ``hermes``: NousResearch Hermes 2 Pro / 3 and Qwen2.5 / Qwen3 templates (``<tool_call>\\n{"name": ..., "arguments":
  ...}\\n</tool_call>``), llama.cpp's ``common_chat_params_init_hermes_2_pro``.
- ``llama3``: Llama 3.1 / 3.2 / 3.3 templates (bare ``{"name": ..., "parameters": ...}``), llama.cpp's
  ``common_chat_params_init_llama_3_x``; results go back in ``tool`` turns (the template renders them as ipython).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_SPACE = r"\s*"


def _literal(text: str) -> str:
    """A GBNF string literal (GBNF reads JSON's escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _char_class(chars: str) -> str:
    return "".join("\\" + c if c in "]^-\\" else c for c in chars)


def text_without(word: str) -> str:
    """GBNF of any text that never contains ``word`` (whose first character does not recur in it) nor ends on a start
    of it: a text answer that cannot open a call. Each step is a character other than the first, or a proper prefix
    of ``word`` followed by a character that leaves it."""
    first = word[0]
    if first in word[1:]:
        raise ValueError(f"{word!r}: its first character recurs")
    steps = [f"[^{_char_class(first)}]"]
    steps += [f"{_literal(word[:i])} [^{_char_class(first + word[i])}]" for i in range(1, len(word))]
    return f"({' | '.join(steps)})*"


def holds_or_ends_on(word: str) -> str:
    """Regex of a text holding ``word`` or ending on a start of it: under ``text_without`` a call, not a text answer."""
    tail = ""
    for char in reversed(word[1:]):
        tail = f"(?:{re.escape(char)}{tail})?"
    return f"{re.escape(word)}|{re.escape(word[0])}{tail}$"


@dataclass(frozen=True)
class ToolFormat:
    """One way of writing a tool call. ``opening``/``closing``: regexes of what surrounds the call object
    ``{"name": ..., <arguments_key>: ...}`` in the model's answer; ``before``/``after``: the literal text the grammar
    puts there; ``text_rule``: GBNF of a text answer under tool_choice auto (None: the format's own envelope)."""

    name: str
    markers: tuple[str, ...]  # all present in the template text: the template uses this format
    native: bool  # the template renders tools and tool calls/results itself
    arguments_key: str = "arguments"
    envelope: bool = False  # the call sits in a JSON object that also offers a text answer (the generic format)
    opening: str = ""
    closing: str = ""
    before: str = ""
    after: str = ""
    text_rule: str | None = None
    not_text: str = ""  # regex found in a text that is a call cut short, not a text answer

    def detect(self, template: str | None) -> bool:
        return bool(template) and all(m in template for m in self.markers)

    def call_schema(self, name: str, parameters: dict) -> dict:
        """The call object of one tool; the schema machinery turns it into grammar."""
        return {"type": "object", "properties": {"name": {"const": name}, self.arguments_key: parameters},
                "required": ["name", self.arguments_key]}

    def root_schema(self, calls: Sequence[dict], may_answer: bool) -> dict:
        """What the grammar's JSON part enforces: one call object (or, generic, its envelope with the text answer)."""
        call = calls[0] if len(calls) == 1 else {"anyOf": list(calls)}
        if not self.envelope:
            return call
        options = [{"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]}]
        if may_answer:
            options.append({"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]})
        return options[0] if len(options) == 1 else {"anyOf": options}

    def root_rule(self, json_rule: str, may_answer: bool) -> tuple[str, dict[str, str]]:
        """The grammar's root around ``json_rule`` and the extra rules it needs."""
        call = " ".join(p for p in (_literal(self.before) if self.before else "", json_rule,
                                    _literal(self.after) if self.after else "") if p)
        if not may_answer or self.text_rule is None:
            return call, {}
        return f"{call} | text-answer", {"text-answer": self.text_rule}


GENERIC = ToolFormat("generic", (), native=False, envelope=True, opening=r'\s*\{\s*"tool_call"\s*:\s*', closing=r"\s*\}\s*")

FORMATS: tuple[ToolFormat, ...] = (
    ToolFormat("hermes", ("<tool_call>", '{"name": '), native=True,  # hermes, qwen2.5, qwen3
               opening=r"<tool_call>\n", closing=r"\n</tool_call>", before="<tool_call>\n", after="\n</tool_call>",
               text_rule=text_without("<tool_call>"), not_text=holds_or_ends_on("<tool_call>")),
    ToolFormat("llama3", ("<|start_header_id|>", "ipython", '"parameters": '), native=True,  # llama3.1, 3.2, 3.3
               arguments_key="parameters", text_rule="[^{ \\t\\n\\r] [^\\x00]*", not_text=r"^\{"),
)

BY_NAME: dict[str, ToolFormat] = {f.name: f for f in (GENERIC, *FORMATS)}


def detect(template: str | None) -> ToolFormat:
    """The tool format of a chat template: the first row whose markers it holds, else the generic format."""
    return next((f for f in FORMATS if f.detect(template)), GENERIC)


# ---- reading a generation back -------------------------------------------------------------------------------------


@dataclass
class CallReader:
    """Reads a generation in ``fmt`` as it arrives. ``feed`` returns what became known: the call's name (once) and then
    fragments of the arguments' raw JSON text; ``answer`` reads the whole text at the end."""

    fmt: ToolFormat
    text: str = ""
    name: str | None = None
    arguments_start: int | None = None
    arguments_end: int | None = None
    sent: int = 0  # characters of the arguments given out so far
    _head: re.Pattern = field(init=False, repr=False)
    _name: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        name = self.fmt.opening + r'\{\s*"name"\s*:\s*"(?P<name>[A-Za-z0-9_-]*)"'  # tool names: schemas.FUNCTION_NAME
        self._name = re.compile(name)
        self._head = re.compile(name + rf'\s*,\s*"{re.escape(self.fmt.arguments_key)}"\s*:\s*(?=\{{)')

    def feed(self, piece: str) -> tuple[str | None, str]:
        """(the name if it just became complete, new arguments text)."""
        self.text += piece
        new_name = None
        if self.name is None:
            found = self._name.match(self.text)
            if found is None:
                return None, ""
            self.name = new_name = found["name"]
        if self.arguments_start is None:
            head = self._head.match(self.text)
            if head is None:
                return new_name, ""
            self.arguments_start = self.sent = head.end()
        if self.arguments_end is None:
            try:  # complete once the arguments value decodes; until then every character so far is part of it
                _, end = json.JSONDecoder().raw_decode(self.text, self.arguments_start)
                self.arguments_end = end
            except ValueError:
                pass
        end = self.arguments_end if self.arguments_end is not None else len(self.text)
        fragment, self.sent = self.text[self.sent:end], max(self.sent, end)
        return new_name, fragment

    @property
    def arguments(self) -> str | None:
        if self.arguments_start is None or self.arguments_end is None:
            return None
        return self.text[self.arguments_start:self.arguments_end]

    def answer(self) -> ParsedAnswer | None:
        """The whole generation: a call, a text answer, or None when it is neither (cut short)."""
        arguments = self.arguments
        if arguments is not None:
            rest = self.text[self.arguments_end:]
            if re.fullmatch(r"\s*\}\s*" + self.fmt.closing + r"\s*", rest) and isinstance(json.loads(arguments), dict):
                return ParsedAnswer(name=self.name, arguments=arguments)
            return None
        if self.name is not None:
            return None  # a call that was cut short
        if self.fmt.envelope:  # the text answer is the envelope's response
            try:
                data = json.loads(self.text)
            except ValueError:
                return None
            if isinstance(data, dict) and set(data) == {"response"} and isinstance(data["response"], str):
                return ParsedAnswer(content=data["response"])
            return None
        if re.search(self.fmt.not_text, self.text):
            return None  # the start of a call, cut short
        return ParsedAnswer(content=self.text)


@dataclass(frozen=True)
class ParsedAnswer:
    """What a tool-mode generation said: a call (name + arguments as JSON text) or a text answer."""

    name: str | None = None
    arguments: str | None = None
    content: str | None = None


def read_answer(fmt: ToolFormat, text: str) -> ParsedAnswer | None:
    reader = CallReader(fmt)
    reader.feed(text)
    return reader.answer()


# ---- what the template renders ------------------------------------------------------------------------------------


def template_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The ``tools`` variable of a chat template: OpenAI's tool objects, as transformers' apply_chat_template passes them."""
    return [{"type": "function", "function": {"name": t["name"], **({"description": t["description"]} if t.get("description") else {}),
                                              "parameters": t["parameters"]}} for t in tools]


def template_call(call_id: str, name: str, arguments: str) -> dict:
    """An earlier call as templates read it: arguments as an object (templates ``tojson`` them), not as JSON text."""
    try:
        parsed: Any = json.loads(arguments)
    except ValueError:
        parsed = arguments
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}
