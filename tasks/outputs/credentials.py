"""C2PA content credentials: each image signed at the writer with a manifest saying that a trained algorithm made
it (`c2pa.created`, digitalSourceType trainedAlgorithmicMedia), which models (their sources and revisions), and
ifbatch as the generator; the prompt only when output.c2pa.include_prompt says so. Signing and reading go through
the maintained `c2pa-python` library (the C2PA SDK, its native part in the wheel): no JUMBF or COSE is written here.

The signer (a PEM certificate chain and its private key) is read and proven when the run's config is made
(`load_key`: parsed, the key the certificate's, in its validity period, and a trial image signed and read back),
so that a signer that cannot sign is refused before any model loads. The key travels only inside the config, in
a field no dump includes (configs/schema.py `C2paConfig.signing`), to the writers. verify reads each signed image's
credentials with the same library (`problem`).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
from importlib.metadata import PackageNotFoundError, version

from ifbatch.configs import ConfigError
from ifbatch.configs.schema import C2paKey, CascadeConfig

from .images import EXTENSIONS

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION = "org.ifbatch.generation"  # ifbatch's own assertion: the models (and, when asked, the prompts)
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# No thumbnail: the SDK would embed one per image (measured at 1024 px: +1.3 MB on a 3.2 MB PNG, +2.8 MB on a WebP).
# No read-back after each signature (the SDK's default): it doubled the cost of signing (1.5 ms -> 0.8 ms for a 1024 px
# JPEG, measured); the signer is proven once before the run (`load_key`) and verify reads every image's.
SETTINGS = {"builder": {"thumbnail": {"enabled": False}}, "verify": {"verify_after_sign": False}}
UNTRUSTED = "signingCredential.untrusted"  # a chain no trust list holds: the signature is still checked
TRUSTED_STATES = ("Valid", "Trusted")


class CredentialsError(ConfigError):
    """The signer cannot sign: the message names the file (or block) and the reason."""


def _version() -> str:
    try:
        return version("ifbatch")
    except PackageNotFoundError:  # a source tree on sys.path
        return "0+unknown"


GENERATOR = {"name": "ifbatch", "version": _version()}


# -- the signer, read and proven once --------------------------------------------------------------------------


def load_key(cert_pem: bytes, key_pem: bytes, cert_from: str, key_from: str) -> C2paKey:
    """The signer, proven able to sign: `cert_from` / `key_from` name where the PEM came from in every error."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise CredentialsError(f"{cert_from}: not a PEM certificate chain (signer first): {e}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CredentialsError(f"{key_from}: the private key is encrypted; ifbatch needs it unencrypted") from None
    except ValueError as e:
        raise CredentialsError(f"{key_from}: not a PEM private key: {e}") from None
    cert = chain[0]
    who = cert.subject.rfc4514_string()
    pub = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*pub) != cert.public_key().public_bytes(*pub):
        raise CredentialsError(f"{key_from}: the key is not the key of {cert_from}'s first certificate ({who})")
    now = dt.datetime.now(dt.UTC)
    if now < cert.not_valid_before_utc:
        raise CredentialsError(f"{cert_from}: the certificate ({who}) is not valid until {cert.not_valid_before_utc}")
    if now >= cert.not_valid_after_utc:
        raise CredentialsError(f"{cert_from}: the certificate ({who}) expired on {cert.not_valid_after_utc}")
    alg = _alg(key, key_from)
    pem = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    pkcs8 = key.private_bytes(*pem)
    source = cert_from if cert_from == key_from else f"{cert_from}, {key_from}"
    until = cert.not_valid_after_utc.isoformat()
    signing = C2paKey(cert=cert_pem.decode(), key=pkcs8.decode(), alg=alg, signer="", valid_until=until, source=source)
    try:  # what the SDK itself makes of them (a certificate it will not sign with: key usage, extensions)
        trial = Signer(signing).sign(_blank_png(), "png", {"id": "ifbatch-trial"})
        signer = signer_of(trial)
    except Exception as e:
        raise CredentialsError(f"{source}: the C2PA library cannot sign with them: {reason(e)}") from None
    if signer is None:
        raise CredentialsError(f"{source}: an image signed with them does not read back as validly signed")
    return signing.model_copy(update={"signer": signer})


def _alg(key, key_from: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name in algs:
            return algs[key.curve.name]
        raise CredentialsError(f"{key_from}: EC curve {key.curve.name}; C2PA signs with P-256, P-384 or P-521")
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise CredentialsError(f"{key_from}: a {type(key).__name__}; C2PA signs with EC, RSA (PSS) or Ed25519 keys")


def _blank_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CredentialsError(f"output.c2pa.{what} = {path!r}: cannot read it: {e.strerror or e}") from None


def with_signing(cfg: CascadeConfig, signing: C2paKey) -> CascadeConfig:
    c2pa = cfg.output.c2pa.model_copy(update={"signing": signing})
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"c2pa": c2pa})})


def with_key_files(cfg: CascadeConfig) -> CascadeConfig:
    """cfg with the signer of output.c2pa.cert_file / key_file read and proven (unchanged without them)."""
    c = cfg.output.c2pa
    if c.cert_file is None or c.signing is not None:
        return cfg
    cert, key = _read_file(c.cert_file, "cert_file"), _read_file(c.key_file, "key_file")
    return with_signing(
        cfg, load_key(cert, key, f"output.c2pa.cert_file = {c.cert_file!r}", f"output.c2pa.key_file = {c.key_file!r}")
    )


