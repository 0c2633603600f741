"""The design's import rule: flows -> tasks -> models -> configs, and models stay free of Ray, Prefect and S3."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["configs", "models", "tasks", "flows"]  # each may import only the ones before it
MODELS_MUST_NOT = {"ray", "prefect", "s3fs", "fsspec", "pyarrow"}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_flow_one_way(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    for path in (ROOT / layer).rglob("*.py"):
        for name in imports(path):
            parts = name.split(".")
            if parts[0] == "ifbatch" and len(parts) > 1:
                assert parts[1] in allowed, f"{path.relative_to(ROOT)} imports {name}"
            if layer in ("configs", "models"):
                assert parts[0] not in MODELS_MUST_NOT, f"{path.relative_to(ROOT)} imports {name}"
