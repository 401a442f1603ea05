"""Data as users bring it: tool-calling conversations with their tools and a chat template of their
own, long samples (truncation counted, bounded, or split with bfd_split), Deep Lake 3 datasets."""

from __future__ import annotations

import base64
import copy
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer import data, sft
from kubetune_trainer.runtime import InvalidDataset
from kubetune_trainer.storage import verify_files
from trainer_helpers import QA, make_pod, qa_rows, spec_doc, write_jsonl

from kubetune import api

# A ChatML template that renders the tools and the assistant's tool calls, and marks assistant turns
# (content and tool calls) with {% generation %}: what a tool-calling model's template does.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}"
    "<tool_call>{{ c['function']['name'] }}({{ c['function']['arguments'] | tojson }})</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>{% endgeneration %}\n"
    "{% else %}{% if m['role'] == 'tool' %}[{{ m['tool_call_id'] }}] {% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "lookup_time", "description": "Local time in a city",
                                          "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>get_weather({"city": "Paris"})</tool_call>'


def weather_chat(answer: str = "It is 18 degrees in Paris.") -> list[dict[str, Any]]:
    return [
        {"role": "developer", "content": "Answer with the tools you have."},
        {"role": "user", "content": "How warm is Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "tool_call_id": "call_1", "content": "temperature=18C"},
        {"role": "assistant", "content": answer},
    ]


def trained_text(tokenizer: Any, row: dict[str, Any]) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])


# -- messages keep their structure --------------------------------------------------------------


def test_tool_calls_and_tools_are_rendered_and_the_call_is_trained(tmp_path: Path, dataset_spec: Any, store: Any,
                                                                   tokenizer: Any) -> None:
    rows = [
        {"messages": weather_chat(), "tools": [WEATHER]},
        {"messages": [{"role": "user", "content": "Time in Oslo?"}, {"role": "assistant", "content": "Noon."}],
         "tools": json.dumps([CLOCK])},  # a JSON string of the list works too
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},  # no tools
    ]
    spec = dataset_spec(source="jsonl", uri=str(write_jsonl(tmp_path / "tools.jsonl", rows)), format="messages",
                        chatTemplate=TOOL_TEMPLATE)
    splits = data.load_splits(spec, store, tmp_path / "work", seed=0)
    assert json.loads(splits.train["messages"][0]) == weather_chat()  # every key kept, null content included
    tok = copy.deepcopy(tokenizer)
    assistant_only, template = sft.assistant_only_loss(spec, tok)
    assert (assistant_only, template, tok.chat_template) == (True, None, TOOL_TEMPLATE)

    tokenized = data.tokenize(splits.train, tok, assistant_only, template)
    first, second, third = (tokenized[i] for i in range(3))
    text = tok.decode(first["input_ids"])
    assert CALL in text and '"name": "get_weather"' in text and "Current weather for a city" in text
    assert "<|im_start|>developer\nAnswer with the tools you have." in text
    assert "<|im_start|>tool\n[call_1] temperature=18C<|im_end|>" in text
    trained = trained_text(tok, first)
    assert CALL in trained and "It is 18 degrees in Paris." in trained  # both assistant turns carry loss
    assert "temperature=18C" not in trained and "Current weather" not in trained and "Paris?" not in trained
    # each conversation is rendered with its own tools (one template call per distinct list)
    assert "lookup_time" in tok.decode(second["input_ids"]) and "get_weather" not in tok.decode(second["input_ids"])
    assert "Tools:" not in tok.decode(third["input_ids"])
    assert data.check_tokens(tokenized, 512, "bfd", assistant_only).truncated_samples == 0


