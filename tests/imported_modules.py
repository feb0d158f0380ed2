"""Import the modules named on the command line in a fresh interpreter; print every module then loaded, as JSON.

    python tests/imported_modules.py edgekit.serve.app [MODULE ...]
    python tests/imported_modules.py --groups '[["edgekit.serve.app"], ["edgekit.fit", "edgekit.cli.fit"]]'

With --groups, each group is imported in its own child forked from this bare interpreter (nothing but the standard
library loaded, as in a fresh one: one interpreter start for all groups); the answer is one list per group.
"""

import importlib
import json
import os
import sys


def imported_in_child(names: list[str]) -> list[str]:
    """The modules loaded after importing ``names`` in a forked child (this process imports nothing)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            for name in names:
                importlib.import_module(name)
            payload = json.dumps(sorted(sys.modules)).encode()
        except BaseException as exc:  # reported to the parent, which fails
            payload, code = json.dumps({"error": repr(exc)}).encode(), 1
        with os.fdopen(write, "wb") as out:
            out.write(payload)
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        data = json.loads(answer.read())
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"importing {names} failed: {data}")
    return data


if __name__ == "__main__":
    if sys.argv[1:2] == ["--groups"]:
        print(json.dumps([imported_in_child(group) for group in json.loads(sys.argv[2])]))
    else:
        for name in sys.argv[1:]:
            importlib.import_module(name)
        print(json.dumps(sorted(sys.modules)))
