"""The stream's steps: each holds what it loaded (a cascade stage, the scorer) and maps batches of rows (numpy
dicts); STEPS is the one list of them, in order, that every executor runs (Ray Data actor pools, or chained in
this process). A new step is a class and a registration (`STEPS.register`).

Rows carry an `error` column: a row that failed upstream passes through untouched (as does a row the scorer
`filtered`), a batch that raises is retried row by row so that one bad row never sinks its batch mates. Rows are
grouped on their resolved stage parameters (columns `stage_N_*`, worked out when the table was read) and run with
exactly those. Embeddings and images travel between stages as fp16 (fp32 for fp32 stages) numpy through the object
store, never through the driver. Each stage adds `seconds_<stage>` and `placement_<stage>` (node, GPU ids, actor,
placement group; JSON).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np

from ifbatch.configs.schema import SECTIONS, CascadeConfig, Execution
from ifbatch.models.params import PARAM_TYPES, PARAMS, StageParams

from ..inputs.expand import expand
from ..inputs.params import cell

Batch = dict[str, np.ndarray]


def param(name: str, value: Any) -> Any:
    """A resolved stage parameter from a numpy cell, as its own type: a column that went through the object
    store may come back with its nulls as NaN and its integers as floats."""
    v = cell(value)
    return None if v is None else PARAM_TYPES[name](v)


def placement() -> str:
    """Where this actor runs, as JSON: node id, GPU ids, actor id, and the placement group it was planned into
    ("pg", absent when the stages were placed by hand; "{}" outside Ray)."""
    import ray

    if not ray.is_initialized():
        return "{}"
    ctx = ray.get_runtime_context()
    where = {
        "node": ctx.get_node_id()[:12],
        "gpus": [str(g) for g in ray.get_gpu_ids()],
        "actor": (ctx.get_actor_id() or "")[:12],
    }
    if ctx.get_placement_group_id():
        where["pg"] = ctx.get_placement_group_id()[:12]
    return json.dumps(where, sort_keys=True)


class StageActor:
    """One step of the stream, constructed with the run's config and called on batches of rows. Common batch
    plumbing: skip failed rows, group by parameters, fall back to row by row.

    A step named as a config section (a stage: configs/schema.py SECTIONS) takes its model, batch, replicas and
    resources from it, runs when the config has the stage (CascadeConfig.stages) and is planned onto the GPUs; any
    other step runs with its class's `batch_size` and `num_cpus`, one actor, no GPU. `reads`: the config keys its
    constructor reads besides its section, `device` and `tiny` (an executor that keeps steps loaded across runs
    reloads one when they change)."""

    name = ""
    drops: tuple[str, ...] = ()  # columns no later stage needs
    expands = False  # the batch leaves as one row per image to make (inputs/expand.py)
    reads: ClassVar[tuple[str, ...]] = ()
    batch_size: ClassVar[int] = 16  # (a step without a config section)
    num_cpus: ClassVar[float] = 1.0
    _where: str | None = None

    @classmethod
    def section(cls, cfg: CascadeConfig) -> Execution | None:
        """Its config section, when it is a stage."""
        return getattr(cfg, cls.name) if cls.name in SECTIONS else None

    @classmethod
    def runs(cls, cfg: CascadeConfig) -> bool:
        return cls.name not in SECTIONS or cls.name in cfg.stages

    @classmethod
    def rows_per_call(cls, cfg: CascadeConfig) -> int:
        return cfg.rows_per_call(cls.name) if cls.name in SECTIONS else cls.batch_size

    @classmethod
    def load_key(cls, cfg: CascadeConfig) -> str:
        """What its loaded object depends on (not its batch, replicas or resources): a change reloads it."""
        keys = {"device", "tiny", *cls.reads, *([cls.name] if cls.name in SECTIONS else [])}
        dump = cfg.model_dump(mode="json")
        picked = {}
        for key in sorted(keys):
            top, _, sub = key.partition(".")
            value = dump.get(top)
            if isinstance(value, dict):
                value = value.get(sub) if sub else {k: v for k, v in value.items() if k not in PER_CALL}
            picked[key] = value
        return json.dumps(picked, sort_keys=True)

    def groups(self, batch: Batch, idx: list[int]) -> dict[StageParams | None, list[int]]:
        names = PARAMS.get(self.name)
        if not names:
            return {None: idx} if idx else {}
        out: dict[StageParams | None, list[int]] = defaultdict(list)
        for i in idx:
            out[StageParams(**{n: param(n, batch[f"{self.name}_{n}"][i]) for n in names})].append(i)
        return out

    def compute(self, batch: Batch, idx: list[int], params: StageParams | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def empty_outputs(self, batch: Batch, n: int) -> dict[str, np.ndarray]:
        """Placeholders of the right shapes for a batch in which every row failed."""
        return {}

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["id"])
        errors = batch["error"].copy() if "error" in batch else np.array([""] * n, dtype=object)
        filtered = batch.get("filtered", np.zeros(n, bool))
        todo = [i for i in range(n) if not errors[i] and not filtered[i]]
        results: dict[int, dict[str, np.ndarray]] = {}
        t0 = time.perf_counter()
        for params, idx in self.groups(batch, todo).items():
            try:
                out = self.compute(batch, idx, params)
                results.update({i: {k: v[j] for k, v in out.items()} for j, i in enumerate(idx)})
            except Exception:  # retry one by one: find the bad row, keep the others
                for i in idx:
                    try:
                        out = self.compute(batch, [i], params)
                        results[i] = {k: v[0] for k, v in out.items()}
                    except Exception as e:
                        errors[i] = f"{self.name}: {type(e).__name__}: {e}"[:2000]
        seconds = (time.perf_counter() - t0) / max(len(todo), 1)
        batch = dict(batch)
        if results:
            template = next(iter(results.values()))
            for key, example in template.items():
                arr = np.asarray(example)
                if key in batch:  # a column an earlier step made: rows not computed here keep its value
                    col = np.array(batch[key], dtype=object if arr.dtype.kind in "OUS" else arr.dtype, copy=True)
                else:
                    col = np.empty(n, dtype=object) if arr.dtype.kind in "OUS" else np.zeros((n, *arr.shape), arr.dtype)
                for i, r in results.items():
                    col[i] = r[key]
                batch[key] = col
        else:
            batch.update(self.empty_outputs(batch, n))
        batch["error"] = errors
        batch[f"seconds_{self.name}"] = np.array([seconds if i in results else np.nan for i in range(n)])
        if self._where is None:
            self._where = placement()  # fixed for the actor's life
        batch[f"placement_{self.name}"] = np.full(n, self._where, dtype=object)
        for key in self.drops:
            batch.pop(key, None)
        return expand(batch) if self.expands else batch


def _seeds(batch: Batch, idx: list[int]) -> list[int]:
    """The seeds stages II and III run with: the chosen candidate's (best of k), else the row's. Then a run with
    `seed` = a record's candidate_seed and k = 1 makes that record's image again."""
    seeds = batch["candidate_seed"] if "candidate_seed" in batch else batch["seed"]
    return [int(seeds[i]) for i in idx]


class EncodeStage(StageActor):
    """Encodes each prompt once, then hands on one row per image to make, each with the row's embeddings."""

    name = "text_encoder"
    expands = True

    def __init__(self, cfg: CascadeConfig):
        from ifbatch.models.encode import TextEncoder

        self.encoder = TextEncoder(cfg.text_encoder, cfg.device)
        self.dim = int(self.encoder.model.config.d_model)
        self.length = cfg.text_encoder.max_length

    def compute(self, batch, idx, params):
        enc = self.encoder.encode([batch["prompt"][i] for i in idx], [batch["negative_prompt"][i] for i in idx])
        return {
            "prompt_embeds": enc.prompt_embeds,
            "negative_embeds": enc.negative_embeds,
            "truncated": np.array(enc.truncated),
            "negative_truncated": np.array(enc.negative_truncated),
        }

    def empty_outputs(self, batch, n):
        z = np.zeros((n, self.length, self.dim), dtype=np.float16)
        f = np.zeros(n, dtype=bool)
        return {"prompt_embeds": z, "negative_embeds": z.copy(), "truncated": f, "negative_truncated": f.copy()}