def test_tokenized_tool_conversations_equal_trls_own(tmp_path: Path, tokenizer: Any, tiny_model_dir: Path) -> None:
    """TRL's SFTTrainer tokenizing the raw conversations (messages and tools columns) gives exactly
    our input_ids and labels."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    raw = datasets.Dataset.from_dict({"messages": [weather_chat(a) for _, a in QA[:4]],
                                      "tools": [json.dumps([WEATHER])] * 2 + [json.dumps([WEATHER, CLOCK])] * 2})
    ours = data.tokenize(raw, tok, assistant_only=True)
    args = SFTConfig(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none", max_length=1024, packing=False,
                     assistant_only_loss=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    theirs = SFTTrainer(model=model, args=args, train_dataset=raw, processing_class=tok).train_dataset
    assert [(r["input_ids"], r["labels"]) for r in theirs] == [(r["input_ids"], r["labels"]) for r in ours]


def test_parquet_conversations_lose_the_nulls_arrow_adds(tmp_path: Path, dataset_spec: Any, store: Any) -> None:
    """Parquet stores one struct type for every message: keys a message lacks come back as nulls,
    which are dropped, not passed to the template as None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": weather_chat()}, {"messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hello."}]}]
    table = pa.Table.from_pylist(rows)
    stored = table.to_pylist()[1]["messages"][0]
    assert stored["tool_calls"] is None and stored["name"] is None  # what the reader sees
    pq.write_table(table, tmp_path / "chat.parquet")
    splits = data.load_splits(dataset_spec(source="parquet", uri=str(tmp_path / "chat.parquet"), format="messages"),
                              store, tmp_path / "work", seed=0)
    assert [json.loads(m) for m in splits.train["messages"]] == [r["messages"] for r in rows]


# -- long samples -------------------------------------------------------------------------------


def test_micro_batching_and_trl_config_treat_bfd_split_as_bfd(tmp_path: Path) -> None:
    t = api.Training(maxSteps=1, batchSize=4, gradientAccumulationSteps=2, packing="bfd_split")
    assert sft.micro_batching(t, varlen_attention=False) == (1, 8)  # padding-free, as bfd
    config = sft.sft_config(t, tmp_path, has_eval=False, wandb=False, run_name=None)
    assert (config.packing, config.packing_strategy, config.padding_free) == (True, "bfd_split", False)
    with pytest.raises(ValueError, match="maxTruncatedFraction"):
        api.Training.model_validate({"maxSteps": 1, "maxTruncatedFraction": 1.5})
    assert api.Training(maxSteps=1).to_wire()["maxTruncatedFraction"] == 0.05


def long_chats(n: int, long_every: int) -> list[dict[str, Any]]:
    """Tool conversations (~150 tokens); every ``long_every``-th answer is longer than maxLength (192)."""
    return [{"messages": weather_chat(f"In Paris it is {18 + i} degrees. " * (40 if i % long_every == 0 else 1)),
             "tools": [WEATHER]} for i in range(n)]


def test_bfd_split_trains_long_samples_whole_and_bfd_refuses_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "chats.jsonl", long_chats(16, long_every=4))
    dataset = {"source": "jsonl", "uri": str(uri), "format": "messages", "chatTemplate": TOOL_TEMPLATE}

    def job(packing: str, out: Path) -> api.FineTuneJobSpec:
        doc = spec_doc({"name": str(tiny_model_dir)}, dataset, "s3://unused/x", maxSteps=3, loggingSteps=1,
                       maxLength=192, batchSize=2, packing=packing)
        spec = api.FineTuneJobSpec.model_validate(doc)
        return spec.model_copy(update={"output": api.S3Output.model_construct(uri=str(out))})

    # bfd would cut 4 of the 16 conversations (25% > maxTruncatedFraction 5%): refused before any model loads
    with pytest.raises(InvalidDataset, match=r"4 of 16 samples \(25.0%\) are longer than training.maxLength=192 "
                                             r"tokens and would be truncated by packing bfd.*rows 0, 4, 8, 12\. "
                                             r".*bfd_split"):
        sft.train(job("bfd", tmp_path / "out-bfd"), make_pod(tmp_path / "work-bfd"))

    out = tmp_path / "out"
    result = sft.train(job("bfd_split", out), make_pod(tmp_path / "work"))
    assert result["progress"]["step"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert verify_files(out, manifest) == []
    stats = manifest["data"]
    assert stats["samplesOverMaxLength"] == 4 and stats["truncatedSamples"] == 0 and stats["truncatedTokens"] == 0
    assert manifest["metrics"]["finalLoss"] > 0
    # the saved tokenizer carries dataset.chatTemplate
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out / "adapter")).chat_template == TOOL_TEMPLATE


