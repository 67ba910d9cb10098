"""Tokens never show in a worker-side repr, and a worker's name is printable text of bounded
length wherever the worker takes it (start_worker, the CLI) and in what it reports (Info)."""

from __future__ import annotations

import httpx

from colabswarm.backend.serve import start_worker
from colabswarm.protocol import Info, Limits, clean_name
from colabswarm.swarm.local import LocalWorker

HOSTILE = "\x1b[31mred\x1b[0m\nline two\r\x1b]0;set the title\x07\u202eevil\x00" + "x" * 200


def test_reprs_mask_the_token():
    handle = start_worker(name="repr", simulate_speed=1.0)
    try:
        token = handle.token
        for text in (repr(handle), str(handle), repr(handle.worker), f"{handle!r}",
                     repr([handle])):
            assert token not in text and token[4:12] not in text, text
        assert f"token='{token[:4]}…'" in repr(handle)
        assert "0x" not in repr(handle.worker)
    finally:
        handle.stop()
    local = LocalWorker(None, ["tiny"], "gpu0", env={"HF_TOKEN": "hf_secret_value_123456"})
    local.share = f"http://127.0.0.1:7801#token={local.token}"
    text = repr(local)
    assert local.token not in text and "hf_secret_value" not in text and "#token=" not in text
    assert f"token='{local.token[:4]}…'" in text


def test_clean_name_removes_escapes_and_bounds_length():
    assert clean_name(HOSTILE) == "red line two evil " + "x" * 46
    assert len(clean_name(HOSTILE)) == 64
    assert clean_name("colab-t4 #2") == "colab-t4 #2"
    assert clean_name("\x1b[2J\x1b[H") == "worker"
    assert Info.model_validate({
        "name": HOSTILE, "version": "0", "device": "cpu", "models": [], "capabilities": [],
        "upscalers": [], "limits": Limits().model_dump(), "queue_depth": 0, "running": 0,
        "jobs_served": 0}).name == clean_name(HOSTILE)


def test_a_hostile_name_is_cleaned_where_the_worker_takes_it(spawn):
    handle = start_worker(name=HOSTILE, simulate_speed=1.0)
    try:
        assert handle.worker.name == clean_name(HOSTILE)
        with httpx.Client(base_url=handle.local_url,
                          headers={"Authorization": f"Bearer {handle.token}"}) as http:
            assert http.get("/v1/info").json()["name"] == clean_name(HOSTILE)
    finally:
        handle.stop()
    argv_name = HOSTILE.replace("\x00", "")  # (a command line cannot hold a NUL)
    proc = spawn("--simulate-speed", "1", name=argv_name)  # the CLI's --name
    printed = "\n".join(proc.lines)
    assert "\x1b" not in printed and "\r" not in printed and "\u202e" not in printed
    assert f"colabswarm worker {clean_name(argv_name)} on" in printed
