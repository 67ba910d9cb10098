"""`python -m colabswarm worker`'s token options: the owner's own token however it is given."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from colabswarm.backend.client import WorkerClient
from colabswarm.protocol import TOKEN_ENV
from tests.conftest import ROOT, WorkerProcess, start_all

DASH_TOKEN = "-starts-with-a-dash-0123456789"


def _proc(name: str, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
    return WorkerProcess("--model", "tiny", *args, name=name, env=env)


async def test_a_token_that_starts_with_a_dash_works_as_given_or_from_a_file_or_the_env(
        worker_procs, tmp_path):
    token_file = tmp_path / "token.txt"
    token_file.write_text("file-token-0123456789abcdef\n")
    os.chmod(token_file, 0o600)
    procs = [
        _proc("spaced", "--token", DASH_TOKEN),          # what argparse alone refuses
        _proc("file", "--token-file", str(token_file)),
        _proc("env", env={TOKEN_ENV: "env-token-0123456789abcdef"}),
    ]
    worker_procs.extend(procs)
    start_all(procs)
    expected = [DASH_TOKEN, "file-token-0123456789abcdef", "env-token-0123456789abcdef"]
    for p, token in zip(procs, expected, strict=True):
        assert p.share.endswith(f"#token={token}"), p.lines
        async with WorkerClient(p.share) as c:  # and the worker really takes it
            assert (await c.info()).name == p.name


@pytest.mark.parametrize("args, says", [
    (["--token", "-short"], "16-256"),
    (["--token-file", "/nonexistent/token.txt"], "Cannot read the token file"),
    (["--token=abcdefghijklmnopq", "--token-file", "x"], "Give the token once"),
])
def test_a_token_that_cannot_work_is_refused_with_what_to_do(args, says):
    r = subprocess.run(
        [sys.executable, "-m", "colabswarm", "worker", "--model", "tiny", "--port", "0", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert says in r.stderr
    assert "Traceback" not in r.stderr
