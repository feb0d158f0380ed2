"""Worker plugin for test_golden.py: records on which thread a model worker runs its golden checks.

Imported by the worker before it loads its bundle (``WorkerConfig.plugins``); it wraps
``edgekit.runtime.golden.check_golden`` and writes the thread's name and whether it is the main thread to the
file ``$EDGEKIT_GOLDEN_PROBE``, then runs the real check.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import edgekit.runtime.golden as golden

_check = golden.check_golden


def check_golden(manifest, model):
    thread = threading.current_thread()
    Path(os.environ["EDGEKIT_GOLDEN_PROBE"]).write_text(f"{thread.name} {thread is threading.main_thread()}")
    return _check(manifest, model)


golden.check_golden = check_golden
