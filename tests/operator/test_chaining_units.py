"""Chaining (issue #19): a FineTuneJob that continues another's adapter (model.adapterFrom.
fineTuneJobRef) waits for it, gets its adapter uri in the pods' spec, and is refused when the
adapter was trained on another base; a MergeJob of the chained job merges into the plain base."""

from __future__ import annotations

from typing import Any

import pytest
from kobjects import FTJ_SPEC, make_body
from kubetune_operator import builders, validation
from kubetune_operator.cache import Cache

from kubetune import api

SFT_STATUS = {"phase": "Succeeded", "adapterUri": "s3://out/sft/adapter"}


def dpo(**model: Any) -> api.FineTuneJobSpec:
    doc = {**FTJ_SPEC, "method": "dpo", "dataset": {**FTJ_SPEC["dataset"], "format": "preference"},
           "model": {**FTJ_SPEC["model"], "adapterFrom": {"fineTuneJobRef": {"name": "sft"}}, **model}}
    return api.FineTuneJobSpec.model_validate(doc)


def test_the_chained_job_gets_the_adapter_uri_of_its_sft_job() -> None:
    sft = make_body("FineTuneJob", FTJ_SPEC, name="sft", status=SFT_STATUS)
    resolved = builders.resolve_adapter_from(dpo(), sft)
    assert resolved.model.adapter_from == api.AdapterFrom(uri="s3://out/sft/adapter")
    assert resolved.model.display() == dpo().model.display()


def test_an_adapter_of_another_base_is_refused() -> None:
    sft = make_body("FineTuneJob", {**FTJ_SPEC, "model": {"uri": "s3://models/other"}}, name="sft",
                    status=SFT_STATUS)
    with pytest.raises(ValueError, match="trained its adapter on s3://models/other.*an adapter fits only its base"):
        builders.resolve_adapter_from(dpo(), sft)


def test_it_waits_for_the_sft_job_and_fails_with_it() -> None:
    field = "model.adapterFrom.fineTuneJobRef"
    running = make_body("FineTuneJob", FTJ_SPEC, name="sft", status={"phase": "Running"})
    assert validation.check_fine_tune_job("sft", running, field).reason == "WaitingForFineTuneJob"
    failed = make_body("FineTuneJob", FTJ_SPEC, name="sft", status={"phase": "Failed", "message": "bad rows"})
    assert validation.check_fine_tune_job("sft", failed, field).phase == "Failed"
    missing = validation.check_fine_tune_job("sft", None, field)
    assert missing.reason == "FineTuneJobNotFound" and field in missing.message


def test_the_sft_job_wakes_the_jobs_chained_to_it() -> None:
    cache = Cache()
    cache.put(make_body("FineTuneJob", dpo().to_wire(), name="dpo"))
    cache.put(make_body("MergeJob", {"source": {"fineTuneJobRef": {"name": "sft"}}, "output": {"uri": "s3://o/m"}},
                        name="merge"))
    cache.put(make_body("FineTuneJob", FTJ_SPEC, name="other"))
    assert sorted(k[2] for k in cache.merge_jobs_referencing("team-a", "sft")) == ["dpo", "merge"]


def test_a_merge_of_the_chained_job_merges_into_the_plain_base() -> None:
    chained = make_body("FineTuneJob", dpo().to_wire(), name="dpo",
                        status={"phase": "Succeeded", "adapterUri": "s3://out/dpo/adapter"})
    merge = api.MergeJobSpec.model_validate({"source": {"fineTuneJobRef": {"name": "dpo"}},
                                             "output": {"uri": "s3://out/merged"}})
    resolved = builders.resolve_merge_spec(merge, chained)
    assert resolved.source.adapter_uri == "s3://out/dpo/adapter" and resolved.source.base_model.adapter_from is None
