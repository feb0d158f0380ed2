"""`edgekit plan`: which target of a recipe is the best one that fits a board and meets a speed floor."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edgekit.fit.estimate import FitReport, FitSettings, fit
from edgekit.fit.facts import from_recipe
from edgekit.fit.quant import PLAN_LADDER, QUALITY_ORDER
from edgekit.formats import FORMATS, TASKS
from edgekit.formats.gguf import NAME as GGUF
from edgekit.schema.device import Device
from edgekit.schema.recipe import GgufTarget, OnnxTarget, Recipe


@dataclass(frozen=True)
class Candidate:
    target_name: str
    in_recipe: bool
    report: FitReport


@dataclass(frozen=True)
class Plan:
    candidates: list[Candidate]  # best quality first
    best: Candidate | None
    summary: str

    def as_dict(self) -> dict:
        return {
            "best": None if self.best is None else {"target": self.best.target_name, "quant": self.best.report.quant,
                                                     "in_recipe": self.best.in_recipe},
            "summary": self.summary,
            "candidates": [{"target": c.target_name, "in_recipe": c.in_recipe, "report": c.report.model_dump(mode="json")}
                           for c in self.candidates],
        }


def _quality_rank(quant: str) -> int:
    return QUALITY_ORDER.index(quant) if quant in QUALITY_ORDER else len(QUALITY_ORDER)


def recipe_targets(recipe: Recipe) -> list[tuple[OnnxTarget | GgufTarget, bool]]:
    """ONNX: the recipe's own targets, in recipe order."""
    return [(t, True) for t in recipe.targets]


def quant_ladder(recipe: Recipe) -> list[tuple[GgufTarget, bool]]:
    """GGUF: the recipe's targets plus the usual quant ladder, best quality first."""
    targets = recipe_targets(recipe)
    present = {t.quant for t in recipe.targets}
    targets += [(GgufTarget(format=GGUF, name=q.lower().replace("_", "-"), quant=q), False)
                for q in PLAN_LADDER if q not in present]
    targets.sort(key=lambda item: _quality_rank(item[0].quant))
    return targets


def _shorter_context(candidates: list[Candidate]) -> Candidate | None:
    """The best-quality candidate that fails only on RAM and fits at a shorter context, if any."""
    for c in candidates:
        failing = {check.name for check in c.report.checks if check.verdict == "fail"}
        if failing == {"ram"} and c.report.suggested_n_ctx:
            return c
    return None


def plan(recipe: Recipe, device: Device, settings: FitSettings, catalog: Iterable[Device] = ()) -> Plan:
    """Fit every target (and, for GGUF, the usual quant ladder) and pick the highest quality that passes.

    Quality order is llama.cpp's KL divergence ranking of the quant types; ONNX targets keep recipe order.
    A candidate that only passes inside the headroom or speed margin (warn) is chosen when nothing passes.
    """
    catalog = list(catalog)
    targets = FORMATS[TASKS[recipe.task].format].hook("plan_candidates")(recipe)
    candidates = [Candidate(target.name, in_recipe, fit(from_recipe(recipe, target), device, settings, catalog))
                  for target, in_recipe in targets]
    best = next((c for c in candidates if c.report.verdict == "pass"), None)
    best = best or next((c for c in candidates if c.report.verdict == "warn"), None)
    if best is None:
        summary = (f"nothing fits {device.id}: even {candidates[-1].report.quant} "
                   f"({candidates[-1].target_name}) fails: {candidates[-1].report.reason}")
        shorter = _shorter_context(candidates)
        if shorter is not None:
            summary += (f"; with a shorter context {shorter.target_name} ({shorter.report.quant}) fits at --ctx "
                        f"{shorter.report.suggested_n_ctx} (serve it with --n-ctx {shorter.report.suggested_n_ctx})")
    else:
        where = "" if best.in_recipe else f" (not in the recipe: add a gguf target with quant: {best.report.quant})"
        summary = f"best for {device.id}: {best.target_name} ({best.report.quant}){where}; {best.report.reason}"
        if best.report.verdict == "warn":
            summary += " [inside the safety margin]"
    return Plan(candidates=candidates, best=best, summary=summary)


# -- the whole library: which recipe x target to ship to a board ------------------------------------

@dataclass(frozen=True)
class Ranked:
    """One recipe target on the board, with the recipe it comes from."""

    recipe: str
    recipe_file: str
    candidate: Candidate

    def as_dict(self) -> dict:
        r = self.candidate.report
        return {"recipe": self.recipe, "recipe_file": self.recipe_file, "target": self.candidate.target_name,
                "quant": r.quant, "in_recipe": self.candidate.in_recipe, "parameters": r.parameters,
                "verdict": r.verdict, "reason": r.reason, "required_ram_bytes": r.memory["required"],
                "disk_bytes": r.disk_bytes, "decode_tok_s": r.decode_tok_s, "decode_tok_s_short": r.decode_tok_s_short,
                "latency_ms": r.latency_ms, "suggested_n_ctx": r.suggested_n_ctx}


@dataclass(frozen=True)
class LibraryPlan:
    device: str
    task: str
    ranked: list[Ranked]  # fits and meets the floor, best first
    dropped: list[Ranked]  # everything else, with the report's reason
    invalid: dict[str, str]  # recipe file -> why it could not be read

    def as_dict(self) -> dict:
        return {"device": self.device, "task": self.task, "ranked": [r.as_dict() for r in self.ranked],
                "dropped": [r.as_dict() for r in self.dropped], "invalid_recipes": self.invalid}


def library_rank(entry: Ranked) -> tuple:
    """Best first: passes outright before inside a margin, then the larger model (more parameters), then the
    higher-quality quant of it (llama.cpp's KL-divergence order), then the faster one."""
    r = entry.candidate.report
    speed = r.decode_tok_s if r.decode_tok_s is not None else -(r.latency_ms or 0.0)
    return (r.verdict != "pass", -r.parameters, _quality_rank(r.quant), -speed, entry.recipe, entry.candidate.target_name)


def plan_library(recipes: Iterable[tuple[str, Recipe | str]], task: str, device: Device, settings: FitSettings,
                 catalog: Iterable[Device] = ()) -> LibraryPlan:
    """Plan every recipe of ``task`` (``(file, Recipe)``, or ``(file, error)`` for a file that did not load) on ``device``."""
    catalog = list(catalog)
    fits, dropped, invalid = [], [], {}
    for path, recipe in recipes:
        if isinstance(recipe, str):
            invalid[path] = recipe
            continue
        if recipe.task != task:
            continue
        for candidate in plan(recipe, device, settings, catalog).candidates:
            entry = Ranked(recipe.name, path, candidate)
            (dropped if candidate.report.verdict == "fail" else fits).append(entry)
    return LibraryPlan(device=device.id, task=task, ranked=sorted(fits, key=library_rank),
                       dropped=sorted(dropped, key=lambda e: (e.recipe, _quality_rank(e.candidate.report.quant))),
                       invalid=invalid)
