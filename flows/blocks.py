"""Secrets kept in Prefect. S3 credentials: a prefect-aws `AwsCredentials` block (or an `S3Bucket` block's
credentials), named in a run's parameters. A C2PA signer: a `Secret` block holding {"cert": <PEM chain>, "key": <PEM
key>}, named by output.c2pa.block. The keys go into the run's config as secret-typed values that no dump includes
(the run record, `ifbatch config`), and reach the Ray workers that write images only by pickling."""

from __future__ import annotations

import json

from ifbatch.configs import ConfigError
from ifbatch.configs.schema import CascadeConfig, S3Credentials
from ifbatch.tasks.outputs.credentials import CredentialsError, load_key, with_key_files, with_signing

KINDS = ("aws-credentials", "s3-bucket")


def _load(spec: str):
    from prefect_aws import AwsCredentials, S3Bucket

    kind, _, name = spec.rpartition("/")
    kind = kind or "aws-credentials"
    if kind not in KINDS or not name:
        raise ConfigError(
            f"aws_credentials = {spec!r}: expected the name of an AwsCredentials block ('my-keys'), or "
            f"'aws-credentials/<name>' or 's3-bucket/<name>'"
        )
    try:
        block = (AwsCredentials if kind == "aws-credentials" else S3Bucket).load(name)
    except ValueError as e:  # Prefect: "Unable to find block document named ..."
        raise ConfigError(
            f"aws_credentials = {spec!r}: no {kind} block named {name!r} in Prefect at this API "
            f"(create it in the dashboard under Blocks, or with prefect_aws.{_cls(kind)}(...).save({name!r}))"
        ) from e
    return block if kind == "aws-credentials" else block.credentials


def _cls(kind: str) -> str:
    return "AwsCredentials" if kind == "aws-credentials" else "S3Bucket"


def with_block_credentials(cfg: CascadeConfig, spec: str) -> CascadeConfig:
    """cfg with the block's keys, and its endpoint and region where the config leaves them to the environment."""
    creds = _load(spec)
    key = getattr(creds, "aws_access_key_id", None) or getattr(creds, "minio_root_user", None)
    secret = getattr(creds, "aws_secret_access_key", None) or getattr(creds, "minio_root_password", None)
    if not key or secret is None or not secret.get_secret_value():
        raise ConfigError(
            f"aws_credentials = {spec!r}: the block has no access key id and secret access key; ifbatch needs both "
            f"(or leave aws_credentials empty to use the environment's)"
        )
    token = getattr(creds, "aws_session_token", None)
    params = getattr(creds, "aws_client_parameters", None)
    s3 = cfg.s3.model_copy(
        update=dict(
            credentials=S3Credentials(key=key, secret=secret.get_secret_value(), token=token, source=spec),
            endpoint_url=cfg.s3.endpoint_url or getattr(params, "endpoint_url", None),
            region=cfg.s3.region or getattr(creds, "region_name", None),
        )
    )
    return cfg.model_copy(update={"s3": s3})


def with_signer(cfg: CascadeConfig) -> CascadeConfig:
    """cfg with output.c2pa's signer read and proven: from its files, or from the Prefect Secret block it names."""
    name = cfg.output.c2pa.block
    if name is None or cfg.output.c2pa.signing is not None:
        return with_key_files(cfg)
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL

    where, api = f"output.c2pa.block = {name!r}", PREFECT_API_URL.value() or "the temporary API"
    try:
        value = Secret.load(name).get()
    except ValueError as e:  # Prefect: "Unable to find block document named ..."
        raise CredentialsError(
            f"{where}: no Secret block named {name!r} in Prefect at {api} (create it in the dashboard under "
            f"Blocks, or with prefect.blocks.system.Secret(value={{'cert': ..., 'key': ...}}).save({name!r}))"
        ) from e
    except Exception as e:  # the API did not answer: said in one line, before anything starts
        raise CredentialsError(f"{where}: cannot read the block from Prefect at {api}: {type(e).__name__}: {e}") from e
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict) or not all(isinstance(value.get(k), str) for k in ("cert", "key")):
        raise CredentialsError(
            f"{where}: the block's value must be an object with 'cert' (the PEM certificate chain, signer first) and "
            f"'key' (its PEM private key)"
        )
    return with_signing(cfg, load_key(value["cert"].encode(), value["key"].encode(), where, where))
