"""The typed config: presets resolve to the right models, bad values are refused by name."""

import pytest

from ifbatch.configs import ConfigError, load_config, preset_names


def test_presets_exist():
    assert {"tiny", "if-xl", "if-l", "if-m"} <= set(preset_names())


def test_if_xl_resolves_to_the_model_card_defaults():
    c = load_config("if-xl")
    assert (c.stage_1.source, c.stage_2.source, c.stage_3.source) == (
        "DeepFloyd/IF-I-XL-v1.0",
        "DeepFloyd/IF-II-L-v1.0",
        "stabilityai/stable-diffusion-x4-upscaler",
    )
    assert c.text_encoder.source == "DeepFloyd/IF-I-XL-v1.0"
    assert {s.variant for s in (c.text_encoder, c.stage_1, c.stage_2, c.stage_3)} == {"fp16"}
    assert {s.dtype for s in (c.text_encoder, c.stage_1, c.stage_2, c.stage_3)} == {"float16"}
    assert (c.stage_1.steps, c.stage_2.steps, c.stage_3.steps) == (100, 50, 75)
    assert (c.stage_1.guidance_scale, c.stage_2.guidance_scale, c.stage_3.guidance_scale) == (7.0, 4.0, 9.0)
    assert (c.stage_2.noise_level, c.stage_3.noise_level) == (250, 100)
    assert c.safety.checker and c.safety.watermark and c.safety_source == "DeepFloyd/IF-I-XL-v1.0"
    assert c.tiny is None
    assert sum(s.num_gpus for s in (c.text_encoder, c.stage_1, c.stage_2, c.stage_3)) <= 1.0


@pytest.mark.parametrize(
    "preset,stage_1,stage_2",
    [
        ("if-l", "DeepFloyd/IF-I-L-v1.0", "DeepFloyd/IF-II-L-v1.0"),
        ("if-m", "DeepFloyd/IF-I-M-v1.0", "DeepFloyd/IF-II-M-v1.0"),
    ],
)
def test_smaller_presets_override_only_the_models(preset, stage_1, stage_2):
    c, xl = load_config(preset), load_config("if-xl")
    assert (c.stage_1.source, c.stage_2.source) == (stage_1, stage_2)
    assert c.stage_1.model_dump(exclude={"source", "num_gpus"}) == xl.stage_1.model_dump(exclude={"source", "num_gpus"})
    assert c.stage_3.model_dump(exclude={"num_gpus"}) == xl.stage_3.model_dump(exclude={"num_gpus"})


def test_tiny_preset_points_every_model_at_the_generated_cascade():
    c = load_config("tiny", ["tiny.dir=/somewhere/tc"])
    assert c.text_encoder.source == c.stage_1.source == c.safety_source == "/somewhere/tc/IF-I"
    assert (c.stage_2.source, c.stage_3.source) == ("/somewhere/tc/IF-II", "/somewhere/tc/x4-upscaler")
    assert c.stage_1.dtype == "float32" and c.stage_1.variant is None
    assert c.scorer.source == "/somewhere/tc/clip"  # the tiny CLIP built with the cascade


def test_overrides_are_typed():
    c = load_config("if-xl", ["stage_1.timesteps=smart27", "stage_2.guidance_scale=5", "stage_1.revision=abc123"])
    assert c.stage_1.timesteps == "smart27" and c.stage_2.guidance_scale == 5.0 and c.stage_1.revision == "abc123"


@pytest.mark.parametrize(
    "override,must_say",
    [
        ("stage_1.stepz=5", ["unknown key 'stage_1.stepz'", "5", "steps"]),
        ("stage_1.steps=0", ["stage_1.steps", "0", "greater than or equal to 1"]),
        ("stage_1.steps=abc", ["stage_1.steps", "'abc'", "valid integer"]),
        ("stage_1.dtype=float64", ["stage_1.dtype", "'float64'", "'float32', 'float16' or 'bfloat16'"]),
        ("stage_2.timesteps=smart99", ["stage_2.timesteps", "'smart99'", "'fast27'"]),
        ("stage_3.noise_level=351", ["stage_3.noise_level", "351", "less than or equal to 350"]),
        ("stage_2.guidance_scale=high", ["stage_2.guidance_scale", "'high'", "valid number"]),
        ("bogus=1", ["unknown key 'bogus'", "stage_1"]),
        ("stage_1.steps", ["'stage_1.steps'", "key=value"]),
    ],
)
def test_bad_values_are_refused_by_name(override, must_say):
    with pytest.raises(ConfigError) as e:
        load_config("if-xl", [override])
    for text in must_say:
        assert text in str(e.value), (text, str(e.value))
    if "=" in override:  # the key is said to come from where it was given: the override, not the preset file
        assert str(e.value).startswith("--set: ") and "if-xl.yaml" not in str(e.value), str(e.value)


def test_a_bad_key_in_a_preset_file_is_said_to_be_there(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("stage_1:\n  stepz: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(preset), ["stage_2.steps=-1"])
    said = str(e.value)
    assert said.startswith(f"{preset}: unknown key 'stage_1.stepz'") and "; --set: stage_2.steps = -1" in said, said


def test_a_stage_needs_steps_or_timesteps():
    with pytest.raises(ConfigError, match="stage_1.*'steps'.*'timesteps'"):
        load_config("if-xl", ["stage_1.steps=null"])


def test_best_of_k_needs_a_scorer_and_adds_its_stage():
    c = load_config("if-xl")
    assert c.stages == ("text_encoder", "stage_1", "stage_2", "stage_3") and c.rows_per_call("stage_1") == 8
    c = load_config("if-xl", ["data.candidates_per_image=4"])
    assert c.stages == ("text_encoder", "stage_1", "scorer", "stage_2", "stage_3")
    assert (c.rows_per_call("stage_1"), c.rows_per_call("scorer"), c.rows_per_call("stage_2")) == (2, 16, 4)
    assert load_config("if-xl", ["data.min_clip_score=20"]).stages == c.stages  # a filter alone scores too
    with pytest.raises(ConfigError, match=r"candidates_per_image = 4 .* need a scorer, but scorer.source is null") as e:
        load_config("if-xl", ["data.candidates_per_image=4", "scorer.source=null"])
    # one sentence that says what to do: the config the rule was checked on is not dumped before it
    said = str(e.value)
    assert said.split("if-xl.yaml with --set: ", 1)[1].startswith("data.candidates_per_image = 4"), said
    assert len(said) < 300 and "{" not in said, said
    with pytest.raises(ConfigError, match=r"data.candidates_per_image.*65.*less than or equal to 64"):
        load_config("if-xl", ["data.candidates_per_image=65"])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'if-xxl'.*'if-xl'"):
        load_config("if-xxl")


def test_the_configuration_reference_describes_every_key_and_is_current():
    """docs/configuration.md is made from the schema (configs/reference.py): each key `--set` takes, described."""
    from pathlib import Path

    from ifbatch.configs.reference import keys, markdown

    undescribed = [key for key, _, text in keys() if not text]
    assert not undescribed, f"keys without a description in configs/schema.py: {undescribed}"
    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert page.read_text() == markdown(), "stale: run python -m ifbatch.configs.reference > docs/configuration.md"
    documented = {key for key, _, _ in keys()}
    assert {"stage_1.steps", "data.min_clip_score", "output.format", "plan.gpu_tflops", "s3.endpoint_url"} <= documented
    assert not {k for k in documented if k.startswith("s3.credentials")}  # secrets are never set by key