def ready(cfg: CascadeConfig) -> None:
    """Before a run starts: a run asked to sign has its signer (made with the config: flows/generate.py)."""
    c = cfg.output.c2pa
    if c.wanted and c.signing is None:
        named = f"block {c.block!r}" if c.block else f"cert_file {c.cert_file!r}"
        raise CredentialsError(
            f"output.c2pa names a signer ({named}) but it was not loaded: make the run's config with "
            f"GenerateParams.config() or tasks/outputs/credentials.with_key_files"
        )


# -- signing, in a writer ----------------------------------------------------------------------------------------


class Expired(Exception):
    """The signing certificate's validity ended during the run."""


class Signer:
    """Signs encoded images with `signing`'s key. The SDK's signer and context are made per thread (a writer takes
    two calls at once) on first use."""

    def __init__(self, signing: C2paKey, models: dict | None = None, include_prompt: bool = False):
        self.signing, self.models, self.include_prompt = signing, models or {}, include_prompt
        self.expiry = dt.datetime.fromisoformat(signing.valid_until)
        self.local = threading.local()

    def _sdk(self):
        import c2pa

        if getattr(self.local, "signer", None) is None:
            s = self.signing
            key = s.key.get_secret_value().encode()
            info = c2pa.C2paSignerInfo(alg=s.alg.encode(), sign_cert=s.cert.encode(), private_key=key, ta_url=None)
            self.local.signer = c2pa.Signer.from_info(info)
            self.local.context = c2pa.Context(c2pa.Settings.from_dict(SETTINGS))
        return c2pa, self.local.signer, self.local.context

    def manifest(self, image_format: str, how: dict) -> dict:
        generation: dict = {"models": self.models}
        if self.include_prompt:
            generation |= {"prompt": how.get("prompt", ""), "negative_prompt": how.get("negative_prompt") or ""}
        created = {"action": "c2pa.created", "digitalSourceType": TRAINED, "softwareAgent": GENERATOR}
        return {
            "claim_generator_info": [GENERATOR],
            "title": f"{how.get('id', 'image')}.{EXTENSIONS[image_format]}",
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [created]}},
                {"label": GENERATION, "data": generation},
            ],
        }

    def sign(self, data: bytes, image_format: str, how: dict) -> bytes:
        """The image's bytes with its signed manifest embedded; raises with the reason when it cannot: the SDK's,
        or the certificate's expiry (the SDK, not reading back what it signed, would sign with an expired one)."""
        if dt.datetime.now(dt.UTC) >= self.expiry:
            raise Expired(f"the signing certificate expired on {self.signing.valid_until}")
        c2pa, signer, context = self._sdk()
        out = io.BytesIO()
        with c2pa.Builder(json.dumps(self.manifest(image_format, how)), context) as builder:
            builder.sign(signer, MIME[image_format], io.BytesIO(data), out)
        return out.getvalue()


# -- reading, for verify and for images taken over ----------------------------------------------------------------


def mime_of(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _read(data: bytes) -> dict:
    import c2pa

    mime = mime_of(data)
    if mime is None:
        raise ValueError("not a PNG, JPEG or WebP image")
    with c2pa.Reader(mime, io.BytesIO(data)) as reader:
        return json.loads(reader.json())


def _identity(doc: dict) -> str | None:
    info = (doc.get("manifests") or {}).get(doc.get("active_manifest") or "", {}).get("signature_info") or {}
    if not info:
        return None
    return f"{info.get('common_name')}; issuer {info.get('issuer')}; serial {info.get('cert_serial_number')}"


def _failures(doc: dict) -> list[str]:
    active = (doc.get("validation_results") or {}).get("activeManifest") or {}
    return [f["code"] for f in active.get("failure") or [] if f.get("code") != UNTRUSTED]


def reason(e: BaseException) -> str:
    """An error as one line: its class without the SDK's private prefix, and its message."""
    return f"{type(e).__name__.lstrip('_').removeprefix('C2pa')}: {e}"


def signer_of(data: bytes) -> str | None:
    """Who signed the image, when its credentials are whole; None when it has none or they do not validate."""
    try:
        doc = _read(data)
    except Exception:
        return None
    return _identity(doc) if doc.get("validation_state") in TRUSTED_STATES and not _failures(doc) else None


def problem(data: bytes, signer: str) -> str | None:
    """What is wrong with the credentials of an image its record says `signer` signed; None when they are whole."""
    try:
        doc = _read(data)
    except Exception as e:
        if "ManifestNotFound" in type(e).__name__:
            return f"content credentials: none (stripped); the record says it was signed by {signer}"
        return f"content credentials: unreadable: {reason(e)}"
    failures = _failures(doc)
    if doc.get("validation_state") not in TRUSTED_STATES or failures:
        return f"content credentials: invalid: {', '.join(failures) or doc.get('validation_state')}"
    found = _identity(doc)
    if found != signer:
        return f"content credentials: signed by {found}, not the run's signer ({signer})"
    return None
