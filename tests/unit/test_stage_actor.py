"""The stage actors' batch plumbing, without Ray: row isolation, grouping on resolved parameters, timings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ifbatch.models.params import StageParams
from ifbatch.tasks.stream.stages import StageActor, placement


class Recording(StageActor):
    """Stage I's plumbing with a model call that records its groups and fails whenever a 'poison' row is in it."""

    name = "stage_1"

    def __init__(self):
        self.calls: list[tuple[list[int], StageParams]] = []

    def compute(self, batch, idx, params):
        self.calls.append((list(idx), params))
        if any(batch["prompt"][i] == "poison" for i in idx):
            raise RuntimeError("cannot draw poison")
        return {"image_1": np.ones((len(idx), 3, 2, 2), np.float16)}


def batch_of(prompts, steps, timesteps=None):
    n = len(prompts)
    return {
        "id": np.array([f"r{i}" for i in range(n)], object),
        "prompt": np.array(prompts, object),
        "seed": np.arange(n),
        "stage_1_steps": np.array(steps),
        "stage_1_guidance_scale": np.full(n, 7.0),
        "stage_1_timesteps": np.array(timesteps or [None] * n, object),
    }


def test_one_failing_row_does_not_sink_its_batch():
    out = Recording()(batch_of(["x", "poison", "y"], [4, 4, 4]))
    assert list(out["error"]) == ["", "stage_1: RuntimeError: cannot draw poison", ""]
    assert out["image_1"][0].sum() == 12 and out["image_1"][1].sum() == 0 and out["image_1"][2].sum() == 12
    assert np.isnan(out["seconds_stage_1"][1]) and out["seconds_stage_1"][0] > 0


def test_rows_run_with_their_own_resolved_parameters():
    stage = Recording()
    stage(batch_of(["a", "b", "c", "d"], [4, 9, 4, 27], [None, None, None, "fast27"]))
    groups = {tuple(idx): p for idx, p in stage.calls}
    assert groups == {
        (0, 2): StageParams(4, 7.0, None),
        (1,): StageParams(9, 7.0, None),
        (3,): StageParams(27, 7.0, "fast27"),
    }


def test_rows_that_failed_upstream_pass_through_untouched():
    batch = batch_of(["a", "b"], [4, 4]) | {"error": np.array(["text_encoder: boom", ""], object)}
    stage = Recording()
    out = stage(batch)
    assert stage.calls == [([1], StageParams(4, 7.0, None))]
    assert out["error"][0] == "text_encoder: boom" and np.isnan(out["seconds_stage_1"][0])


def test_every_row_carries_its_actors_placement_as_one_json_object():
    """Computed once per actor ("{}" outside Ray; node, GPU ids and actor inside)."""
    out = Recording()(batch_of(["a", "b"], [4, 4]))
    assert out["placement_stage_1"][0] == out["placement_stage_1"][1] == placement()
    assert isinstance(json.loads(out["placement_stage_1"][0]), dict)


def test_parameters_that_crossed_the_object_store_keep_their_types():
    batch = batch_of(["a", "b"], [4.0, 4.0], [float("nan"), np.float32("nan")])
    stage = Recording()
    stage(batch)
    [(idx, params)] = stage.calls
    assert idx == [0, 1] and params == StageParams(4, 7.0, None) and type(params.steps) is int


def test_a_ray_stage_actor_is_up_before_its_model_loads_and_its_batches_wait_for_the_load():
    """loads_apart: the constructor returns while the load runs (Ray Data starts the next stage's actors then, so the
    stages load at once); a batch waits for the load and then runs on what it loaded; a load that fails raises on
    every batch, saying why; the class keeps its name (Ray names the actors by it)."""
    import threading

    from ifbatch.models.loading import ModelLoadError
    from ifbatch.tasks.stream.ray.startup import load_failure, loads_apart

    release = threading.Event()

    class Slow(Recording):
        def __init__(self, fail: bool = False):
            assert release.wait(10)
            if fail:
                raise ModelLoadError("cannot load stage_1 model from '/m': bad header")
            super().__init__()

    actor_cls = loads_apart(Slow)
    assert actor_cls.__name__ == "Slow" and issubclass(actor_cls, Slow)
    actor = actor_cls()  # returns at once: the load waits on `release`
    result = []
    caller = threading.Thread(target=lambda: result.append(actor(batch_of(["a", "b"], [4, 4]))))
    caller.start()
    caller.join(0.3)
    assert caller.is_alive() and not result  # the batch waits for the load
    release.set()
    caller.join(10)
    assert result and list(result[0]["error"]) == ["", ""] and [idx for idx, _ in actor.calls] == [[0, 1]]

    failing = loads_apart(Slow)(fail=True)
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="bad header"):
            failing(batch_of(["a"], [4]))
    # what the driver gets is Ray Data's text of it: said as the ModelLoadError itself
    text = "UserCodeException ...\n  ifbatch.models.loading.ModelLoadError: cannot load stage_1 model from '/m': x\n"
    assert str(load_failure(RuntimeError(text))) == "cannot load stage_1 model from '/m': x"
    assert load_failure(RuntimeError("ValueError: other")) is None
