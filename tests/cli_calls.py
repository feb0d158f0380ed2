"""Answer recorded `edgekit` calls with this interpreter's edgekit, all in this one process.

    python tests/cli_calls.py CALLS_DIR

CALLS_DIR holds N.args (the arguments, a NUL after each) and N.cwd (the folder) per call, as tests/test_install.py's
recording shim writes them; this writes N.out, N.err and N.code for each, from edgekit.cli.main run in that folder
(helpers.run_cli) at the terminal width $COLUMNS. Run by an installed venv's python, the checkout is not on sys.path:
the answers are the installed wheel's.
"""

import os
import sys
from pathlib import Path

from helpers import run_cli

if __name__ == "__main__":
    calls = Path(sys.argv[1])
    for n in range(len(list(calls.glob("*.args")))):
        args = (calls / f"{n}.args").read_text().split("\0")[:-1]
        done = run_cli(*args, cwd=Path((calls / f"{n}.cwd").read_text().strip()), columns=int(os.environ.get("COLUMNS", "80")))
        (calls / f"{n}.out").write_text(done.stdout)
        (calls / f"{n}.err").write_text(done.stderr)
        (calls / f"{n}.code").write_text(str(done.returncode))
