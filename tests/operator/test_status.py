"""Status derivation from realistic Job/pod dicts: every phase and failure reason."""

from __future__ import annotations

import json

import pytest
from kobjects import jcond, job_dict, pod_dict, term_msg
from kubetune_operator import status

from kubetune.api import FineTuneJobStatus, MergeJobStatus

NOW = "2026-01-01T02:00:00Z"
LATER = "2026-01-01T03:00:00Z"


def _cond(st, ctype):
    return next((c for c in st["conditions"] if c["type"] == ctype), None)


def _types(st):
    return {c["type"]: c["status"] for c in st["conditions"]}


def derive(body, job, pods, **kw):
    st = status.derive(body["kind"], body, job, pods, NOW, **kw)
    model = FineTuneJobStatus if body["kind"] == "FineTuneJob" else MergeJobStatus
    model.model_validate(st)  # never writes a field the CRD's status schema does not have
    return st


def test_no_job_yet_is_pending(ftj_body):
    st = derive(ftj_body(), None, [])
    assert st["phase"] == "Pending"
    assert _types(st) == {"Ready": "False", "Reconciling": "True"}
    assert "jobName" not in st


def test_job_created_pod_not_yet(ftj_body):
    st = derive(ftj_body(), job_dict(active=1), [])
    assert (st["phase"], _cond(st, "Ready")["reason"]) == ("Pending", "Starting")
    assert st["jobName"] == "demo-train" and st["attempts"] == 1


def test_unschedulable_reports_the_scheduler_message(ftj_body):
    msg = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    st = derive(ftj_body(), job_dict(active=1), [pod_dict("demo-train-a", "Pending", unschedulable=msg)])
    assert st["phase"] == "Pending"
    ready = _cond(st, "Ready")
    assert ready["reason"] == "Unschedulable" and msg in ready["message"] and msg in st["message"]
    assert _types(st) == {"Ready": "False", "Reconciling": "True"}


@pytest.mark.parametrize(("reason", "stalled"), [("ImagePullBackOff", True), ("InvalidImageName", True),
                                                 ("CreateContainerConfigError", True), ("ErrImagePull", False)])
def test_image_and_config_errors(ftj_body, reason, stalled):
    pod = pod_dict("demo-train-a", "Pending", waiting=(reason, 'Back-off pulling image "x"'))
    st = derive(ftj_body(), job_dict(active=1), [pod])
    assert st["phase"] == "Pending"
    assert _cond(st, "Ready")["reason"] == reason
    assert ('Back-off pulling image "x"' in st["message"])
    assert (_cond(st, "Stalled") is not None) == stalled
    assert (_cond(st, "Reconciling") is not None) == (not stalled)


def test_running(ftj_body):
    job = job_dict(active=1, startTime="2026-01-01T00:00:05Z")
    st = derive(ftj_body(), job, [pod_dict("demo-train-a", "Running")])
    assert st["phase"] == "Running"
    assert st["startTime"] == "2026-01-01T00:00:05Z"
    assert st["observedGeneration"] == 1
    assert all(c["observedGeneration"] == 1 for c in st["conditions"])
    assert "completionTime" not in st


def test_running_message_appends_the_pods_stage_without_writing_it(ftj_body):
    body = ftj_body()
    job, pods = job_dict(active=1), [pod_dict("demo-train-a", "Running")]
    assert derive(body, job, pods)["message"] == "pod demo-train-a is running (attempt 1)"
    body["status"] = {"phase": "Running", "stage": "loading model HuggingFaceTB/SmolLM2-135M"}
    st = derive(body, job, pods)
    assert st["message"] == "pod demo-train-a is running (attempt 1): loading model HuggingFaceTB/SmolLM2-135M"
    assert _cond(st, "Reconciling")["message"] == st["message"]
    assert "stage" not in st and "stage" not in status.OWNED_FIELDS  # the pod owns it
    assert "stage" not in status.changed(body["status"], st)


