"""The typed run configuration: every knob of a run, its default, its bounds, in one place.

Defaults are the model card's (DeepFloyd IF-I-XL + IF-II-L + SD x4 upscaler, fp16, 100/50/75 steps,
guidance 7/4/9, noise 250/100). Presets in this folder override only what differs.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

Dtype = Literal["float32", "float16", "bfloat16"]
Device = Literal["auto", "cpu", "cuda"]
TimestepPreset = Literal["fast27", "smart27", "smart50", "smart100", "smart185", "super27", "super40", "super100"]


class Section(BaseModel):
    """Strict, frozen, closed: unknown keys and wrong types are errors, never silently coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)
    tiny_subdir: ClassVar[str] = ""  # its models' folder in a generated tiny cascade (laid out like the hub repos)


class ModelRef(Section):
    source: str = Field(min_length=1, description="Hub repo id (org/name) or a local directory laid out like it.")
    revision: str | None = Field(None, description="Hub branch, tag or commit; null = the repo's default branch.")
    variant: str | None = Field("fp16", description="Weight file variant, e.g. 'fp16'; null = the plain files.")
    dtype: Dtype = Field("float16", description="Compute dtype of this stage's weights.")


class Execution(Section):
    """A stage's section: a model run by actors. What the stage is, besides its knobs, is said here once (its step,
    tasks/stream/stages.py, and everything that plans or records it read these)."""

    per_candidate: ClassVar[bool] = False  # its work grows with data.candidates_per_image (best of k)
    chooses_only: ClassVar[bool] = False  # it runs only in a run that chooses (best of k, a score floor)
    params: ClassVar[tuple[str, ...]] = ()  # what shapes its pass over a row (models/params.py; row overrides)

    batch_size: int = Field(4, ge=1, le=1024, description="Rows per model call.")
    num_gpus: float = Field(1.0, ge=0, le=8, description="GPUs per actor; fractions colocate stages on one GPU.")
    num_cpus: float = Field(1.0, ge=0, le=64, description="CPUs reserved per actor.")
    replicas: int = Field(1, ge=1, le=1024, description="Actors running this stage.")


class TextEncoderConfig(ModelRef, Execution):
    tiny_subdir = "IF-I"
    source: str = Field(
        "DeepFloyd/IF-I-XL-v1.0",
        min_length=1,
        description="Repo or directory holding text_encoder/ and tokenizer/ (any IF-I repo).",
    )
    max_length: int = Field(
        77, ge=1, le=512, description="T5 tokens per prompt; longer prompts are truncated and reported."
    )
    clean_caption: bool = Field(
        False,
        description="How prompts and negative prompts are prepared for T5, as the model card's encode_prompt does: "
        "false = lowercased and stripped (the card's call); true = IF's full caption cleaning (diffusers' "
        "_clean_caption: HTML, URLs, CJK punctuation ...). The manifest keeps the prompt as given.",
    )
    batch_size: int = Field(32, ge=1, le=1024)


class DiffusionStage(ModelRef, Execution):
    params = ("steps", "timesteps", "guidance_scale")

    steps: int | None = Field(None, ge=1, le=1000, description="Denoising steps (ignored when timesteps is set).")
    timesteps: TimestepPreset | None = Field(None, description="A named IF timestep schedule instead of steps.")
    guidance_scale: float = Field(7.0, ge=0.0, le=50.0, description="Classifier-free guidance scale (<=1 disables it).")
    compile: bool = Field(
        False,
        description="torch.compile the UNet, compiled at actor start on the stage's batch shape; shorter batches are "
        "padded to it so the shape never changes. Measured 1.35-1.38x on H200 UNets; off until measured on yours.",
    )
    compile_backend: Literal["inductor", "aot_eager"] = Field(
        "inductor",
        description="torch.compile backend: inductor (generated kernels, the fast one) or aot_eager (the same "
        "graph capture without code generation: how the tests check compiled stages on a 2-core CPU).",
    )

    @model_validator(mode="after")
    def _steps_or_timesteps(self) -> DiffusionStage:
        if self.steps is None and self.timesteps is None:
            raise ValueError(
                "one of 'steps' (an int >= 1) or 'timesteps' (a named schedule) must be set; both are null"
            )
        return self


