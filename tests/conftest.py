"""Shared fixtures: one tiny cascade per test session, built offline from a fixed seed."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from ifbatch.configs import load_config  # noqa: E402
from ifbatch.models.tiny import build_tiny_cascade  # noqa: E402

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_cascade(tmp_path_factory.mktemp("models") / "tiny-cascade", seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_cfg(tiny_dir):
    return load_config("tiny", [f"tiny.dir={tiny_dir}"])
