"""The KubeRay RayJob example stays runnable: a valid RayJob whose command ifbatch's CLI accepts, on Ray's pinned
version, with the GPUs its pods request given to Ray. (Not run: there is no Kubernetes here.)"""

from __future__ import annotations

import re
import shlex
import tomllib

import yaml

from ifbatch.flows.cli import parser

from ..helpers import ROOT

MANIFEST = ROOT / "deploy" / "kuberay" / "rayjob.yaml"


def pinned(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.split(r"==", d)[1] for d in deps if re.match(rf"{re.escape(package)}(\[.*\])?==", d))


def test_rayjob_example_is_a_valid_job_that_ifbatch_accepts():
    job = yaml.safe_load(MANIFEST.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and job["metadata"]["name"]
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["ifbatch", "run"]
    args = parser().parse_args(argv[1:])  # exits (fails the test) on an option ifbatch does not have
    assert args.ray_address == "auto" and args.preset in ("if-xl", "if-l", "if-m")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned("ray")
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    pods = [head["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["image"] and container["name"]
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]  # never a literal secret
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(group["rayStartParams"]["num-gpus"]) == int(limits["nvidia.com/gpu"])


def test_the_image_is_built_on_the_pinned_ray_and_python():
    dockerfile = (ROOT / "deploy" / "kuberay" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{pinned('ray')}-py311-gpu" in dockerfile
    assert f"torch=={pinned('torch')}" in dockerfile


def test_prefect_yaml_is_written_from_the_definitions_serve_uses():
    """One definition of the deployments: prefect.yaml is `ifbatch deployments` output, so it cannot drift from
    what `ifbatch serve` serves (edit flows/deploy.py, then `ifbatch deployments --write prefect.yaml`)."""
    from ifbatch.flows.deploy import ENTRYPOINT, deployments, prefect_yaml

    committed = (ROOT / "prefect.yaml").read_text()
    assert committed == prefect_yaml(), "prefect.yaml is stale: run `ifbatch deployments --write prefect.yaml`"
    doc = yaml.safe_load(committed)
    served = {d.name: d for d in deployments()}
    assert [d["name"] for d in doc["deployments"]] == list(served)
    for d in doc["deployments"]:
        s = served[d["name"]]
        assert d["tags"] == list(s.tags) and d["entrypoint"] == ENTRYPOINT
        assert set(d["parameters"]["params"]) == set(s.parameters["params"])
        assert bool(d.get("schedules")) == bool(s.schedules)
    assert doc["deployments"][0]["description"] == served["generate"].description
    path, func = ENTRYPOINT.split(":")
    assert (ROOT / path).exists() and f"def {func}(" in (ROOT / path).read_text()


def test_the_run_takes_every_flow_parameter_typed():
    """The flow's parameters (the Run form, the CLI's arguments) and the run's typed parameters are the same set:
    a parameter added to one and not the other fails here, not by a key missing mid-run."""
    import dataclasses

    import pytest

    from ifbatch.flows.generate import GenerateParams
    from ifbatch.tasks.run_record import RunParams

    assert set(GenerateParams.model_fields) == {f.name for f in dataclasses.fields(RunParams)}
    given = GenerateParams(prompts="p.parquet", output="s3://b/o", overrides=["seed=3"], wait=True)
    params = RunParams.of(given)
    assert params.overrides == ("seed=3",) and params.wait and params.record()["overrides"] == ["seed=3"]
    assert params.record() == given.model_dump()  # the run record keeps them as given
    with pytest.raises(TypeError, match=r"unknown run parameters \['outptu'\]"):
        RunParams.of({"prompts": "p", "outptu": "o"})
