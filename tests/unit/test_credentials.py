"""C2PA content credentials without Ray: the writer actors' code called on a folder with a certificate chain the
test makes (tests/certs.py). Every image -- png, jpeg, webp; a file or a WebDataset member -- is read back by the
C2PA library's own Reader (with the test root as its trust anchor: `Trusted`); verify names a changed byte, a
stripped manifest and another key's signature; a signer that cannot sign is refused naming the file and the reason;
a certificate that expires mid-run fails the images signed after, with the reason, and not the others."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import time

import numpy as np
import pyarrow as pa
import pytest

from ifbatch.configs import ConfigError, load_config
from ifbatch.tasks.outputs import credentials
from ifbatch.tasks.outputs.credentials import CredentialsError, Signer, with_key_files
from ifbatch.tasks.outputs.formats import read_image
from ifbatch.tasks.outputs.images import read_provenance
from ifbatch.tasks.outputs.manifest import read_manifest, write_part
from ifbatch.tasks.outputs.verify import repair, verify
from ifbatch.tasks.outputs.writer import ImageWriter, ShardWriter
from ifbatch.tasks.storage import locate
from tests.certs import make_chain
from tests.helpers import writer_rows

MODELS = {"stage_1": {"source": "DeepFloyd/IF-I-XL-v1.0", "commit": "abc123", "dtype": "float16"}}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_chain(tmp_path_factory.mktemp("certs"))


def signed_cfg(chain, *more):
    return with_key_files(load_config("tiny", [*chain.overrides, *more]))


def write_signed(out: str, cfg, n: int = 3, failed: int = 0) -> pa.Table:
    """n images (the last `failed` failed upstream) through the writers into the manifest, as a run would."""
    pixels = np.random.default_rng(5).integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)
    records = ImageWriter(cfg, out, MODELS)(writer_rows(pixels, failed=failed))
    if cfg.output.format == "webdataset":
        records = ShardWriter(cfg, out, "run1")(records)
    write_part(locate(out), records, "run1", json.dumps(MODELS), 0)
    return records


def reader(data: bytes, mime: str, root_pem: bytes | None = None) -> dict:
    """The C2PA library's own reading of an image (the test root trusted when given)."""
    import c2pa

    settings = {"verify": {"verify_trust": True}, "trust": {"trust_anchors": root_pem.decode()}} if root_pem else {}
    with c2pa.Reader(mime, io.BytesIO(data), context=c2pa.Context(c2pa.Settings.from_dict(settings))) as r:
        return json.loads(r.json())


@pytest.mark.parametrize(
    "fmt,image,mime",
    [("files", "png", "image/png"), ("files", "jpeg", "image/jpeg"), ("webdataset", "webp", "image/webp")],
)
def test_every_image_carries_credentials_the_c2pa_reader_trusts(tmp_path, chain, fmt, image, mime):
    out = str(tmp_path / "out")
    cfg = signed_cfg(chain, f"output.format={fmt}", f"output.image_format={image}")
    records = write_signed(out, cfg, n=3, failed=1).to_pylist()
    loc = locate(out)
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 2 and records[2]["status"] == "failed" and records[2]["c2pa_signer"] is None
    for rec in ok:
        data = read_image(loc, rec)
        assert hashlib.sha256(data).hexdigest() == rec["sha256"] and len(data) == rec["bytes"]  # the signed file
        assert rec["c2pa_signer"] == cfg.output.c2pa.signing.signer
        assert "ifbatch test signer" in rec["c2pa_signer"]
        doc = reader(data, mime, chain.root_pem)
        assert doc["validation_state"] == "Trusted", doc.get("validation_results")
        manifest = doc["manifests"][doc["active_manifest"]]
        assert manifest["claim_generator_info"][0]["name"] == "ifbatch"
        labels = {a["label"]: a["data"] for a in manifest["assertions"]}
        (created,) = labels["c2pa.actions.v2"]["actions"]
        assert created["action"] == "c2pa.created" and created["digitalSourceType"] == credentials.TRAINED
        assert labels[credentials.GENERATION] == {"models": MODELS}  # the prompt stays out unless asked for
        assert read_provenance(data)["id"] == rec["id"]  # ifbatch's own provenance is still in the file
        assert reader(data, mime)["validation_state"] == "Valid"  # untrusted root: the signature still checked
    report, _ = verify(loc)
    assert report.whole and report.checked == 2, report.problems