def test_stage_is_only_shown_while_a_pod_runs(ftj_body, mj_body):
    body = ftj_body()
    body["status"] = {"stage": "training from step 0"}  # left by a failed attempt
    failed = pod_dict("demo-train-a", "Failed",
                      terminated={"exitCode": 4, "message": term_msg("StorageError", "s3 down")})
    retrying = derive(body, job_dict(active=0, failed=1), [failed])
    assert "training" not in retrying["message"] and "s3 down" in retrying["message"]
    starting = derive(body, job_dict(active=1, failed=1), [failed, pod_dict("demo-train-b", "Pending",
                                                                              created="2026-01-01T00:10:00Z")])
    assert starting["message"] == "pod demo-train-b is starting"
    merge = mj_body()
    merge["status"] = {"stage": "uploading the merged model to s3://out/merged"}
    pod = pod_dict("m-a", "Succeeded", terminated={"exitCode": 0, "message": term_msg("Completed", "merged")})
    done = derive(merge, job_dict("demo-merged-merge", conditions=[jcond("Complete")], succeeded=1), [pod])
    assert done["message"] == "merged" and "stage" not in done


def test_retry_counts_attempts_and_reports_last_failure(ftj_body):
    failed = pod_dict("demo-train-a", "Failed", terminated={"exitCode": 4, "reason": "Error",
                                                             "message": term_msg("StorageError", "s3 down")})
    job = job_dict(active=0, failed=1)
    st = derive(ftj_body(), job, [failed])
    assert (st["phase"], _cond(st, "Ready")["reason"]) == ("Running", "Retrying")
    assert "s3 down" in st["message"] and st["attempts"] == 1
    running = pod_dict("demo-train-b", "Running", created="2026-01-01T00:10:00Z")
    st = derive(ftj_body(), job_dict(active=1, failed=1), [running, failed])
    assert st["phase"] == "Running" and st["attempts"] == 2
    assert "attempt 2" in st["message"]


def test_pod_succeeded_before_the_job_is_complete_is_still_running(ftj_body):
    """The watch shows the pod's success before the Job controller marks the Job Complete: the
    status stays Running (no step back to Pending) until it does."""
    pod = pod_dict("demo-train-a", "Succeeded", terminated={"exitCode": 0, "message": term_msg("Completed", "ok")})
    st = derive(ftj_body(), job_dict(active=0), [pod])
    assert (st["phase"], _cond(st, "Ready")["reason"]) == ("Running", "Completing")
    assert "demo-train-a succeeded" in st["message"] and not status.is_finished(st)


def test_succeeded_copies_results_from_termination_message(ftj_body):
    result = {"adapterUri": "s3://out/run-1/adapter", "reportUri": "s3://out/run-1/report.md",
              "checkpointUri": "s3://out/run-1/checkpoints/step-10", "progress": {"step": 10, "percent": 100},
              "mergedUri": "not-a-finetune-field", "secretToken": "x"}
    pod = pod_dict("demo-train-a", "Succeeded", terminated={"exitCode": 0, "reason": "Completed",
                                                             "message": term_msg("Completed", "trained", **result)})
    job = job_dict(conditions=[jcond("SuccessCriteriaMet"), jcond("Complete", when="2026-01-01T01:00:00Z")],
                   succeeded=1, completionTime="2026-01-01T01:00:00Z", startTime="2026-01-01T00:00:05Z")
    st = derive(ftj_body(), job, [pod])
    assert st["phase"] == "Succeeded"
    assert _types(st) == {"Ready": "True", "Succeeded": "True"}
    assert st["adapterUri"] == "s3://out/run-1/adapter"
    assert st["reportUri"] == "s3://out/run-1/report.md"
    assert st["checkpointUri"] == "s3://out/run-1/checkpoints/step-10"
    assert st["progress"] == {"step": 10, "percent": 100}
    assert "mergedUri" not in st and "secretToken" not in st
    assert st["completionTime"] == "2026-01-01T01:00:00Z"
    assert st["message"] == "trained"
    assert status.is_finished(st)


def test_merge_job_results(mj_body):
    result = {"mergedUri": "s3://out/merged", "adapterUri": "s3://out/run-1/adapter",
              "verification": {"maxLogitDiff": 0.01, "tolerance": 0.05, "passed": True},
              "samples": [{"prompt": "Hi", "output": "Hello"}], "progress": {"step": 1}}
    pod = pod_dict("m-a", "Succeeded", terminated={"exitCode": 0, "message": term_msg("Completed", "merged",
                                                                                       **result)})
    st = derive(mj_body(), job_dict("demo-merged-merge", conditions=[jcond("Complete")], succeeded=1), [pod])
    assert st["phase"] == "Succeeded"
    assert st["mergedUri"] == "s3://out/merged"
    assert st["verification"]["passed"] is True
    assert st["samples"] == [{"prompt": "Hi", "output": "Hello"}]
    assert "progress" not in st


