"""The torchrun launcher's pure parts: its command line for one pod and for an Indexed Job's pod,
and the pod's exit code and termination message from its ranks' (no processes here; the ranks
themselves run in test_trainer_distributed.py)."""

from __future__ import annotations

from pathlib import Path

from kubetune_trainer.distributed import Ranks, pod_outcome, torchrun_args

from kubetune import contract

RECIPE = ["train", "--spec", "/etc/kubetune/spec.json"]


def test_one_pod_runs_torchrun_standalone() -> None:
    args = torchrun_args({contract.ENV_NPROC_PER_NODE: "4"}, RECIPE)
    assert args[:2] == ["--nproc-per-node", "4"]
    assert "--standalone" in args and "--rdzv-endpoint" not in args
    assert args[args.index("--max-restarts") + 1] == "0"  # a failed rank fails the pod, with its code
    assert args[-5:] == ["-m", "kubetune_trainer.distributed", *RECIPE]


def test_indexed_job_pod_meets_pod_zero_and_names_itself_under_the_service() -> None:
    env = {contract.ENV_NPROC_PER_NODE: "2", contract.ENV_NNODES: "3", contract.ENV_NODE_RANK: "2",
           contract.ENV_RDZV_ENDPOINT: "ft-train-0.ft-train-1a2b3c4d:29400", contract.ENV_RDZV_ID: "uid-1"}
    args = torchrun_args(env, RECIPE, hostname="ft-train-2")
    flag = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert flag["--nnodes"] == "3" and flag["--nproc-per-node"] == "2" and flag["--node-rank"] == "2"
    assert flag["--rdzv-backend"] == "c10d" and flag["--rdzv-endpoint"] == "ft-train-0.ft-train-1a2b3c4d:29400"
    assert flag["--rdzv-id"] == "uid-1"
    assert flag["--rdzv-conf"].startswith("is_host=0,")  # pod 0 hosts the rendezvous, not this one
    # its address in the rendezvous sorts after pod 0's, so global rank 0 is on pod 0
    assert flag["--local-addr"] == "ft-train-2.ft-train-1a2b3c4d"
    assert "--standalone" not in args
    pod0 = torchrun_args({**env, contract.ENV_NODE_RANK: "0"}, RECIPE, hostname="ft-train-0")
    assert "is_host=1," in pod0[pod0.index("--rdzv-conf") + 1]
    assert sorted([flag["--local-addr"], pod0[pod0.index("--local-addr") + 1]])[0].startswith("ft-train-0.")


def test_success_reports_rank_zeros_result() -> None:
    messages = {0: {"reason": "Completed", "message": "done", "result": {"adapterUri": "s3://b/o/adapter"}},
                1: {"reason": "Completed", "message": "done", "result": {}}}
    assert pod_outcome(messages, {}) == (0, messages[0])
    # a pod without global rank 0 (pod 1 of an Indexed Job): its own ranks' message, no result
    code, doc = pod_outcome({2: messages[1], 3: messages[1]}, {})
    assert code == 0 and doc["result"] == {}


def test_failure_names_the_rank_with_a_known_reason_permanent_first() -> None:
    messages = {0: {"reason": "Crashed", "message": "RuntimeError: gloo connection closed", "result": {}},
                1: {"reason": "InvalidDataset", "message": "row 7: empty text", "result": {}},
                2: {"reason": "StorageError", "message": "s3 timeout", "result": {}}}
    code, doc = pod_outcome(messages, {0: 1, 1: 3, 2: 4})
    assert code == contract.EXIT_INVALID_DATASET
    assert doc["reason"] == "InvalidDataset" and doc["message"] == "rank 1: row 7: empty text"
    code, doc = pod_outcome({0: messages[0], 2: messages[2]}, {0: 1, 2: 4})
    assert (code, doc["reason"]) == (contract.EXIT_STORAGE, "StorageError")


