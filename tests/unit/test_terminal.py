"""What reaches a user's terminal: library noise is dropped where it is made, everything else passes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ..services import SeaweedS3


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_stderr_filter_drops_only_the_listed_lines_even_from_c_code():
    res = run_python("""
        import os
        from ifbatch.flows.terminal import STDERR_NOISE, filtered_stderr
        with filtered_stderr():
            os.write(2, b"kept before\\n")
            os.write(2, f"[core_worker.cc] Actor X {STDERR_NOISE[0]}. See ray#53727\\n".encode())
            os.write(2, b"kept after\\n")
        os.write(2, b"restored\\n")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == ["kept before", "kept after", "restored"]


QUIET_CHECK = """
    import logging, sys
    logging.basicConfig(stream=sys.stdout, format="%(name)s: %(message)s")
    import ifbatch.models.loading  # quiets on import, before any pipeline is imported
    logging.getLogger("transformers.utils.import_utils").warning("`CLIPImageProcessor` requires torchvision (x)")
    logging.getLogger("transformers.utils.import_utils").warning("a real problem")
    logging.getLogger("transformers.tokenization_utils_base").warning("Token indices sequence length is longer (124)")
"""


@pytest.mark.parametrize("verbose", ["", "1"])
def test_library_noise_is_dropped_unless_verbose(verbose):
    res = run_python(QUIET_CHECK, IFBATCH_VERBOSE=verbose)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "transformers.utils.import_utils: a real problem" in lines
    noisy = [line for line in lines if "torchvision" in line or "Token indices" in line]
    assert len(noisy) == (2 if verbose else 0)


@pytest.mark.slow
def test_test_servers_start_beside_another_seaweedfs(s3_server, tmp_path):
    """Every listener of a test server is on a port it chose or off: a second one starts beside the session's."""
    second = SeaweedS3(tmp_path).start()
    try:
        assert second.port != s3_server.port and second.proc.poll() is None and s3_server.proc.poll() is None
    finally:
        second.stop()


def test_ray_cluster_notices_are_dropped_from_stdout_and_nothing_else():
    """Ray's driver prints the cluster's notices with print(), `(raylet)` first, coloured or not, one notice
    possibly many lines (a raylet's last log lines); ifbatch's lines and the stage actors' lines pass."""
    import contextlib
    import io

    from ifbatch.flows.terminal import without_ray_notices

    out = io.StringIO()
    with contextlib.redirect_stdout(out), without_ray_notices():
        print("progress: 4/36 images")
        print("\x1b[33m(raylet)\x1b[0m Raylet is terminated. Last 20 lines:\n    [state-dump] x\n    [state-dump] y")
        print("(raylet, ip=10.0.0.12) The node with node id: 54b3 has been marked dead")
        print("(MapWorker(MapBatches(Stage3Stage)) pid=42) a stage's own line")
        print("ifbatch: stopped after generation started")
    assert out.getvalue().splitlines() == [
        "progress: 4/36 images",
        "(MapWorker(MapBatches(Stage3Stage)) pid=42) a stage's own line",
        "ifbatch: stopped after generation started",
    ]


def test_the_terminal_leaves_out_the_dashboards_detail_and_prefects_repeats_of_a_failure():
    import logging

    from ifbatch.flows.terminal import DETAIL, _ForTheTerminal

    def rec(name, msg, level=logging.ERROR, extra=None):
        r = logging.LogRecord(name, level, __file__, 1, msg, None, None)
        r.__dict__.update(extra or {})
        return r

    keep = _ForTheTerminal().filter
    assert not keep(rec("prefect.flow_runs", "what stopped it: Traceback ...", extra=DETAIL))
    assert not keep(rec("prefect.task_runs", "Task run failed with state: Failed(message='RunStopped: ...')"))
    assert not keep(rec("prefect.flow_runs", "Finished in state Failed('stopped after ...')", logging.INFO))
    assert keep(rec("prefect.task_runs", "Finished in state Completed()", logging.INFO))
    assert keep(rec("prefect.task_runs", "Task run failed with exception: KeyError('x')"))  # a bug keeps its trace
    assert keep(rec("prefect.flow_runs", "progress: 4/36 images", logging.INFO))
    assert keep(rec("ifbatch.run", "Finished in state Failed (a message of another logger)"))
