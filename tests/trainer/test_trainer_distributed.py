"""Two ranks in one pod, as the operator runs a FineTuneJob with ``gpus: 2``: ``kubetune train`` with
``KUBETUNE_NPROC_PER_NODE=2`` runs torchrun, two real processes train together over gloo on CPU.

* The 2-rank run's losses match one process with the same global batch (gradient accumulation
  doubled), step by step, within :data:`LOSS_TOLERANCE`.
* Only rank 0 writes: every status patch comes from rank 0, every stored object is PUT once.
* SIGTERM mid-run: both ranks stop at the same step, one checkpoint holds both ranks' states,
  the pod exits 7 (Preempted); one process then resumes from it (another world size), is
  preempted in turn, and two ranks finish the run.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer.storage import Store
from trainer_helpers import KUBETUNE, FakeApiServer, cli_env, qa_rows, spec_doc, write_jsonl

from kubetune import api

pytestmark = pytest.mark.integration

STEPS = 6
# Per-step loss, 2 ranks x 1 micro-batch vs 1 process x 2 micro-batches (float32 on CPU). The same
# packed rows make each optimizer step; only where the gradients are summed differs (the gloo
# all-reduce vs accumulation). Measured: 0.0 (docs/trainer.md, "Several GPUs").
LOSS_TOLERANCE = 1e-3


class Pod:
    """One ``kubetune train`` (the launcher when ranks > 1), with a fresh pod's scratch space."""

    def __init__(self, tmp_path: Path, name: str, spec_file: Path, env: dict[str, str], ranks: int):
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.log = open(self.dir / "log.txt", "w")  # noqa: SIM115 - closed in wait()
        extra = {"KUBETUNE_NPROC_PER_NODE": str(ranks)} if ranks > 1 else {}
        self.proc = subprocess.Popen(
            [KUBETUNE, "train", "--spec", str(spec_file)], stdout=self.log, stderr=subprocess.STDOUT,
            env=cli_env({**env, **extra, "OMP_NUM_THREADS": "1", "KUBETUNE_WORK_DIR": str(self.dir / "work"),
                         "KUBETUNE_TERMINATION_LOG": str(self.dir / "termination-log")}),
        )

    def wait(self, timeout: float = 600) -> int:
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


def make_spec(folder: Path, model_dir: Path, out: str, endpoint: str, **training: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / "qa.jsonl", qa_rows(40))
    dataset = {"source": "jsonl", "uri": str(data), "format": "template", "template": "Q: {question}\nA: {answer}"}
    doc = spec_doc({"name": str(model_dir)}, dataset,
                   out, endpoint, **{"maxSteps": STEPS, "saveSteps": 3, "loggingSteps": 1, "batchSize": 1,
                                     "maxLength": 48, **training})
    path = folder / "spec.json"
    path.write_text(json.dumps(doc))
    return path


