"""Certificate chains the tests make themselves (`cryptography`), for C2PA content credentials: an ES256 root CA
and a signer certificate under it, as a C2PA signer needs (digitalSignature, emailProtection, key identifiers)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Chain:
    cert_file: Path  # the signer's certificate, then the root's
    key_file: Path  # the signer's private key (PKCS#8 PEM, unencrypted)
    root_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def overrides(self) -> list[str]:
        return [f"output.c2pa.cert_file={self.cert_file}", f"output.c2pa.key_file={self.key_file}"]

    @property
    def key_lines(self) -> list[str]:
        """The key's base64 lines: what must never be found outside the key file."""
        return [ln for ln in self.key_pem.decode().splitlines() if ln and not ln.startswith("-----")]


def _name(cn: str) -> x509.Name:
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ifbatch tests")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), org])


def _usage(signer: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=not signer, crl_sign=not signer, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def make_chain(
    folder: Path,
    name: str = "ifbatch test signer",
    valid_from: dt.timedelta = dt.timedelta(days=-1),
    valid_for: dt.timedelta = dt.timedelta(days=30),
    password: bytes | None = None,
) -> Chain:
    """A root and a signer valid from now + valid_from for valid_for, written to folder/<name>.pem and .key."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = (
        x509.CertificateBuilder().subject_name(_name(f"{name} root")).issuer_name(_name(f"{name} root"))
        .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2)).not_valid_after(now + dt.timedelta(days=60))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(signer=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(root.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_from).not_valid_after(now + valid_from + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(signer=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    root_pem, cert_pem = root.public_bytes(pem), cert.public_bytes(pem)
    plain = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    stored = plain
    if password is not None:
        stored = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(password)
        )
    slug = name.replace(" ", "-")
    cert_file, key_file = folder / f"{slug}.pem", folder / f"{slug}.key"
    cert_file.write_bytes(cert_pem + root_pem)
    key_file.write_bytes(stored)
    return Chain(cert_file, key_file, root_pem, cert_pem, plain)
