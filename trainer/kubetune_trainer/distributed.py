"""Several training ranks: torchrun in the pod, one rank per GPU, over one pod or an Indexed Job.

When ``resources.gpus x resources.nodes > 1`` the operator sets ``KUBETUNE_NPROC_PER_NODE`` and
``KUBETUNE_NNODES`` (:mod:`kubetune.contract`) and ``kubetune train`` becomes the launcher:
:func:`launch` runs torchrun (``torch.distributed.run``, in this process: the same argument parser
and elastic agent as the ``torchrun`` command), which starts the ranks as
``python -m kubetune_trainer.distributed`` and each rank runs the same recipe
(:func:`kubetune_trainer.sft.train`). Nothing here is a launcher or a rendezvous of its own.

* **One pod** (``nodes: 1``): torchrun ``--standalone`` (a rendezvous on localhost, a free port).
* **Several pods** (``nodes: N``): torchrun's c10d rendezvous, hosted by pod 0's agent at
  ``KUBETUNE_RDZV_ENDPOINT`` (pod 0's name under the job's headless Service). Each pod's address
  in the rendezvous is its own name under that Service, so the ranks sort by pod index and global
  rank 0 is always on pod 0. ``--max-restarts 0``: a rank that fails fails its pod, with the
  rank's exit code; a pod that comes back (the Job controller re-creates it) joins the rendezvous,
  and torchrun restarts the other pods' ranks with it (a membership change), so the whole group
  resumes together from the last checkpoint in storage.
* **Exit codes and the termination message.** Each rank writes its termination message to its own
  file; the launcher writes the one the operator reads: the result of the rank that has one
  (global rank 0), or the failure of the rank that failed first with a named reason (a rank that
  only lost its peers crashes later and less clearly), and exits with that rank's code, so the pod
  failure policy (permanent codes fail the Job at once) works as with one process.
* **Pod 0 replaced.** Its old agent closes the rendezvous when its ranks end; a pod that comes up
  meanwhile finds it closed (or gone) and joins again every 5 s until the new pod 0 hosts it.
* **SIGTERM.** torchrun passes it to the ranks and waits 30 s for them (its own limit) before
  SIGKILL; the ranks agree on the step to stop at (:meth:`Ranks.any`), save one checkpoint
  (rank 0 uploads it after every rank has written its part) and exit 7 (Preempted).

:class:`Ranks` is what the recipe knows about its place: rank, local rank, world size.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubetune import contract

log = logging.getLogger("kubetune.distributed")

T = TypeVar("T")
RANK_MESSAGES = "ranks"  # under the work dir: rank-<global rank>.json, each rank's termination message
JOIN_TIMEOUT_S = 900  # how long pods wait for each other at the rendezvous (image pulls, scheduling)
REJOIN_DELAY_S = 5


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (torchrun's RANK, LOCAL_RANK, WORLD_SIZE, ...)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Ranks:
        return cls(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                   world=int(env.get("WORLD_SIZE", 1)), local_world=int(env.get("LOCAL_WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        """Global rank 0: the one rank that writes status, storage, W&B and the result."""
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        """Local rank 0: the rank that downloads for its pod."""
        return self.local_rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def setup(self) -> Ranks:
        """Join the process group (nccl on GPUs, gloo on CPU) and pin this rank's GPU."""
        if not self.several:
            return self
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        log.info("rank %d of %d (local rank %d of %d)", self.rank, self.world, self.local_rank, self.local_world)
        return self

    def device(self) -> Any:
        """Where this rank's model lives: its GPU, or the CPU."""
        import torch

        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.several:
            import torch.distributed as dist

            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank must call it at the same point)."""
        if not self.several:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], device=self.device() if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def per_pod(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on each pod's local rank 0 only (a download into the pod's shared work dir);
        every rank gets its pod's result. Every rank must call it at the same point."""
        result = fn() if self.local_main else None
        if not self.several:
            return result  # type: ignore[return-value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, result)
        return gathered[self.rank - self.local_rank]  # torchrun numbers a pod's ranks contiguously

    def work_dir(self, shared: Path) -> Path:
        """This rank's own scratch folder (data and its caches): the pod's for local rank 0."""
        return shared if self.local_main else shared / f"rank-{self.local_rank}"


# ----------------------------------------------------------------------------------------------
# The launcher (the pod's `kubetune train` when the job has several ranks)
# ----------------------------------------------------------------------------------------------