# -- Deep Lake 3 ------------------------------------------------------------------------------

# A Deep Lake 3 dataset (tar.gz of its folder), written by deeplake 3.9.52, which cannot be installed
# next to Deep Lake 4:
#   ds = deeplake.empty("v3ds"); ds.create_tensor("question", htype="text"); ds.create_tensor("answer", htype="text")
#   for q, a in QA[:6]: ds.append({"question": q, "answer": a})
#   ds.commit("kubetune test fixture")
DEEPLAKE_V3 = (
    "H4sIAAAAAAAAA+1dTYgkVx2fcU1Yo0ZiPCV7aBqFIKFT76tqZglESFTIBJY9BCGbsa3uqpopt6e67arezDrMKYJoDqJBclGPevWg"
    "SE4K2YMEBE8G4lFYCIiQQFDEg+/VR093VXe/rupXrzNb/x/0dNV7b+rj/fv/6v/xq/fuECd8ZqdeGBwWY/E3R/473kYMYUYIpaIc"
    "GZQYOy1W83XFmISRPW61dsbDYbSqnaz+kuKOkH/XDsLX3HHXd2r5KZSXP2YUg/x1IC///vEkuK14RCgvf2oQBvLXgSXy79O+jWwP"
    "M0Q92kNko3MIAZuULpU/wlZO/iYm5k7LUHSPK9Fw+T9MOvsdhnf55qf4R3w/lH5fTZuI/R89c/PNd+7+fvfHTx3+6/D+5Hdv3f/P"
    "iy/+77238YdP/v0rb1z7/HX2sv2H9j9++/PW+3/+TPBSsKW7AZTFYv3v+oHjnqp6CpQf/xnGFMZ/HVgp/0kQHttjx3U2O4ds/DdI"
    "Xv4WQgzGfx1Ix/+rjx/cuPnRE+/ee2jbFwTQioL+D09O/Kjr+J6n7BxS/ed1OfvfogT0Xwd2CyUPb+EqANtCXv8jNwiH4+6JG9md"
    "74ZDJYa8TP9Nk+XtP8ukoP86cPZIi6Mdm31dPviPxm4Y+sOgfb0VTAaDp5NqJ7o7cnlRe+IHkUnbafGx7ziuaBqNJ25WljU9cgN3"
    "7Peztn7YHfjBbV7j2YPQvSgN3e9N3KDv5moGbnAUHfNCMyvg/x3y/bPztODEPu0m1x3633fnL1jUcds1vpJbcZEAircOszZ+IG0T"
    "2CfxzVxoSHY/oX0yGrjLuyzy+QUfdaNjXns8HDi5Wt5JYTQWh352spcd8w7vMO/ufH/ysvTg7cRUaz9yrlD+Bf33B65i96+K/2cw"
    "BP6fDqySvyL3T27/oUL8z6IWjP86kPp/274MwJaQ6D9/AocRf8rUkwEsP/4ThCD/pwVF+avPAJaXP/+C/J8WLJU/NvhDmHnWPnZN"
    "2nPMDc4he/4vyP9RjOH5rwNr5v9O/+j/8Ndfev07H37wxo1fvPq5t9575eCnL5z95FfvP/WX5599/urHv/za3sm9l/709vk7/33l"
    "2//84le3dDeAslim/ypdwAr+H7Mg/6cFEvkrcQGl/l8x/0dNyP9pQZb/+9vB/Z/9++tHLcj/NQsL9F95BlCq/4X8HyMI8n9aAPm/"
    "ZqOo/+ozgDL9N82C/0eA/6kHkP9bL/83oyEPVAZwgf4rzwBW8P8ohvyfFqyWv5oMoNT+K+T/LIIg/6cFkP9rNmL9T9L/tb0GWn78"
    "Rxa2YPzXgVn51/Hun0B5+ROMIf+rBQvkj+keMYjpoT7qUcvc2/gcsuc/tgr2HwL+tx4syf+JINCjM80eTT+76fe1tL3YFsm+K+m2"
    "+LF8mn++wD/fSI9ltEaDSdgyWj7/00HJHhJ7uIOTPSz2aIcke0TsmR2a7FGxt9dhyR4Te8joaOmcBqCo/4rJnzvV+B8I/D8tWCp/"
    "VeTPnSr5P5MYwP/Qgiz/d/zNJ68Nr7z+Zcj/NQtz+l/Du38CUv0vvv+HxPw/oP/1A/J/zcas/tfx7p+ARP+RYeKi/4dA/3WgZP5P"
    "ZKzyyb/ZrN00+xe5p5H61N80Szf7Qt5seVzHT+0GojzdusjZTZt4AzviVYUrmLY6j7e2kWpMbkx1knGm8I7TS2x8V/TprcNtpR4B"
    "nwDMjf81vPspUMH/j+f/Av+/fiyTv0L3v8r7n4jA+/9aAPnfZiPW/9Tx9wNvqNTwTyHTf2Ll5/8gJoH8jxactXtjO+gLa5tbsn7Q"
    "flo4A/7AGce2/a22Y/UMo+f0LAfbDPc8x0aMi8fGhDqYWp7JPIKZiduH/D9HNv+3KDM3+ZGSH9YJt1zto9i6vT3pudEkcFsRN0xb"
    "nn8aTcZu+6Jp5MdWMLL2TWzsM4N20B4lBrpoMQm52Z8Zy6NJbyA4hrE70T92+7dHQz++gsSh4CbwMLIH3cSMDruj8bDPL8YVdrIB"
    "pmyq/44d2aEbqff8E0j9f5r3//mIAPqvBan/bw8Gw9e6jjtwI3feBXRcz54MosQsnHNfc1636MdoztOcqXJHy2qGWU3O9c7c0qPx"
    "cDKac1STwEM3iVaFc5e0iKebDxfMHT0NeYnhZFWAoTj/T/Fsi1nCSe8mLn3euY/rsn8RtdPtueDDwhudNl12OcXTr9Ed4O83DfH4"
    "n/1uamIAlvf/MbaA/6cF8/KvhwFYXv6EWcD/04KF8t+jRs+29oljeIz2WH/Dc0j9P4QK8z9ieP9LC1bw/x6bafZY+tlNv9tpe7Et"
    "Foe4km6/sJPw/8T2y+mxvnVsRzH3L+UBPpcVZFTAaUHGBpwWZITAaUHGCZwWZLTA57T01oOHRfqvOgVQfvynlgn8Py1YIX9lKQDZ"
    "+L+A/2cy4P9pQcb/e/Xg47+++ZvP/gD4f81CTv9rYQBK9b/I/2MG8P+0APh/zca8/tfDAJToPzJMszD/G6z/oweXlv83H3p/oBiA"
    "udg+cAABtSE3/tfCAKzg/5sG8P+0YLn81TEApfZ/kf/HDOD/aQHw/5qNWP/TRzy3MIJoPByoJgLK7H9U4P8xZsL8T1pwltLqYvO6"
    "7fnjMHJ63j61qENNZKN9d58Q0seeg/Z7vAQxQve8uHGROFig/1UmEn7CiYO8eu3bkXTV+n2e69CF3TTPu0z7ZL5wthvSmipdIPog"
    "ua2EOZXc2fUSHXMObsT2MTv+1zD1U4zy9j8mIv4L9n/9mJf/urpb7odSXv6WhWD9By2oKP+ZFQPl5ygtf4wNDP6/Fmwu/zQq6i7v"
    "Han/X5A/sWD9Jz1QJP+VQcPy+k8Zgue/FiiW/8KgoVT/8/wfbFID5v/Qgoz/8/jBjZsfPfHuPeD/NAub67+cMyDTf9PMxf8wwwz4"
    "P1oA63+st/5H/v2/B2P1DyX6L80ZV7D/CIH1f7VArfwX54yl9l8+/4tNDPM/6AHkf5uNqvo/u2KQ7Bzlx39MLIj/aYEK+csigNLx"
    "v/j8xxbE/7RAmfxXmIDl9Z8ZJsT/tEC5/BeYgFL9L8b/LAbxPy2A9b+bDRX6L4sAyvS/sP6vOAU8/7UA4n+w/u/G+i+JAJa3/6hl"
    "QPxPC1TLf1EEUGr/FeN/pgHxPy2A+F+zUVH/S60YXH78RxgRGP91YDP5y7l/AtLxv8j/Qwa8/6MFCuQvfWG4vP4T0wL7TwsUyn/p"
    "C8NS/S/E/xgzYf5HLYD1P5uNzfR/vfmCJPpfXP8PU4ph/h8tuLTz/8D6f6WCjDD3D2ARNhz/15ovqIL9zzDM/64F6uS/fL4gqf1f"
    "iP8yioH/rwUQ/202Kup/qRUDZfrPD1mI/yHI/2uBbP2/w+pz1Wxvbpptd+olQkX9z1YMXGsAkD7/jbz/TzCB+L8WnIGyNBob6v9a"
    "M4VL43/59T9B/7UB1v+E9T9h/c/mouL4X2rF0PLxP8RM4P9owabyX4cBJLf/C/FfyuD5rwVK5C9JAZTXf4op8H+0QKn8l6QApPpf"
    "fP8PEeD/aAGs/9dsbKr/6zCApP5/fv0vzAyY/08PLi3/B9b/Ag4QYGNsPP6vwQCqYP8bFvB/tECl/JcxgKT2f5H/Y1nA/9EC4P8A"
    "AABAM/F/rI+LuwDwAAA="
)


