"""Constrained decoding: JSON Schemas turned into llama.cpp grammars (GBNF), and tool calls in a constrained JSON format.

The conversion is llama-cpp-python's port of llama.cpp's ``json_schema_to_grammar`` (``llama_cpp.llama_grammar``).
That converter silently ignores keywords it does not handle (``minimum``, ``oneOf`` exclusivity, siblings of
``$ref``, ``required`` names without a property, ...), so a schema is first checked node by node against
``SUPPORTED`` below: every keyword of a node must be one the converter enforces for that node's form, else the
schema is refused naming the keyword (``UnsupportedSchema``). The checked schema is rewritten into the plain form
the converter handles correctly (annotations dropped, ``$ref`` targets given unique rule names), and its size,
depth and repetition counts are bounded so a hostile schema cannot stall the daemon.

Tool calls are written in the chat template's own tool format where it has one, else in llama.cpp's generic format
(the table is ``tool_formats``): the call objects (one, or with parallel calls up to the format's bound) are
constrained by a grammar built here from the tools' parameter schemas, with the format's text around and between
them, and the daemon turns the answer into OpenAI ``tool_calls``.

Board side: the daemon converts schemas without loading llama.cpp (the converter is pure Python, loaded on its own);
the worker's sampler checks each drawn token against the grammar.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.runtime.tool_formats import GENERIC, ParsedAnswer, ToolFormat, gbnf_literal, read_answer

# Bounds on a schema before it is converted (each a 400 when exceeded).
MAX_SCHEMA_ITEMS = 4096  # dict keys + list elements of the whole schema
MAX_SCHEMA_DEPTH = 32  # nesting of schema nodes
MAX_REPEAT = 256  # minItems/maxItems/minLength/maxLength: the converter spells out every repetition
MAX_OPTIONAL_PROPERTIES = 32  # per object: the converter's rules for them grow with the square, its recursion with the count
MAX_GRAMMAR_CHARS = 256 * 1024

# Keywords that only describe (never constrain) a node: accepted and dropped.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                         "writeOnly", "$schema"})
# Containers of subschemas reachable only through ``$ref``: not part of the node they sit in.
DEFINITIONS = frozenset({"$defs", "definitions"})

# Every constraint keyword the converter enforces, with the node forms it is enforced in. Anything else is refused.
SUPPORTED: dict[str, str] = {
    "type": "string, number, integer, boolean, null, object, array, or a list of them",
    "properties": f"object: each property's schema; at most {MAX_OPTIONAL_PROPERTIES} of them optional",
    "required": "object: names listed in properties",
    "additionalProperties": "object: false (or, without properties, a schema for every value)",
    "items": "array: one schema for every item",
    "prefixItems": "array: a tuple of exactly these items",
    "minItems": f"array: up to {MAX_REPEAT}",
    "maxItems": f"array: up to {MAX_REPEAT}",
    "minLength": f"string: up to {MAX_REPEAT}",
    "maxLength": f"string: up to {MAX_REPEAT}",
    "format": "string: date, time, date-time, uuid",
    "enum": "values of the node's type",
    "const": "a value of the node's type",
    "anyOf": "alternatives",
    "$ref": "local references (#/...) that do not loop",
}
TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
FORMATS = ("date", "time", "date-time", "uuid")
# Keywords of each node form; a node may not mix forms (the converter takes the first form it sees).
_FORMS: dict[str, frozenset[str]] = {
    "ref": frozenset({"$ref"}),
    "anyOf": frozenset({"anyOf"}),
    "enum": frozenset({"enum", "type"}),
    "const": frozenset({"const", "type"}),
    "object": frozenset({"type", "properties", "required", "additionalProperties"}),
    "array": frozenset({"type", "items", "prefixItems", "minItems", "maxItems"}),
    "string": frozenset({"type", "minLength", "maxLength", "format"}),
    "scalar": frozenset({"type"}),
}
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,), "null": (type(None),),
    "object": (dict,), "array": (list,),
}


class UnsupportedSchema(EdgekitError):
    """A JSON Schema the grammar cannot enforce; ``keyword`` names what, ``pointer`` where (JSON Pointer)."""

    def __init__(self, keyword: str, pointer: str, reason: str) -> None:
        where = pointer or "the root"
        super().__init__(f"{keyword!r} at {where}: {reason}",
                         hint="supported keywords: " + ", ".join(SUPPORTED) + " (and annotations such as title)")
        self.keyword, self.pointer = keyword, pointer


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _count_items(schema: Any) -> None:
    """Refuse a schema with more than MAX_SCHEMA_ITEMS keys and list elements (iterative: no recursion limit)."""
    seen, stack = 0, [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            seen += len(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            seen += len(node)
            stack.extend(node)
        if seen > MAX_SCHEMA_ITEMS:
            raise UnsupportedSchema("schema", "", f"more than {MAX_SCHEMA_ITEMS} keywords and values; send a smaller schema")


class _Normalizer:
    """Checks a schema against ``SUPPORTED`` and rewrites it into the form the converter handles."""

    def __init__(self, root: dict) -> None:
        self.root = root
        self.targets: dict[str, str] = {}  # JSON Pointer of a $ref target -> its converter reference
        self.defs: dict[str, dict] = {}  # converter reference -> normalized target
        self.edges: dict[str, set[str]] = {}  # pointer of a ref scope -> pointers its refs lead to
        self.scope = ""

    def run(self) -> tuple[dict, dict[str, dict]]:
        root = self.node(self.root, "", 0)
        queue = list(self.targets)
        done: set[str] = set()
        while queue:
            pointer = queue.pop()
            if pointer in done:
                continue
            done.add(pointer)
            before = set(self.targets)
            self.scope = pointer
            self.defs[self.targets[pointer]] = self.node(self.lookup(pointer), pointer, 0)
            queue.extend(set(self.targets) - before)
        self.check_loops()
        return root, self.defs

    def lookup(self, pointer: str) -> Any:
        node: Any = self.root
        for token in pointer.split("/")[1:]:
            token = _unescape(token)
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise UnsupportedSchema("$ref", pointer, "points at nothing in this schema")
        return node

    def ref(self, ref: Any, pointer: str) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise UnsupportedSchema("$ref", pointer, "only local references (#/...) are supported")
        target = ref[1:]
        self.edges.setdefault(self.scope, set()).add(target)
        if target not in self.targets:
            self.targets[target] = f"#ref{len(self.targets)}"
        return self.targets[target]

    def check_loops(self) -> None:
        """A $ref that reaches itself again (directly or through other refs) is refused: recursive schemas are not
        supported, and a loop without content between would be a left-recursive grammar."""
        state: dict[str, int] = {}  # 1: on the current path, 2: done

        def visit(pointer: str, path: list[str]) -> None:
            state[pointer] = 1
            for target in sorted(self.edges.get(pointer, ())):
                if state.get(target) == 1:
                    loop = " -> ".join(f"#{p}" for p in [*path[path.index(target):], target]) if target in path else f"#{target}"
                    raise UnsupportedSchema("$ref", target, f"references loop ({loop}); recursive schemas are not supported")
                if target not in state:
                    visit(target, [*path, target])
            state[pointer] = 2

        visit("", [""])

    def node(self, schema: Any, pointer: str, depth: int) -> dict:
        if depth > MAX_SCHEMA_DEPTH:
            raise UnsupportedSchema("schema", pointer, f"nested more than {MAX_SCHEMA_DEPTH} levels deep")
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise UnsupportedSchema("schema", pointer, "a schema must be a JSON object (or true)")
        keys = [k for k in schema if k not in ANNOTATIONS and k not in DEFINITIONS]
        if not keys:  # any value
            return {"type": list(TYPES)}
        for key in keys:
            if key not in SUPPORTED:
                raise UnsupportedSchema(key, pointer, "this keyword is not enforced by constrained decoding")
        form = self.form(schema, keys, pointer)
        extra = [k for k in keys if k not in _FORMS[form]]
        if extra:
            raise UnsupportedSchema(extra[0], pointer, f"cannot be combined with {form!r} keywords in one schema "
                                    "(only one of them would be enforced)")
        return getattr(self, f"form_{form}")(schema, pointer, depth)

    @staticmethod
    def form(schema: dict, keys: list[str], pointer: str) -> str:
        for keyword in ("$ref", "anyOf", "enum", "const"):
            if keyword in keys:
                return {"$ref": "ref"}.get(keyword, keyword)
        kind = schema.get("type")
        if isinstance(kind, list):
            return "scalar"
        if kind is None:
            if any(k in keys for k in _FORMS["object"] - {"type"}):
                return "object"
            if any(k in keys for k in _FORMS["array"] - {"type"}):
                return "array"
            raise UnsupportedSchema(keys[0], pointer, "give the node a 'type' for this keyword")
        if kind in ("object", "array", "string"):
            return kind
        return "scalar"

    def types(self, schema: dict, pointer: str) -> list[str]:
        kind = schema.get("type")
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or any(not isinstance(k, str) or k not in TYPES for k in kinds):
            raise UnsupportedSchema("type", pointer, "must be one of " + ", ".join(TYPES) + " or a non-empty list of them")
        return kinds

    def form_ref(self, schema: dict, pointer: str, depth: int) -> dict:
        return {"$ref": self.ref(schema["$ref"], pointer)}

    def form_anyOf(self, schema: dict, pointer: str, depth: int) -> dict:
        options = schema["anyOf"]
        if not isinstance(options, list) or not options:
            raise UnsupportedSchema("anyOf", pointer, "must be a non-empty list of schemas")
        return {"anyOf": [self.node(o, f"{pointer}/anyOf/{i}", depth + 1) for i, o in enumerate(options)]}

    def values_of_type(self, schema: dict, values: list, keyword: str, pointer: str) -> None:
        if "type" not in schema:
            return
        allowed = tuple(t for k in self.types(schema, pointer) for t in _JSON_TYPES[k])
        for value in values:
            is_bool = isinstance(value, bool)
            if not isinstance(value, allowed) or (is_bool and bool not in allowed):
                raise UnsupportedSchema(keyword, pointer, f"{value!r} is not of the node's type")

    def form_enum(self, schema: dict, pointer: str, depth: int) -> dict:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise UnsupportedSchema("enum", pointer, "must be a non-empty list")
        self.values_of_type(schema, values, "enum", pointer)
        return {"enum": values}

    def form_const(self, schema: dict, pointer: str, depth: int) -> dict:
        self.values_of_type(schema, [schema["const"]], "const", pointer)
        return {"const": schema["const"]}

    def form_scalar(self, schema: dict, pointer: str, depth: int) -> dict:
        kinds = self.types(schema, pointer)
        return {"type": kinds if isinstance(schema["type"], list) else kinds[0]}

    def form_object(self, schema: dict, pointer: str, depth: int) -> dict:
        if "type" in schema and schema["type"] != "object":
            raise UnsupportedSchema("type", pointer, "object keywords need type 'object'")
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise UnsupportedSchema("properties", pointer, "must be an object of schemas")
        required = schema.get("required", [])
        if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
            raise UnsupportedSchema("required", pointer, "must be a list of property names")
        missing = [r for r in required if r not in properties]
        if missing:
            raise UnsupportedSchema("required", pointer, f"{missing[0]!r} is required but not in properties")
        optional = len(properties) - len(set(required))
        if optional > MAX_OPTIONAL_PROPERTIES:
            raise UnsupportedSchema("properties", pointer, f"{optional} optional properties; at most "
                                    f"{MAX_OPTIONAL_PROPERTIES} per object are supported (list the others in required)")
        out: dict[str, Any] = {"type": "object"}
        if properties:
            out["properties"] = {name: self.node(sub, f"{pointer}/properties/{_escape(name)}", depth + 1)
                                 for name, sub in properties.items()}
            out["required"] = list(dict.fromkeys(required))
        additional = schema.get("additionalProperties")
        if additional is False:
            out["additionalProperties"] = False
        elif additional is not None and additional is not True:
            if properties:  # the converter's extra keys may repeat a declared property's name
                raise UnsupportedSchema("additionalProperties", pointer, "with properties, only false is supported")
            out["additionalProperties"] = self.node(additional, f"{pointer}/additionalProperties", depth + 1)
        elif additional is True and properties:
            raise UnsupportedSchema("additionalProperties", pointer, "with properties, only false is supported")
        if properties and "additionalProperties" not in out:
            out["additionalProperties"] = False  # what the grammar produces anyway: only the declared properties
        return out

    def count(self, schema: dict, keyword: str, pointer: str) -> int | None:
        value = schema.get(keyword)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > MAX_REPEAT:
            raise UnsupportedSchema(keyword, pointer, f"must be an integer from 0 to {MAX_REPEAT}")
        return value

    def bounds(self, schema: dict, low: str, high: str, pointer: str) -> dict:
        lo, hi = self.count(schema, low, pointer), self.count(schema, high, pointer)
        if lo is not None and hi is not None and lo > hi:
            raise UnsupportedSchema(low, pointer, f"{low} is above {high}: nothing can match")
        return {k: v for k, v in ((low, lo), (high, hi)) if v is not None}

    def form_array(self, schema: dict, pointer: str, depth: int) -> dict:
        if "type" in schema and schema["type"] != "array":
            raise UnsupportedSchema("type", pointer, "array keywords need type 'array'")
        bounds = self.bounds(schema, "minItems", "maxItems", pointer)
        if "prefixItems" in schema:
            if "items" in schema:
                raise UnsupportedSchema("items", pointer, "items next to prefixItems is not supported")
            items = schema["prefixItems"]
            if not isinstance(items, list) or not items:
                raise UnsupportedSchema("prefixItems", pointer, "must be a non-empty list of schemas")
            if not bounds.get("minItems", 0) <= len(items) <= bounds.get("maxItems", len(items)):
                raise UnsupportedSchema("minItems", pointer, "the grammar produces exactly the prefixItems")
            return {"type": "array", "prefixItems": [self.node(s, f"{pointer}/prefixItems/{i}", depth + 1)
                                                     for i, s in enumerate(items)]}
        if "items" not in schema:
            if bounds:
                raise UnsupportedSchema(next(iter(bounds)), pointer, "needs items")
            return {"type": "array"}
        if not isinstance(schema["items"], (dict, bool)) or schema["items"] is False:
            raise UnsupportedSchema("items", pointer, "must be one schema")
        return {"type": "array", "items": self.node(schema["items"], f"{pointer}/items", depth + 1), **bounds}

    def form_string(self, schema: dict, pointer: str, depth: int) -> dict:
        if "format" in schema:
            if schema["format"] not in FORMATS:
                raise UnsupportedSchema("format", pointer, "only formats " + ", ".join(FORMATS) + " are enforced")
            if "minLength" in schema or "maxLength" in schema:
                raise UnsupportedSchema("format", pointer, "format with minLength/maxLength is not supported")
            return {"type": "string", "format": schema["format"]}
        return {"type": "string", **self.bounds(schema, "minLength", "maxLength", pointer)}


@functools.cache
def _llama_grammar():
    """llama-cpp-python's ``llama_grammar`` module, loaded on its own: it is pure Python, while importing it through
    the package runs ``llama_cpp/__init__.py``, which loads libllama (about 28 MiB of RSS the daemon never uses)."""
    name = "edgekit.runtime._llama_grammar"
    package = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        from edgekit.errors import RuntimeBackendError

        raise RuntimeBackendError("llama-cpp-python is not installed: install edgekit[runtime]")
    spec = importlib.util.spec_from_file_location(name, Path(package.submodule_search_locations[0]) / "llama_grammar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _converter_class():
    """llama-cpp-python's converter with the repairs that keep it from emitting invalid JSON or wrong rules."""
    llama_grammar = _llama_grammar()

    class Converter(llama_grammar.SchemaConverter):
        def _resolve_ref(self, ref: str) -> str:
            # Upstream names a ref's rule after the pointer's last segment and reuses any rule of that name,
            # even a property's: give every target its own reserved rule.
            name = f"ref{ref[4:]}-def"
            if name not in self._rules:
                self._rules[name] = '"placeholder"'
                self._rules[name] = self.visit(self._refs[ref], f"{name}-body")
            return name

        def _format_literal(self, literal: str) -> str:
            # Upstream leaves backslashes unescaped: a JSON escape in a constant or a property name would turn into
            # another character in the grammar (and a different value in the output).
            return super()._format_literal(literal.replace("\\", "\\\\"))

        def _add_primitive(self, name: str, rule):
            # JSON strings may not hold raw control characters; upstream's char rule lets them through.
            if rule is llama_grammar.PRIMITIVE_RULES["char"]:
                rule = llama_grammar.BuiltinRule(r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])', [])
            return super()._add_primitive(name, rule)

    return Converter


