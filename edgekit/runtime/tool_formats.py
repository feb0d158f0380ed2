"""Tool-call formats: how a chat template asks a model to call tools, and how the daemon reads the calls back.

One row per format (``FORMATS``), tried in order against the bundle's chat template text; the first whose markers
all appear is used, and the generic format (llama.cpp's, for templates without tool syntax) is the fallback. A row
says how to detect it, whether the template renders the tools (its ``tools`` variable) and the calls and results
itself (``native``), the GBNF around the call objects the schema machinery of ``structured`` builds, and how a
generation is read back: ``CallReader`` takes the text as it is generated and gives each call's name as soon as it
is complete, then the arguments' raw JSON text fragment by fragment, call after call; a non-streamed answer is the
same reader fed the whole text, so streamed and non-streamed arguments are the same bytes.

Several calls in one answer (OpenAI ``parallel_tool_calls``) are written the format's own way, and at most
``MAX_CALLS`` of them: the grammar spells the repetition out as a bounded count, which keeps it a finite rule
rather than an open-ended loop and bounds what one answer can ask the client to run.

Fail closed: under a grammar a call can only be written in the format, and a text answer (tool_choice auto) can
never hold the start of a call, so a call is always read as a call, never passed on as text.

Formats, with their source:
- ``generic``: llama.cpp ``common/chat.cpp`` ``common_chat_params_init_generic``: ``{"tool_call": {"name",
  "arguments"}}``, or with parallel calls ``{"tool_calls": [{"name", "arguments"}, ...]}`` (llama.cpp also has the
  model write an ``id`` in each; here the daemon assigns ids), or ``{"response": "..."}``; the tools are described
  in a system message.
- ``hermes``: NousResearch Hermes 2 Pro / 3 and Qwen2.5 / Qwen3 templates (``<tool_call>\\n{"name": ..., "arguments":
  ...}\\n</tool_call>``, one block per call, blocks joined by a newline as Qwen2.5's template renders them),
  llama.cpp's ``common_chat_params_init_hermes_2_pro``.
- ``llama3``: Llama 3.1 / 3.2 / 3.3 templates (bare ``{"name": ..., "parameters": ...}``), llama.cpp's
  ``common_chat_params_init_llama_3_x``; results go back in ``tool`` turns (the template renders them as ipython).
  One call per answer: these templates raise "This model only supports single tool-calls at once!" on an assistant
  turn with more, and llama.cpp's parser reads one call.
- ``mistral``: Mistral v3 / Nemo templates (``[TOOL_CALLS][{"name": ..., "arguments": ...}, ...]``, tools listed in
  ``[AVAILABLE_TOOLS]``), llama.cpp's ``common_chat_params_init_mistral_nemo``; the calls are always a JSON list
  (of one when calls are not parallel). The template renders each earlier call with an ``id`` and each result with
  its ``call_id``, and refuses ids that are not 9 characters: ids are mapped to 9 alphanumerics (``template_id``).
  llama.cpp's grammar has the model write that id too; here the daemon assigns ids. ``[TOOL_CALLS]`` is a control
  token (llama.cpp keeps its text in the output as a "preserved token", and so does the daemon for tool requests);
  the reader takes the list with or without it, and a text answer cannot begin with ``[``.
- ``mistral-args``: newer Mistral templates (Devstral, Ministral 3): each call is ``[TOOL_CALLS]name[ARGS]{...}``,
  calls follow one another, no call ids (llama.cpp's ``common_chat_params_init_ministral_3``).
  ``mistral-call-id``: Mistral Small 3.2's template, which writes ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`` with
  9-character ids; the model writes an id there, and the daemon assigns its own as for the other formats. The
  markers are control tokens whose text the daemon keeps in tool requests, so the reader requires them; the grammar
  has one alternative per tool, its name written out and its own arguments rule.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_SPACE = r"\s*"


def gbnf_literal(text: str) -> str:
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
    steps += [f"{gbnf_literal(word[:i])} [^{_char_class(first + word[i])}]" for i in range(1, len(word))]
    return f"({' | '.join(steps)})*"


def holds_or_ends_on(word: str) -> str:
    """Regex of a text holding ``word`` or ending on a start of it: under ``text_without`` a call, not a text answer."""
    tail = ""
    for char in reversed(word[1:]):
        tail = f"(?:{re.escape(char)}{tail})?"
    return f"{re.escape(word)}|{re.escape(word[0])}{tail}$"


MAX_CALLS = 8  # calls in one answer: the grammar's repetition bound (see the module docstring)

_NAME = r'\{\s*"name"\s*:\s*"(?P<name>[A-Za-z0-9_-]*)"'  # a call object's head; tool names: schemas.FUNCTION_NAME


@dataclass(frozen=True)
class Layout:
    """Where the call objects sit in an answer, as regexes: before the first, between two (None: one call only), and
    after the last (after the last call object's closing brace)."""

    opening: str
    closing: str
    separator: str | None = None


@dataclass(frozen=True)
class ToolFormat:
    """One way of writing tool calls. ``layouts``: how the call objects ``{"name": ..., <arguments_key>: ...}`` sit in
    the model's answer, tried in order by the reader; ``before``/``between``/``after``: the literal text the grammar
    puts around and between them (unless they are a JSON list, ``json_list``); ``text_rule``: GBNF of a text answer
    under tool_choice auto (None: the format's own envelope). A format that writes no call object but a marker, the
    name, a second marker and the arguments object (``named_calls``) says how the reader finds a call's name
    (``call_head``), the start of its arguments (``arguments_head``) and the end of the call after them (``call_end``)."""

    name: str
    markers: tuple[str, ...]  # all present in the template text: the template uses this format
    native: bool  # the template renders tools and tool calls/results itself
    layouts: tuple[Layout, ...]
    arguments_key: str = "arguments"
    max_calls: int = MAX_CALLS  # the most calls one answer of this format holds
    envelope: bool = False  # the calls sit in a JSON object that also offers a text answer (the generic format)
    json_list: bool = False  # the calls are a JSON list (even of one)
    before: str = ""
    between: str = ""
    after: str = ""
    text_rule: str | None = None
    not_text: str = ""  # regex found in a text that is a call cut short, not a text answer
    template_id_length: int | None = None  # the template refuses call ids of another length (mapped by template_id)
    named_calls: tuple[str, str] | None = None  # the grammar writes a call as literal [0], the name, GBNF [1], arguments
    call_head: str = _NAME  # regex with a group "name", matching only once the name is complete
    arguments_head: str | None = None  # regex before the arguments object; None: the call object's arguments key
    call_end: str = r"\s*\}"  # regex after the arguments object: the call object's closing brace

    def detect(self, template: str | None) -> bool:
        return bool(template) and all(m in template for m in self.markers)

    def most_calls(self, parallel: bool) -> int:
        """How many calls the grammar allows: the format's bound, or one when parallel calls are off."""
        return self.max_calls if parallel else 1

    def call_schema(self, name: str, parameters: dict) -> dict:
        """The call object of one tool; the schema machinery turns it into grammar."""
        return {"type": "object", "properties": {"name": {"const": name}, self.arguments_key: parameters},
                "required": ["name", self.arguments_key]}

    def root_schema(self, calls: Sequence[dict], may_answer: bool, most: int = 1) -> dict:
        """What the grammar's JSON part enforces: one call object, a list of up to ``most`` (``json_list``; generic
        with parallel calls), or, generic, its envelope with the text answer."""
        call = calls[0] if len(calls) == 1 else {"anyOf": list(calls)}
        listed = {"type": "array", "items": call, "minItems": 1, "maxItems": most}
        if not self.envelope:
            return listed if self.json_list else call
        key, value = ("tool_calls", listed) if most > 1 else ("tool_call", call)
        options = [{"type": "object", "properties": {key: value}, "required": [key]}]
        if may_answer:
            options.append({"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]})
        return options[0] if len(options) == 1 else {"anyOf": options}

    def root_rule(self, json_rule: str, may_answer: bool, most: int = 1) -> tuple[str, dict[str, str]]:
        """The grammar's root around ``json_rule`` and the extra rules it needs; text-delimited calls (hermes)
        repeat the JSON part with ``between`` up to ``most`` times."""
        parts = [gbnf_literal(self.before) if self.before else "", json_rule]
        if most > 1 and not self.json_list and not self.envelope:
            parts.append(f"({gbnf_literal(self.between)} {json_rule}){{0,{most - 1}}}")
        parts.append(gbnf_literal(self.after) if self.after else "")
        call = " ".join(p for p in parts if p)
        if not may_answer or self.text_rule is None:
            return call, {}
        return f"{call} | text-answer", {"text-answer": self.text_rule}


GENERIC = ToolFormat("generic", (), native=False, envelope=True, layouts=(
    Layout(opening=r'\s*\{\s*"tool_call"\s*:\s*', closing=r"\s*\}\s*"),
    Layout(opening=r'\s*\{\s*"tool_calls"\s*:\s*\[\s*', separator=r"\s*,\s*", closing=r"\s*\]\s*\}\s*"),
))

# What Mistral's named-call formats share: calls follow one another, each ends with its arguments object, and a text
# answer never holds the call marker (a control token whose text tool requests keep, Sampling.control_text).
_MISTRAL_NAMED = dict(native=True, layouts=(Layout(opening="", separator=r"\s*", closing=""),), arguments_head=r"(?=\{)",
                      call_end="", text_rule=text_without("[TOOL_CALLS]"), not_text=holds_or_ends_on("[TOOL_CALLS]"))

FORMATS: tuple[ToolFormat, ...] = (
    # Rows with [CALL_ID] first: a template with it also holds the markers of the row without.
    ToolFormat("mistral-call-id", ("[TOOL_CALLS]", "[CALL_ID]", "[ARGS]", "[AVAILABLE_TOOLS]"),  # Small 3.2
               named_calls=("[TOOL_CALLS]", '"[CALL_ID]" [a-zA-Z0-9]{9} "[ARGS]"'),
               call_head=r"\[TOOL_CALLS\](?P<name>[A-Za-z0-9_-]+)\[CALL_ID\][A-Za-z0-9]{9}\[ARGS\]",
               template_id_length=9, **_MISTRAL_NAMED),
    ToolFormat("mistral-args", ("[TOOL_CALLS]", "[ARGS]", "[AVAILABLE_TOOLS]"),  # Devstral, Ministral 3
               named_calls=("[TOOL_CALLS]", '"[ARGS]"'), call_head=r"\[TOOL_CALLS\](?P<name>[A-Za-z0-9_-]+)\[ARGS\]",
               **_MISTRAL_NAMED),
    ToolFormat("hermes", ("<tool_call>", '{"name": '), native=True,  # hermes, qwen2.5, qwen3
               layouts=(Layout(opening=r"<tool_call>\n", separator=r"\n</tool_call>\s*<tool_call>\n",
                               closing=r"\n</tool_call>"),),
               before="<tool_call>\n", between="\n</tool_call>\n<tool_call>\n", after="\n</tool_call>",
               text_rule=text_without("<tool_call>"), not_text=holds_or_ends_on("<tool_call>")),
    ToolFormat("llama3", ("<|start_header_id|>", "ipython", '"parameters": '), native=True,  # llama3.1, 3.2, 3.3
               layouts=(Layout(opening="", closing=""),), arguments_key="parameters", max_calls=1,
               text_rule="[^{ \\t\\n\\r] [^\\x00]*", not_text=r"^\{"),
    ToolFormat("mistral", ("[TOOL_CALLS][", "[AVAILABLE_TOOLS]"), native=True,  # mistral v3, nemo
               # [TOOL_CALLS] is a control token in Mistral's vocabularies: the grammar matches its text, but the
               # generated text may come without it (control tokens' text is not rendered), so the reader also takes
               # the bare list; a text answer may not begin with "[", so only a call begins with it.
               layouts=(Layout(opening=r"(?:\[TOOL_CALLS\]\s*)?\[\s*", separator=r"\s*,\s*", closing=r"\s*\]\s*"),),
               json_list=True, before="[TOOL_CALLS]", text_rule="[^[] " + text_without("[TOOL_CALLS]"),
               not_text=r"^\[|" + holds_or_ends_on("[TOOL_CALLS]"), template_id_length=9),
)

BY_NAME: dict[str, ToolFormat] = {f.name: f for f in (GENERIC, *FORMATS)}


def detect(template: str | None) -> ToolFormat:
    """The tool format of a chat template: the first row whose markers it holds, else the generic format."""
    return next((f for f in FORMATS if f.detect(template)), GENERIC)


# ---- reading a generation back -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallDelta:
    """What became known of call ``index``: its name (once, when complete) or a fragment of its arguments' JSON text."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class _Call:
    name: str
    name_end: int
    arguments_start: int | None = None
    arguments_end: int | None = None



@dataclass
class CallReader:
    """Reads a generation in ``fmt`` as it arrives. ``feed`` returns what became known, call by call: each call's name
    (once) and then fragments of its arguments' raw JSON text; ``answer`` reads the whole text at the end."""

    fmt: ToolFormat
    text: str = ""
    calls: list[_Call] = field(default_factory=list)
    layout: Layout | None = None  # the layout the first call opened with
    sent: int = 0  # characters of the current call's arguments given out so far

    def _arguments_head(self) -> re.Pattern:
        if self.fmt.arguments_head is not None:
            return re.compile(self.fmt.arguments_head)
        return re.compile(rf'\s*,\s*"{re.escape(self.fmt.arguments_key)}"\s*:\s*(?=\{{)')

    def _next_call(self) -> bool:
        """Whether the name of the next call became complete (the previous call, if any, being complete)."""
        if not self.calls:
            for layout in self.fmt.layouts:
                found = re.compile(layout.opening + self.fmt.call_head).match(self.text)
                if found is not None:
                    self.layout = layout
                    self.calls.append(_Call(found["name"], found.end()))
                    return True
            return False
        last = self.calls[-1]
        if last.arguments_end is None or self.layout.separator is None or len(self.calls) >= self.fmt.max_calls:
            return False
        found = re.compile(self.fmt.call_end + self.layout.separator + self.fmt.call_head).match(self.text, last.arguments_end)
        if found is None:
            return False
        self.calls.append(_Call(found["name"], found.end()))
        return True

    def feed(self, piece: str) -> list[CallDelta]:
        """What ``piece`` made known: names of calls that just became complete and new arguments text."""
        self.text += piece
        out: list[CallDelta] = []
        while True:
            if not self.calls or self.calls[-1].arguments_end is not None:
                if not self._next_call():
                    return out
                out.append(CallDelta(len(self.calls) - 1, name=self.calls[-1].name))
            call, index = self.calls[-1], len(self.calls) - 1
            if call.arguments_start is None:
                head = self._arguments_head().match(self.text, call.name_end)
                if head is None:
                    return out
                call.arguments_start = self.sent = head.end()
            try:  # complete once the arguments value decodes; until then every character so far is part of it
                _, call.arguments_end = json.JSONDecoder().raw_decode(self.text, call.arguments_start)
            except ValueError:
                pass
            end = call.arguments_end if call.arguments_end is not None else len(self.text)
            if end > self.sent:
                out.append(CallDelta(index, arguments=self.text[self.sent:end]))
                self.sent = end
            if call.arguments_end is None:
                return out

    def answer(self) -> ParsedAnswer | None:
        """The whole generation: calls, a text answer, or None when it is neither (cut short)."""
        if self.calls:
            last = self.calls[-1]
            if last.arguments_end is None:
                return None  # a call that was cut short
            rest = self.text[last.arguments_end:]
            if not re.fullmatch(self.fmt.call_end + self.layout.closing + r"\s*", rest):
                return None
            calls = tuple(ParsedCall(c.name, self.text[c.arguments_start:c.arguments_end]) for c in self.calls)
            if not all(isinstance(json.loads(c.arguments), dict) for c in calls):
                return None
            return ParsedAnswer(calls=calls)
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
class ParsedCall:
    """One call: the function's name and its arguments as JSON text (the bytes the model wrote)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedAnswer:
    """What a tool-mode generation said: calls, in order, or a text answer."""

    calls: tuple[ParsedCall, ...] = ()
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


_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def template_id(fmt: ToolFormat, call_id: str | None) -> str | None:
    """A call id as ``fmt``'s template accepts it: unchanged, or (Mistral: exactly 9 alphanumerics) the same digest
    of it for the call and for its result, so the two still pair up; an id already in that form is kept."""
    length = fmt.template_id_length
    if call_id is None or length is None or (len(call_id) == length and call_id.isascii() and call_id.isalnum()):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest(), "big")
    digits = []
    for _ in range(length):
        number, digit = divmod(number, len(_ID_ALPHABET))
        digits.append(_ID_ALPHABET[digit])
    return "".join(digits)


def template_call(fmt: ToolFormat, call_id: str, name: str, arguments: str) -> dict:
    """An earlier call as ``fmt``'s templates read it: arguments as an object (templates ``tojson`` them), not as JSON
    text; the id in the form the template accepts."""
    try:
        parsed: Any = json.loads(arguments)
    except ValueError:
        parsed = arguments
    return {"id": template_id(fmt, call_id), "type": "function", "function": {"name": name, "arguments": parsed}}