def world_from_env(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(ranks per pod, pods) the operator asked for."""
    return int(env.get(contract.ENV_NPROC_PER_NODE) or 1), int(env.get(contract.ENV_NNODES) or 1)


def torchrun_args(env: Mapping[str, str], recipe_args: list[str], hostname: str | None = None) -> list[str]:
    """torchrun's command line for this pod: ``--standalone`` in one pod; with several, the c10d
    rendezvous at pod 0 (which hosts it), this pod's own address under the Service."""
    nproc, nnodes = world_from_env(env)
    args = ["--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "1"]
    if nnodes == 1:
        args.append("--standalone")
    else:
        endpoint = env[contract.ENV_RDZV_ENDPOINT]
        node_rank = int(env[contract.ENV_NODE_RANK])
        host = endpoint.rsplit(":", 1)[0]
        me = hostname or socket.gethostname()
        # pod 0 is "<job>-0.<service>": this pod is "<job>-<index>.<service>", resolvable by its peers
        local_addr = f"{me}.{host.split('.', 1)[1]}" if "." in host else me
        args += ["--nnodes", str(nnodes), "--node-rank", str(node_rank),
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                 "--rdzv-id", env.get(contract.ENV_RDZV_ID) or "kubetune",
                 "--rdzv-conf", f"is_host={1 if node_rank == 0 else 0},join_timeout={JOIN_TIMEOUT_S}",
                 "--local-addr", local_addr]
    return [*args, "-m", "kubetune_trainer.distributed", *recipe_args]


def launch(recipe_args: list[str], work_dir: Path, termination_log: Path,
           env: Mapping[str, str] = os.environ) -> int:
    """Run the ranks under torchrun; write the pod's termination message; return its exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousConnectionError
    from torch.distributed.run import parse_args, run

    logging.basicConfig(level=os.environ.get("KUBETUNE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    messages = work_dir / RANK_MESSAGES
    for old in messages.glob("rank-*.json") if messages.is_dir() else ():
        old.unlink()
    argv = torchrun_args(env, recipe_args)
    log.info("torchrun %s", " ".join(argv))
    failures: dict[int, int] = {}
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        try:
            run(parse_args(argv))
        except (RendezvousClosedError, RendezvousConnectionError) as err:
            # pod 0 is being replaced: its old agent closed the rendezvous (or is gone) and the new
            # one is not up yet. Join the new one, within the rendezvous' own join timeout.
            if time.monotonic() > deadline:
                failures = {-2: contract.EXIT_CRASH}
                log.error("no rendezvous at %s: %r", env.get(contract.ENV_RDZV_ENDPOINT), err)
                break
            log.warning("the rendezvous is not ready (%r): joining again in %d s", err, REJOIN_DELAY_S)
            time.sleep(REJOIN_DELAY_S)
            continue
        except ChildFailedError as err:
            failures = {rank: failure.exitcode for rank, failure in err.failures.items()}
        except SignalException as err:
            log.warning("%s: the ranks were stopped", err)
            failures = {-1: contract.EXIT_PREEMPTED}
        break
    code, doc = pod_outcome(read_messages(messages), failures)
    termination_log.parent.mkdir(parents=True, exist_ok=True)
    try:
        termination_log.write_text(json.dumps(doc, separators=(",", ":")))
    except OSError as err:
        log.debug("cannot write the termination message to %s: %s", termination_log, err)
    return code


def read_messages(folder: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob("rank-*.json")) if folder.is_dir() else ():
        try:
            out[int(path.stem.split("-")[1])] = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
    return out


REASON_CODES = {reason: code for code, reason in contract.EXIT_REASONS.items()}


def pod_outcome(messages: dict[int, dict[str, Any]], failures: dict[int, int]) -> tuple[int, dict[str, Any]]:
    """The pod's exit code and termination message from its ranks' messages and torchrun's failures
    (global rank -> exit code; -1: the launcher itself was stopped by a signal).

    Success: the message with a result (rank 0's; another pod's ranks have none). Failure: the
    rank whose message names a reason the operator knows (permanent ones first: they end the job),
    else the first failed rank, as a crash."""
    if not failures:
        with_result = [m for _, m in sorted(messages.items()) if m.get("result")]
        return contract.EXIT_OK, (with_result or [m for _, m in sorted(messages.items())] or
                                  [{"reason": "Completed", "message": "all ranks finished", "result": {}}])[0]
    named = [(rank, m) for rank, m in sorted(messages.items()) if m.get("reason") in REASON_CODES]
    named.sort(key=lambda rm: (REASON_CODES[rm[1]["reason"]] not in contract.PERMANENT_EXIT_CODES, rm[0]))
    if named:
        rank, message = named[0]
        return REASON_CODES[message["reason"]], {**message, "message": f"rank {rank}: {message.get('message', '')}"}
    if -1 in failures:
        return contract.EXIT_PREEMPTED, {"reason": "Preempted", "message": "stopped by a signal before any "
                                         "rank saved a checkpoint", "result": {}}
    if -2 in failures:
        return contract.EXIT_CRASH, {"reason": "Crashed", "message": "the pods did not meet at the rendezvous "
                                     f"within {JOIN_TIMEOUT_S} s", "result": {}}
    rank, code = min(failures.items())
    crashed = [(r, m) for r, m in sorted(messages.items()) if m.get("reason") == "Crashed"]
    if crashed:
        rank, message = crashed[0]
        return contract.EXIT_CRASH, {**message, "message": f"rank {rank}: {message.get('message', '')}"}
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return (code if code > 0 else contract.EXIT_CRASH), {"reason": "Crashed", "message": f"rank {rank} {how}",
                                                         "result": {}}


# ----------------------------------------------------------------------------------------------
# A rank (what torchrun starts)
# ----------------------------------------------------------------------------------------------


def rank_termination_log(work_dir: Path, rank: int) -> Path:
    return work_dir / RANK_MESSAGES / f"rank-{rank}.json"


def main(argv: list[str] | None = None) -> None:
    """One rank: ``python -m kubetune_trainer.distributed train --spec FILE``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "train" or args[1] != "--spec":
        raise SystemExit("usage: python -m kubetune_trainer.distributed train --spec FILE")
    from kubetune.api import FineTuneJobSpec
    from kubetune_trainer import runtime, sft

    ranks = Ranks.from_env()
    ctx = runtime.PodContext.from_env("FineTuneJob")
    ctx.termination_log = rank_termination_log(ctx.work_dir, ranks.rank)
    if not ranks.main:  # one rank reports: the others train, silently
        ctx.reporter = runtime.StatusReporter(None, None, None, None, None, None)

    def recipe(c: runtime.PodContext) -> dict[str, Any]:
        return sft.train(runtime.load_spec(args[2], FineTuneJobSpec), c, ranks=ranks.setup())

    sys.exit(runtime.run_entry("FineTuneJob", recipe, ctx))


if __name__ == "__main__":
    main()
