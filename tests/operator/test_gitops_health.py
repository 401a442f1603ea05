"""The Argo CD Lua health checks, run by a real Lua 5.4 on statuses the operator derives, and the
kstatus (Flux) reading of the same statuses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kobjects import jcond, job_dict, pod_dict, term_msg
from kubetune_operator import status

HEALTH = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "health"
NOW = "2026-01-01T02:00:00Z"
LUA = shutil.which("lua5.4") or shutil.which("lua")


def lua_value(v: Any) -> str:
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "{" + ", ".join(lua_value(x) for x in v) + "}"
    return "{" + ", ".join(f"[{lua_value(k)}] = {lua_value(x)}" for k, x in v.items()) + "}"


def argo_health(script: str, obj: dict[str, Any]) -> tuple[str, str]:
    assert LUA, "lua5.4 is required (apt-get install -y lua5.4)"
    program = f"obj = {lua_value(obj)}\nlocal hs = dofile({lua_value(str(HEALTH / script))})\n" \
              "io.write(hs.status, '\\n', hs.message or '')"
    out = subprocess.run([LUA, "-"], input=program, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    state, _, message = out.stdout.partition("\n")
    return state, message


def kstatus(obj: dict[str, Any]) -> str:
    """kstatus' generic rules (sigs.k8s.io/cli-utils/pkg/kstatus/status, GetConditions fallback)."""
    st = obj.get("status") or {}
    if st.get("observedGeneration") is not None and st["observedGeneration"] != obj["metadata"]["generation"]:
        return "InProgress"
    conds = {c["type"]: c for c in st.get("conditions") or []}
    if conds.get("Reconciling", {}).get("status") == "True":
        return "InProgress"
    if conds.get("Stalled", {}).get("status") == "True":
        return "Failed"
    if conds.get("Ready", {}).get("status") == "False":
        return "InProgress"
    return "Current"


def with_status(body: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], **kw: Any) -> dict:
    body["status"] = status.derive(body["kind"], body, job, pods, NOW, **kw)
    return body


def test_finetunejob_phases(ftj_body):
    fresh = ftj_body()
    assert argo_health("finetunejob.lua", fresh) == ("Progressing", "Waiting for the kubetune operator")

    running = with_status(ftj_body(), job_dict(active=1), [pod_dict("demo-train-a", "Running")])
    running["status"]["progress"] = {"percent": 40, "eta": "12m30s"}
    state, message = argo_health("finetunejob.lua", running)
    assert state == "Progressing" and "(40%, ETA 12m30s)" in message
    assert kstatus(running) == "InProgress"

    pod = pod_dict("demo-train-a", "Succeeded", terminated={"exitCode": 0, "message": term_msg(
        "Completed", "done", adapterUri="s3://out/run-1/adapter")})
    done = with_status(ftj_body(), job_dict(conditions=[jcond("Complete")], succeeded=1), [pod])
    assert argo_health("finetunejob.lua", done) == ("Healthy", "Succeeded: adapter at s3://out/run-1/adapter")
    assert kstatus(done) == "Current"

    failed_pod = pod_dict("demo-train-a", "Failed", terminated={"exitCode": 3, "message": term_msg(
        "InvalidDataset", "column 'text' not found")})
    failed = with_status(ftj_body(), job_dict(conditions=[jcond("Failed", "PodFailurePolicy")], failed=1),
                         [failed_pod])
    assert argo_health("finetunejob.lua", failed) == ("Degraded", "InvalidDataset: column 'text' not found")
    assert kstatus(failed) == "Failed"


def test_finetunejob_stalled_suspended_and_stale_generation(ftj_body):
    pull = pod_dict("demo-train-a", "Pending", waiting=("ImagePullBackOff", "no such image"))
    stalled = with_status(ftj_body(), job_dict(active=1), [pull])
    state, message = argo_health("finetunejob.lua", stalled)
    assert state == "Degraded" and message.startswith("ImagePullBackOff:")
    assert kstatus(stalled) == "Failed"

    suspended = with_status(ftj_body(suspend=True), job_dict(suspend=True), [], spec_suspend=True)
    assert argo_health("finetunejob.lua", suspended)[0] == "Suspended"

    stale = with_status(ftj_body(), job_dict(active=1), [pod_dict("demo-train-a", "Running")])
    stale["metadata"]["generation"] = 2
    assert argo_health("finetunejob.lua", stale)[0] == "Progressing"
    assert kstatus(stale) == "InProgress"

    missing = with_status(ftj_body(), None, [], blocked=status.Verdict("Failed", "SecretNotFound", "no s3-creds",
                                                                       stalled=True))
    assert argo_health("finetunejob.lua", missing) == ("Degraded", "SecretNotFound: no s3-creds")


def test_mergejob_phases(mj_body):
    waiting = with_status(mj_body(), None, [], blocked=status.Verdict("Pending", "WaitingForFineTuneJob", "waiting"))
    assert argo_health("mergejob.lua", waiting) == ("Progressing", "Pending: waiting")
    assert kstatus(waiting) == "InProgress"
    pod = pod_dict("m-a", "Succeeded", terminated={"exitCode": 0, "message": term_msg(
        "Completed", "merged", mergedUri="s3://out/merged")})
    done = with_status(mj_body(), job_dict("demo-merged-merge", conditions=[jcond("Complete")], succeeded=1), [pod])
    assert argo_health("mergejob.lua", done) == ("Healthy", "Succeeded: merged model at s3://out/merged")
    gone = with_status(mj_body(), None, [], blocked=status.Verdict("Pending", "FineTuneJobNotFound", "no demo",
                                                                   stalled=True))
    assert argo_health("mergejob.lua", gone) == ("Degraded", "FineTuneJobNotFound: no demo")


@pytest.mark.parametrize("script", ["finetunejob.lua", "mergejob.lua"])
def test_docs_embed_the_shipped_scripts(script):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "gitops.md").read_text()
    body = (HEALTH / script).read_text()
    embedded = "\n".join("    " + line if line else "" for line in body.splitlines())
    assert embedded in doc, f"docs/gitops.md is out of date with charts/kubetune/health/{script}"


def test_finetunejob_prepare_stage(ftj_body):
    """Argo CD and Flux follow the two stages: the CPU prepare stage is progress, its failure (no GPU
    pod made) is Degraded/Failed with the pod's reason."""
    prep = job_dict("demo-prepare", active=1)
    preparing = with_status(ftj_body(), None, [], blocked=status.prepare_verdict(
        prep, [pod_dict("demo-prepare-a", "Running")], "preparing: tokenizing 40 samples"))
    state, message = argo_health("finetunejob.lua", preparing)
    assert state == "Progressing" and "preparing: tokenizing 40 samples" in message, message
    assert kstatus(preparing) == "InProgress"
    failed_pod = pod_dict("demo-prepare-a", "Failed", terminated={"exitCode": 3, "message": term_msg(
        "InvalidDataset", "row 6 is empty")})
    failed = with_status(ftj_body(), None, [], blocked=status.prepare_verdict(
        job_dict("demo-prepare", conditions=[jcond("Failed", "PodFailurePolicy")], failed=1), [failed_pod]))
    state, message = argo_health("finetunejob.lua", failed)
    assert state == "Degraded" and message.startswith("InvalidDataset: the prepare stage failed, no GPU pod"), message
    assert kstatus(failed) == "Failed"
