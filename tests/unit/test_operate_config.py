"""Prefect-side settings that need no server: the GPU slot's name per cluster, and S3 keys from a block that no
dump of the config contains."""

from __future__ import annotations

import pickle
import socket

import pytest

from ifbatch.configs import load_config
from ifbatch.configs.schema import S3Credentials
from ifbatch.flows.gpu_slot import slot_name
from ifbatch.tasks.storage import storage_options

HOST = socket.gethostname()


@pytest.mark.parametrize(
    "address, name",
    [
        (None, f"ifbatch-gpus-{HOST}"),  # a local cluster: this machine's GPUs
        ("auto", f"ifbatch-gpus-{HOST}"),
        ("127.0.0.1:6379", f"ifbatch-gpus-{HOST}"),  # a cluster on this machine is the same GPUs
        ("ray://head.example:10001", "ifbatch-gpus-head.example"),
        ("10.0.0.5:6379", "ifbatch-gpus-10.0.0.5"),
    ],
)
def test_runs_on_the_same_cluster_share_one_slot_name(address, name):
    rc = load_config("tiny", [f"ray.address={address}"] if address else []).ray
    assert slot_name(rc) == name


def test_an_operator_may_name_the_slot():
    assert slot_name(load_config("tiny", ["ray.gpu_slot=team-a-gpus"]).ray) == "team-a-gpus"


def test_block_keys_reach_s3fs_and_no_dump_or_repr():
    cfg = load_config("tiny")
    creds = S3Credentials(key="AKIDEXAMPLE", secret="very-secret-value", source="my-keys")
    cfg = cfg.model_copy(update={"s3": cfg.s3.model_copy(update={"credentials": creds})})
    for text in (repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump()), repr(creds)):
        assert "very-secret-value" not in text and "AKIDEXAMPLE" not in text
    back = pickle.loads(pickle.dumps(cfg))  # how the Ray workers that write images get it
    opts = storage_options("s3://bucket/out", back.s3)
    assert (opts["key"], opts["secret"]) == ("AKIDEXAMPLE", "very-secret-value")
    assert "key" not in storage_options("./out", back.s3)


@pytest.mark.parametrize("spec", ["minio/keys", "s3-bucket/", "gcs-credentials/keys"])
def test_a_credentials_block_of_the_wrong_kind_is_named(spec):
    from ifbatch.configs import ConfigError
    from ifbatch.flows.blocks import with_block_credentials

    with pytest.raises(ConfigError) as e:
        with_block_credentials(load_config("tiny"), spec)
    assert repr(spec) in str(e.value) and "AwsCredentials" in str(e.value)


def test_a_signer_block_on_an_api_that_does_not_answer_is_refused_in_one_line():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ifbatch.flows.blocks import with_signer
    from ifbatch.tasks.outputs.credentials import CredentialsError

    # nothing listens on the discard port (settings, not the environment: a worker that ran a test with a Prefect
    # API before has its settings loaded)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}), pytest.raises(CredentialsError) as e:
        with_signer(load_config("tiny", ["output.c2pa.block=signer"]))
    said = str(e.value)
    assert said.startswith("output.c2pa.block = 'signer': cannot read the block from Prefect at http://127.0.0.1:9/api")
    assert "ConnectError" in said


def test_an_alert_block_needs_its_type():
    from ifbatch.configs import ConfigError
    from ifbatch.flows.alerts import notification_block_id

    with pytest.raises(ConfigError) as e:
        notification_block_id("oncall")
    assert "'oncall'" in str(e.value) and "slack-webhook/ops" in str(e.value)
