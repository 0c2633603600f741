"""Stores that refuse or cannot be reached, on a real S3 server (SeaweedFS with identities and no bucket
auto-creation, as AWS behaves): `ifbatch run` refuses before anything starts, exit 2, naming the URI, the store's
own error code and what to check; with the right credentials the same run gets past the check."""

from __future__ import annotations

import pytest

from ifbatch.flows import cli

from ..helpers import EXAMPLES
from ..services import SeaweedS3, free_port

pytestmark = pytest.mark.slow

KEY, SECRET = "ifbatch-key", "ifbatch-right-secret"


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory):
    import s3fs

    folder = tmp_path_factory.mktemp("strict-s3")
    server = SeaweedS3.accepting_only(folder, KEY, SECRET, ["-s3.autoCreateBucket=false"]).start()
    s3fs.S3FileSystem(endpoint_url=server.endpoint, key=KEY, secret=SECRET).mkdir("prompts")
    s3fs.S3FileSystem(endpoint_url=server.endpoint, key=KEY, secret=SECRET).put(str(EXAMPLES), "prompts/p.parquet")
    yield server
    server.stop()


@pytest.fixture
def run(strict_s3, monkeypatch, capsys):
    import s3fs

    def never(*a, **kw):
        raise AssertionError("got past preflight")

    def run(prompts: str, output: str, secret: str = SECRET, endpoint: str | None = None) -> tuple[int | str, str]:
        s3fs.S3FileSystem.clear_instance_cache()  # credentials come from the environment, set per case
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        args = ["run", prompts, output, "--no-progress", "--set", f"s3.endpoint_url={endpoint or strict_s3.endpoint}"]
        try:
            code = cli.main(args)
        except AssertionError as e:
            code = str(e)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
        return code, capsys.readouterr().err

    monkeypatch.setattr(cli, "_generate", never)
    return run


CASES = [
    # (case, prompts, output, secret, endpoint, words)
    (
        "wrong secret, output",
        str(EXAMPLES),
        "s3://prompts/out",
        "wrong",
        None,
        ["cannot write to output 's3://prompts/out'", "SignatureDoesNotMatch", "check the credentials", "'prompts'"],
    ),
    (
        "wrong secret, prompts",
        "s3://prompts/p.parquet",
        "@tmp",
        "wrong",
        None,
        ["prompt table 's3://prompts/p.parquet'", "403", "check the credentials"],
    ),
    (
        "missing bucket",
        str(EXAMPLES),
        "s3://no-such-bucket/out",
        SECRET,
        None,
        ["cannot write to output 's3://no-such-bucket/out'", "NoSuchBucket", "'no-such-bucket' does not exist"],
    ),
    (
        "unreachable endpoint",
        str(EXAMPLES),
        "s3://prompts/out",
        SECRET,
        "@closed",
        ["cannot write to output 's3://prompts/out'", "EndpointConnectionError", "check the endpoint"],
    ),
]


@pytest.mark.parametrize("case, prompts, output, secret, endpoint, words", CASES, ids=[c[0] for c in CASES])
def test_a_store_that_refuses_is_named_with_its_code_and_a_hint(
    case, prompts, output, secret, endpoint, words, run, tmp_path
):
    output = str(tmp_path / "out") if output == "@tmp" else output
    endpoint = f"http://127.0.0.1:{free_port()}" if endpoint == "@closed" else endpoint
    code, err = run(prompts, output, secret, endpoint)
    assert code == 2, err
    for w in words:
        assert w in err, f"{case}: {w!r} not in {err!r}"
    assert "ifbatch-right-secret" not in err and "wrong" not in err.replace("wrong secret", "")


def test_the_right_credentials_pass_the_check(run):
    code, err = run("s3://prompts/p.parquet", "s3://prompts/out")
    assert code == "got past preflight", err