class Stage1Stage(StageActor):
    """64 px images. When the run chooses (best of k, a score filter: cfg.chooses) each row leaves with its k
    candidates (`candidates_1`, `candidate_seeds`) for the scorer, made stage_1.batch_size images a call."""

    name = "stage_1"
    reads = ("text_encoder.max_length", "data.candidates_per_image", "data.min_clip_score")

    def __init__(self, cfg: CascadeConfig):
        from ifbatch.models.stage_1 import Stage1

        self.runner = Stage1(cfg.stage_1, cfg.device)
        self.runner.warm_up(*self.runner.example(cfg.text_encoder.max_length))
        self.k = cfg.data.candidates_per_image if cfg.chooses else 0
        self.size = cfg.stage_1.batch_size

    def compute(self, batch, idx, params):
        if not self.k:
            seeds = _seeds(batch, idx)
            return {"image_1": self.runner(batch["prompt_embeds"][idx], batch["negative_embeds"][idx], seeds, params)}
        from ifbatch.models.seeding import candidate_seed

        k, b = self.k, self.size
        seeds = np.array([[candidate_seed(s, j) for j in range(k)] for s in _seeds(batch, idx)], dtype=np.int64)
        pe, ne = (np.repeat(batch[c][idx], k, axis=0) for c in ("prompt_embeds", "negative_embeds"))
        flat = [int(s) for s in seeds.reshape(-1)]
        out = np.concatenate(
            [self.runner(pe[i : i + b], ne[i : i + b], flat[i : i + b], params) for i in range(0, len(flat), b)]
        )
        return {"candidates_1": out.reshape(len(idx), k, *out.shape[1:]), "candidate_seeds": seeds}

    def empty_outputs(self, batch, n):
        s = self.runner.size
        if not self.k:
            return {"image_1": np.zeros((n, 3, s, s), dtype=np.float16)}
        return {
            "candidates_1": np.zeros((n, self.k, 3, s, s), dtype=np.float16),
            "candidate_seeds": np.zeros((n, self.k), dtype=np.int64),
        }


