"""Write the JSON Schemas of edgekit's file formats into the repo (a test fails when they drift)."""

import json
from pathlib import Path

from edgekit.schema import generated_schemas

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    for relative, schema in generated_schemas().items():
        path = ROOT / relative
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {relative}")
