"""Unit tests of the pod runner's pure helpers (no cluster needed)."""

from __future__ import annotations

import signal
from pathlib import Path

import podrunner as pr
import pytest


@pytest.mark.parametrize(("q", "value"), [
    ("512Mi", 512 * 2**20), ("2Gi", 2 * 2**30), ("1.5", 1.5), ("250m", 0.25), ("2G", 2e9), ("1e3", 1000.0),
    ("100k", 1e5), (3, 3.0),
])
def test_parse_quantity(q, value):
    assert pr.parse_quantity(q) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["", "Mi", "12Qi", "1.2.3"])
def test_parse_quantity_rejects(bad):
    with pytest.raises(ValueError, match="not a quantity"):
        pr.parse_quantity(bad)


def test_expand_vars_like_kubernetes():
    env = {"A": "x", "B": "y"}
    assert pr.expand_vars("$(A)-$(B)", env) == "x-y"
    assert pr.expand_vars("$(MISSING)", env) == "$(MISSING)"  # undefined references stay as written
    assert pr.expand_vars("$$(A)", env) == "$(A)"  # $$ escapes
    assert pr.expand_vars("plain $A", env) == "plain $A"


def test_rewrite_path_longest_mount_wins():
    mounts = {"/etc/kubetune": "/tmp/p/spec", "/var/kubetune/work": "/tmp/p/work", "/var/kubetune": "/tmp/p/var",
              "/tmp": "/tmp/p/tmp"}
    assert pr.rewrite_path("/etc/kubetune/spec.json", mounts) == "/tmp/p/spec/spec.json"
    assert pr.rewrite_path("/etc/kubetune", mounts) == "/tmp/p/spec"
    assert pr.rewrite_path("/var/kubetune/work/ckpt", mounts) == "/tmp/p/work/ckpt"
    assert pr.rewrite_path("/var/kubetune/cache", mounts) == "/tmp/p/var/cache"
    assert pr.rewrite_path("--spec=/etc/kubetune/spec.json", mounts) == "--spec=/tmp/p/spec/spec.json"
    # not a path prefix match: /etc/kubetune-other is not under /etc/kubetune
    assert pr.rewrite_path("/etc/kubetune-other/x", mounts) == "/etc/kubetune-other/x"
    assert pr.rewrite_path("train", mounts) == "train"
    assert pr.rewrite_path("--flag=value", mounts) == "--flag=value"


def test_exit_codes_and_reasons():
    assert pr.exit_code_of(0) == 0
    assert pr.exit_code_of(3) == 3
    assert pr.exit_code_of(-signal.SIGKILL) == 137
    assert pr.exit_code_of(-signal.SIGTERM) == 143
    assert pr.termination_reason(0) == "Completed"
    assert pr.termination_reason(7) == "Error"
    assert pr.termination_reason(137, oom_killed=True) == "OOMKilled"
    assert pr.termination_reason(143, deadline=True) == "DeadlineExceeded"


def test_termination_message_file_then_log_fallback():
    log = "\n".join(f"line {i}" for i in range(200))
    assert pr.termination_message('{"reason": "x"}', log, 3, "FallbackToLogsOnError") == '{"reason": "x"}'
    fallback = pr.termination_message("", log, 3, "FallbackToLogsOnError")
    assert fallback.splitlines()[-1] == "line 199" and len(fallback.splitlines()) == 80
    assert pr.termination_message("", log, 0, "FallbackToLogsOnError") == ""  # only on error
    assert pr.termination_message("", log, 3, "File") == ""
    assert len(pr.termination_message("x" * 10000, "", 1, "File").encode()) == pr.TERMINATION_MESSAGE_LIMIT
    assert len(pr.log_tail("y" * 5000).encode()) == pr.FALLBACK_LOG_BYTES


def test_field_refs():
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "a"},
                        "annotations": {"k": "v"}},
           "spec": {"nodeName": "runner-node", "serviceAccountName": "sa"}, "status": {}}
    assert pr.field_ref_value(pod, "metadata.name") == "p"
    assert pr.field_ref_value(pod, "metadata.namespace") == "ns"
    assert pr.field_ref_value(pod, "metadata.uid") == "u-1"
    assert pr.field_ref_value(pod, "metadata.labels['app']") == "a"
    assert pr.field_ref_value(pod, "metadata.annotations['k']") == "v"
    assert pr.field_ref_value(pod, "spec.nodeName") == "runner-node"
    assert pr.field_ref_value(pod, "status.podIP") == "127.0.0.1"
    with pytest.raises(pr.PodConfigError, match="unsupported fieldRef"):
        pr.field_ref_value(pod, "spec.containers")


def test_resource_field_refs():
    c = {"resources": {"limits": {"memory": "1Gi", "cpu": "1500m"}}}
    assert pr.resource_field_value(c, {"resource": "limits.memory", "divisor": "1Mi"}) == "1024"
    assert pr.resource_field_value(c, {"resource": "limits.cpu"}) == "2"  # rounded up, like the kubelet
    assert pr.resource_field_value(c, {"resource": "requests.memory"}) == str(2**30)  # requests default to limits


def test_key_items():
    data = {"a": "1", "b": "2"}
    assert pr.key_items(data, None) == {"a": "a", "b": "b"}
    assert pr.key_items(data, [{"key": "a", "path": "sub/x.json"}]) == {"sub/x.json": "a"}


def test_runner_paths_are_never_rewritten_even_under_a_mount(tmp_path):
    """A clone under /tmp must still find its venv: only the pod's own env values are rewritten."""
    from types import SimpleNamespace

    runner = pr.PodRunner.__new__(pr.PodRunner)
    runner.kube = SimpleNamespace(server="https://127.0.0.1:6443")
    runner.extra_env = {}
    runner.bin_dir = Path("/tmp/clone/.venv/bin")
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": {}}
    container = {"env": [{"name": "HF_HOME", "value": "/tmp/hf"}]}
    env = runner._container_env(pod, container, {"/tmp": str(tmp_path)}, None, tmp_path / "term")
    assert env["PATH"].startswith("/tmp/clone/.venv/bin")
    assert env["HF_HOME"] == f"{tmp_path}/hf"