class Stage1Config(DiffusionStage):
    tiny_subdir, per_candidate = "IF-I", True
    source: str = Field("DeepFloyd/IF-I-XL-v1.0", min_length=1)
    steps: int | None = Field(100, ge=1, le=1000)
    guidance_scale: float = Field(7.0, ge=0.0, le=50.0)
    batch_size: int = Field(8, ge=1, le=1024)


class Stage2Config(DiffusionStage):
    tiny_subdir, params = "IF-II", ("steps", "timesteps", "guidance_scale", "noise_level")
    source: str = Field("DeepFloyd/IF-II-L-v1.0", min_length=1)
    steps: int | None = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(4.0, ge=0.0, le=50.0)
    noise_level: int = Field(250, ge=0, le=1000, description="Noise added to the 64 px image before upscaling.")


class Stage3Config(DiffusionStage):
    tiny_subdir, params = "x4-upscaler", ("steps", "guidance_scale", "noise_level")
    source: str = Field("stabilityai/stable-diffusion-x4-upscaler", min_length=1)
    steps: int | None = Field(75, ge=1, le=1000)
    timesteps: None = Field(None, description="The x4 upscaler has no named schedules; use steps.")
    guidance_scale: float = Field(9.0, ge=0.0, le=50.0)
    noise_level: int = Field(100, ge=0, le=350, description="Noise added to the 256 px image (max 350).")
    batch_size: int = Field(2, ge=1, le=1024)


class ScorerConfig(ModelRef, Execution):
    """CLIP image-text similarity (100 x cosine): picks the best of a row's stage I candidates at 64 px, filters
    under data.min_clip_score, and scores every final image (the manifest's clip_score)."""

    tiny_subdir, per_candidate, chooses_only = "clip", True, True

    source: str | None = Field(
        "openai/clip-vit-large-patch14",
        min_length=1,
        description="CLIP repo (transformers CLIPModel + CLIPProcessor) or a directory laid out like it; null = no "
        "scores (then data.candidates_per_image must be 1 and data.min_clip_score null).",
    )
    variant: str | None = Field(None, description="Weight file variant; the OpenAI CLIP repos have none.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per CLIP call.")
    num_gpus: float = Field(0.1, ge=0, le=8)