def _converter(refs: dict[str, dict]):
    converter = _converter_class()(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter._refs = refs
    return converter


def schema_rule(schema: Any, name: str, rules: dict[str, str]) -> str:
    """Add the rules enforcing ``schema`` to ``rules`` under names starting with ``name``; returns its rule."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema("schema", "", "a schema must be a JSON object")
    _count_items(schema)
    root, refs = _Normalizer(schema).run()
    converter = _converter(refs)
    # Upstream visits the root under the name "" and so names a property "" at the root "root": root rules stay apart.
    rule = converter.visit(root, name)
    for key, body in converter._rules.items():
        if rules.setdefault(key, body) != body:  # shared primitives are equal; a $ref's rule is named by its pointer
            raise UnsupportedSchema("$ref", "", f"two schemas of this request define {key!r} differently")
    return rule


def grammar_text(rules: dict[str, str]) -> str:
    """The GBNF of ``rules`` (one of them "root"), refused when it grows too large for a board to parse quickly."""
    grammar = "\n".join(f"{name} ::= {rule}" for name, rule in sorted(rules.items()))
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise UnsupportedSchema("schema", "", f"its grammar would exceed {MAX_GRAMMAR_CHARS} characters")
    return grammar


def schema_grammar(schema: Any, frame: Callable[[str], tuple[str, dict[str, str]]] | None = None) -> str:
    """GBNF enforcing ``schema`` (UnsupportedSchema when it cannot be enforced in full).

    ``frame``: builds the root from the schema's rule (a tool format's text around a call) and adds its own rules."""
    rules: dict[str, str] = {}
    rule = schema_rule(schema, "doc", rules)
    if frame is not None:
        rule, extra = frame(rule)
        rules.update(extra)
    rules["root"] = rule
    return grammar_text(rules)


JSON_OBJECT_GRAMMAR_SCHEMA: dict = {"type": "object"}


# ---- tool calls ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request with tools is run: its format, the grammar of the answer and, for a format the template
    does not render itself, the system text describing the tools."""

    format: ToolFormat
    system: str | None
    grammar: str
    may_answer: bool  # tool_choice auto: a text answer is allowed


