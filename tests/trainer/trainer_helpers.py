"""Helpers shared by the trainer tests (a module of its own: every test folder has a conftest.py)."""

from __future__ import annotations

import json
import os
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUCKET = "trainer-tests"

QA = [(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40)]

# A ChatML template with {% generation %} markers: assistant-only loss (the tiny tokenizer's own has none)
GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def marked(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` whose chat template marks the assistant turns."""
    import copy

    out = copy.deepcopy(tokenizer)
    out.chat_template = GENERATION_TEMPLATE
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:60]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def qa_rows(n: int = 40) -> list[dict[str, str]]:
    return [{"question": q, "answer": a} for q, a in QA[:n]]


def spec_doc(model: dict[str, Any], dataset: dict[str, Any], output_uri: str, endpoint: str | None = None,
             **training: Any) -> dict[str, Any]:
    """A FineTuneJobSpec dict with small, fast CPU defaults (override any training field)."""
    train = {"maxSteps": 4, "maxLength": 64, "batchSize": 2, "learningRate": 5e-3, "loggingSteps": 2,
             "saveSteps": 100, "gradientCheckpointing": False, "warmupRatio": 0.0, **training}
    doc: dict[str, Any] = {"model": model, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                           "dataset": dataset, "training": train, "output": {"uri": output_uri}}
    if endpoint:
        doc["storage"] = {"endpoint": endpoint}
    return doc


def make_pod(work: Path, name: str = "ft") -> Any:
    from kubetune_trainer.runtime import PodContext, StatusReporter

    work.mkdir(parents=True, exist_ok=True)
    return PodContext(kind="FineTuneJob", name=name, namespace="ns", work_dir=work,
                      reporter=StatusReporter(None, None, None, None, None, None),
                      termination_log=work / "termination-log")


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a ``kubetune train`` subprocess (offline, quiet, one thread per op)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "PYTEST_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


KUBETUNE = str(Path(sys.executable).parent / "kubetune")


class FakeApiServer:
    """Records every PATCH (path, headers, body) as it arrives; ``freeze()`` makes it hold requests
    unanswered (a frozen API server) until ``thaw()`` or ``hang_limit`` seconds."""

    def __init__(self, hang_limit: float = 10.0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answered = 0
        self.hang_limit = hang_limit
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                           "answered_before": outer.answered, "at": time.monotonic()})
                outer._open.wait(outer.hang_limit)
                with outer._lock:
                    outer.answered += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def freeze(self) -> None:
        self._open.clear()

    def thaw(self) -> None:
        self._open.set()

    def steps(self) -> list[int]:
        with self._lock:
            return [r["body"]["status"]["progress"]["step"] for r in self.requests]

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thaw()
        self.httpd.shutdown()
        self.httpd.server_close()


# -- preference data (methods dpo and kto) ---------------------------------------------------------

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "quiet", "north", "paper", "light"]


def pairs(n: int, seed: int = 0, conversational: bool = False) -> list[dict[str, Any]]:
    """Prompts of random words; the chosen answer is always polite ("yes please, ..."), the rejected
    one rude ("no way, ..."): a preference a policy can learn, and check on held-out prompts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = " ".join(rng.choice(WORDS) for _ in range(4))
        prompt, chosen, rejected = f"Question: {topic}?\nAnswer:", " yes please, thank you.", " no way, go away."
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": f"{topic}?"}],
                         "chosen": [{"role": "assistant", "content": chosen.strip()}],
                         "rejected": [{"role": "assistant", "content": rejected.strip()}]})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def preference_spec(tiny: Path, s3: Any, data_uri: str, out: str, method: str, settings: dict[str, Any],
                    fmt: str = "preference", max_steps: int = 24, **over: Any) -> Any:
    """A dpo, orpo or kto job on the tiny model: 24 steps of 4 rows, a fifth of the data held out,
    prepared inline; ``over`` replaces whole spec sections."""
    from kubetune import api

    doc = spec_doc({"name": str(tiny)}, {"source": "jsonl", "uri": data_uri, "format": fmt, "eval": {"fraction": 0.2}},
                   out, s3.endpoint, maxSteps=max_steps, maxLength=64, batchSize=4, learningRate=5e-3,
                   loggingSteps=4, evalSteps=12)
    doc.update({"method": method, method: settings, "prepare": {"mode": "inline"}, **over})
    return api.FineTuneJobSpec.model_validate(doc)


def put(s3: Any, prefix: str, name: str, rows: list[dict[str, Any]]) -> str:
    bucket, _, key = f"{prefix}/{name}".partition("/")
    s3.client().put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in rows))
    return f"s3://{prefix}/{name}"


def recorder(ctx: Any) -> list[dict[str, Any]]:
    patches: list[dict[str, Any]] = []
    ctx.reporter.patch = lambda p: patches.append(p) or True
    return patches
