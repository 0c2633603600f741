"""The design's import rule: flows -> tasks -> models -> configs, one way, no circle; models stay free of Ray,
Prefect and S3; inside tasks/, the Ray stream and the output formats know nothing of Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["configs", "models", "tasks", "flows"]  # each may import only the ones before it
MODELS_MUST_NOT = {"ray", "prefect", "s3fs", "fsspec", "pyarrow"}
# tasks/ inside: each part may import only the ones before it (the Prefect steps on top)
TASK_PARTS = ["storage", "inputs", "preflight", "outputs", "stream", "run_record", "run", "artifacts", "steps"]
PREFECT_FREE = {"storage", "inputs", "preflight", "outputs", "stream", "run_record", "run"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["ifbatch", *parts])


def imports(path: Path) -> set[str]:
    """Absolute names of everything a file imports, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # `from . import x` names a module too
    return found


def package_files() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}


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


def test_inside_tasks_the_stream_and_outputs_stay_below_the_prefect_steps():
    for path in (ROOT / "tasks").rglob("*.py"):
        rel = path.relative_to(ROOT / "tasks").with_suffix("").parts
        if rel == ("__init__",):
            continue
        part = rel[0]
        allowed = set(TASK_PARTS[: TASK_PARTS.index(part) + 1])
        for name in imports(path):
            parts = name.split(".")
            if parts[:2] == ["ifbatch", "tasks"] and len(parts) > 2:
                assert parts[2] in allowed, f"{path.relative_to(ROOT)} imports {name}"
            if part in PREFECT_FREE:
                assert parts[0] != "prefect", f"{path.relative_to(ROOT)} imports {name}"


def test_no_import_circle():
    files = package_files()
    graph = {m: {n for n in imports(p) if n in files and n != m} for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(m) :], m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_every_stage_is_one_config_section_with_one_runner_and_one_registered_step_in_its_order():
    from ifbatch.configs.schema import DIFFUSION_STAGES, STAGES, CascadeConfig
    from ifbatch.models.cascade import RUNNERS
    from ifbatch.models.params import PARAMS
    from ifbatch.tasks.stream.stages import STEPS

    assert STAGES == ("text_encoder", "stage_1", "scorer", "stage_2", "stage_3")  # the rows' way through them
    assert STEPS.names == list(STAGES) and sorted(RUNNERS) == sorted(STAGES) and tuple(PARAMS) == DIFFUSION_STAGES
    assert all(s in CascadeConfig.model_fields for s in STAGES)


def test_the_writers_and_the_stage_plumbing_load_without_torch():
    """A writer actor (and the cluster simulation's fake stages) imports the stage plumbing but runs no model: it
    must not pay torch's import (~1.5 s of CPU a process, measured; a run starts one or more writers)."""
    import subprocess
    import sys

    code = (
        "import sys, ifbatch.tasks.outputs.writer, ifbatch.tasks.stream.stages, ifbatch.tasks.stream.ray.executor\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_the_readme_is_short_and_every_link_in_the_docs_resolves():
    """The README is what a newcomer reads in five minutes (at most 200 lines); the rest is in docs/, linked."""
    import re

    root = Path(__file__).resolve().parents[2]
    assert len((root / "README.md").read_text().splitlines()) <= 200
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    broken = [
        (page.name, target)
        for page in pages
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
        if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()
    ]
    assert not broken, broken


def test_every_manifest_column_is_in_the_output_pages_table():
    """docs/output.md's table names every column a manifest record has (a stage's parameters and seconds by their
    pattern), and no column it does not have."""
    import re

    from ifbatch.configs.schema import STAGES
    from ifbatch.tasks.outputs.manifest import SCHEMA

    page = (Path(__file__).resolve().parents[2] / "docs" / "output.md").read_text()
    named = {n for row in re.findall(r"^\| (`.*?) \|", page, re.M) for n in re.findall(r"`([^`]+)`", row)}
    columns = set(SCHEMA.names)
    patterns = {
        re.sub(r"^stage_\d_", "stage_N_", c) if c.startswith("stage_") else "seconds_<stage>" if c[8:] in STAGES else c
        for c in columns
    }
    assert patterns == named, (sorted(patterns - named), sorted(named - patterns))


def test_every_package_of_the_tree_is_installed():
    """pyproject's package list names every folder with an __init__.py below the four roots: a non-editable install
    (a wheel, a Docker image) has exactly those, and a package left out imports here (editable) and not there."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join([name, *init.parent.relative_to(root / folder).parts])
        for name, folder in setup["package-dir"].items()
        for init in (root / folder).rglob("__init__.py")
    }
    assert set(setup["packages"]) == found, sorted(found ^ set(setup["packages"]))