def losses(store: Store, out: str, step: int, into: Path) -> list[float]:
    store.download_dir(f"{out}/checkpoints/step-{step}", into)
    history = json.loads((into / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def channel_env(server: FakeApiServer, tmp_path: Path) -> dict[str, str]:
    """The pod's progress channel, pointed at a recording stand-in for the API server."""
    sa = tmp_path / "serviceaccount"
    sa.mkdir(exist_ok=True)
    (sa / "token").write_text("pod-token\n")
    return {"KUBETUNE_API_SERVER": server.url, "KUBETUNE_SERVICEACCOUNT_DIR": str(sa),
            "KUBETUNE_KIND": "FineTuneJob", "KUBETUNE_NAME": "ft", "KUBETUNE_NAMESPACE": "ns"}


def puts(s3: Any, key_prefix: str) -> list[str]:
    """Object keys PUT under ``key_prefix`` so far, once per request (the S3 server's access log)."""
    text = "".join(p.read_text(errors="replace") for p in Path(s3.log_dir).glob("s3-*.log"))
    return re.findall(rf'"PUT /{re.escape(key_prefix)}/(\S+?)(?:\?\S*)? HTTP', text)


def test_two_ranks_train_like_one_process_and_only_rank_zero_writes(
        tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], prefix: str, tmp_path: Path) -> None:
    store = Store.from_spec(api.Storage(endpoint=s3.endpoint))
    out2, out1 = f"s3://{prefix}/two-ranks", f"s3://{prefix}/one-process"
    with FakeApiServer() as server:
        two = Pod(tmp_path, "two", make_spec(tmp_path / "a", tiny_model_dir, out2, s3.endpoint,
                                             gradientAccumulationSteps=1),
                  {**s3_env, **channel_env(server, tmp_path)}, ranks=2)
        assert two.wait() == 0, two.output()[-4000:]
        patches = list(server.requests)
    one = Pod(tmp_path, "one", make_spec(tmp_path / "b", tiny_model_dir, out1, s3.endpoint,
                                         gradientAccumulationSteps=2), s3_env, ranks=1)
    assert one.wait() == 0, one.output()[-4000:]

    # two processes ran, as ranks 0 and 1 of 2
    log = two.output()
    assert "rank 0 of 2" in log and "rank 1 of 2" in log, log[-3000:]

    # the same global batch trains the same way
    two_ranks = losses(store, out2, STEPS, tmp_path / "two-final")
    one_process = losses(store, out1, STEPS, tmp_path / "one-final")
    worst = max(abs(a - b) for a, b in zip(two_ranks, one_process, strict=True))
    print(f"2 ranks vs 1 process: {len(two_ranks)} steps, max |loss difference| {worst:.2e}")
    assert two_ranks == pytest.approx(one_process, abs=LOSS_TOLERANCE)
    assert len(two_ranks) == STEPS

    # the result is rank 0's, and it is a loadable PEFT adapter
    result = two.termination()
    assert result["reason"] == "Completed" and result["result"]["adapterUri"] == f"{out2}/adapter", result
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store.download_dir(f"{out2}/adapter", tmp_path / "adapter")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "adapter"))

    # only rank 0 wrote: every status patch is its, every object was stored once
    assert patches and {p["headers"].get("User-Agent") for p in patches} == {"kubetune-trainer (rank 0)"}
    assert patches[-1]["body"]["status"]["adapterUri"] == f"{out2}/adapter"
    keys = puts(s3, out2.removeprefix("s3://"))
    assert keys, "the S3 server's log shows no PUT"
    repeated = {k for k in keys if keys.count(k) > 1 and k != "checkpoints/latest.json"}
    assert not repeated, f"objects written more than once: {sorted(repeated)}"
    assert keys.count("manifest.json") == 1
    stored = store.list(f"{out2}/checkpoints/step-{STEPS}")
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(stored), stored  # both ranks' states, in one checkpoint


def wait_for(condition: Callable[[], Any], pod: Pod, timeout: float = 300, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if pod.proc.poll() is not None:
            raise AssertionError(f"the trainer exited ({pod.proc.returncode}) before {what}:\n{pod.output()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{pod.output()[-3000:]}")


def test_sigterm_one_checkpoint_for_both_ranks_then_resume_with_any_world_size(
        tiny_model_dir: Path, s3: Any, s3_env: dict[str, str], prefix: str, tmp_path: Path) -> None:
    store = Store.from_spec(api.Storage(endpoint=s3.endpoint))
    out, total = f"s3://{prefix}/preempted", 16
    spec_file = make_spec(tmp_path / "spec", tiny_model_dir, out, s3.endpoint, maxSteps=total, saveSteps=2)

    def stored_step(above: int = -1) -> int | None:
        pointer = store.get_json(f"{out}/checkpoints/latest.json")
        return pointer["step"] if pointer and pointer["step"] > above else None

    # 1. Two ranks, SIGTERM to the pod's process (what the kubelet does): one agreed checkpoint, exit 7.
    first = Pod(tmp_path, "first", spec_file, s3_env, ranks=2)
    wait_for(stored_step, first, what="a first checkpoint")
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 7, first.output()[-4000:]
    message = first.termination()
    assert message["reason"] == "Preempted", message
    stopped = stored_step()
    assert stopped is not None and 2 <= stopped < total
    assert f"stopped on SIGTERM at step {stopped}" in message["message"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(store.list(f"{out}/checkpoints/step-{stopped}"))
    assert not store.exists(f"{out}/manifest.json")

    # 2. One process resumes from the 2-rank checkpoint (another world size), and is preempted too.
    second = Pod(tmp_path, "second", spec_file, s3_env, ranks=1)
    wait_for(lambda: stored_step(above=stopped), second, what="a checkpoint after the resume")
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == 7, second.output()[-4000:]
    assert f"resuming from step {stopped}" in second.output()
    again = stored_step()
    assert again is not None and again > stopped

    # 3. Two ranks finish the run from there.
    third = Pod(tmp_path, "third", spec_file, s3_env, ranks=2)
    assert third.wait() == 0, third.output()[-4000:]
    assert f"resuming from step {again}" in third.output()
    result = third.termination()["result"]
    assert result["progress"]["step"] == total
    assert store.get_json(f"{out}/manifest.json")["result"] == result