class ScoreStage(StageActor):
    """Best of k at 64 px: scores each row's candidates against its prompt with CLIP, keeps the best (`image_1`;
    the first on a tie) with its index, seed and every candidate's score; a row whose best scores under
    data.min_clip_score is `filtered` (no later stage makes it)."""

    name = "scorer"
    drops = ("candidates_1", "candidate_seeds")
    reads = ("data.candidates_per_image", "data.min_clip_score")

    def __init__(self, cfg: CascadeConfig):
        from ifbatch.models.scorer import ClipScorer

        self.scorer = ClipScorer(cfg.scorer, cfg.device)
        self.k = cfg.data.candidates_per_image
        self.floor = cfg.data.min_clip_score

    def compute(self, batch, idx, params):
        from ifbatch.models.scorer import to_pixels

        candidates = batch["candidates_1"][idx]  # (n, k, 3, s, s) in [-1, 1]
        n, k = candidates.shape[:2]
        prompts = [str(batch["prompt"][i]) for i in idx for _ in range(k)]
        scores = self.scorer(to_pixels(candidates.reshape(n * k, *candidates.shape[2:])), prompts).reshape(n, k)
        best, rows = scores.argmax(axis=1), np.arange(n)
        floor = -np.inf if self.floor is None else self.floor
        return {
            "image_1": candidates[rows, best],
            "candidate": best.astype(np.int16),
            "candidate_seed": batch["candidate_seeds"][idx][rows, best],
            "candidate_scores": scores,
            "filtered": scores[rows, best] < floor,
        }

    def empty_outputs(self, batch, n):
        c = batch["candidates_1"]
        return {
            "image_1": np.zeros((n, *c.shape[2:]), dtype=c.dtype),
            "candidate": np.zeros(n, np.int16),
            "candidate_seed": np.zeros(n, np.int64),
            "candidate_scores": np.full((n, self.k), np.nan, np.float32),
            "filtered": np.zeros(n, bool),
        }


class Stage2Stage(StageActor):
    name = "stage_2"
    drops = ("image_1", "prompt_embeds", "negative_embeds")
    reads = ("text_encoder.max_length",)

    def __init__(self, cfg: CascadeConfig):
        from ifbatch.models.stage_2 import Stage2

        self.runner = Stage2(cfg.stage_2, cfg.device)
        self.runner.warm_up(*self.runner.example(cfg.text_encoder.max_length))

    def compute(self, batch, idx, params):
        return {
            "image_2": self.runner(
                batch["image_1"][idx],
                batch["prompt_embeds"][idx],
                batch["negative_embeds"][idx],
                _seeds(batch, idx),
                params,
            )
        }

    def empty_outputs(self, batch, n):
        s = self.runner.size
        return {"image_2": np.zeros((n, 3, s, s), dtype=np.float16)}


