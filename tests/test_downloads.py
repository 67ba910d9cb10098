"""`--allow-downloads` takes hub ids only: a requested name that is also a folder under the
worker's working directory is never loaded from it, an existing and a missing folder give the
same answer (no file-system oracle), and a failed download leaves /v1/info's model list as it
was. The worker runs in its own process with the hub offline (HF_HUB_OFFLINE=1: nothing is
downloaded, every hub look-up fails as a missing repository would)."""

from __future__ import annotations

import shutil

import httpx

from colabswarm.backend.tiny import tiny_model_dir
from colabswarm.errors import ErrorKind
from colabswarm.protocol import JobStatus
from tests.conftest import WorkerProcess


def _final(http: httpx.Client, job_id: str) -> JobStatus:
    status = JobStatus.model_validate(http.get(f"/v1/jobs/{job_id}").json())
    for _ in range(60):
        if status.state not in ("queued", "running"):
            return status
        r = http.get(f"/v1/jobs/{job_id}", params={"wait": 10, "since": status.version})
        status = JobStatus.model_validate(r.json())
    raise AssertionError(f"job {job_id} did not finish: {status}")


def test_a_requested_name_is_a_hub_id_never_a_local_folder(worker_procs, tmp_path):
    # a real diffusers pipeline at ./local/pipe, where a hub id "local/pipe" would point
    shutil.copytree(tiny_model_dir("tiny"), tmp_path / "local" / "pipe")
    (tmp_path / "empty" / "dir").mkdir(parents=True)
    proc = WorkerProcess("--model", "tiny", "--allow-downloads", name="downloads",
                         env={"HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    worker_procs.append(proc)
    proc.start()
    base = f"http://127.0.0.1:{proc.port}"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {proc.token}"},
                      timeout=60) as http:
        assert http.get("/v1/info").json()["models"] == ["tiny"]
        answers = {}
        for name in ("local/pipe", "empty/dir", "missing/pipe"):
            r = http.post("/v1/jobs", json={"model": name, "width": 64, "height": 64,
                                            "steps": 2, "seeds": [1]})
            assert r.status_code == 202, r.text  # a hub id: accepted, fetched on the worker
            final = _final(http, r.json()["id"])
            assert final.state == "failed", f"{name} must not load from the folder here"
            assert final.error_kind is ErrorKind.MODEL_NOT_AVAILABLE
            answers[name] = final.error.replace(name, "<name>")
            assert http.get("/v1/info").json()["models"] == ["tiny"], "nothing half-added"
        # an existing pipeline folder, an empty folder and nothing: one and the same answer
        assert len(set(answers.values())) == 1, answers
        assert "hub" in answers["missing/pipe"]
        assert str(tmp_path) not in answers["missing/pipe"]
        # and the worker goes on serving its own model
        r = http.post("/v1/jobs", json={"model": "tiny", "width": 64, "height": 64,
                                        "steps": 2, "seeds": [1]})
        assert _final(http, r.json()["id"]).state == "done"
        assert http.get("/v1/info").json()["models"] == ["tiny"]