def check_parameters(parameters: Any, pointer: str) -> dict:
    """A function's parameters must be an object schema (what OpenAI requires); None means no parameters."""
    if parameters is None:
        return {"type": "object", "properties": {}}
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise UnsupportedSchema("type", pointer, "a function's parameters must be a JSON Schema with type 'object'")
    return parameters


def tool_plan(tools: Sequence[Tool], choice: str | None, fmt: ToolFormat = GENERIC, parallel: bool = True) -> ToolPlan:
    """``choice``: "auto", "required", or a function's name (the caller checked it exists); ``parallel``: one answer
    may hold several calls (up to the format's bound), else exactly one."""
    may_answer = choice == "auto"
    most = fmt.most_calls(parallel)
    chosen = [t for t in tools if t.name == choice] if choice not in ("auto", "required") else list(tools)
    if fmt.named_calls:
        grammar = named_calls_grammar(fmt, chosen, may_answer, most)
    else:
        schema = fmt.root_schema([fmt.call_schema(t.name, t.parameters) for t in chosen], may_answer, most)
        grammar = schema_grammar(schema, functools.partial(fmt.root_rule, may_answer=may_answer, most=most))
    if fmt.native:  # the template lists the tools and says how to call them
        return ToolPlan(format=fmt, system=None, grammar=grammar, may_answer=may_answer)
    described = [{"name": t.name, **({"description": t.description} if t.description else {}),
                  "parameters": t.parameters} for t in tools]
    # The wording of llama.cpp's generic tool-call format (common/chat.cpp), with the tools listed and the key the
    # grammar allows named (tool_calls, a list, when several calls may be made).
    key = "`tool_calls` (a list of requests to call tools)" if most > 1 else "`tool_call` (a request to call a tool)"
    system = ("You have access to the following tools:\n" + json.dumps(described, ensure_ascii=False) + "\n\n"
              + (f"Respond in JSON format, either with {key} or with `response` reply to the user's request"
                 if may_answer else f"Respond in JSON format with {key}"))
    return ToolPlan(format=fmt, system=system, grammar=grammar, may_answer=may_answer)