def _unet_sample_size(section) -> int:
    """The side of the images a stage's UNet makes, from its config file alone (no weights)."""
    from diffusers import UNet2DConditionModel

    path = section.source
    return int(UNet2DConditionModel.load_config(path, subfolder="unet", revision=section.revision)["sample_size"])


class Stage3Stage(StageActor):
    name = "stage_3"
    drops = ("image_2",)
    reads = ("stage_2", "safety", "scorer")

    def __init__(self, cfg: CascadeConfig):
        from ifbatch.models.safety import Safety
        from ifbatch.models.stage_3 import Stage3

        self.runner = Stage3(cfg.stage_3, cfg.device)
        if self.runner.compiled:
            self.runner.warm_up(*self.runner.example(_unet_sample_size(cfg.stage_2)))
        self.safety = Safety(cfg.safety, cfg.safety_source, cfg.stage_3.dtype, cfg.device)
        self.scorer = None
        if cfg.scorer.source is not None:  # every final image's clip_score, so that any output can be filtered
            from ifbatch.models.scorer import ClipScorer

            self.scorer = ClipScorer(cfg.scorer, cfg.device)

    def compute(self, batch, idx, params):
        images = self.runner(
            batch["image_2"][idx],
            [batch["prompt"][i] for i in idx],
            [batch["negative_prompt"][i] for i in idx],
            _seeds(batch, idx),
            params,
        )
        safe = self.safety(images)
        flag = lambda xs: np.array([-1 if x is None else int(x) for x in xs], dtype=np.int8)  # noqa: E731
        prompts = [str(batch["prompt"][i]) for i in idx]
        return {
            "image": safe.images,
            "clip_score": np.full(len(idx), np.nan, np.float32)
            if self.scorer is None
            else self.scorer(safe.images, prompts),
            "nsfw": flag(safe.nsfw),
            "watermark_detected": flag(safe.watermark_detected),
            "watermarked": np.array(safe.watermarked),
        }

    def empty_outputs(self, batch, n):
        s = 4 * batch["image_2"].shape[-1]  # the x4 upscaler
        return {
            "image": np.zeros((n, s, s, 3), dtype=np.uint8),
            "clip_score": np.full(n, np.nan, np.float32),
            "nsfw": np.full(n, -1, np.int8),
            "watermark_detected": np.full(n, -1, np.int8),
            "watermarked": np.zeros(n, bool),
        }


PER_CALL = {"batch_size", "replicas", "num_gpus", "num_cpus"}  # how a step is called, not what it loads


class Steps:
    """The stream's steps in order: the one list every executor runs. The cascade's stages are registered here in
    the order of their config sections (a test holds them to it); another step is registered after the step it
    follows."""

    def __init__(self, steps: list[type[StageActor]]):
        self._steps = list(steps)

    def __iter__(self) -> Iterator[type[StageActor]]:
        return iter(list(self._steps))

    def __getitem__(self, name: str) -> type[StageActor]:
        for step in self._steps:
            if step.name == name:
                return step
        raise KeyError(f"no step named {name!r}; the steps are {self.names}")

    def register(self, step: type[StageActor], after: str) -> None:
        """Add `step` right after the step named `after`."""
        if not step.name or any(s.name == step.name for s in self._steps):
            raise ValueError(f"a step needs a name of its own: {step.name!r} (the steps: {self.names})")
        self._steps.insert(self._steps.index(self[after]) + 1, step)

    def unregister(self, name: str) -> None:
        self._steps.remove(self[name])

    @contextlib.contextmanager
    def registered(self, step: type[StageActor], after: str) -> Iterator[None]:
        """`step` registered for the block (a test's)."""
        self.register(step, after)
        try:
            yield
        finally:
            self.unregister(step.name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._steps]

    def for_run(self, cfg: CascadeConfig, actors: Mapping[str, type] | None = None) -> list[type[StageActor]]:
        """The steps a run with this config has, in order; `actors` stands other classes in for some (by name)."""
        return [(actors or {}).get(s.name, s) for s in self._steps if s.runs(cfg)]


STEPS = Steps([EncodeStage, Stage1Stage, ScoreStage, Stage2Stage, Stage3Stage])