def test_the_prompt_goes_in_only_when_asked(tmp_path, chain):
    cfg = signed_cfg(chain, "output.c2pa.include_prompt=true")
    (rec, *_) = write_signed(str(tmp_path / "out"), cfg, n=1).to_pylist()
    doc = reader(read_image(locate(str(tmp_path / "out")), rec), "image/png")
    labels = {a["label"]: a["data"] for a in doc["manifests"][doc["active_manifest"]]["assertions"]}
    assert labels[credentials.GENERATION]["prompt"] == "p"


def test_verify_names_a_changed_byte_a_stripped_manifest_and_another_key(tmp_path, chain):
    out = str(tmp_path / "out")
    cfg = signed_cfg(chain)
    records = {r["id"]: r for r in write_signed(out, cfg, n=4).to_pylist()}
    loc = locate(out)
    path = {i: r["image_uri"].removeprefix("file://") for i, r in records.items()}
    data = loc.fs.cat_file(path["r0"])  # a changed byte, inside the pixels
    loc.write_bytes(path["r0"], data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])
    pixels = np.random.default_rng(5).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    plain = ImageWriter(load_config("tiny"), str(tmp_path / "plain"), MODELS)(writer_rows(pixels))
    stripped = (tmp_path / "plain").joinpath(plain.column("image_uri")[1].as_py().split("/plain/", 1)[1])
    loc.write_bytes(path["r1"], stripped.read_bytes())  # the same image, no credentials
    other = make_chain(tmp_path / "other", name="someone else")
    resigned = Signer(with_key_files(load_config("tiny", other.overrides)).output.c2pa.signing, MODELS)
    loc.write_bytes(path["r2"], resigned.sign(stripped.read_bytes(), "png", {"id": "r1"}))
    report, ok = verify(loc)
    found = {p.id: (p.kind, p.detail) for p in report.problems}
    assert set(found) == {"r0", "r1", "r2"} and {k for k, _ in found.values()} == {"corrupt"}, report.problems
    assert "content credentials: invalid" in found["r0"][1]
    assert "content credentials: none (stripped)" in found["r1"][1]
    assert "signed by someone else; issuer ifbatch tests" in found["r2"][1] and "not the run's" in found["r2"][1]
    fixed = repair(loc, report, ok)
    assert fixed.failed == 3
    after = {r["id"]: r for r in read_manifest(loc).to_pylist()}
    assert [after[i]["status"] for i in ("r0", "r1", "r2", "r3")] == ["failed", "failed", "failed", "ok"]
    assert "content credentials" in after["r2"]["error"]  # the next run makes them again, signed

    # an image whose record says it was signed but whose bytes (and record) were replaced by a valid unsigned one
    rec = after["r3"]
    assert credentials.problem(stripped.read_bytes(), rec["c2pa_signer"]).startswith("content credentials: none")


def test_a_signer_that_cannot_sign_is_refused_naming_the_file_and_why(tmp_path, chain):
    def refused(*overrides) -> str:
        with pytest.raises(CredentialsError) as e:
            with_key_files(load_config("tiny", list(overrides)))
        return str(e.value)

    expired = make_chain(tmp_path / "expired", valid_from=dt.timedelta(days=-10), valid_for=dt.timedelta(days=1))
    msg = refused(*expired.overrides)
    assert f"cert_file = '{expired.cert_file}'" in msg and "expired on" in msg
    early = make_chain(tmp_path / "early", valid_from=dt.timedelta(days=2))
    assert "is not valid until" in refused(*early.overrides)
    other = make_chain(tmp_path / "other", name="another signer")
    msg = refused(f"output.c2pa.cert_file={chain.cert_file}", f"output.c2pa.key_file={other.key_file}")
    assert f"key_file = '{other.key_file}'" in msg and "is not the key of" in msg
    missing = tmp_path / "nowhere.key"
    msg = refused(f"output.c2pa.cert_file={chain.cert_file}", f"output.c2pa.key_file={missing}")
    assert f"key_file = '{missing}'" in msg and "No such file" in msg
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    msg = refused(f"output.c2pa.cert_file={garbage}", f"output.c2pa.key_file={chain.key_file}")
    assert f"cert_file = '{garbage}'" in msg and "not a PEM certificate chain" in msg
    locked = make_chain(tmp_path / "locked", password=b"secret")
    assert "the private key is encrypted" in refused(*locked.overrides)
    with pytest.raises(ConfigError, match=r"output.c2pa.cert_file = .* needs output.c2pa.key_file too"):
        load_config("tiny", [f"output.c2pa.cert_file={chain.cert_file}"])
    with pytest.raises(CredentialsError, match="names a signer .* but it was not loaded"):
        credentials.ready(load_config("tiny", chain.overrides))  # a run refuses a config made without it


