"""The reporter's uid guard, against a small HTTP server that answers like the API server: with the
resource's uid every patch is a JSON patch that first tests ``/metadata/uid``; a refused patch is
looked into once (GET); a re-created namesake stops the channel for good (logged once, never raised);
a resource without a status yet gets its first status in one guarded patch; without a uid the
reporter merge-patches as before."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer.runtime import JSON_PATCH, MERGE_PATCH, POD_FIELDS, ProgressSender, StatusReporter

from kubetune import contract
from kubetune.api import STAGE_MAX_LENGTH

STATUS_PATH = "/apis/kubetune.dev/v1alpha1/namespaces/ns/finetunejobs/ft/status"
INVALID = {"kind": "Status", "status": "Failure", "code": 422, "reason": "Invalid",
           "message": "the server rejected our request due to an error in our request"}


class ScriptedApiServer:
    """Records each request; answers from ``answers`` (method -> list of (code, body)), the last one
    repeated; 200 ``{}`` when nothing is scripted."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with lock:
                    outer.requests.append({"method": self.command, "path": self.path,
                                           "content_type": self.headers.get("Content-Type"), "body": body})
                    script = outer.answers.get(self.command) or [(200, {})]
                    code, answer = script.pop(0) if len(script) > 1 else script[0]
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = _answer  # noqa: N815 - http.server's naming

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[ScriptedApiServer]:
    s = ScriptedApiServer()
    yield s
    s.close()


def make_reporter(server: ScriptedApiServer, tmp_path: Path, uid: str | None = "uid-1") -> StatusReporter:
    (tmp_path / "token").write_text("pod-token\n")
    return StatusReporter(server=server.url, token_file=tmp_path / "token", ca_file=None, kind="FineTuneJob",
                          name="ft", namespace="ns", timeout=5, uid=uid)


def test_every_patch_is_guarded_by_the_uid(server: ScriptedApiServer, tmp_path: Path) -> None:
    reporter = make_reporter(server, tmp_path)
    long_stage = "x" * (STAGE_MAX_LENGTH + 50)
    assert reporter.patch({"progress": {"step": 3}, "stage": long_stage, "wandbUrl": None})
    (req,) = server.requests
    assert req["method"] == "PATCH" and req["path"] == STATUS_PATH and req["content_type"] == JSON_PATCH
    assert req["body"] == [
        {"op": "test", "path": "/metadata/uid", "value": "uid-1"},  # first: nothing applies to a namesake
        {"op": "add", "path": "/status/progress", "value": {"step": 3}},
        {"op": "add", "path": "/status/stage", "value": long_stage[:STAGE_MAX_LENGTH - 3] + "..."},
    ]  # a null is dropped: "add" cannot delete, and no caller means to
    assert reporter.failures == 0 and reporter.stopped is None


