"""`edgekit plan`: which target of a recipe is the best one that fits a board and meets a speed floor."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edgekit.fit.estimate import FitReport, FitSettings, fit
from edgekit.fit.facts import from_recipe
from edgekit.fit.quant import PLAN_LADDER, QUALITY_ORDER
from edgekit.schema.device import Device
from edgekit.formats import FORMATS, TASKS
from edgekit.formats.gguf import NAME as GGUF
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
