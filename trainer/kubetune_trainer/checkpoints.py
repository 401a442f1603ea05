"""Checkpoints in object storage, resume, and a clean stop on SIGTERM.

Layout under ``output.uri`` (see :mod:`kubetune.contract`)::

    checkpoints/step-40/...      the HF Trainer checkpoint folder: adapter, optimizer, scheduler,
                                 trainer_state.json, RNG states
    checkpoints/step-40/checkpoint.json   the folder's own pointer (written after its files)
    checkpoints/latest.json      {"step": 40, "uri": ".../checkpoints/step-40", "files": {rel: sha256},
                                  "fingerprint": ..., "fingerprintInputs": {...}, "owner": {...}}

The pointer is written LAST, only after every file of the folder is stored, so a pod killed in the
middle of an upload leaves the previous pointer in place and a retry resumes from a complete
checkpoint. Older folders beyond ``keepCheckpoints`` are deleted after the pointer moves.

A run resumes only from checkpoints with its own fingerprint (:mod:`kubetune_trainer.fingerprint`).
A checkpoint whose files no longer match their sha256 is skipped for the previous kept one; when
none is intact the run starts over from step 0 (a correct result, later), and says so.

SIGTERM (Kubernetes preemption, node drain, ``kubectl delete pod``) does not kill the run: the
handler only raises a flag; the current step finishes, a checkpoint is saved and uploaded, and the
recipe exits with :class:`~kubetune_trainer.runtime.Preempted` (exit 7) so the retry resumes.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import TrainerCallback

from kubetune import contract
from kubetune_trainer.distributed import Ranks
from kubetune_trainer.runtime import StatusReporter, StorageError
from kubetune_trainer.storage import Store, join, verify_files

log = logging.getLogger("kubetune.checkpoints")

STEP_DIR = re.compile(r"^step-(\d+)$")
FOLDER_POINTER = "checkpoint.json"  # inside each checkpoint folder: what the fallback reads


def checkpoints_uri(output_uri: str) -> str:
    return join(output_uri, contract.CHECKPOINTS_DIR)


def latest_pointer(store: Store, output_uri: str) -> dict[str, Any] | None:
    """The pointer to the newest complete checkpoint, or None."""
    pointer = store.get_json(join(output_uri, contract.LATEST_POINTER))
    if pointer is not None and not {"step", "uri"} <= set(pointer):
        log.warning("ignoring a malformed %s: %s", contract.LATEST_POINTER, pointer)
        return None
    return pointer


def upload_checkpoint(store: Store, local: Path, output_uri: str, step: int,
                      stamp: dict[str, Any] | None = None) -> dict[str, Any]:
    """Upload one checkpoint folder, its own pointer, then move the latest pointer to it (in that
    order). ``stamp``: the run's fingerprint, its inputs and owner."""
    uri = join(checkpoints_uri(output_uri), f"step-{step}")
    files = store.upload_dir(local, uri)
    pointer = {"step": step, "uri": uri, "files": files, **(stamp or {})}
    store.put_json(join(uri, FOLDER_POINTER), pointer)
    store.put_json(join(output_uri, contract.LATEST_POINTER), pointer)
    log.info("checkpoint step %d stored at %s (%d files)", step, uri, len(files))
    return pointer


def stored_steps(store: Store, output_uri: str) -> list[int]:
    """Steps of the checkpoint folders in storage, oldest first."""
    steps = set()
    for rel in store.list(checkpoints_uri(output_uri)):
        match = STEP_DIR.match(rel.split("/")[0])
        if match:
            steps.add(int(match.group(1)))
    return sorted(steps)


def prune(store: Store, output_uri: str, keep: int, current: int, protect: int | None = None) -> list[int]:
    """Delete the oldest checkpoint folders beyond ``keep``; never the one the pointer names, nor
    ``protect`` (the best checkpoint, with training.keepBest)."""
    steps = [s for s in stored_steps(store, output_uri) if s not in (current, protect)]
    doomed = steps[: max(0, len(steps) - (keep - 1))]
    for step in doomed:
        store.delete(join(checkpoints_uri(output_uri), f"step-{step}"))
    if doomed:
        log.info("deleted old checkpoints: %s", ", ".join(f"step-{s}" for s in doomed))
    return doomed


def download_latest(store: Store, output_uri: str, work_dir: Path, fingerprint: str | None = None
                    ) -> tuple[Path, int] | None:
    """Fetch the newest intact checkpoint of this run (files checked against their sha256), falling
    back to older kept ones; None when there is none (the run starts at step 0).

    ``fingerprint``: only checkpoints that carry it are candidates (the caller has already refused
    a latest pointer of another run). A download that fails is a StorageError (a retry may work);
    a checkpoint whose files differ is skipped."""
    latest = latest_pointer(store, output_uri)
    if latest is None:
        return None
    candidates = [latest] + [p for p in older_pointers(store, output_uri, int(latest["step"]))
                             if fingerprint is None or p.get("fingerprint") == fingerprint]
    for pointer in candidates:
        local = fetch(store, pointer, work_dir / "resume")
        if local is not None:
            log.info("resuming from step %d (%s)", pointer["step"], pointer["uri"])
            return local, int(pointer["step"])
    log.warning("no intact checkpoint of this run is left in %s: training starts over from step 0",
                checkpoints_uri(output_uri))
    return None