class SafetyConfig(Section):
    tiny_subdir = "IF-I"
    checker: bool = Field(True, description="Run IF's safety checker; results are per-row flags, images are kept.")
    watermark: bool = Field(True, description="Stamp IF's watermark on the final images.")
    source: str | None = Field(
        None,
        description="Repo or directory with safety_checker/, feature_extractor/, watermarker/; null = stage_1.source.",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit of safety.source; null = its default.")
    p_threshold: float = Field(0.5, ge=0.0, le=1.0, description="NSFW score threshold.")
    w_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Watermark score threshold.")


class TinyCascade(Section):
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the random weights.")
    dir: str = Field(
        "~/.cache/ifbatch/tiny-cascade",
        min_length=1,
        description="Where the generated cascade is saved (built once if missing).",
    )


MAX_IMAGES_PER_PROMPT = 10_000


class DataConfig(Section):
    prompt_column: str = Field("prompt", min_length=1, description="Column holding the prompt text.")
    id_column: str = Field("id", min_length=1, description="Optional column of row ids (safe file names).")
    negative_prompt_column: str = Field("negative_prompt", min_length=1, description="Optional negative prompts.")
    seed_column: str = Field("seed", min_length=1, description="Optional per-row seeds (0 <= seed < 2**63).")
    read_batch_rows: int = Field(65536, ge=1, le=10_000_000, description="Rows read from the table at a time.")
    row_overrides: bool = Field(True, description="Allow per-row columns stage_N_steps / stage_N_guidance_scale.")
    images_per_prompt: int = Field(
        1, ge=1, le=MAX_IMAGES_PER_PROMPT, description="Images made from each row (its own seed and id each)."
    )
    images_column: str = Field(
        "n", min_length=1, description="Optional per-row column of images per prompt (overrides images_per_prompt)."
    )
    candidates_per_image: int = Field(
        1,
        ge=1,
        le=64,
        description="Best of k: stage I makes k candidates of each image (candidate 0 with the image's seed, the "
        "others with seeds derived from it), the scorer keeps the one that best matches the prompt, and only that "
        "one is upscaled. 1 = no choice (the images of a run without it).",
    )
    min_clip_score: float | None = Field(
        None,
        ge=-100,
        le=100,
        description="Images whose best 64 px candidate scores under this are recorded as status 'filtered' and not "
        "upscaled (done: a rerun does not make them again). null = keep every image.",
    )
    on_changed_settings: Literal["refuse", "remake"] = Field(
        "refuse",
        description="When images this run would skip as done were made with other settings (text preprocessing, "
        "steps, guidance, noise levels, seeds, models, best of k, score floor, watermark): refuse = stop before "
        "anything loads, saying what differs and for how many images; remake = make those images again with this "
        "run's settings (their files are replaced; output.format=files only), saying so and recording it.",
    )
    max_prompt_chars: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Longer prompts are rejected (T5 reads the first 77 tokens; the rest would only bloat every "
        "manifest record and image).",
    )


class C2paKey(Section):
    """A signer's certificate chain and private key, read and checked when the run's config is made
    (tasks/outputs/credentials.py). Secret-typed key: a repr, a log line or an error shows ******."""

    cert: str = Field(description="The PEM certificate chain, signer first (public).")
    key: SecretStr
    alg: str = Field(description="The C2PA signing algorithm the key calls for (es256, ps256, ed25519, ...).")
    signer: str = Field(description="The signing certificate as a C2PA reader names it (common name, issuer, serial).")
    valid_until: str = Field(description="The signing certificate's notAfter (ISO 8601, UTC): nothing is signed after.")
    source: str = Field(description="Where they came from: the files or the block's name (never the key).")


class C2paConfig(Section):
    cert_file: str | None = Field(
        None,
        description="C2PA content credentials: the PEM certificate chain (signer first) that signs every image; "
        "with output.c2pa.key_file. null (and no block) = images are not signed.",
    )
    key_file: str | None = Field(None, description="The PEM private key of output.c2pa.cert_file's signer.")
    block: str | None = Field(
        None,
        description='Instead of the files: the name of a Prefect Secret block whose value is {"cert": <PEM chain>, '
        '"key": <PEM key>}.',
    )
    include_prompt: bool = Field(
        False, description="Put each image's prompt and negative prompt into its signed C2PA manifest."
    )
    # Never written anywhere: excluded from every dump (run record, `ifbatch config`), only pickled to the writers.
    signing: C2paKey | None = Field(None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _one_signer(self) -> C2paConfig:
        files = (self.cert_file is not None, self.key_file is not None)
        if files[0] != files[1]:
            given, other = ("cert_file", "key_file") if files[0] else ("key_file", "cert_file")
            raise ValueError(
                f"output.c2pa.{given} = {getattr(self, given)!r} needs output.c2pa.{other} too (the signer's "
                f"certificate chain and its private key)"
            )
        if files[0] and self.block is not None:
            raise ValueError(
                f"output.c2pa.block = {self.block!r} and output.c2pa.cert_file = {self.cert_file!r}: give the "
                f"signer one way, the files or the block"
            )
        return self

    @property
    def wanted(self) -> bool:
        """Whether the run signs its images (a signer was given)."""
        return self.cert_file is not None or self.block is not None


class OutputConfig(Section):
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality.")
    shard_depth: int = Field(2, ge=0, le=3, description="Levels of 256-way hashed sub-folders under images/.")
    manifest_part_rows: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description="A manifest part is written once this many records are in hand (a threshold: a part holds "
        "what the last batch brought over it, or fewer when output.manifest_flush_seconds passes first).",
    )
    manifest_flush_seconds: float = Field(
        30.0, gt=0, le=3600, description="Write a part at least this often; a killed run loses at most these rows."
    )
    compact: bool = Field(
        True, description="Merge the run's manifest parts when it ends (split by id hash past 4,096: ifbatch compact)."
    )
    format: str = Field(
        "files",
        pattern=r"^[a-z][a-z0-9_]*$",
        description="The output format (tasks/outputs/formats.py; checked when the run starts): files: one image "
        "file per image under images/ (with a metadata.parquet per first-level folder, for "
        "load_dataset('imagefolder')); webdataset: "
        "tar shards under shards/ (<key>.png, <key>.json, <key>.txt); or a format registered by its name.",
    )
    shard_samples: int = Field(256, ge=1, le=100_000, description="webdataset: at most this many images per shard.")
    shard_bytes: int = Field(
        1 << 30, ge=1 << 20, le=4 << 30, description="webdataset: a shard is closed before it grows past this size."
    )
    writers: int | None = Field(
        None, ge=1, le=1024, description="Writer actors (encode and upload); null = sized to the plan, 1 without one."
    )
    writer_cpus: float = Field(1.0, gt=0, le=16, description="CPUs each writer actor reserves.")
    c2pa: C2paConfig = C2paConfig()


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); null = start a local one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (null: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local cluster (null: detect).")
    object_store_gb: float | None = Field(None, gt=0, description="Object store size of a local cluster.")
    gpu_slot: str | None = Field(
        None,
        description="Prefect global concurrency limit every run on this cluster holds while it runs, so that runs "
        "sharing the GPUs queue; null = ifbatch-gpus-<host of the cluster's address, or this machine>.",
    )
    runs_at_once: int = Field(
        1, ge=1, description="The limit's size when a run first creates it (an operator may change it in Prefect)."
    )


class PlanConfig(Section):
    mode: Literal["auto", "manual"] = Field(
        "auto",
        description="auto: the planner places the stages on the Ray cluster's GPUs (replicas, GPU share, CPUs, "
        "batch) from the cost table, keeping what --set gave; manual: the stage sections as written. "
        "No effect on a cluster without GPUs.",
    )
    gpu_kind: str | None = Field(None, description="GPU kind in the cost table; null = as Ray reports it, else H200.")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="One GPU's memory (GB); null = as read on the nodes, else the cost table's."
    )
    gpu_tflops: float | None = Field(
        None,
        gt=0,
        description="Dense fp16 tensor TFLOP/s of a GPU kind the cost table does not know (its spec sheet): what "
        "it is costed from; null = as the slowest GPU the table knows.",
    )
    calibrate: bool = Field(
        True,
        description="When the costs are estimates (a GPU kind the table has not measured), time the run's first "
        "images and correct the plan from them within the run.",
    )
    costs: str | None = Field(None, description="A cost table file instead of configs/costs_data/costs.yaml.")
    use_measured: bool = Field(
        True, description="Cost the stages from an earlier run into the same output when one measured them."
    )


