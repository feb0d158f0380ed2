"""Board side: render a model's Jinja chat template in a sandbox (docs/reliability.md case 2).

A chat template comes from the model file, so it is untrusted code. It is compiled only in
jinja2's ``ImmutableSandboxedEnvironment`` (the fix for llama-cpp-python CVE-2024-34359, and
what transformers' ``apply_chat_template`` uses): attribute access to dunder members such as
``''.__class__.__mro__`` raises ``SecurityError`` (here at the first unsafe step), containers
cannot be mutated, and ``range`` is capped. On top of that the rendered prompt is cut off at ``max_chars`` so a template cannot
loop its way to gigabytes. The helpers templates expect (``raise_exception``, ``strftime_now``,
``tojson`` keeping non-ASCII) follow transformers' rendering so prompts match the reference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from edgekit.errors import BundleError, RuntimeBackendError

DEFAULT_MAX_CHARS = 1_000_000
# What a template's expressions raise on unexpected messages (missing keys, wrong types, ...).
_EVALUATION_ERRORS = (
    TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
)


class ChatTemplateError(RuntimeBackendError):
    """Rendering a chat template failed; ``client_error`` is True when the messages caused it."""

    def __init__(self, message: str, *, client_error: bool, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.client_error = client_error


class _TemplateRaised(Exception):
    """``raise_exception(...)`` was called by the template: it refuses these messages."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


class _Generation(Extension):
    """Accept transformers' ``{% generation %}...{% endgeneration %}`` block and render its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with unsafe attribute access failing at once.

    jinja2's sandbox answers ``x.__class__`` (or ``x|attr('__globals__')``, or a format string
    reaching an attribute) with an Undefined that only raises when used further and renders as
    an empty string otherwise. An escape attempt should not pass silently: raise right away.
    """

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _Output:
    """Collects rendered chunks and stops once the prompt would exceed its character budget."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.parts: list[str] = []
        self.size = 0

    def add(self, chunk: str) -> None:
        self.size += len(chunk)
        if self.size > self.max_chars:
            raise ChatTemplateError(
                f"chat template output exceeds {self.max_chars} characters", client_error=True,
                hint="send shorter messages; a template that loops without end is broken",
            )
        self.parts.append(chunk)


class ChatTemplate:
    """A compiled, sandboxed chat template; ``render(messages)`` gives the prompt text."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        max_chars: int = DEFAULT_MAX_CHARS,
        origin: str = "chat template",
    ) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.max_chars = max_chars
        self.origin = origin
        # trim_blocks/lstrip_blocks as in transformers, so whitespace matches the reference prompts.
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise BundleError(f"{origin} does not compile: {exc}", hint="fix the template in the model's metadata") from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **variables: Any,
    ) -> str:
        """The prompt for ``messages``; every failure inside the template is a ``ChatTemplateError``."""
        context = {
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **({"tools": list(tools)} if tools is not None else {}),
            **variables,
        }
        out = _Output(self.max_chars)
        try:
            for chunk in self._template.generate(**context):
                out.add(chunk)
        except ChatTemplateError:
            raise
        except _TemplateRaised as exc:
            raise ChatTemplateError(f"{self.origin} refused the messages: {exc}", client_error=True) from exc
        except SecurityError as exc:
            raise ChatTemplateError(
                f"{self.origin} tried an operation the sandbox forbids: {exc}", client_error=False,
                hint="the model file carries an unsafe chat template; do not serve it",
            ) from exc
        except _EVALUATION_ERRORS as exc:
            # Errors raised while the template evaluates expressions over the request's messages.
            message = f"{self.origin} failed on these messages: {type(exc).__name__}: {exc}"
            raise ChatTemplateError(message, client_error=True) from exc
        return "".join(out.parts)
