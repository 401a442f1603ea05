"""Validation the CRD cannot express: Secrets and keys, GPU settings, the MergeJob's FineTuneJob."""

from __future__ import annotations

from kubetune_operator import validation

from kubetune import api


def _secret(*keys: str) -> dict:
    return {"metadata": {"name": "x"}, "data": {k: "c2VjcmV0" for k in keys}}


def test_parse_spec_reports_every_problem():
    spec, verdict = validation.parse_spec("FineTuneJob", {"model": {"name": "a", "uri": "s3://bb/x"},
                                                          "training": {}})
    assert spec is None
    assert verdict.phase == "Failed" and verdict.reason == "InvalidSpec" and verdict.stalled
    assert "model" in verdict.message and "dataset" in verdict.message and "output" in verdict.message


def test_parse_spec_ok(ftj_body, mj_body):
    spec, verdict = validation.parse_spec("FineTuneJob", ftj_body()["spec"])
    assert verdict is None and isinstance(spec, api.FineTuneJobSpec)
    spec, verdict = validation.parse_spec("MergeJob", mj_body()["spec"])
    assert verdict is None and isinstance(spec, api.MergeJobSpec)


def test_secret_needs_lists_every_reference(ftj_body):
    body = ftj_body(tracking={"wandb": {"project": "p", "secretRef": {"name": "wandb", "key": "k"}}},
                    dataset={"source": "jsonl", "uri": "s3://dd/x", "secretRef": {"name": "ds"}})
    spec = api.FineTuneJobSpec.model_validate(body["spec"])
    assert validation.secret_needs(spec) == [
        validation.SecretNeed("spec.storage.secretRef", "s3-creds", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
        validation.SecretNeed("spec.model.secretRef", "hf-token", ("token",)),
        validation.SecretNeed("spec.dataset.secretRef", "ds", ("token",)),
        validation.SecretNeed("spec.tracking.wandb.secretRef", "wandb", ("k",)),
    ]


def test_missing_secret_and_missing_key(ftj_body):
    spec = api.FineTuneJobSpec.model_validate(ftj_body()["spec"])
    needs = validation.secret_needs(spec)
    verdict = validation.check_secrets(needs, {"s3-creds": None, "hf-token": _secret("token")})
    assert verdict.reason == "SecretNotFound" and verdict.phase == "Pending" and verdict.stalled  # not final
    assert "Secret 's3-creds' (spec.storage.secretRef) not found" in verdict.message
    verdict = validation.check_secrets(needs, {"s3-creds": _secret("AWS_ACCESS_KEY_ID"), "hf-token": _secret("token")})
    assert "has no key 'AWS_SECRET_ACCESS_KEY'" in verdict.message
    assert "c2VjcmV0" not in verdict.message  # values never appear
    ok = {"s3-creds": _secret("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), "hf-token": _secret("token")}
    assert validation.check_secrets(needs, ok) is None


def test_string_data_keys_count(ftj_body):
    spec = api.FineTuneJobSpec.model_validate(ftj_body(storage={}, model={"name": "m", "secretRef": {"name": "h"}})
                                              ["spec"])
    needs = validation.secret_needs(spec)
    assert validation.check_secrets(needs, {"h": {"stringData": {"token": "t"}}}) is None


def test_gpu_resource_must_be_an_extended_resource(ftj_body):
    for bad in ("gpu", "kubernetes.io/gpu"):
        spec = api.FineTuneJobSpec.model_validate(ftj_body(resources={"gpus": 1, "gpuResource": bad})["spec"])
        verdict = validation.check_resources(spec, "img")
        assert verdict is not None and verdict.reason == "InvalidSpec" and bad in verdict.message
    spec = api.FineTuneJobSpec.model_validate(ftj_body(resources={"gpus": 0, "gpuResource": "gpu"})["spec"])
    assert validation.check_resources(spec, "img") is None  # no GPU asked: the name is unused
    spec = api.FineTuneJobSpec.model_validate(ftj_body()["spec"])
    assert validation.check_resources(spec, "img") is None
    assert "no default trainer image" in validation.check_resources(spec, None).message


def test_merge_source_states():
    assert validation.check_fine_tune_job("demo", None).reason == "FineTuneJobNotFound"
    waiting = validation.check_fine_tune_job("demo", {"status": {"phase": "Running"}})
    assert (waiting.phase, waiting.reason, waiting.stalled) == ("Pending", "WaitingForFineTuneJob", False)
    assert validation.check_fine_tune_job("demo", {}).reason == "WaitingForFineTuneJob"
    failed = validation.check_fine_tune_job("demo", {"status": {"phase": "Failed", "jobName": "demo-train",
                                                                "message": "OOM"}})
    assert (failed.phase, failed.reason) == ("Failed", "FineTuneJobFailed") and "OOM" in failed.message
    # Failed is final even without a Job (an invalid spec): the MergeJob fails too, it does not wait
    invalid = validation.check_fine_tune_job("demo", {"status": {"phase": "Failed", "message": "invalid spec"}})
    assert (invalid.phase, invalid.reason) == ("Failed", "FineTuneJobFailed")
    # a FineTuneJob blocked on a missing Secret may still recover: keep waiting
    blocked = validation.check_fine_tune_job("demo", {"status": {"phase": "Pending", "message": "Secret"}})
    assert blocked.reason == "WaitingForFineTuneJob"
    no_adapter = validation.check_fine_tune_job("demo", {"status": {"phase": "Succeeded"}})
    assert no_adapter.reason == "AdapterNotFound"
    assert validation.check_fine_tune_job("demo", {"status": {"phase": "Succeeded",
                                                              "adapterUri": "s3://o/a"}}) is None
