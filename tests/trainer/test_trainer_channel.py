"""The progress channel against a real HTTP server standing in for the API server: progress patches
are throttled and coalesced, training never waits on a slow or frozen server, and the final progress
is delivered at the end of training."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubetune_trainer.callbacks import ProgressReporter
from kubetune_trainer.runtime import StatusReporter
from trainer_helpers import FakeApiServer
from transformers import TrainerControl, TrainerState

STATUS_PATH = "/apis/kubetune.dev/v1alpha1/namespaces/ns/finetunejobs/ft/status"
QUICK = 0.5  # seconds: a call that returns within this did not wait on the network


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def reporter(api_server: FakeApiServer, tmp_path: Path) -> StatusReporter:
    (tmp_path / "token").write_text("pod-token\n")
    return StatusReporter(server=api_server.url, token_file=tmp_path / "token", ca_file=None,
                          kind="FineTuneJob", name="ft", namespace="ns")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def log_steps(cb: ProgressReporter, state: TrainerState, steps: range) -> list[float]:
    """``on_log`` as the Trainer calls it at each step; returns how long each call took."""
    took = []
    for step in steps:
        state.global_step, state.epoch = step, step / state.max_steps
        start = time.monotonic()
        cb.on_log(None, state, TrainerControl(), logs={"loss": 3.0 - step / 100, "learning_rate": 1e-4})
        took.append(time.monotonic() - start)
    return took


def test_a_burst_of_progress_becomes_one_patch_then_the_newest(api_server: FakeApiServer,
                                                               reporter: StatusReporter) -> None:
    cb = ProgressReporter(reporter, interval=2.0)
    state = TrainerState(max_steps=100)
    cb.on_train_begin(None, state, TrainerControl())
    burst_start = time.monotonic()
    log_steps(cb, state, range(1, 2))
    assert wait_until(lambda: len(api_server.requests) == 1)  # the first report goes out at once
    log_steps(cb, state, range(2, 101))
    assert time.monotonic() - burst_start < 1.0  # the burst itself is well inside one interval

    # The other 99 coalesce into one patch, the newest, sent when the interval is over, without any
    # flush.
    assert wait_until(lambda: 100 in api_server.steps(), timeout=5.0)
    sent = api_server.steps()
    assert sent == [1, 100]
    assert api_server.requests[1]["at"] - api_server.requests[0]["at"] >= 2.0 - 0.1
    last = api_server.requests[-1]
    assert last["path"] == STATUS_PATH and last["headers"]["Authorization"] == "Bearer pod-token"
    assert last["headers"]["Content-Type"] == "application/merge-patch+json"
    assert last["body"]["status"]["progress"] == cb.progress and cb.progress["step"] == 100
    time.sleep(2.5)  # nothing left to send: no repeat after another interval
    assert api_server.steps() == sent


def test_training_never_waits_on_a_frozen_api_server(api_server: FakeApiServer, reporter: StatusReporter) -> None:
    cb = ProgressReporter(reporter, interval=0.2)
    state = TrainerState(max_steps=50)
    cb.on_train_begin(None, state, TrainerControl())
    api_server.freeze()  # requests are held for up to 10 s (the reporter's own timeout)
    took = log_steps(cb, state, range(1, 2))
    assert wait_until(lambda: len(api_server.requests) == 1)  # step 1 is in flight, unanswered
    took += log_steps(cb, state, range(2, 31))
    for step in range(31, 41):  # and again once the interval has passed and a send is due
        time.sleep(0.05)
        took += log_steps(cb, state, range(step, step + 1))
    assert max(took) < QUICK, f"on_log waited {max(took):.2f}s on the API server"
    time.sleep(0.5)
    assert api_server.steps() == [1]  # one request in flight; the rest wait, coalesced, behind it
    assert cb.progress["step"] == 40

    api_server.thaw()  # the server answers: the newest progress follows, not the ones in between
    assert wait_until(lambda: 40 in api_server.steps())
    assert api_server.steps() == [1, 40]


def test_the_final_progress_is_delivered_at_train_end(api_server: FakeApiServer, reporter: StatusReporter) -> None:
    cb = ProgressReporter(reporter)  # the default 5 s interval: nothing but the first goes out during the run
    state = TrainerState(max_steps=20)
    cb.on_train_begin(None, state, TrainerControl())
    api_server.freeze()
    took = log_steps(cb, state, range(1, 2))
    assert wait_until(lambda: len(api_server.requests) == 1)  # step 1 is in flight, unanswered
    took += log_steps(cb, state, range(2, 20))
    assert max(took) < QUICK

    threading.Timer(1.0, api_server.thaw).start()  # the API server recovers while the run ends
    state.global_step, state.epoch = 20, 1.0
    start = time.monotonic()
    cb.on_train_end(None, state, TrainerControl())
    ended = time.monotonic() - start
    # on_train_end waited for the server (it answered after about 1 s), not for the 5 s interval
    assert 0.5 < ended < cb.flush_timeout
    assert api_server.steps() == [1, 20] and api_server.answered == 2
    final = api_server.requests[-1]["body"]["status"]["progress"]
    assert final == cb.progress and (final["step"], final["percent"]) == (20, 100)

    # A final evaluation after training (sft.py runs one) is delivered at once too, not after 5 s.
    cb.on_log(None, state, TrainerControl(), logs={"eval_loss": 1.5})
    assert api_server.requests[-1]["body"]["status"]["progress"]["evalLoss"] == 1.5


def test_train_end_waits_a_bounded_time_then_delivers_later(api_server: FakeApiServer, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    patient = StatusReporter(server=api_server.url, token_file=tmp_path / "token", ca_file=None,
                             kind="FineTuneJob", name="ft", namespace="ns", timeout=30.0)
    cb = ProgressReporter(patient, interval=0.1, flush_timeout=1.0)
    state = TrainerState(max_steps=10)
    cb.on_train_begin(None, state, TrainerControl())
    api_server.freeze()
    log_steps(cb, state, range(1, 2))
    assert wait_until(lambda: len(api_server.requests) == 1)
    log_steps(cb, state, range(2, 10))
    state.global_step = 10
    start = time.monotonic()
    cb.on_train_end(None, state, TrainerControl())  # the server stays frozen: give up after flush_timeout
    assert time.monotonic() - start < 1.0 + QUICK
    assert api_server.steps() == [1]

    api_server.thaw()  # still pending, never lost: it goes out when the request in flight ends
    assert wait_until(lambda: api_server.steps() == [1, 10])


def test_a_stage_patch_lands_after_the_progress_in_flight(api_server: FakeApiServer,
                                                         reporter: StatusReporter) -> None:
    """Stage patches stay synchronous, and requests never overlap: a stage (or the final result) sent
    while a progress patch hangs goes out after it, so an older patch cannot land last."""
    cb = ProgressReporter(reporter, interval=0.1)
    state = TrainerState(max_steps=10)
    cb.on_train_begin(None, state, TrainerControl())
    api_server.freeze()
    log_steps(cb, state, range(1, 2))
    assert wait_until(lambda: len(api_server.requests) == 1)
    threading.Timer(0.5, api_server.thaw).start()
    assert reporter.patch({"stage": "uploading the adapter and report"}) is True  # returns once it landed
    assert [r["body"]["status"] for r in api_server.requests][1] == {"stage": "uploading the adapter and report"}
    assert api_server.requests[1]["answered_before"] == 1  # sent only after the progress patch was answered
    assert reporter.failures == 0