def test_preempted_ranks_and_ranks_killed_without_a_message() -> None:
    preempted = {0: {"reason": "Preempted", "message": "stopped on SIGTERM at step 4", "result": {}}}
    assert pod_outcome(preempted, {-1: contract.EXIT_PREEMPTED})[0] == contract.EXIT_PREEMPTED
    code, doc = pod_outcome({}, {-1: contract.EXIT_PREEMPTED})  # stopped before any rank wrote
    assert code == contract.EXIT_PREEMPTED and doc["reason"] == "Preempted"
    code, doc = pod_outcome({}, {1: -9})
    assert code == contract.EXIT_CRASH and doc == {"reason": "Crashed", "message": "rank 1 was killed by signal 9",
                                                  "result": {}}
    code, doc = pod_outcome({}, {-2: contract.EXIT_CRASH})  # the pods never met
    assert code == contract.EXIT_CRASH and "did not meet at the rendezvous" in doc["message"]
    crashed = {0: {"reason": "Crashed", "message": "ValueError: x", "result": {}}}
    assert pod_outcome(crashed, {0: 1}) == (1, {**crashed[0], "message": "rank 0: ValueError: x"})


def test_ranks_from_torchrun_environment() -> None:
    ranks = Ranks.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (ranks.main, ranks.local_main, ranks.several) == (False, False, True)
    assert Ranks.from_env({}) == Ranks() and Ranks().main and not Ranks().several
    # local rank 0 uses the pod's work dir (and downloads into it); the others have their own for data
    assert Ranks().work_dir(Path("/w")) == Path("/w") and ranks.work_dir(Path("/w")) == Path("/w/rank-1")


def test_strategy_and_four_bit_estimate(tiny_model_dir: Path) -> None:
    import pytest
    import torch
    from kubetune_trainer import modeling
    from kubetune_trainer.runtime import InvalidSpec

    from kubetune import api

    source = api.ModelSource(name=str(tiny_model_dir))
    assert modeling.distributed_strategy("fsdp", 1, str(tiny_model_dir), source) is None  # one rank: neither
    assert modeling.distributed_strategy("auto", 2, str(tiny_model_dir), source) == "ddp"  # no GPU here
    assert modeling.distributed_strategy("ddp", 2, str(tiny_model_dir), source) == "ddp"
    with pytest.raises(InvalidSpec, match="fsdp needs GPUs"):
        modeling.distributed_strategy("fsdp", 2, str(tiny_model_dir), source)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    embeddings = sum(m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    total = sum(p.numel() for p in model.parameters())
    assert modeling.four_bit_bytes(str(tiny_model_dir), source) == int((total - embeddings) * 0.5 + embeddings * 2)

    fsdp = modeling.quantization_config(api.Quantization(), fsdp=True)
    assert fsdp.bnb_4bit_quant_storage == torch.float32  # the compute dtype on CPU: FSDP can shard it
    assert modeling.quantization_config(api.Quantization()).bnb_4bit_quant_storage == torch.uint8


def test_sft_config_for_ranks(tmp_path: Path) -> None:
    from kubetune_trainer import sft

    from kubetune import api

    t = api.Training(maxSteps=4, gradientCheckpointing=True)
    ddp = sft.sft_config(t, tmp_path, False, False, None, ranks=2)
    assert ddp.ddp_find_unused_parameters is False and ddp.gradient_checkpointing
    assert ddp.gradient_checkpointing_kwargs == {"use_reentrant": False} and not ddp.fsdp
    fsdp = sft.sft_config(t, tmp_path, False, False, None, ranks=2, fsdp=True)
    assert fsdp.fsdp and fsdp.fsdp_config["version"] == 2
    assert fsdp.fsdp_config["state_dict_type"] == "FULL_STATE_DICT"  # checkpoints and adapter as with one rank
    assert fsdp.fsdp_config["activation_checkpointing"] and not fsdp.gradient_checkpointing
    assert sft.sft_config(t, tmp_path, False, False, None).ddp_find_unused_parameters is None