def fetch(store: Store, pointer: dict[str, Any], into: Path) -> Path | None:
    """Download the checkpoint a pointer names into ``into/checkpoint-<step>`` and check every file
    against its sha256; None (with a warning) when it is damaged. A failing storage raises."""
    local = into / f"checkpoint-{int(pointer['step'])}"
    if local.exists():
        shutil.rmtree(local)
    try:
        store.download_dir(pointer["uri"], local)
    except StorageError as err:
        if store.list(pointer["uri"]):
            raise  # storage is failing: a retry may get it
        bad = [f"{err}"]
    else:
        bad = verify_files(local, pointer) if pointer.get("files") else []
    if not bad:
        return local
    log.warning("checkpoint %s is damaged (%d files differ, e.g. %s): trying the previous kept checkpoint",
                pointer["uri"], len(bad), bad[0])
    shutil.rmtree(local, ignore_errors=True)
    return None


def folder_pointer(store: Store, output_uri: str, step: int) -> dict[str, Any] | None:
    return store.get_json(join(checkpoints_uri(output_uri), f"step-{step}", FOLDER_POINTER))


def older_pointers(store: Store, output_uri: str, below: int) -> list[dict[str, Any]]:
    """The folder pointers of the kept checkpoints older than step ``below``, newest first."""
    out = []
    for step in reversed(stored_steps(store, output_uri)):
        if step >= below:
            continue
        pointer = folder_pointer(store, output_uri, step)
        if pointer is not None and {"step", "uri"} <= set(pointer):
            out.append(pointer)
    return out


class CheckpointUploader(TrainerCallback):  # type: ignore[misc]
    """After each local save, upload the folder, move the pointer, prune, and report checkpointUri.

    With several ranks every rank saves its part (its RNG state) first; global rank 0 uploads once
    all have (a barrier), the others go on."""

    def __init__(self, store: Store, output_uri: str, keep: int, reporter: StatusReporter,
                 stamp: dict[str, Any] | None = None, protect: Callable[[], int | None] | None = None,
                 ranks: Ranks | None = None):
        self.store, self.output_uri, self.keep, self.reporter = store, output_uri, keep, reporter
        self.stamp, self.protect = stamp, protect
        self.ranks = ranks or Ranks()
        self.last: dict[str, Any] | None = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ranks.barrier()
        if not self.ranks.main:
            return
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not local.is_dir() or (self.last and self.last["step"] == state.global_step):
            return
        self.last = upload_checkpoint(self.store, local, self.output_uri, state.global_step, self.stamp)
        prune(self.store, self.output_uri, self.keep, state.global_step, self.protect() if self.protect else None)
        self.reporter.patch({"checkpointUri": self.last["uri"]})


def best_of(log_history: list[dict[str, Any]], min_delta: float = 0.0) -> tuple[int | None, float | None, int]:
    """(best step, its eval loss, evaluations since) over a run's logged evaluations: an evaluation
    improves when its loss is below the best so far by more than ``min_delta``. Derived from the
    history each time, so a resumed run (whose history spans every pod) agrees with an uninterrupted one."""
    best_step, best_loss, since = None, None, 0
    for entry in log_history:
        if "eval_loss" not in entry:
            continue
        loss = float(entry["eval_loss"])
        if best_loss is None or loss < best_loss - min_delta:
            best_step, best_loss, since = int(entry["step"]), loss, 0
        else:
            since += 1
    return best_step, best_loss, since


class BestCheckpoint(TrainerCallback):  # type: ignore[misc]
    """training.earlyStopping and training.keepBest: after each evaluation, a new best is saved as a
    checkpoint (so it can be published and is never pruned), and ``patience`` evaluations in a row
    without improvement stop training (with a checkpoint of that step)."""

    def __init__(self, early_stopping: Any | None, keep_best: bool):
        self.early_stopping, self.keep_best = early_stopping, keep_best
        self.min_delta = early_stopping.min_delta if early_stopping else 0.0
        self.best_step: int | None = None
        self.best_loss: float | None = None
        self.stopped_early = False

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        if "eval_loss" not in (metrics or {}):
            return
        self.best_step, self.best_loss, since = best_of(state.log_history, self.min_delta)
        if self.keep_best and since == 0:
            control.should_save = True
        if self.early_stopping and since >= self.early_stopping.patience and not control.should_training_stop:
            log.info("early stopping at step %d: %d evaluations without improvement (best eval loss %.4g at "
                     "step %s)", state.global_step, since, self.best_loss, self.best_step)
            self.stopped_early = True
            control.should_training_stop = True
            control.should_save = True


class EvalInterrupted(Exception):
    """SIGTERM arrived during an evaluation: it is abandoned so the checkpoint fits the grace period."""


class PreemptionHandler(TrainerCallback):  # type: ignore[misc]
    """SIGTERM -> finish the step, save a checkpoint, stop training. Installed by the recipe.

    During an evaluation the next evaluation batch raises :class:`EvalInterrupted`; the recipe's
    trainer (:func:`kubetune_trainer.sft.trainer_class`) drops that evaluation, so the save that
    follows it in the same step starts at once instead of after the whole evaluation set.

    With several ranks the signal may reach them at different steps (or only one pod's): at every
    step end the ranks agree (:meth:`Ranks.any`), so all save the same step and stop together. An
    evaluation in progress then finishes first (abandoning it on one rank would leave the others
    waiting in its collectives)."""

    def __init__(self, ranks: Ranks | None = None) -> None:
        self.requested = False
        self.ranks = ranks or Ranks()
        self._previous: Any = None

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not the main thread: SIGTERM keeps its default action (no checkpoint on preemption)")
            return self
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("SIGTERM: finishing the current step, then saving a checkpoint and stopping")
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.ranks.any(self.requested):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.requested and not self.ranks.several:
            control.should_save = True  # the Trainer's own control: saved right after the abandoned evaluation
            control.should_training_stop = True
            raise EvalInterrupted(f"SIGTERM during the evaluation at step {state.global_step}")