@pytest.mark.parametrize(("code", "reason"), [(2, "InvalidSpec"), (3, "InvalidDataset"), (5, "InvalidAdapter"),
                                              (6, "VerificationFailed"), (8, "OutputConflict"), (9, "Diverged"),
                                              (10, "Stalled")])
def test_permanent_exit_codes_map_to_reasons(ftj_body, code, reason):
    msg = term_msg(reason, f"column 'text' missing ({reason})")
    pod = pod_dict("demo-train-a", "Failed", terminated={"exitCode": code, "reason": "Error", "message": msg})
    job = job_dict(conditions=[jcond("FailureTarget", "PodFailurePolicy", "Container trainer ... exit code"),
                               jcond("Failed", "PodFailurePolicy", "Container trainer ... exit code")], failed=1)
    st = derive(ftj_body(), job, [pod])
    assert st["phase"] == "Failed"
    assert _types(st) == {"Ready": "False", "Stalled": "True", "Failed": "True"}
    for ctype in ("Ready", "Stalled", "Failed"):
        assert _cond(st, ctype)["reason"] == reason
        assert _cond(st, ctype)["message"] == f"column 'text' missing ({reason})"
    assert st["completionTime"] == "2026-01-01T01:00:00Z"


def test_backoff_limit_exceeded_with_last_attempt(ftj_body):
    pods = [pod_dict(f"demo-train-{i}", "Failed", created=f"2026-01-01T00:0{i}:00Z",
                     terminated={"exitCode": 1, "reason": "Error", "message": f"Traceback: boom {i}"})
            for i in range(3)]
    job = job_dict(conditions=[jcond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff "
                                                                       "limit")], failed=3)
    st = derive(ftj_body(), job, pods)
    assert st["phase"] == "Failed"
    assert _cond(st, "Ready")["reason"] == "BackoffLimitExceeded"
    assert "boom 2" in st["message"] and "exit code 1" in st["message"]
    assert st["attempts"] == 3