def test_the_key_is_in_no_dump_repr_or_record(chain):
    cfg = signed_cfg(chain)
    signing = cfg.output.c2pa.signing
    assert signing is not None and signing.key.get_secret_value().strip() == chain.key_pem.decode().strip()
    shown = [cfg.model_dump_json(), repr(cfg), str(cfg), repr(signing), json.dumps(cfg.model_dump(mode="json"))]
    for text in shown:
        assert not [ln for ln in chain.key_lines if ln in text]
    assert cfg.output.c2pa.model_dump()["cert_file"] == str(chain.cert_file)  # the file's name is shown, not it
    assert "signing" not in cfg.output.c2pa.model_dump()


@pytest.mark.slow  # waits 4 s for the certificate to expire
def test_a_certificate_that_expires_mid_run_fails_the_images_after_it(tmp_path):
    """Signed while the certificate holds; after it expires, each image fails with the library's reason and is not
    written, and the batch's other rows are recorded as ever (here: one failed upstream)."""
    short = make_chain(tmp_path / "short", valid_for=dt.timedelta(days=1, seconds=4))  # from a day ago: 4 s left
    out = str(tmp_path / "out")
    writer = ImageWriter(with_key_files(load_config("tiny", short.overrides)), out, MODELS)
    pixels = np.random.default_rng(5).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    before = writer(writer_rows(pixels[:1])).to_pylist()
    assert before[0]["status"] == "ok" and before[0]["c2pa_signer"]
    expiry = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)
    time.sleep(max(0.0, (expiry - dt.datetime.now(dt.UTC)).total_seconds()) + 0.5)
    rows = writer_rows(pixels, failed=1)
    rows["id"] = np.array(["a", "b", "c"], object)
    after = writer(rows).to_pylist()
    assert [r["status"] for r in after] == ["failed", "failed", "failed"]
    for r in after[:2]:
        assert r["error"].startswith("sign: output.c2pa.cert_file") and "signing certificate expired on" in r["error"]
        assert r["image_uri"] is None and r["c2pa_signer"] is None
    assert after[2]["error"] == "stage_2: RuntimeError: boom"  # failed upstream, as before
    assert not list((tmp_path / "out").rglob("a.png")) and not list((tmp_path / "out").rglob("b.png"))


def test_a_signed_image_left_unrecorded_is_recorded_with_its_signer(tmp_path, chain):
    """A run killed between an image and its record: verify --repair (as the next run) records it from the image
    alone, its signer read from its credentials, and the output is whole with them checked."""
    out = str(tmp_path / "out")
    cfg = signed_cfg(chain)
    write_signed(out, cfg, n=1)
    pixels = np.random.default_rng(9).integers(0, 256, (1, 24, 24, 3), dtype=np.uint8)
    rows = writer_rows(pixels)
    rows["id"] = np.array(["unrecorded"], object)
    ImageWriter(cfg, out, MODELS)(rows)  # written, never recorded
    loc = locate(out)
    report, ok = verify(loc)
    assert [p.kind for p in report.problems] == ["adoptable"]
    assert repair(loc, report, ok).adopted == 1
    rec = {r["id"]: r for r in read_manifest(loc).to_pylist()}["unrecorded"]
    assert rec["status"] == "ok" and rec["c2pa_signer"] == cfg.output.c2pa.signing.signer
    report, _ = verify(loc)
    assert report.whole and report.checked == 2