def named_calls_grammar(fmt: ToolFormat, tools: Sequence[Tool], may_answer: bool, most: int) -> str:
    """GBNF of a format that writes each call as a marker, the tool's name, more markers and the arguments object
    (``fmt.named_calls``): one alternative per tool, each with its own arguments rule."""
    opening, after_name = fmt.named_calls
    rules: dict[str, str] = {}
    rules["tool-call"] = " | ".join(f"{gbnf_literal(opening + t.name)} {after_name} {schema_rule(t.parameters, f'args-{i}', rules)}"
                                    for i, t in enumerate(tools))
    root = "tool-call" + (f" tool-call{{0,{most - 1}}}" if most > 1 else "")
    if may_answer:
        root, rules["text-answer"] = f"{root} | text-answer", fmt.text_rule
    rules["root"] = root
    return grammar_text(rules)


def parse_answer(text: str, fmt: ToolFormat = GENERIC) -> ParsedAnswer | None:
    """A whole answer in ``fmt``; None when the text is not a complete answer (cut by max_tokens)."""
    return read_answer(fmt, text)


def calls_text(calls: Sequence[tuple[str, str]]) -> str:
    """Earlier calls (name, arguments JSON text) as the model writes them in the generic format: one as ``tool_call``,
    several as the ``tool_calls`` list (assistant turns with tool_calls)."""
    objects = []
    for name, arguments in calls:
        try:
            parsed: Any = json.loads(arguments)
        except ValueError:
            parsed = arguments
        objects.append({"name": name, "arguments": parsed})
    envelope = {"tool_call": objects[0]} if len(objects) == 1 else {"tool_calls": objects}
    return json.dumps(envelope, ensure_ascii=False)


def tool_result_text(content: str, call_id: str | None, name: str | None) -> str:
    """A tool's result as a ``role: tool`` turn's content in the generic format."""
    result: dict[str, Any] = {"content": content}
    if name:
        result["tool"] = name
    if call_id:
        result["tool_call_id"] = call_id
    return json.dumps({"tool_response": result}, ensure_ascii=False)


def with_system(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """``text`` added to the first system message, or as a new one in front."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + text}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def grammar_sampler(vocab: Any, grammar: str) -> Any:
    """llama.cpp's grammar sampler for ``grammar`` (the caller frees it); llama.cpp returns NULL for a grammar it rejects."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        from edgekit.errors import RuntimeBackendError

        raise RuntimeBackendError("llama.cpp rejected the grammar of this response_format or tools")
    return sampler


def check_grammar(vocab: Any, grammar: str) -> bool:
    """Whether llama.cpp parses ``grammar`` (checked before a generation starts, so a bad one fails only its request)."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def tools_of(specs: Sequence[Mapping[str, Any]]) -> list[Tool]:
    return [Tool(s["name"], s.get("description"), s["parameters"]) for s in specs]
