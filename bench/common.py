"""Helpers shared by the benchmarks: machine facts, isolated runs, tables, and docs/benchmarks.md sections.

Every benchmark writes only its own section of ``docs/benchmarks.md``, between the markers
``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->`` (see :func:`update_section`), so the
three scripts can run in any order and re-running one leaves the others' tables alone.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOC_TITLE = "# Benchmarks\n\nMeasured numbers that decide kubetune's design. Each section is written by its script " \
            "(`make bench`); re-running a script replaces only its own section.\n"
PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "liger-kernel",
            "kopf", "kubernetes", "boto3")


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that matter (missing ones are left out)."""
    from kubetune_trainer.report import library_versions  # the same record the trainer's manifest keeps

    return library_versions(names)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, usable cores, memory and GPU (name and memory when torch sees one)."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
                            "python": platform.python_version()}
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    except ImportError:
        pass
    return info


def describe_machine(info: dict[str, Any]) -> str:
    text = f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores, {info.get('memory_gib', '?')} GiB RAM"
    return text + (f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU")


def describe_versions(found: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in found.items())


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a table, relative to the repo root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        argv[0] = str(script.relative_to(REPO))
    except ValueError:
        pass
    in_venv = Path(sys.executable).parent.parent.resolve() == (REPO / ".venv").resolve()
    python = ".venv/bin/python" if in_venv else "python3"
    return python + " " + " ".join(shlex.quote(a) for a in argv)


# ----------------------------------------------------------------------------------------------
# Tables and the markdown file
# ----------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "—"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def update_section(path: Path, name: str, body: str) -> None:
    """Replace the text between this section's markers (appending the section when it is new)."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else DOC_TITLE
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# ----------------------------------------------------------------------------------------------
# Isolated runs: one configuration per process, so peak memory is that configuration's own
# ----------------------------------------------------------------------------------------------


def trainer_bench() -> Any:
    """bench/trainer.py (its data generator and template) as a module, whatever else is named
    ``trainer`` (the repository's trainer/ folder is one)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_trainer", REPO / "bench" / "trainer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_worker(script: Path, config: dict[str, Any], timeout: float, env: dict[str, str] | None = None,
               log_path: Path | None = None) -> dict[str, Any]:
    """Run ``script --worker JSON`` in a fresh Python; it prints one line ``RESULT {...}``.

    A crash or timeout becomes ``{"error": ...}`` so one bad configuration never loses the others."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(config)]
    started = time.monotonic()
    log_file = log_path or Path(tempfile.mkstemp(prefix="bench-worker-", suffix=".log")[1])
    with log_file.open("w") as out:  # straight to the file: a killed worker still leaves its log
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})},
                                start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"error": f"timed out after {timeout:.0f}s", "wall_s": time.monotonic() - started}
    lines = log_file.read_text(errors="replace").splitlines()
    if log_path is None:
        log_file.unlink()
    for line in reversed(lines):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            result.setdefault("wall_s", time.monotonic() - started)
            return result
    tail = [line for line in lines if line.strip()][-3:]
    return {"error": f"exit {proc.returncode}: " + " / ".join(tail)[-400:], "wall_s": time.monotonic() - started}


def emit_result(result: dict[str, Any]) -> None:
    """What a worker prints last: its result as one JSON line."""
    print("RESULT " + json.dumps(result), flush=True)


def peak_rss_mib() -> float:
    """Peak resident memory of this process: VmHWM, the high-water mark of this process's own address
    space. (``ru_maxrss`` is wrong here: Linux carries the parent's RSS at fork into it across exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
