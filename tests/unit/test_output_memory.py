"""verify and compact hold the records, not the parts: their peak memory does not grow with the part count.

The same 40 records, spread over 300 parts and over 2,400 (each id recorded many times, the latest wins): a part
read on its own costs ~80 KB of Arrow and Python objects, so a tool that held every part at once peaked ~150 MB
higher on the larger output (measured before the fix: verify 1.6 GB at 20,000 parts). Each tool runs in a fresh
process and reads its own peak from /proc (VmHWM: ru_maxrss would include the forking pytest's, from before exec).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pytest

from ifbatch.tasks.outputs.manifest import RECORD_SCHEMA, part_paths, write_part
from ifbatch.tasks.storage import locate

pytestmark = pytest.mark.slow

IDS = 40

TOOL = """
import json, sys
from ifbatch.tasks.storage import locate

def peak_mb():  # this process's own peak (ru_maxrss keeps the forking parent's from before the exec)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024

loc = locate(sys.argv[2])
if sys.argv[1] == "verify":
    from ifbatch.tasks.outputs.verify import verify
    report, _ = verify(loc)
    out = {"whole": report.whole, "checked": report.checked, "summary": report.summary()}
else:
    from ifbatch.tasks.outputs.compact import compact
    written, removed = compact(loc)
    out = {"removed": len(removed)}
out["peak_mb"] = peak_mb()
print(json.dumps(out))
"""


def output(path, parts: int) -> str:
    """`parts` parts of one record each over IDS images (files present), copied from IDS written parts."""
    loc = locate(str(path))
    for i in range(IDS):
        data = f"image {i}".encode()
        image = loc.path("images", f"img-{i}.png")
        loc.write_bytes(image, data)
        rec = {"id": f"img-{i}", "status": "ok", "image_uri": loc.uri(image), "bytes": len(data)}
        rec.update(sha256=hashlib.sha256(data).hexdigest(), prompt=f"a prompt, {i}", seed=i)
        write_part(loc, pa.Table.from_pylist([rec], schema=RECORD_SCHEMA), "20261206T000000Z-aaaaaa", "{}", i)
    first = part_paths(loc)
    for n in range(IDS, parts):
        shutil.copyfile(first[n % IDS], loc.path("manifest", f"part-20261206T000000Z-aaaaaa-{n:05d}.parquet"))
    return str(path)


def run(tool: str, out: str) -> dict:
    res = subprocess.run([sys.executable, "-c", TOOL, tool, out], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_verify_and_compact_memory_does_not_grow_with_the_parts(tmp_path):
    small, large = output(tmp_path / "small", 300), output(tmp_path / "large", 2400)
    a, b = run("verify", small), run("verify", large)
    assert a["whole"] and b["whole"] and a["checked"] == b["checked"] == IDS, (a, b)
    assert "manifest: 2,400 parts read in" in b["summary"] and "images: 40 read and hashed in" in b["summary"]
    assert b["peak_mb"] - a["peak_mb"] < 60, (a["peak_mb"], b["peak_mb"])
    a, b = run("compact", small), run("compact", large)
    assert (a["removed"], b["removed"]) == (300, 2400)
    assert b["peak_mb"] - a["peak_mb"] < 60, (a["peak_mb"], b["peak_mb"])
    assert len(part_paths(locate(large))) == 1 and run("verify", large)["whole"]