def test_a_re_created_namesake_stops_the_channel_for_good(server: ScriptedApiServer, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    server.answers = {"PATCH": [(422, INVALID)],
                      "GET": [(200, {"metadata": {"uid": "uid-2", "resourceVersion": "7"}, "status": {}})]}
    reporter = make_reporter(server, tmp_path)
    with caplog.at_level(logging.WARNING, logger="kubetune"):
        assert reporter.patch({"stage": "training"}) is False
        assert reporter.patch({"stage": "uploading"}) is False  # no request any more
        sender = ProgressSender(reporter.patch, interval=0)
        sender.submit({"progress": {"step": 1}})
        assert sender.flush(5)  # the background sender neither crashes nor hangs
    assert [r["method"] for r in server.requests] == ["PATCH", "GET"]
    assert not reporter.enabled and "uid-2" in (reporter.stopped or "") and "uid-1" in (reporter.stopped or "")
    stops = [r for r in caplog.records if "stopped for good" in r.getMessage()]
    assert len(stops) == 1 and "training goes on" in stops[0].getMessage()


def test_the_first_status_is_added_whole_under_the_uid_and_resource_version(server: ScriptedApiServer,
                                                                            tmp_path: Path) -> None:
    """No status yet (the operator has not written one): "add /status/stage" has no parent to add to."""
    server.answers = {"PATCH": [(422, INVALID), (200, {})],
                      "GET": [(200, {"metadata": {"uid": "uid-1", "resourceVersion": "41"}})]}
    reporter = make_reporter(server, tmp_path)
    assert reporter.patch({"stage": "starting"})
    assert [r["method"] for r in server.requests] == ["PATCH", "GET", "PATCH"]
    assert server.requests[2]["content_type"] == JSON_PATCH
    assert server.requests[2]["body"] == [
        {"op": "test", "path": "/metadata/uid", "value": "uid-1"},
        {"op": "test", "path": "/metadata/resourceVersion", "value": "41"},  # nobody wrote a status meanwhile
        {"op": "add", "path": "/status", "value": {"stage": "starting"}},
    ]
    assert reporter.failures == 0 and reporter.enabled


def test_invalid_values_are_a_plain_failure(server: ScriptedApiServer, tmp_path: Path) -> None:
    """Same uid and a status: the values themselves were refused; the channel stays open."""
    current = {"metadata": {"uid": "uid-1", "resourceVersion": "5"}, "status": {"phase": "Running"}}
    server.answers = {"PATCH": [(422, INVALID), (200, {})], "GET": [(200, current)]}
    reporter = make_reporter(server, tmp_path)
    assert reporter.patch({"progress": {"step": -1}}) is False
    assert reporter.failures == 1 and reporter.enabled and reporter.stopped is None
    assert reporter.patch({"progress": {"step": 2}})
    assert [r["method"] for r in server.requests] == ["PATCH", "GET", "PATCH"]


@pytest.mark.parametrize("code", [403, 404, 500])
def test_other_refusals_do_not_stop_the_channel(server: ScriptedApiServer, tmp_path: Path, code: int) -> None:
    server.answers = {"PATCH": [(code, {"kind": "Status", "code": code}), (200, {})]}
    reporter = make_reporter(server, tmp_path)
    assert reporter.patch({"stage": "x"}) is False and reporter.patch({"stage": "y"})
    assert [r["method"] for r in server.requests] == ["PATCH", "PATCH"] and reporter.stopped is None


def test_a_failed_look_is_a_plain_failure(server: ScriptedApiServer, tmp_path: Path) -> None:
    server.answers = {"PATCH": [(422, INVALID)], "GET": [(503, {"kind": "Status", "code": 503})]}
    reporter = make_reporter(server, tmp_path)
    assert reporter.patch({"stage": "x"}) is False
    assert reporter.failures == 1 and reporter.enabled and reporter.stopped is None


def test_without_a_uid_it_merge_patches(server: ScriptedApiServer, tmp_path: Path) -> None:
    reporter = make_reporter(server, tmp_path, uid=None)
    assert reporter.patch({"stage": "training"})
    (req,) = server.requests
    assert req["content_type"] == MERGE_PATCH and req["body"] == {"status": {"stage": "training"}}


def test_the_uid_comes_from_the_pod_env(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    env = {contract.ENV_SA_DIR: str(tmp_path), contract.ENV_API_SERVER: "https://api:6443",
           contract.ENV_KIND: "MergeJob", contract.ENV_NAME: "m", contract.ENV_NAMESPACE: "ns",
           contract.ENV_UID: "0d9f-uid"}
    reporter = StatusReporter.from_env(env)
    assert reporter.enabled and reporter.uid == "0d9f-uid"
    assert StatusReporter.from_env({**env, contract.ENV_UID: ""}).uid is None


def test_the_pod_fields_match_what_the_recipes_report() -> None:
    """The chart's policy allows exactly these; the operator's result copy (status.RESULT_FIELDS) is a subset."""
    from kubetune_operator import status

    chart = (Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "templates"
             / "progress-channel-policy.yaml").read_text()
    for kind, fields in POD_FIELDS.items():
        assert set(status.RESULT_FIELDS[kind]) <= set(fields) and "stage" in fields
        assert not set(fields) & set(status.OWNED_FIELDS) and "mergeJobName" not in fields
        assert "[" + ", ".join(f"'{f}'" for f in fields) + "]" in chart