class S3Credentials(Section):
    """Keys from a Prefect block (flows/blocks.py). Secret-typed: a repr, a log line or an error shows ******."""

    key: SecretStr
    secret: SecretStr
    token: SecretStr | None = None
    source: str = Field(description="Where they came from, e.g. the block's name (never the keys).")


class S3Config(Section):
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint; null = AWS or AWS_ENDPOINT_URL. "
        "Credentials come from the environment, or from the Prefect block named by the run's aws_credentials.",
    )
    region: str | None = Field(None, description="Region name; null = the environment's.")
    retry_deadline_s: float = Field(
        120.0,
        ge=0,
        le=3600,
        description="How long a write retries transient store errors (5xx, throttling, dropped connections), with "
        "backoff, before it fails.",
    )
    # Never written anywhere: excluded from every dump (run record, `ifbatch config`), only pickled to the Ray
    # workers that write the images.
    credentials: S3Credentials | None = Field(None, exclude=True, repr=False)


class CascadeConfig(Section):
    preset: str = Field("if-xl", description="Name of the preset this config came from.")
    seed: int = Field(
        0, ge=0, lt=2**63, description="Run seed: rows without a seed get one derived from it and their id."
    )
    device: Device = Field("auto", description="'auto' picks CUDA when available.")
    executor: Literal["ray", "local"] = Field(
        "ray",
        description="What runs the stream: ray (actor pools on a Ray cluster, planned on its GPUs) or local (every "
        "stage in the run's own process, one batch at a time: tests, a machine without a cluster).",
    )
    tiny: TinyCascade | None = Field(None, description="Generate a seeded random-weight cascade and load it.")
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    stage_1: Stage1Config = Stage1Config()
    scorer: ScorerConfig = ScorerConfig()
    stage_2: Stage2Config = Stage2Config()
    stage_3: Stage3Config = Stage3Config()
    safety: SafetyConfig = SafetyConfig()
    data: DataConfig = DataConfig()
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()
    plan: PlanConfig = PlanConfig()
    s3: S3Config = S3Config()

    @model_validator(mode="before")
    @classmethod
    def _tiny_sources(cls, data: Any) -> Any:
        """A tiny cascade supplies the source of every model the preset leaves unset."""
        if not isinstance(data, dict) or not isinstance(data.get("tiny"), dict):
            return data
        tiny_dir = TinyCascade(**data["tiny"]).dir.rstrip("/")
        data = dict(data)
        for section, field in cls.model_fields.items():
            sub = getattr(field.annotation, "tiny_subdir", "")
            if not sub or not isinstance(data.get(section) or {}, dict):
                continue  # a section set to a value: validation says so
            part = dict(data.get(section) or {})
            part.setdefault("source", f"{tiny_dir}/{sub}")
            data[section] = part
        return data

    @model_validator(mode="after")
    def _scorer_for_choices(self) -> CascadeConfig:
        if self.scorer.source is None and self.chooses:
            raise ValueError(
                f"data.candidates_per_image = {self.data.candidates_per_image} and data.min_clip_score = "
                f"{self.data.min_clip_score} need a scorer, but scorer.source is null; set scorer.source (a CLIP "
                f"repo or directory), or candidates_per_image=1 and min_clip_score=null"
            )
        return self

    @property
    def safety_source(self) -> str:
        return self.safety.source or self.stage_1.source

    @property
    def chooses(self) -> bool:
        """Whether the scorer stage runs: best of k, or a score filter."""
        return self.data.candidates_per_image > 1 or self.data.min_clip_score is not None

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this run has, in order (the scorer only when it chooses)."""
        return tuple(s for s in STAGES if not SECTIONS[s].chooses_only or self.chooses)

    def rows_per_call(self, stage: str) -> int:
        """Rows a stage takes per call: its batch_size counts images, and stage I and the scorer see
        data.candidates_per_image images per row."""
        size = getattr(self, stage).batch_size
        if SECTIONS[stage].per_candidate:
            return max(1, size // self.data.candidates_per_image)
        return size


RunConfig = CascadeConfig  # the whole run's configuration; the cascade is most of it

# The stages, in the order a run's rows go through them: the sections that are a stage (Execution), in the order
# the config lists them. Each section's name is its stage's one name everywhere (manifest columns, placement,
# per-stage timings, actor pools).
SECTIONS: dict[str, type[Execution]] = {
    name: f.annotation
    for name, f in CascadeConfig.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, Execution)
}
STAGES = tuple(SECTIONS)
CASCADE = tuple(s for s in STAGES if not SECTIONS[s].chooses_only)  # the stages of a run that does not choose
DIFFUSION_STAGES = tuple(s for s in STAGES if SECTIONS[s].params)
