"""Live progress: a TrainerCallback that reports into the resource's ``status.progress``.

Every ``loggingSteps`` (and at the end) it computes ``{"progress": {...}}`` with step, totalSteps,
percent, epoch, loss, evalLoss, learningRate, tokensPerSecond (non-pad tokens actually trained,
counted by TRL), eta and updatedAt, and hands it to a :class:`~kubetune_trainer.runtime.ProgressSender`
that merge-patches it through the pod's :class:`~kubetune_trainer.runtime.StatusReporter` from a
background thread: at most one patch every ``interval`` seconds (5 s), the newest progress winning,
so training never waits on the API server, however slow, and ``loggingSteps: 1`` does not flood
it. At the end of training (and for a final evaluation after it) the progress is sent at once and
waited for (at most ``flush_timeout``, 10 s), so the last progress in the status is the final one. The channel never
raises, so a broken one never stops training. tqdm bars stay in the log; ``echo`` (``kubetune
run``) also prints one line per report, unthrottled.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from kubetune_trainer.report import PREFERENCE_METRICS
from kubetune_trainer.runtime import FLUSH_TIMEOUT_S, PROGRESS_INTERVAL_S, ProgressSender, StatusReporter

log = logging.getLogger("kubetune")


def format_duration(seconds: float) -> str:
    """12m30s / 2h05m / 45s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def rfc3339_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def progress_fields(step: int, total: int, epoch: float | None, elapsed: float, steps_done: int,
                    tokens: float | None) -> dict[str, Any]:
    """The computed part of ``status.progress`` (camelCase). ``steps_done``/``tokens``/``elapsed``
    count this process only, so a resumed run's rate is not inflated by steps it did not run."""
    out: dict[str, Any] = {"step": step, "totalSteps": total,
                           "percent": min(100, int(100 * step / total)) if total else 0, "updatedAt": rfc3339_now()}
    if epoch is not None:
        out["epoch"] = round(float(epoch), 4)
    if steps_done > 0 and elapsed > 0:
        eta = (total - step) * elapsed / steps_done
        out["etaSeconds"] = int(round(max(0.0, eta)))
        out["eta"] = format_duration(eta)
        if tokens:
            out["tokensPerSecond"] = round(tokens / elapsed, 1)
    return out


class ProgressReporter(TrainerCallback):  # type: ignore[misc]
    """Reports progress every logging step (throttled) and at the end (flushed); keeps the latest
    fields for the result."""

    def __init__(self, reporter: StatusReporter, echo: Callable[[str], None] | None = None, *,
                 interval: float = PROGRESS_INTERVAL_S, flush_timeout: float = FLUSH_TIMEOUT_S):
        self.reporter, self.echo, self.flush_timeout = reporter, echo, flush_timeout
        self.sender = ProgressSender(reporter.patch, interval)
        self.ended = False  # after training (a final evaluation) every report is flushed like the last one
        self.progress: dict[str, Any] = {}
        self.started = time.monotonic()
        self.start_step = 0
        self.tokens = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()
        self.start_step = state.global_step
        self.ended = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        if "num_tokens" in logs:  # TRL: non-pad tokens trained by this process so far
            self.tokens = float(logs["num_tokens"])
        if "loss" in logs:
            self.progress["loss"] = round(float(logs["loss"]), 5)
        if "eval_loss" in logs:
            self.progress["evalLoss"] = round(float(logs["eval_loss"]), 5)
            self.progress["evalPerplexity"] = round(math.exp(min(float(logs["eval_loss"]), 700.0)), 4)
        if "learning_rate" in logs:
            self.progress["learningRate"] = float(logs["learning_rate"])
        for key, field in PREFERENCE_METRICS.items():
            if key in logs and math.isfinite(float(logs[key])):
                self.progress[field] = round(float(logs[key]), 5)
        if "loss" in logs or "eval_loss" in logs:
            self.report(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ended = True
        self.report(state)

    def report(self, state: Any) -> None:
        elapsed = time.monotonic() - self.started
        self.progress.update(progress_fields(state.global_step, state.max_steps, state.epoch, elapsed,
                                             state.global_step - self.start_step, self.tokens))
        self.sender.submit({"progress": dict(self.progress)})  # returns at once: never waits on the network
        if self.echo:
            p = self.progress
            parts = [f"step {p['step']}/{p['totalSteps']} ({p['percent']}%)"]
            parts += [f"{key} {p[key]:.4g}" for key in ("loss", "evalLoss") if key in p]
            if "tokensPerSecond" in p:
                parts.append(f"{p['tokensPerSecond']:.0f} tok/s")
            if "eta" in p:
                parts.append(f"eta {p['eta']}")
            self.echo("progress: " + ", ".join(parts))
        if self.ended and not self.sender.flush(self.flush_timeout):
            log.warning("the final progress did not reach the API server within %.0fs; it is sent when the "
                        "request in flight ends", self.flush_timeout)
