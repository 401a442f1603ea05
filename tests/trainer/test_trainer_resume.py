"""The trainer as the pod runs it (``kubetune train --spec FILE`` in a subprocess): preempted with
SIGTERM, killed with SIGKILL, its S3 server gone mid-run; each restart continues from the last
complete checkpoint and a failed upload never leaves a manifest."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer.storage import Store, verify_files
from trainer_helpers import KUBETUNE, cli_env, qa_rows, spec_doc, write_jsonl

from kubetune import api

pytestmark = pytest.mark.integration

MAX_STEPS = 12
RESUME_LOSS_TOLERANCE = 1e-4  # per-step loss, interrupted-and-resumed vs uninterrupted (CPU, float32)


class Pod:
    """One ``kubetune train`` process with its own scratch space, as a fresh pod would have."""

    def __init__(self, tmp_path: Path, name: str, spec_file: Path, env: dict[str, str]):
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.log = open(self.dir / "log.txt", "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [KUBETUNE, "train", "--spec", str(spec_file)], stdout=self.log, stderr=subprocess.STDOUT,
            env=cli_env({**env, "KUBETUNE_WORK_DIR": str(self.dir / "work"),
                         "KUBETUNE_TERMINATION_LOG": str(self.dir / "termination-log")}),
        )

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        return code

    def output(self) -> str:
        return (self.dir / "log.txt").read_text()

    def termination(self) -> dict[str, Any]:
        return json.loads((self.dir / "termination-log").read_text())


def wait_for(condition: Callable[[], Any], pod: Pod, timeout: float = 300, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if pod.proc.poll() is not None:
            raise AssertionError(f"the trainer exited ({pod.proc.returncode}) before {what}:\n{pod.output()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{pod.output()[-3000:]}")


def make_spec(tmp_path: Path, model_dir: Path, out: str, endpoint: str) -> Path:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    doc = spec_doc({"name": str(model_dir)},
                   {"source": "jsonl", "uri": str(data), "format": "template",
                    "template": "Q: {question}\nA: {answer}"},
                   out, endpoint, maxSteps=MAX_STEPS, saveSteps=2, loggingSteps=1, keepCheckpoints=2,
                   batchSize=1, maxLength=48)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(doc))
    return path


def pointer_step(store: Store, out: str, above: int = -1) -> int | None:
    pointer = store.get_json(f"{out}/checkpoints/latest.json")
    return pointer["step"] if pointer and pointer["step"] > above else None


def test_sigterm_then_sigkill_then_resume_to_the_end(tiny_model_dir: Path, s3: Any, s3_env: dict[str, str],
                                                     bucket: str, prefix: str, tmp_path: Path) -> None:
    out = f"s3://{prefix}/run"
    spec_file = make_spec(tmp_path, tiny_model_dir, out, s3.endpoint)
    store = Store.from_spec(api.Storage(endpoint=s3.endpoint))

    # 1. Preemption: SIGTERM once a first checkpoint landed -> finish the step, checkpoint, exit 7.
    first = Pod(tmp_path, "pod-1", spec_file, s3_env)
    wait_for(lambda: pointer_step(store, out), first, what="a first checkpoint")
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 7, first.output()[-3000:]
    message = first.termination()
    assert message["reason"] == "Preempted"
    stopped = store.get_json(f"{out}/checkpoints/latest.json")
    assert f"stopped on SIGTERM at step {stopped['step']}" in message["message"]
    assert stopped["uri"] == f"{out}/checkpoints/step-{stopped['step']}"
    assert 2 <= stopped["step"] < MAX_STEPS
    assert not store.exists(f"{out}/manifest.json")

    # 2. A new pod resumes from that step; SIGKILL it (no chance to save) after it checkpointed more.
    second = Pod(tmp_path, "pod-2", spec_file, s3_env)
    killed_after = wait_for(lambda: pointer_step(store, out, above=stopped["step"]), second,
                            what="a checkpoint after the resume")
    second.proc.send_signal(signal.SIGKILL)
    assert second.wait() == -signal.SIGKILL
    assert f"resuming from step {stopped['step']}" in second.output()

    # 3. The third pod resumes from the newest COMPLETE checkpoint and finishes.
    pointer = store.get_json(f"{out}/checkpoints/latest.json")
    assert pointer["step"] >= killed_after
    local = tmp_path / "check"
    store.download_dir(pointer["uri"], local)
    assert verify_files(local, pointer) == []  # the pointer never names a partial upload
    third = Pod(tmp_path, "pod-3", spec_file, s3_env)
    assert third.wait() == 0, third.output()[-3000:]
    assert f"resuming from step {pointer['step']}" in third.output()
    result = third.termination()["result"]
    assert result["progress"]["step"] == MAX_STEPS
    manifest = store.get_json(f"{out}/manifest.json")
    final = store.get_json(f"{out}/checkpoints/latest.json")
    assert final["step"] == MAX_STEPS
    # the final trainer state carries the losses of all three pods, one per step
    state_dir = tmp_path / "final"
    store.download_dir(final["uri"], state_dir)
    history = json.loads((state_dir / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, MAX_STEPS + 1))

    # 4. The same spec run without interruption reaches the same losses, step by step: the resumes
    #    restored adapter, optimizer, scheduler, RNG and data position (not only contiguous steps).
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    straight = Pod(tmp_path, "pod-straight", make_spec(straight_dir, tiny_model_dir, f"{out}-straight", s3.endpoint),
                   s3_env)
    assert straight.wait() == 0, straight.output()[-3000:]
    reference = store.get_json(f"{out}-straight/manifest.json")
    store.download_dir(f"{out}-straight/checkpoints/step-{MAX_STEPS}", tmp_path / "straight-final")
    expected = json.loads((tmp_path / "straight-final" / "trainer_state.json").read_text())["log_history"]
    resumed_losses = [h["loss"] for h in history if "loss" in h]
    straight_losses = [h["loss"] for h in expected if "loss" in h]
    worst = max(abs(a - b) for a, b in zip(resumed_losses, straight_losses, strict=True))
    print(f"resumed vs uninterrupted: {len(resumed_losses)} steps, max |loss difference| {worst:.2e}")
    assert resumed_losses == pytest.approx(straight_losses, abs=RESUME_LOSS_TOLERANCE)
    # the manifest's train loss covers the whole run, not only the last pod's steps
    whole_run = pytest.approx(reference["metrics"]["trainLoss"], abs=RESUME_LOSS_TOLERANCE)
    assert manifest["metrics"]["trainLoss"] == whole_run
    assert manifest["result"] == result
    # keepCheckpoints=2
    assert len({k.split("/")[0] for k in store.list(f"{out}/checkpoints") if "/" in k}) == 2


def test_s3_outage_fails_with_storage_error_and_no_manifest(tiny_model_dir: Path, s3_factory: Any,
                                                             tmp_path: Path) -> None:
    server = s3_factory()
    server.make_bucket("faults")
    out = "s3://faults/run"
    spec_file = make_spec(tmp_path, tiny_model_dir, out, server.endpoint)
    store = Store.from_spec(api.Storage(endpoint=server.endpoint), env=server.env)

    pod = Pod(tmp_path, "pod-1", spec_file, server.env)
    wait_for(lambda: pointer_step(store, out), pod, what="a first checkpoint")
    server.stop()  # the network to storage is gone mid-run
    code = pod.wait()
    server.start()
    assert code == 4, pod.output()[-3000:]
    message = pod.termination()
    assert message["reason"] == "StorageError"
    assert server.endpoint in message["message"] and "s3://faults/run" in message["message"]
    assert not store.exists(f"{out}/manifest.json")  # never a manifest without its files
    pointer = store.get_json(f"{out}/checkpoints/latest.json")
    local = tmp_path / "check"
    store.download_dir(pointer["uri"], local)
    assert verify_files(local, pointer) == []

    # storage is back: the retry resumes from the last complete checkpoint and publishes
    retry = Pod(tmp_path, "pod-2", spec_file, server.env)
    assert retry.wait() == 0, retry.output()[-3000:]
    assert f"resuming from step {pointer['step']}" in retry.output()
    manifest = store.get_json(f"{out}/manifest.json")
    published = tmp_path / "published"
    store.download_dir(out, published)
    assert verify_files(published, manifest) == []
