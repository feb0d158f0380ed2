"""Recipe schema: the shipped recipes are valid, bad ones fail with file:field messages and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, write_recipe

from edgekit.errors import RecipeError
from edgekit.schema import generated_schemas, load_recipe


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    loaded = load_recipe(path)
    assert loaded.recipe.name == path.stem
    assert len(loaded.sha256) == 64


def test_checked_in_json_schemas_match_the_models():
    for relative, schema in generated_schemas().items():
        on_disk = json.loads((REPO / relative).read_text())
        assert on_disk == json.loads(json.dumps(schema)), f"{relative} drifted: run scripts/generate_schemas.py"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"nmae": "x"}, "nmae: unknown key"),
        ({"task": "summarization"}, "task: Input should be"),
        ({"targets": []}, "targets: List should have at least 1 item"),
        ({"max_length": "long"}, "max_length: Input should be a valid integer"),
        ({"source": {}}, "give exactly one of 'id'"),
        ({"targets": [{"format": "onnx", "name": "a", "quantization": {"mode": "static"}}]}, "needs a 'calibration' section"),
        ({"targets": [{"format": "gguf", "name": "q", "quant": "Q4_K_M"}]}, "format gguf is for text-generation"),
        ({"targets": [{"format": "tflite", "name": "a"}]}, "does not match any of the expected tags"),
    ],
)
def test_bad_recipe_names_file_and_field(tmp_path, overrides, expected):
    path = write_recipe(tmp_path / "bad.yaml", tmp_path, **overrides)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_missing_field_is_reported(tmp_path):
    path = tmp_path / "missing.yaml"
    path.write_text("name: x\nsource: {id: a/b}\ntargets: [{format: onnx, name: t}]\n")
    with pytest.raises(RecipeError, match=r"missing\.yaml: task: required field is missing"):
        load_recipe(path)


def test_cli_exit_code_2_on_bad_recipe(tmp_path):
    path = write_recipe(tmp_path / "bad.yaml", tmp_path, unknown_key=1)
    done = subprocess.run([sys.executable, "-m", "edgekit", "export", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown_key: unknown key" in done.stderr


def test_cli_recipes_list_json():
    done = subprocess.run([sys.executable, "-m", "edgekit", "recipes", "list", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    names = {row["name"] for row in rows}
    assert "all-minilm-l6-v2" in names
    assert all(row["error"] is None for row in rows)


def test_cli_recipes_list_exits_2_when_a_recipe_is_invalid(tmp_path):
    write_recipe(tmp_path / "good.yaml", tmp_path)
    write_recipe(tmp_path / "bad.yaml", tmp_path, task="summarization")
    done = subprocess.run([sys.executable, "-m", "edgekit", "recipes", "list", "--dir", str(tmp_path), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    rows = {row["file"]: row for row in json.loads(done.stdout)}
    assert rows["good.yaml"]["error"] is None and "task: Input should be" in rows["bad.yaml"]["error"]