def deeplake_v3(dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(DEEPLAKE_V3)), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest / "v3ds"


def test_deeplake_3_dataset_is_read_locally_and_on_s3(tmp_path: Path, s3: Any, prefix: str, dataset_spec: Any,
                                                      store: Any) -> None:
    import deeplake

    folder = deeplake_v3(tmp_path)
    assert (folder / "dataset_meta.json").exists()  # the v3 layout
    with pytest.raises(Exception, match="does not exist"):  # what Deep Lake 4's open says about it
        deeplake.open_read_only(f"file://{folder}")
    template = "Question: {question}\nAnswer: {answer}"
    spec = dataset_spec(source="deeplake", uri=str(folder), format="template", template=template)
    splits = data.load_splits(spec, store, tmp_path / "a", seed=0)
    assert splits.train["text"] == [template.format(**r) for r in qa_rows(6)]

    s3.upload_dir(folder, *f"{prefix}/v3ds".split("/", 1))
    spec = dataset_spec(source="deeplake", uri=f"s3://{prefix}/v3ds", format="promptCompletion",
                        promptField="question", completionField="answer", eval={"fraction": 0.5})
    splits = data.load_splits(spec, store, tmp_path / "b", seed=0)
    assert sorted([*splits.train["prompt"], *splits.eval["prompt"]]) == sorted(q for q, _ in QA[:6])


def test_unreadable_deeplake_folder_names_convert(tmp_path: Path, dataset_spec: Any, store: Any) -> None:
    folder = deeplake_v3(tmp_path)
    for path in folder.iterdir():  # the v3 markers stay, the data goes
        if path.is_dir():
            for f in path.rglob("*"):
                if f.is_file():
                    f.unlink()
    (folder / "dataset_meta.json").write_text("{not json")
    spec = dataset_spec(source="deeplake", uri=str(folder), format="text")
    with pytest.raises(InvalidDataset, match=r"cannot open the Deep Lake dataset .*read as a Deep Lake 3 dataset: "
                                             r".*deeplake.convert"):
        data.load_splits(spec, store, tmp_path / "work", seed=0)
