"""Copies of bundles for serving tests (imported as ``served_copies``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgekit.schema.manifest import MANIFEST_NAME


def without_golden(models: Path, bundle: Path) -> Path:
    """A hard-linked copy of ``bundle`` in the folder ``models`` whose manifest holds no golden record.

    A worker reruns a bundle's golden record before it serves it: ~0.9 s of CPU per load of the exported SmolLM2. Tests
    about what the daemon does with requests load the copy; the record's check at load is tested where it is the point
    (test_serve_api.py, test_fleet.py, test_golden.py) and on the exported bundle served by test_tool_formats.py's
    daemon. The manifest is rewritten as a new file: the hard link would change the original's.
    """
    models.mkdir(parents=True, exist_ok=True)
    copy = models / bundle.name
    shutil.copytree(bundle, copy, copy_function=_link_or_copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["golden"] = None
    (copy / MANIFEST_NAME).unlink()
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    return copy


def _link_or_copy(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
