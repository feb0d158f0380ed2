"""Fit reports in the formats CI systems read: JUnit XML and GitHub Actions workflow commands."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from edgekit.fit.estimate import FitReport
from edgekit.fit.memory import MIB


def _escape_command(text: str) -> str:
    # GitHub workflow commands: %, CR and LF must be percent-encoded in the message
    # (docs.github.com, "Workflow commands for GitHub Actions").
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_command(text).replace(":", "%3A").replace(",", "%2C")


def github_annotations(reports: Sequence[FitReport]) -> list[str]:
    """One ``::error`` per failing and ``::warning`` per warning fit; passing fits print nothing."""
    lines = []
    for report in reports:
        if report.verdict == "pass":
            continue
        level = "error" if report.verdict == "fail" else "warning"
        title = _escape_property(f"edgekit fit: {report.subject} on {report.device}")
        lines.append(f"::{level} title={title}::{_escape_command(report.reason)}")
    return lines


def markdown_summary(reports: Sequence[FitReport]) -> str:
    """A table for $GITHUB_STEP_SUMMARY."""
    icon = {"pass": "✅ pass", "warn": "⚠️ warn", "fail": "❌ fail"}
    rows = ["| bundle | device | RAM needed | usable | tok/s short / deep | TTFT | verdict | reason |",
            "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        speed = (f"{r.decode_tok_s_short:.1f} / {r.decode_tok_s:.1f}" if r.decode_tok_s is not None
                 else (f"{r.latency_ms:.1f} ms" if r.latency_ms else ""))
        ttft = "" if r.ttft_s is None else f"{r.ttft_s:.2f} s"
        rows.append(f"| {r.subject} | {r.device} | {r.memory['required'] / MIB:,.0f} MiB | {r.usable_ram_bytes / MIB:,.0f} MiB "
                    f"| {speed} | {ttft} | {icon[r.verdict]} | {r.reason} |")
    notes = "".join(f"\n- {line}" for line in assumption_lines(reports))
    return "\n".join(rows) + "\n" + (f"\nAssumptions:{notes}\n" if notes else "")


def junit_xml(reports: Sequence[FitReport], suite: str = "edgekit fit") -> str:
    """A JUnit testsuite: one testcase per (bundle, device); fail -> <failure>, warn -> passing case with a note."""
    root = ET.Element("testsuites")
    failures = sum(r.verdict == "fail" for r in reports)
    element = ET.SubElement(root, "testsuite", name=suite, tests=str(len(reports)), failures=str(failures),
                            errors="0", skipped="0")
    for report in reports:
        case = ET.SubElement(element, "testcase", classname=report.subject, name=report.device, time="0")
        properties = ET.SubElement(case, "properties")
        for key, value in (("verdict", report.verdict), ("required_ram_bytes", report.memory["required"]), ("peak_rss_bytes", report.memory["total"]),
                           ("usable_ram_bytes", report.usable_ram_bytes), ("decode_tok_s", report.decode_tok_s),
                           ("prompt_tok_s", report.prompt_tok_s), ("ttft_s", report.ttft_s), ("latency_ms", report.latency_ms)):
            if value is not None:
                ET.SubElement(properties, "property", name=key, value=str(value))
        if report.verdict == "fail":
            failure = ET.SubElement(case, "failure", message=report.reason, type="fit")
            failure.text = "\n".join(f"{c.name}: {c.verdict}: {c.message}" for c in report.checks)
        elif report.verdict == "warn":
            ET.SubElement(case, "system-out").text = f"warning: {report.reason}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def assumption_lines(reports: Sequence[FitReport]) -> list[str]:
    """What the figures of these reports assume, one line per distinct assumption (a table's footnotes)."""
    grouped: dict[str, list[str]] = {}

    def add(line: str, subject: str = "") -> None:
        subjects = grouped.setdefault(line, [])
        if subject and subject not in subjects:
            subjects.append(subject)

    for r in reports:
        a = r.assumptions
        if "decode_depth" in a:
            ttft = (f"; TTFT: a {a['prompt_tokens']:,}-token prompt in batches of {a['n_ubatch']} + one decode step"
                    if "n_ubatch" in a else "")
            add(f"context {a['n_ctx']:,} tokens x {a['slots']} slot(s) (serve --n-ctx, --slots); tok/s of decode at the "
                f"start of a conversation / {a['decode_depth']:,} tokens deep{ttft}", r.subject)
        if "latency_input_tokens" in a:
            add(f"latency of one {a['latency_input_tokens']}-token input at batch 1; RAM for the largest micro-batch, "
                f"{a['batch_texts']} x {a['batch_input_tokens']} tokens (serve --batch-max, --batch-max-tokens), of a "
                f"request of {a['request_texts']:,} texts (--max-embedding-inputs)", r.subject)
    daemon = max((r.memory.get("daemon", 0) for r in reports), default=0)
    if daemon:
        add(f"RAM: the model's worker + edgekit serve's own process ({daemon >> 20} MiB) against the board's usable RAM "
            "(installed minus what its OS keeps), as `edgekit serve --device` admits it")
    elif reports:
        add("RAM: the runtime process alone (--no-daemon) against the board's usable RAM")
    bands: dict[str, list[str]] = {}
    for r in reports:
        if r.decode_tok_s_band:
            low, high = r.decode_tok_s_band
            bands.setdefault(r.device, []).append(f"{low:.1f}-{high:.1f} ({r.subject})")
    for device, ranges in bands.items():
        add(f"{device}: boards with its SoC, each calibrated on its own published measurements, predict deep decode "
            f"{', '.join(ranges)} tok/s")
    # The assumption most models share goes bare; the others name their models (one prefix* for a family of bundles).
    common = max((line for line, subjects in grouped.items() if subjects), key=lambda line: len(grouped[line]), default=None)
    return [line if line == common or not subjects else f"{line}: {_names(subjects)}" for line, subjects in grouped.items()]


def _names(subjects: list[str]) -> str:
    prefix = os.path.commonprefix(subjects)
    prefix = prefix[: prefix.rfind("-") + 1]
    return f"{prefix}*" if len(subjects) > 2 and len(prefix) > 3 else ", ".join(subjects)
