"""The daemon's bundle verification sorts good bundles from hostile ones (the bundles are built in serve_fixtures)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from serve_fixtures import MINILM_NAME, SMOLLM_NAME, hostile_bundles, link_bundles

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


# ---- tests of the verification the daemon relies on ------------------------------------------


def test_verifier_subprocess_accepts_good_and_rejects_hostile(tmp_path, smollm_bundle, minilm_bundle):
    """docs/reliability.md case 1, 3, 5: each hostile bundle is rejected with its reason; the good ones pass."""
    from edgekit.serve.discovery import bundle_dirs, verify_bundles

    async def verify_all(paths: list[Path]) -> list:
        return [row async for row in verify_bundles(paths, timeout=600.0)]

    models = link_bundles(tmp_path / "models", smollm_bundle, minilm_bundle)
    hostile = hostile_bundles(models, smollm_bundle, minilm_bundle)
    rows = {Path(r.dir).name: r for r in asyncio.run(verify_all(bundle_dirs(models)))}
    assert rows[SMOLLM_NAME].ok and rows[SMOLLM_NAME].task == "text-generation"
    assert rows[MINILM_NAME].ok and rows[MINILM_NAME].task == "feature-extraction"
    assert not rows[hostile["tampered"].name].ok and "sha256 differs" in rows[hostile["tampered"].name].error
    assert not rows[hostile["absurd-counts"].name].ok and "4294967303 tensors" in rows[hostile["absurd-counts"].name].error
    assert not rows[hostile["truncated"].name].ok and "past the end" in rows[hostile["truncated"].name].error
    escape = rows[hostile["onnx-escape"].name]
    assert not escape.ok and "outside the bundle" in escape.error
    assert len(rows) == 6
