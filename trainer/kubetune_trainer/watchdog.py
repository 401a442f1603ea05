"""The run's watchdog: a diverged or stalled run ends with a clear reason instead of burning GPU hours.

* **Diverged** (exit 9): a logged training loss is NaN/Inf or above ``divergenceFactor`` x the first
  logged loss, or the adapter holds non-finite weights when a checkpoint is about to be stored. The
  check runs before the checkpoint upload of that step (callback order), so no diverged checkpoint
  is ever stored: the pointer keeps naming the last good one, and the error names it.
* **Stalled** (exit 10): no training or evaluation step ended for ``stallSeconds`` (a hung GPU,
  collective or storage call). The training thread is stuck then, so a monitor thread writes the
  termination message and ends the process itself.

Both are permanent failures (the operator does not retry them). A new FineTuneJob with the same spec
and output resumes from the last good checkpoint (same fingerprint), e.g. after fixing the cause.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune import api, contract
from kubetune_trainer.runtime import KubetuneError, write_termination_message

log = logging.getLogger("kubetune.watchdog")


class Diverged(KubetuneError):
    exit_code = contract.EXIT_DIVERGED
    reason = "Diverged"


class Stalled(KubetuneError):
    exit_code = contract.EXIT_STALLED
    reason = "Stalled"


def loss_problem(loss: float, first: float | None, factor: float) -> str | None:
    """Why a logged loss means divergence, or None."""
    if not math.isfinite(loss):
        return f"the training loss is {loss}"
    if first is not None and first > 0 and loss > factor * first:
        return f"the training loss {loss:.4g} is over {factor:g}x the first logged loss {first:.4g}"
    return None


class Watchdog(TrainerCallback):  # type: ignore[misc]
    """Divergence checks in the training loop plus a stall monitor thread (see the module docstring).

    ``last_checkpoint`` returns the newest stored checkpoint's uri (for the messages); ``on_stall``
    is called from the monitor thread with the Stalled error and must end the process."""

    def __init__(self, settings: api.Watchdog, last_checkpoint: Callable[[], str | None],
                 on_stall: Callable[[Stalled], None]):
        self.settings, self.last_checkpoint, self.on_stall = settings, last_checkpoint, on_stall
        self.first_loss: float | None = None
        self.beat = time.monotonic()
        self.step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- divergence -------------------------------------------------------------------------------
    def _kept(self) -> str:
        where = self.last_checkpoint()
        return f"the last good checkpoint is {where}" if where else "no checkpoint was stored before it"

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        self._heartbeat(state)
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        problem = loss_problem(float(loss), self.first_loss, self.settings.divergence_factor)
        if problem:
            raise Diverged(f"diverged at step {state.global_step}: {problem}; {self._kept()}. Lower "
                           "training.learningRate (or raise training.watchdog.divergenceFactor if this is expected)")
        if self.first_loss is None:
            self.first_loss = float(loss)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        import torch

        self._heartbeat(state)
        if model is None:
            return
        for name, param in model.named_parameters():
            if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
                raise Diverged(f"diverged by step {state.global_step}: the trainable weight {name} holds NaN or "
                               f"Inf values, so this checkpoint is not stored; {self._kept()}. Lower "
                               "training.learningRate")

    # -- stalls -----------------------------------------------------------------------------------
    def _heartbeat(self, state: Any = None) -> None:
        self.beat = time.monotonic()
        if state is not None:
            self.step = state.global_step

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._heartbeat(state)
        if self._thread is None:
            self._thread = threading.Thread(target=self._monitor, name="kubetune-watchdog", daemon=True)
            self._thread.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._heartbeat(state)

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._heartbeat()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._heartbeat()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()

    def _monitor(self) -> None:
        limit = self.settings.stall_seconds
        while not self._stop.wait(min(5.0, limit / 5)):
            idle = time.monotonic() - self.beat
            if idle > limit:
                self.on_stall(Stalled(f"stalled: no training step ended for {idle:.0f}s (training.watchdog."
                                      f"stallSeconds={limit}) after step {self.step}; {self._kept()}"))
                return


def exit_process(termination_log: Path, err: Stalled) -> None:
    """End the process from the monitor thread: the training thread is stuck and cannot unwind."""
    log.error("%s: %s", err.reason, err)
    write_termination_message(termination_log, err.reason, str(err), {})
    logging.shutdown()
    os._exit(err.exit_code)
