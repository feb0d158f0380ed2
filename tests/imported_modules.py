"""Import the modules named on the command line in a fresh interpreter; print every module then loaded, as JSON.

    python tests/imported_modules.py edgekit.serve.app [MODULE ...]
"""

import importlib
import json
import sys

if __name__ == "__main__":
    for name in sys.argv[1:]:
        importlib.import_module(name)
    print(json.dumps(sorted(sys.modules)))