def test_oom_killed_is_named(ftj_body):
    pod = pod_dict("demo-train-a", "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    job = job_dict(conditions=[jcond("Failed", "BackoffLimitExceeded", "backoff")], failed=1)
    st = derive(ftj_body(), job, [pod])
    assert _cond(st, "Ready")["reason"] == "OOMKilled"
    assert "spec.resources.memory" in st["message"]


def test_storage_error_after_retries_is_named(ftj_body):
    pod = pod_dict("demo-train-a", "Failed", terminated={"exitCode": 4, "message": term_msg(
        "StorageError", "cannot write s3://out/run-1 at http://minio:9000: AccessDenied")})
    st = derive(ftj_body(), job_dict(conditions=[jcond("Failed", "BackoffLimitExceeded", "x")], failed=4), [pod])
    assert _cond(st, "Ready")["reason"] == "StorageError" and "AccessDenied" in st["message"]


def test_deadline_exceeded(ftj_body):
    job = job_dict(conditions=[jcond("FailureTarget", "DeadlineExceeded", "Job was active longer than specified "
                                                                          "deadline")], active=1)
    st = derive(ftj_body(), job, [pod_dict("demo-train-a", "Running")])
    assert st["phase"] == "Failed"
    assert _cond(st, "Ready")["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=600" in st["message"]


def test_log_tail_termination_message(ftj_body):
    pod = pod_dict("demo-train-a", "Failed", terminated={"exitCode": 1, "message": "Segmentation fault\n"})
    st = derive(ftj_body(), job_dict(conditions=[jcond("Failed", "BackoffLimitExceeded", "limit")], failed=1),
                [pod])
    assert "Segmentation fault" in st["message"]


def test_evicted_pod_without_container_state(ftj_body):
    pod = pod_dict("demo-train-a", "Failed", reason="Evicted")
    pod["status"]["message"] = "The node was low on resource: memory."
    st = derive(ftj_body(), job_dict(active=0, failed=1), [pod])
    assert "low on resource" in st["message"]


def test_suspended_and_waiting_for_admission(ftj_body):
    job = job_dict(suspend=True, conditions=[jcond("Suspended", "JobSuspended", "Job suspended")])
    st = derive(ftj_body(suspend=True), job, [], spec_suspend=True)
    assert st["phase"] == "Suspended"
    assert _types(st) == {"Ready": "False", "Suspended": "True"}
    st = derive(ftj_body(queueName="q"), job, [], spec_suspend=False)
    assert (st["phase"], _cond(st, "Ready")["reason"]) == ("Pending", "WaitingForAdmission")


def test_suspend_waits_for_the_running_pod_to_save_and_stop(ftj_body):
    """Suspended is reported once the pod that got SIGTERM is gone: until then it is saving the
    checkpoint the status will name."""
    job = job_dict(suspend=True)
    saving = pod_dict("demo-train-a", "Running")
    st = derive(ftj_body(suspend=True), job, [saving], spec_suspend=True)
    assert (st["phase"], _cond(st, "Ready")["reason"]) == ("Running", "Suspending")
    assert "demo-train-a is saving a checkpoint" in st["message"]
    stopped = pod_dict("demo-train-a", "Failed", terminated={"exitCode": 7, "message": term_msg("Preempted", "saved")})
    assert derive(ftj_body(suspend=True), job, [stopped], spec_suspend=True)["phase"] == "Suspended"


def test_blocked_verdict_overrides(ftj_body):
    blocked = status.Verdict("Pending", "SecretNotFound", "Secret 's3-creds' not found", stalled=True)
    st = derive(ftj_body(), None, [], blocked=blocked)
    assert st["phase"] == "Pending" and _types(st) == {"Ready": "False", "Stalled": "True"}
    assert _cond(st, "Stalled")["reason"] == "SecretNotFound"
    assert not status.is_finished(st)  # re-checked: the Secret may appear
    invalid = derive(ftj_body(), None, [], blocked=status.Verdict("Failed", "InvalidSpec", "bad", stalled=True))
    assert status.is_finished(invalid)  # Failed is final: the spec is immutable


def test_transition_times_kept_and_restart_recomputes_the_same_status(ftj_body):
    body = ftj_body()
    job, pods = job_dict(active=1), [pod_dict("demo-train-a", "Running")]
    first = status.derive("FineTuneJob", body, job, pods, NOW)
    body["status"] = first
    again = status.derive("FineTuneJob", body, job, pods, LATER)  # a restarted operator, later
    assert again == first
    assert status.changed(first, again) == {}
    done = job_dict(conditions=[jcond("Complete")], succeeded=1)
    pod = pod_dict("demo-train-a", "Succeeded", terminated={"exitCode": 0, "message": term_msg("Completed", "ok")})
    final = status.derive("FineTuneJob", body, done, [pod], LATER)
    assert _cond(final, "Ready")["lastTransitionTime"] == LATER  # False -> True
    assert "Reconciling" not in _types(final)


def test_changed_keeps_trainer_fields_out_of_the_patch(ftj_body):
    old = {"phase": "Running", "progress": {"step": 5}, "wandbUrl": "https://wandb/run"}
    new = {"phase": "Running", "message": "m"}
    assert status.changed(old, new) == {"message": "m"}  # progress/wandbUrl are not touched


def test_generation_is_observed(ftj_body):
    body = ftj_body()
    body["metadata"]["generation"] = 3
    st = status.derive("FineTuneJob", body, job_dict(active=1), [], NOW)
    assert st["observedGeneration"] == 3 and {c["observedGeneration"] for c in st["conditions"]} == {3}


def test_parse_termination_message():
    assert status.parse_termination_message(None) == (None, "", {})
    assert status.parse_termination_message('{"reason": "Completed", "message": "ok", "result": {"a": 1}}') == \
        ("Completed", "ok", {"a": 1})
    assert status.parse_termination_message("[1, 2]") == (None, "[1, 2]", {})
    long = "x" * 10000
    assert len(status.parse_termination_message(long)[1]) == status.MESSAGE_LIMIT
    assert status.safe_reason("Bad reason!", "Error") == "Error"
    assert json.loads(term_msg("A", "b"))["reason"] == "A"


def test_finished_status_acknowledges_a_new_generation(ftj_body):
    pod = pod_dict("demo-train-a", "Succeeded", terminated={"exitCode": 0, "message": term_msg("Completed", "ok")})
    done = status.derive("FineTuneJob", ftj_body(), job_dict(conditions=[jcond("Complete")], succeeded=1), [pod], NOW)
    again = status.observe_generation(done, 2)
    assert again["observedGeneration"] == 2 and {c["observedGeneration"] for c in again["conditions"]} == {2}
    assert [(c["type"], c["status"], c["lastTransitionTime"]) for c in again["conditions"]] == \
        [(c["type"], c["status"], c["lastTransitionTime"]) for c in done["conditions"]]
    assert again["phase"] == "Succeeded" and status.changed(done, status.observe_generation(done, 1)) == {}
