"""Training data: load a ``spec.dataset`` from its source, check it, and shape it for TRL.

Sources (``dataset.source``):

* ``jsonl`` / ``parquet`` — a file or a folder of files, local or ``s3://``. In a folder, a split
  is the files named ``<split>.<ext>`` or ``<split>-*``/``<split>_*`` (the Hub's layout); when no
  file is named after the training split, every file is training data.
* ``huggingface`` — a ``save_to_disk`` folder (local or ``s3://``), or a hub id where a hub is
  reachable (token from ``KUBETUNE_DATASET_TOKEN``).
* ``deeplake`` — a local path, ``s3://`` (the job's storage endpoint and credentials) or
  ``hub://``/``al://`` (token from ``KUBETUNE_DATASET_TOKEN``); Deep Lake 4, or Deep Lake 3 read
  through ``deeplake.query`` (:func:`load_deeplake`).

Formats (``dataset.format``) become the columns TRL's SFTTrainer understands:

* ``text`` -> ``text``; ``template`` -> ``text`` (``template.format(**row)``);
* ``promptCompletion`` -> ``prompt``/``completion`` (TRL trains on the completion only);
* ``messages`` -> ``messages`` (+ ``tools``), JSON strings rendered by the chat template, tool
  calls and tools included (:func:`check_messages`, :func:`check_tools`).

Every check happens here, before a model is loaded, and fails with
:class:`~kubetune_trainer.runtime.InvalidDataset` naming the column, row and fix: missing
columns (with the columns present), empty data, unknown template fields, wrong value types,
template rows with an empty answer, bad JSON lines, conversations the chat template refuses,
more truncated samples than ``training.maxTruncatedFraction``, no trainable tokens.
docs/data.md describes the formats, checks and truncation rules for users.

Large data: JSONL, Parquet and ``save_to_disk`` data are read as Arrow tables memory-mapped from
files under the pod's work dir (``<work_dir>/hf-cache``), never as Python rows: the row checks and
the formatting run a batch at a time (:class:`RowFormatter`, through ``datasets.map``), and the
formatted TRL columns are written to Arrow cache files there as well, so memory stays flat as the
data grows (docs/benchmarks.md, Data loading memory). JSONL goes through ``datasets``' JSON loader
when every column a format reads comes out as Arrow strings, integers or booleans (exactly the
values ``json.loads`` gives); otherwise (conversations, tools, floats, nested or mixed-type
values, lines the loader refuses) each line is checked by ``json.loads`` and stored whole in an
Arrow file, to be decoded a batch at a time (:func:`jsonl_as_arrow`), so a bad line is still named
by file and line number and the values are exactly what ``json.loads`` gives. Deep Lake data is
still read into Python columns (:func:`load_deeplake`).
"""

from __future__ import annotations

import json
import logging
import os
import string
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import api, contract
from kubetune_trainer.runtime import InvalidDataset, NotFound
from kubetune_trainer.storage import Store, is_s3, join

log = logging.getLogger("kubetune.data")

MAX_LISTED = 5  # problems named in one error message
MISSING = object()  # a JSON line without the key (as opposed to null)
EXTENSIONS = {"jsonl": (".jsonl", ".json", ".jsonl.gz"), "parquet": (".parquet",)}
ROLES = ("system", "developer", "user", "assistant", "tool")
# Optional string keys a message keeps (besides role, content and tool_calls).
MESSAGE_TEXT_KEYS = ("name", "tool_call_id", "reasoning_content", "thinking")
FORMAT_BATCH = 1000  # rows per batch of the row checks and formatting
LINE_COLUMN = "__kubetune_json_line__"  # jsonl_as_arrow: each JSON line, whole
CACHE_DIR = "hf-cache"  # under the work dir: datasets' Arrow files (loaded, formatted, tokenized data)
# Arrow types datasets' JSON loader gives exactly the values json.loads gives (not float64: the
# loader turns the integers of a mixed column into floats; not timestamps: it parses date strings).
EXACT_JSON_TYPES = ("string", "large_string", "int64", "bool")


@dataclass
class RawSplit:
    """One split as read from its source: an Arrow-backed ``datasets.Dataset`` (memory-mapped), or,
    for Deep Lake, ``get`` returning one column as Python values."""

    name: str
    columns: list[str]
    num_rows: int
    dataset: Any = None  # datasets.Dataset; None for Deep Lake
    json_lines: bool = False  # dataset holds each JSON line whole (LINE_COLUMN), decoded a batch at a time
    get: Callable[[str], list[Any]] | None = None  # Deep Lake
    jsonl_files: list[Path] = field(default_factory=list)  # JSONL read by datasets' loader: rescanned for error texts

    def values(self, batch: dict[str, list[Any]], names: list[str]) -> dict[str, list[Any]]:
        """The columns ``names`` of a batch as Python values (MISSING where a JSON line lacks the key)."""
        if self.json_lines:
            rows = [json.loads(text) for text in batch[LINE_COLUMN]]
            return {name: [row.get(name, MISSING) for row in rows] for name in names}
        return {name: batch[name] for name in names}


@dataclass
class Splits:
    """The datasets handed to SFTTrainer (TRL's column layout)."""

    train: Any  # datasets.Dataset
    eval: Any | None  # datasets.Dataset


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def load_splits(spec: api.Dataset, store: Store, work_dir: Path, seed: int) -> Splits:
    """Load, check and format the training (and evaluation) data. Raises InvalidDataset."""
    train_raw = load_raw(spec, spec.split, store, work_dir)
    train = format_split(train_raw, spec, work_dir)
    evaluation = None
    if spec.eval is not None and spec.eval.split is not None:
        evaluation = format_split(load_raw(spec, spec.eval.split, store, work_dir), spec, work_dir)
    elif spec.eval is not None and spec.eval.fraction is not None:
        train, evaluation = split_fraction(train, spec.eval.fraction, seed)
    log.info("dataset %s (%s, %s): %d training rows%s", spec.uri, spec.source, spec.format, len(train),
             f", {len(evaluation)} evaluation rows" if evaluation is not None else "")
    return Splits(train=train, eval=evaluation)


def split_fraction(ds: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Hold out ``fraction`` of the rows (seeded); both parts must keep at least one row."""
    n_eval = int(len(ds) * fraction)
    if n_eval < 1 or len(ds) - n_eval < 1:
        raise InvalidDataset(
            f"dataset.eval.fraction {fraction} of {len(ds)} rows leaves {n_eval} evaluation and "
            f"{len(ds) - n_eval} training rows: both need at least one (use more data or another fraction)"
        )
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def load_raw(spec: api.Dataset, split: str, store: Store, work_dir: Path) -> RawSplit:
    """Read one split from the dataset's source."""
    loaders = {"jsonl": load_files, "parquet": load_files, "huggingface": load_huggingface, "deeplake": load_deeplake}
    raw = loaders[spec.source](spec, split, store, work_dir)
    if raw.num_rows == 0:
        raise InvalidDataset(f"the dataset {spec.uri} (split {split!r}) is empty: it has no rows")
    return raw


def _select_files(names: list[str], ext: tuple[str, ...], split: str, is_train: bool, uri: str) -> list[str]:
    """Files of a folder that hold ``split`` (see the module docstring for the layout)."""
    data = sorted(n for n in names if n.endswith(ext) and not Path(n).name.startswith("."))
    if not data:
        raise InvalidDataset(f"the dataset folder {uri} holds no {'/'.join(ext)} files")
    named = [n for n in data if Path(n).name.split(".")[0] == split
             or Path(n).name.startswith((f"{split}-", f"{split}_")) or n.startswith(f"{split}/")]
    if named:
        return named
    if is_train:
        return data
    raise InvalidDataset(
        f"the dataset folder {uri} has no file for split {split!r} (expected {split}{ext[0]} or {split}-*{ext[0]}); "
        f"files: {', '.join(data[:10])}"
    )


def _fetch_files(spec: api.Dataset, split: str, store: Store, work_dir: Path) -> list[Path]:
    """Local paths of the data files of ``split`` (downloaded first when on S3)."""
    ext = EXTENSIONS[spec.source]
    is_train = split == spec.split
    if is_s3(spec.uri):
        try:
            names = store.list(spec.uri)
        except NotFound as err:  # no such bucket: the spec's input, not a storage fault
            raise InvalidDataset(f"the dataset {spec.uri} does not exist: {err}") from err
        if not names:
            if not store.exists(spec.uri):
                raise InvalidDataset(f"the dataset {spec.uri} does not exist")
            if not is_train:
                raise InvalidDataset(f"dataset.eval.split {split!r} needs dataset.uri to be a folder, not one file")
            dest = work_dir / "data" / Path(spec.uri).name
            store.download_file(spec.uri, dest)
            return [dest]
        chosen = _select_files(names, ext, split, is_train, spec.uri)
        local = work_dir / "data" / split
        for rel in chosen:
            store.download_file(join(spec.uri, rel), local / rel)
        return [local / rel for rel in chosen]
    path = Path(spec.uri.removeprefix("file://"))
    if path.is_file():
        if not is_train:
            raise InvalidDataset(f"dataset.eval.split {split!r} needs dataset.uri to be a folder, not one file")
        return [path]
    if path.is_dir():
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        return [path / n for n in _select_files(names, ext, split, is_train, spec.uri)]
    raise InvalidDataset(f"the dataset {spec.uri} does not exist")


def _load_arrow(kind: str, files: list[Path], work_dir: Path) -> Any:
    """``datasets``' ``json``/``parquet`` loader: the files converted once into Arrow files under the
    work dir and memory-mapped from there. None when the loader fails (the caller reads the files
    itself, for the exact error or for data the loader cannot type)."""
    import datasets

    try:
        return datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train",
                                     cache_dir=str(work_dir / CACHE_DIR))
    except Exception as err:  # noqa: BLE001 - datasets wraps every reader failure differently
        log.info("datasets' %s loader cannot read %s (%s: %s): reading the files directly", kind,
                 ", ".join(p.name for p in files[:3]), type(err).__name__, str(err).splitlines()[0][:200] if str(err)
                 else "")
        return None


def _exact_json_column(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in EXACT_JSON_TYPES


def _starts_with_array(path: Path) -> bool:
    """A JSON document that is one array: datasets' loader would read its objects as rows, a JSON
    lines reader refuses it (as kubetune always has: line 1 is a JSON list)."""
    opener: Any = open
    if path.name.endswith(".gz"):
        import gzip

        opener = gzip.open
    with opener(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def load_files(spec: api.Dataset, split: str, store: Store, work_dir: Path) -> RawSplit:
    """JSONL or Parquet files, as Arrow data memory-mapped from the work dir."""
    files = _fetch_files(spec, split, store, work_dir)
    if spec.source == "jsonl":
        if spec.format != "messages" and not any(_starts_with_array(p) for p in files):
            ds = _load_arrow("json", files, work_dir)
            if ds is not None and all(_exact_json_column(ds.features[c]) for c in required_columns(spec)
                                      if c in ds.features):
                return RawSplit(split, list(ds.column_names), len(ds), ds, jsonl_files=files)
        return jsonl_as_arrow(files, split, work_dir)
    ds = _load_arrow("parquet", files, work_dir)
    if ds is not None:
        return RawSplit(split, list(ds.column_names), len(ds), ds)
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:  # the error text, or Parquet files with differing schemas, which datasets refuses: in memory
        tables = [pq.read_table(path) for path in files]
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowException, OSError) as err:
        raise InvalidDataset(f"cannot read the Parquet data of {spec.uri}: {err}") from err
    return RawSplit(split, table.column_names, table.num_rows, datasets.Dataset(table))


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """One JSON object per line (blank lines skipped), with its text; a bad line is named by its number."""
    opener: Any = open
    if path.name.endswith(".gz"):
        import gzip

        opener = gzip.open
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidDataset(f"{path.name} line {number} is not valid JSON: {err.msg} (column {err.colno})") \
                    from None
            if not isinstance(row, dict):
                raise InvalidDataset(f"{path.name} line {number} is a JSON {type(row).__name__}, not an object")
            yield line.strip(), row


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All the rows of a JSONL file as Python objects (small files only)."""
    return [row for _, row in iter_jsonl(path)]


def jsonl_batches(files: list[Path], names: list[str]) -> Iterator[tuple[int, dict[str, list[Any]]]]:
    """The columns ``names`` of JSONL files as Python values, FORMAT_BATCH rows at a time, with the
    first row's number (MISSING where a line lacks the key)."""
    chunk: list[dict[str, Any]] = []
    start = 0
    for path in files:
        for _, row in iter_jsonl(path):
            chunk.append(row)
            if len(chunk) == FORMAT_BATCH:
                yield start, {name: [r.get(name, MISSING) for r in chunk] for name in names}
                start, chunk = start + len(chunk), []
    if chunk:
        yield start, {name: [r.get(name, MISSING) for r in chunk] for name in names}


def jsonl_as_arrow(files: list[Path], split: str, work_dir: Path) -> RawSplit:
    """JSONL files checked line by line (:func:`iter_jsonl`) and written, each line whole, to an Arrow
    file under the work dir, memory-mapped: for data datasets' loader refuses or would change
    (conversations, tools, floats, mixed types). The columns are the keys of all the rows, in order
    of appearance; :meth:`RawSplit.values` decodes the lines a batch at a time."""
    import datasets
    import pyarrow as pa

    folder = work_dir / CACHE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"jsonl-{split}-{uuid.uuid4().hex}.arrow"
    schema = pa.schema([(LINE_COLUMN, pa.large_string())])
    keys: dict[str, None] = {}
    rows = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        chunk: list[str] = []
        for file in files:
            for text, row in iter_jsonl(file):
                keys.update(dict.fromkeys(row))
                chunk.append(text)
                if len(chunk) == FORMAT_BATCH:
                    writer.write_batch(pa.record_batch([pa.array(chunk, pa.large_string())], schema=schema))
                    rows, chunk = rows + len(chunk), []
        if chunk:
            writer.write_batch(pa.record_batch([pa.array(chunk, pa.large_string())], schema=schema))
            rows += len(chunk)
    return RawSplit(split, list(keys), rows, datasets.Dataset.from_file(str(path)), json_lines=True)


def load_huggingface(spec: api.Dataset, split: str, store: Store, work_dir: Path) -> RawSplit:
    """A ``save_to_disk`` folder (local or S3) or a hub dataset id."""
    import datasets

    local = Path(spec.uri.removeprefix("file://"))
    if is_s3(spec.uri):
        local = work_dir / "data" / "huggingface"
        if not (local / ".complete").exists():
            if not store.list(spec.uri):
                raise InvalidDataset(f"the dataset {spec.uri} does not exist or is empty")
            store.download_dir(spec.uri, local)
            (local / ".complete").touch()
    if local.exists():
        try:
            loaded = datasets.load_from_disk(str(local))
        except (FileNotFoundError, ValueError) as err:
            raise InvalidDataset(f"{spec.uri} is not a datasets save_to_disk folder: {err}") from err
    else:
        token = os.environ.get(contract.ENV_DATASET_TOKEN) or os.environ.get(contract.ENV_HF_TOKEN)
        try:
            loaded = datasets.load_dataset(spec.uri, token=token, cache_dir=str(work_dir / CACHE_DIR))
        except (FileNotFoundError, ValueError, ConnectionError) as err:
            raise InvalidDataset(f"cannot load the dataset {spec.uri!r} (not a local folder; from the hub: {err})") \
                from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InvalidDataset(f"the dataset {spec.uri} has no split {split!r}; splits: {', '.join(loaded)}")
        ds = loaded[split]
    elif split != spec.split:
        raise InvalidDataset(f"the dataset {spec.uri} is a single split: dataset.eval.split {split!r} cannot exist "
                             "(use dataset.eval.fraction)")
    else:
        ds = loaded
    return RawSplit(split, list(ds.column_names), len(ds), ds)


def deeplake_creds(store: Store) -> dict[str, str]:
    """The job's storage endpoint and credentials in Deep Lake's terms."""
    args = store._client_args
    creds = {"aws_region": str(args["region"])}
    if args.get("access_key"):
        creds["aws_access_key_id"] = str(args["access_key"])
    if args.get("secret_key"):
        creds["aws_secret_access_key"] = str(args["secret_key"])
    if args.get("endpoint"):
        creds["endpoint_url"] = str(args["endpoint"])
    return creds


def _plain(value: Any) -> Any:
    """Deep Lake values (numpy arrays, Dict objects) as plain Python values."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def load_deeplake(spec: api.Dataset, split: str, store: Store, work_dir: Path) -> RawSplit:
    """A Deep Lake 4 dataset, or a Deep Lake 3 one (no named splits: use eval.fraction).

    Deep Lake 4's ``open_read_only`` cannot open a v3 dataset (the format of the ``hub://activeloop/...``
    datasets of the QLoRA tutorials): on a v3 folder it fails with "Dataset does not exist". Deep
    Lake 4 still reads v3 read-only through a query, which is how ``deeplake.convert`` itself reads
    its source, so a dataset ``open_read_only`` refuses is read with ``deeplake.query('SELECT * FROM
    "<uri>"')``. Verified with deeplake 4.7.4 on a v3 dataset written by deeplake 3.9.52, in a local
    folder and on S3 (tests/trainer/test_trainer_formats.py); not verified: ``hub://`` v3 datasets
    (no hub here), which take the same path with the token. When both fail, the error names both
    causes and ``deeplake.convert``."""
    import deeplake

    if split != spec.split:
        raise InvalidDataset("Deep Lake datasets have no named splits: use dataset.eval.fraction")
    uri = spec.uri
    kwargs: dict[str, Any] = {}
    if is_s3(uri):
        kwargs["creds"] = deeplake_creds(store)
    elif uri.startswith(("hub://", "al://")):
        kwargs["token"] = os.environ.get(contract.ENV_DATASET_TOKEN)
    elif "://" not in uri:
        if not Path(uri).exists():
            raise InvalidDataset(f"the dataset {uri} does not exist")
        uri = f"file://{Path(uri).resolve()}"
    ds: Any
    try:
        ds = deeplake.open_read_only(uri, **kwargs)
    except Exception as err:  # noqa: BLE001 - deeplake raises its own hierarchy for every failure
        if '"' in uri:
            raise InvalidDataset(f"cannot open the Deep Lake dataset {spec.uri}: {type(err).__name__}: {err}") from err
        try:  # a Deep Lake 3 dataset: v4 reads it through a query only
            ds = deeplake.query(f'SELECT * FROM "{uri}"', **kwargs)
        except Exception as v3_err:  # noqa: BLE001
            raise InvalidDataset(
                f"cannot open the Deep Lake dataset {spec.uri}: {type(err).__name__}: {' '.join(str(err).split())}; "
                f"read as a Deep Lake 3 dataset: {type(v3_err).__name__}: {' '.join(str(v3_err).split())}. For a "
                "Deep Lake 3 dataset, deeplake.convert(src, dst) (Deep Lake 4) copies it to the v4 format: point "
                "dataset.uri at the copy") from err
        log.info("%s is not a Deep Lake 4 dataset (%s): read as a Deep Lake 3 dataset", spec.uri, type(err).__name__)
    columns = [column.name for column in ds.schema.columns]
    return RawSplit(split, columns, len(ds), get=lambda c: [_plain(v) for v in ds[c][:]])  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------


def template_fields(template: str) -> list[str]:
    """Column names a format string uses (``{a}``, ``{a.b}``, ``{a[0]}`` -> ``a``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise InvalidDataset(f"dataset.template is not a valid format string: {err}") from err
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = name.split(".")[0].split("[")[0]
        if not root or root.isdigit():
            raise InvalidDataset(
                "dataset.template must name its columns ({column}), positional fields like {} or {0} are not allowed"
            )
        fields.append(root)
    return list(dict.fromkeys(fields))


def required_columns(spec: api.Dataset) -> dict[str, str]:
    """Column -> the spec field that names it, for the chosen format."""
    if spec.format == "text":
        return {spec.text_field: "dataset.textField"}
    if spec.format == "template":
        return {field: "a field of dataset.template" for field in template_fields(spec.template or "")}
    if spec.format == "promptCompletion":
        return {spec.prompt_field: "dataset.promptField", spec.completion_field: "dataset.completionField"}
    if spec.format == "preference":
        return {spec.prompt_field: "dataset.promptField", spec.chosen_field: "dataset.chosenField",
                spec.rejected_field: "dataset.rejectedField"}
    if spec.format == "feedback":
        return {spec.prompt_field: "dataset.promptField", spec.completion_field: "dataset.completionField",
                spec.label_field: "dataset.labelField"}
    return {spec.messages_field: "dataset.messagesField"}


def check_columns(raw: RawSplit, spec: api.Dataset) -> None:
    missing = [(col, why) for col, why in required_columns(spec).items() if col not in raw.columns]
    if missing:
        named = "; ".join(f"{why} {col!r}" for col, why in missing)
        raise InvalidDataset(
            f"the dataset {spec.uri} (split {raw.name!r}) has no column {named}; columns present: "
            f"{', '.join(raw.columns) or '(none)'}"
        )


def _describe(value: Any) -> str:
    if value is MISSING:
        return "missing"
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _raise_problems(problems: list[str], total: int, what: str) -> None:
    if problems:
        more = f" (and {total - len(problems)} more)" if total > len(problems) else ""
        raise InvalidDataset(f"{what}: " + "; ".join(problems) + more)


def _check_tool_call(call: Any, where: str) -> str | None:
    """One entry of ``tool_calls``: ``{"type": "function", "function": {"name", "arguments"}}`` (the
    OpenAI and transformers layout) or ``{"name", "arguments"}``; ``arguments`` an object or a string."""
    if not isinstance(call, dict):
        return f"{where} is {_describe(call)}, not an object"
    function = call.get("function", call)
    if not isinstance(function, dict):
        return f"{where} has function {_describe(function)}, not an object"
    if not isinstance(function.get("name", MISSING), str):
        return f"{where} has name {_describe(function.get('name', MISSING))}, not a string"
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, (dict, str)):
        return f"{where} has arguments {_describe(arguments)}, not an object or a JSON string"
    return None


def check_messages(value: Any, row: int) -> list[dict[str, Any]] | str:
    """A conversation: a list of messages (or a JSON string of one); returns it normalised or the problem.

    A message keeps ``role`` (one of :data:`ROLES`), ``content`` (a string; null only for an
    assistant message with ``tool_calls``), ``tool_calls`` (a list of objects, see
    :func:`_check_tool_call`), and the strings ``name``, ``tool_call_id``, ``reasoning_content`` and
    ``thinking``; other keys are dropped. Null optional keys (as Parquet and datasets store keys a
    message lacks) and empty ``tool_calls`` lists count as absent."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return f"row {row} is a string that is not a JSON list of messages"
    if not isinstance(value, list) or not value:
        return f"row {row} is {_describe(value)}, not a non-empty list of messages"
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            return f"row {row} message {i} is {_describe(msg)}, not an object with role and content"
        role, content = msg.get("role", MISSING), msg.get("content", MISSING)
        if role not in ROLES:
            return f"row {row} message {i} has role {_describe(role)}; roles: {', '.join(ROLES)}"
        tool_calls = msg.get("tool_calls")
        if tool_calls is not None:
            if not isinstance(tool_calls, list):
                return f"row {row} message {i} ({role}) has tool_calls {_describe(tool_calls)}, not a list"
            if tool_calls and role != "assistant":
                return f"row {row} message {i} ({role}) has tool_calls: only assistant messages call tools"
            for j, call in enumerate(tool_calls):
                problem = _check_tool_call(call, f"row {row} message {i} tool_calls[{j}]")
                if problem:
                    return problem
        if not isinstance(content, str) and not (content is None and tool_calls):
            return (f"row {row} message {i} ({role}) has content {_describe(content)}, not a string"
                    + (" (null content needs tool_calls)" if content is None and role == "assistant" else ""))
        message: dict[str, Any] = {"role": role, "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
        for key in MESSAGE_TEXT_KEYS:
            text = msg.get(key)
            if text is None:
                continue
            if not isinstance(text, str):
                return f"row {row} message {i} ({role}) has {key} {_describe(text)}, not a string"
            message[key] = text
        out.append(message)
    return out


def check_tools(value: Any, row: int) -> list[dict[str, Any]] | None | str:
    """The tools column of one conversation: a list of JSON-schema function specs (``{"type":
    "function", "function": {"name", "description", "parameters"}}`` or ``{"name", ...}``) or a JSON
    string of one; null, missing, "" or [] mean no tools. Returns the list, None, or the problem."""
    if value is MISSING or value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return f"row {row} is a string that is not a JSON list of tools"
    if not isinstance(value, list):
        return f"row {row} is {_describe(value)}, not a list of tools"
    for j, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return f"row {row} tool {j} is {_describe(tool)}, not a function spec with a name"
    return value or None


class _Problems:
    """Rows that fail one check: the first MAX_LISTED named, the rest counted."""

    def __init__(self, what: str) -> None:
        self.what, self.listed, self.count = what, [], 0

    def add(self, problem: str) -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append(problem)

    def raise_any(self) -> None:
        _raise_problems(self.listed, self.count, self.what)


class RowFormatter:
    """The row checks and TRL's columns (see the module docstring), one batch at a time: the function
    ``datasets.map`` runs over the Arrow data (``with_indices``: row numbers are positions in the
    source). Rows that fail a check are left out and remembered; :meth:`finish` raises the first
    failing check after the last batch, naming the first rows and counting the rest.

    ``template``: rows whose template fields are missing or null are named, and so are rows whose
    LAST field (the template's answer: what the row teaches, as the completion of
    ``promptCompletion``) is an empty or blank string: such a row renders to the bare template around
    its prompt and would teach an empty answer. They fail rather than being dropped (as an empty
    ``text`` is) because an empty value in a named column is the same gap in the data as a null one,
    usually from the same export or a wrong column, and a job that trains on silently fewer rows
    hides it. Other fields may be empty: optional parts of a prompt, such as Alpaca's ``input``.

    ``messages``: the ``messages`` column (and ``tools`` when the data has ``dataset.toolsField``),
    each row a JSON string: tool calls and tool schemas differ from row to row, which Arrow would
    merge into one struct type (adding null keys) or refuse; :func:`_tokenize_batch` reads them back.

    Rows with nothing to learn from (empty ``text`` or ``completion``) are dropped, and counted."""

    def __init__(self, raw: RawSplit, spec: api.Dataset) -> None:
        self.raw, self.format = raw, spec.format
        self.template = spec.template or ""
        self.fields = template_fields(self.template) if spec.format == "template" else []
        self.checks: list[_Problems]
        if spec.format == "text":
            self.inputs, self.outputs = [spec.text_field], ["text"]
            self.checks = [_Problems(f"column {spec.text_field!r} must hold strings")]
        elif spec.format == "promptCompletion":
            self.inputs, self.outputs = [spec.prompt_field, spec.completion_field], ["prompt", "completion"]
            self.checks = [_Problems(f"column {c!r} must hold strings") for c in self.inputs]
        elif spec.format == "template":
            self.inputs, self.outputs = self.fields, ["text"]
            self.checks = [_Problems("dataset.template fields must have values")]
        elif spec.format == "preference":
            self.inputs = [spec.prompt_field, spec.chosen_field, spec.rejected_field]
            self.outputs = ["prompt", "chosen", "rejected", "conversational"]
            self.checks = [_Problems(f"columns {', '.join(map(repr, self.inputs))} must hold strings, or lists of "
                                     "messages (the same kind in a row)"),
                           _Problems("each pair needs a chosen and a rejected answer that differ")]
            self.kind: str | None = None  # text or messages: the first good row decides, the others follow
        elif spec.format == "feedback":
            self.inputs = [spec.prompt_field, spec.completion_field, spec.label_field]
            self.outputs = ["prompt", "completion", "label", "conversational"]
            self.checks = [_Problems(f"columns {', '.join(map(repr, self.inputs[:2]))} must hold strings, or lists "
                                     "of messages (the same kind in a row)"),
                           _Problems("each completion needs content"),
                           _Problems(f"column {spec.label_field!r} (dataset.labelField) must hold true or false")]
            self.kind = None
        else:
            tools = [spec.tools_field] if spec.tools_field in raw.columns else []
            self.inputs, self.outputs = [spec.messages_field, *tools], ["messages", *(["tools"] if tools else [])]
            self.checks = [_Problems(f"column {spec.messages_field!r} must hold conversations"),
                           _Problems(f"column {spec.tools_field!r} (dataset.toolsField) must hold lists of tools")]
        self.blank: list[int] = []  # template rows with an empty answer (the first ones)
        self.blank_count = 0
        self.dropped = 0  # rows with an empty text or completion
        self.has_tools = False  # a row has tools

    @property
    def failed(self) -> bool:
        return any(check.count for check in self.checks) or self.blank_count > 0

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        values = self.raw.values(batch, list(dict.fromkeys(self.inputs)))
        out: dict[str, list[Any]] = {name: [] for name in self.outputs}
        if self.format in ("text", "promptCompletion"):
            columns = [values[c] for c in self.inputs]
            for i, row in enumerate(indices):
                row_values = [column[i] for column in columns]
                good = True
                for check, value in zip(self.checks, row_values, strict=True):
                    if not isinstance(value, str):
                        check.add(f"row {row} is {_describe(value)}")
                        good = False
                if not good:
                    continue
                if not row_values[-1].strip():  # the text, or the completion
                    self.dropped += 1
                    continue
                for name, value in zip(self.outputs, row_values, strict=True):
                    out[name].append(value)
        elif self.format == "template":
            self._template(values, indices, out["text"])
        elif self.format in ("preference", "feedback"):
            self._preference(values, indices, out)
        else:
            self._conversations(values, indices, out)
        return out

    def _template(self, values: dict[str, list[Any]], indices: list[int], texts: list[str]) -> None:
        answer = self.fields[-1] if self.fields else None
        for i, row in enumerate(indices):
            row_values = {name: values[name][i] for name in self.fields}
            wrong = [f"{name!r} is {_describe(v)}" for name, v in row_values.items()
                     if v is MISSING or v is None or isinstance(v, bytes)]
            if wrong:
                self.checks[0].add(f"row {row}: " + ", ".join(wrong))
                continue
            if answer is not None and isinstance(row_values[answer], str) and not row_values[answer].strip():
                self.blank_count += 1
                if len(self.blank) < MAX_LISTED:
                    self.blank.append(row)
                continue
            try:
                text = self.template.format(**row_values)
            except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
                raise InvalidDataset(f"dataset.template cannot be applied to row {row}: "
                                     f"{type(err).__name__}: {err}") from err
            if not text.strip():
                self.dropped += 1
                continue
            texts.append(text)

    def _conversations(self, values: dict[str, list[Any]], indices: list[int], out: dict[str, list[Any]]) -> None:
        messages = values[self.inputs[0]]
        tools = values[self.inputs[1]] if len(self.inputs) > 1 else None
        for i, row in enumerate(indices):
            checked = check_messages(messages[i], row)
            if isinstance(checked, str):
                self.checks[0].add(checked)
            checked_tools = check_tools(tools[i], row) if tools is not None else None
            if isinstance(checked_tools, str):
                self.checks[1].add(checked_tools)
            if isinstance(checked, str) or isinstance(checked_tools, str):
                continue
            out["messages"].append(json.dumps(checked, ensure_ascii=False))
            if tools is not None:
                self.has_tools = self.has_tools or checked_tools is not None
                out["tools"].append(None if checked_tools is None else json.dumps(checked_tools, ensure_ascii=False))

    def _preference(self, values: dict[str, list[Any]], indices: list[int], out: dict[str, list[Any]]) -> None:
        """preference rows (prompt, chosen, rejected) and feedback rows (prompt, completion, label):
        prompt and answers all strings (text: the answers follow the prompt as they are, EOS added) or
        all lists of messages (conversational: the prompt's turns, then the answer's, starting with
        the assistant, rendered by the chat template). An empty answer, or a pair's two the same,
        teaches no preference; a feedback label is a boolean (or 0/1)."""
        feedback = self.format == "feedback"
        names = ["prompt", "completion"] if feedback else ["prompt", "chosen", "rejected"]
        columns = [values[c] for c in self.inputs]
        for i, row in enumerate(indices):
            given = [column[i] for column in columns]
            label = given.pop() if feedback else None
            absent = [name for name, v in zip(self.inputs, given, strict=False) if v is MISSING or v is None]
            if absent:
                self.checks[0].add(f"row {row} has no {' and no '.join(map(repr, absent))}")
                continue
            if feedback and not (isinstance(label, bool) or (isinstance(label, int) and label in (0, 1))):
                self.checks[2].add(f"row {row} is {_describe(label)}")
                continue
            if any(isinstance(v, str) for v in given) and not all(isinstance(v, str) for v in given):
                self.checks[0].add(f"row {row} mixes strings and lists of messages")
                continue
            if all(isinstance(v, str) for v in given):
                kind, parts = "text", given
                empty = [name for name, v in zip(names[1:], given[1:], strict=True) if not v.strip()]
            else:
                checked = [check_messages(v, row) for v in given]
                problem = next((c for c in checked if isinstance(c, str)), None)
                if problem is not None:
                    self.checks[0].add(f"{problem} (columns {', '.join(self.inputs[:len(given)])}: strings or lists "
                                       "of messages)")
                    continue
                answers = [c for c in checked[1:] if isinstance(c, list)]
                wrong = [n for n, a in zip(names[1:], answers, strict=True) if a[0]["role"] != "assistant"]
                if wrong:
                    self.checks[0].add(f"row {row}: {' and '.join(wrong)} must start with an assistant message")
                    continue
                kind = "messages"
                parts = [json.dumps(c, ensure_ascii=False) for c in checked]
                empty = [n for n, a in zip(names[1:], answers, strict=True)
                         if not any((m.get("content") or "").strip() or m.get("tool_calls") for m in a)]
            if self.kind is None:
                self.kind = kind
            if kind != self.kind:
                self.checks[0].add(f"row {row} is {kind} but earlier rows are {self.kind}")
                continue
            if empty:
                self.checks[1].add(f"row {row} has an empty {' and '.join(empty)} answer")
                continue
            if not feedback and parts[1] == parts[2]:
                self.checks[1].add(f"row {row}: chosen and rejected are the same answer")
                continue
            for name, value in zip(names, parts, strict=True):
                out[name].append(value)
            if feedback:
                out["label"].append(bool(label))
            out["conversational"].append(kind)

    def finish(self) -> None:
        """Raise the first failing check (in the order of the columns), as InvalidDataset."""
        for check in self.checks:
            check.raise_any()
        if self.blank_count:
            answer = self.fields[-1]
            rows = ", ".join(map(str, self.blank))
            more = f" (and {self.blank_count - MAX_LISTED} more)" if self.blank_count > MAX_LISTED else ""
            raise InvalidDataset(
                f"{self.blank_count} of {self.raw.num_rows} rows have an empty {answer!r}, the last field of "
                f"dataset.template (what each row teaches), and would train on the bare template: rows {rows}{more}; "
                f"fill the {answer!r} values or remove these rows")


def format_split(raw: RawSplit, spec: api.Dataset, work_dir: Path) -> Any:
    """A ``datasets.Dataset`` with TRL's columns for one split, checked row by row (:class:`RowFormatter`)
    and written to an Arrow file under ``<work_dir>/hf-cache`` (Deep Lake: in memory)."""
    import datasets

    check_columns(raw, spec)
    rows = RowFormatter(raw, spec)
    features = datasets.Features({name: datasets.Value("bool" if name == "label" else "string")
                                  for name in rows.outputs})
    if raw.dataset is not None:
        source = raw.dataset.select_columns([LINE_COLUMN] if raw.json_lines
                                              else list(dict.fromkeys(rows.inputs)) or raw.dataset.column_names)
        folder = work_dir / CACHE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = f"format-{raw.name}-{uuid.uuid4().hex}"
        formatted = source.map(rows, batched=True, batch_size=FORMAT_BATCH, with_indices=True,
                               remove_columns=source.column_names, features=features, load_from_cache_file=False,
                               cache_file_name=str(folder / f"{name}.arrow"), new_fingerprint=name)
    else:  # Deep Lake: Python columns
        assert raw.get is not None
        columns = {c: raw.get(c) for c in dict.fromkeys(rows.inputs)}
        parts: dict[str, list[Any]] = {name: [] for name in rows.outputs}
        for start in range(0, raw.num_rows, FORMAT_BATCH):
            stop = min(start + FORMAT_BATCH, raw.num_rows)
            for key, values in rows({c: v[start:stop] for c, v in columns.items()}, list(range(start, stop))).items():
                parts[key].extend(values)
        formatted = datasets.Dataset.from_dict(parts, features=features)
    if rows.failed and raw.jsonl_files:
        # datasets' loader turned missing keys into nulls: the exact messages come from the lines
        exact = RowFormatter(RawSplit(raw.name, raw.columns, raw.num_rows), spec)
        for start, batch in jsonl_batches(raw.jsonl_files, list(dict.fromkeys(rows.inputs))):
            exact(batch, list(range(start, start + len(next(iter(batch.values()), [])))))
        exact.finish()
    rows.finish()
    if rows.dropped:
        log.warning("split %s: dropped %d rows whose %s is empty", raw.name, rows.dropped,
                    "completion" if spec.format == "promptCompletion" else "text")
    if len(formatted) == 0:
        raise InvalidDataset(f"the dataset {spec.uri} (split {raw.name!r}) has no non-empty samples")
    if "tools" in formatted.column_names and not rows.has_tools:
        formatted = formatted.remove_columns("tools")
    return formatted


# ----------------------------------------------------------------------------------------------
# Tokenization (once, batched) and the token-level checks
# ----------------------------------------------------------------------------------------------

TOKENIZE_BATCH = 500


def _labelled(ids: list[int], mask: list[int] | None) -> list[int]:
    return list(ids) if mask is None else [t if m else -100 for t, m in zip(ids, mask, strict=True)]


def _tokenize_batch(batch: dict[str, list[Any]], indices: list[int], tokenizer: Any, assistant_only: bool,
                    chat_template: str | None, unpaired: bool = False) -> dict[str, list[Any]]:
    """TRL's per-sample tokenization (``SFTTrainer._prepare_dataset``), for a batch at once.

    text: text + EOS; prompt/completion: prompt + completion + EOS, loss on the tokens after the
    longest common prefix of the tokenized prompt and the tokenized whole; messages: the chat
    template (with the row's ``tools``, as TRL passes them), loss on the assistant tokens
    (``{% generation %}``) or on everything. A conversation the template cannot render is named by
    its row (``indices``) in an InvalidDataset."""
    eos = tokenizer.eos_token or ""
    if "chosen" in batch and unpaired:  # method kto on preference pairs: a desirable and an undesirable row each
        batch, indices = unpair(batch, indices)
    if "chosen" in batch or "label" in batch:
        return _tokenize_preference(batch, indices, tokenizer, chat_template)
    if "text" in batch:
        texts = [t if t.endswith(eos) else t + eos for t in batch["text"]]
        ids = tokenizer(texts)["input_ids"]
        return {"input_ids": ids, "labels": [list(i) for i in ids]}
    if "prompt" in batch:
        completions = [c if c.endswith(eos) else c + eos for c in batch["completion"]]
        prompts = tokenizer(batch["prompt"])["input_ids"]
        full = tokenizer([p + c for p, c in zip(batch["prompt"], completions, strict=True)])["input_ids"]
        labels = []
        for p, f in zip(prompts, full, strict=True):
            shared = next((i for i, (a, b) in enumerate(zip(p, f, strict=False)) if a != b), min(len(p), len(f)))
            labels.append([-100] * shared + list(f[shared:]))
        return {"input_ids": full, "labels": labels}
    from jinja2 import TemplateError

    TEMPLATE_ERRORS = (TemplateError, TypeError, ValueError, KeyError)  # noqa: N806
    conversations = [json.loads(m) if isinstance(m, str) else m for m in batch["messages"]]
    tools = batch.get("tools") or [None] * len(conversations)
    groups: dict[Any, list[int]] = {}  # one call per distinct tools list (the template takes one for all)
    for i, tool_list in enumerate(tools):
        groups.setdefault(tool_list if tool_list is None or isinstance(tool_list, str)
                          else json.dumps(tool_list), []).append(i)

    def render(chats: list[Any], tools: Any) -> Any:
        return tokenizer.apply_chat_template(chats, tokenize=True, return_dict=True, chat_template=chat_template,
                                             return_assistant_tokens_mask=assistant_only, tools=tools)

    all_ids: list[Any] = [None] * len(conversations)
    all_labels: list[Any] = [None] * len(conversations)
    for key, members in groups.items():
        chats = [conversations[i] for i in members]
        tool_specs = json.loads(key) if key is not None else None
        try:
            out = render(chats, tool_specs)
        except TEMPLATE_ERRORS as err:  # the template refuses a conversation (its raise_exception, a bad value)
            for i in members:  # name the first one
                try:
                    render([conversations[i]], tool_specs)
                except TEMPLATE_ERRORS as row_err:
                    raise InvalidDataset(
                        f"the chat template cannot render row {indices[i]} of the split: "
                        f"{type(row_err).__name__}: {row_err}; the conversation: "
                        f"{json.dumps(conversations[i], ensure_ascii=False)[:300]}") from row_err
            raise InvalidDataset(f"the chat template cannot render the conversations: {type(err).__name__}: {err}") \
                from err
        masks = out["assistant_masks"] if assistant_only else [None] * len(members)
        for i, row_ids, mask in zip(members, out["input_ids"], masks, strict=True):
            all_ids[i], all_labels[i] = row_ids, _labelled(row_ids, mask)
    return {"input_ids": all_ids, "labels": all_labels}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def unpair(batch: dict[str, list[Any]], indices: list[int]) -> tuple[dict[str, list[Any]], list[int]]:
    """Preference pairs as feedback rows, as TRL's ``unpair_preference_dataset`` makes them: the
    batch's chosen answers (label true), then its rejected ones (label false)."""
    n = len(batch["prompt"])
    return ({"prompt": batch["prompt"] * 2, "completion": batch["chosen"] + batch["rejected"],
             "label": [True] * n + [False] * n, "conversational": batch["conversational"] * 2}, indices * 2)


def _tokenize_preference(batch: dict[str, list[Any]], indices: list[int], tokenizer: Any,
                         chat_template: str | None) -> dict[str, list[Any]]:
    """TRL's DPO and KTO tokenization (``DPOTrainer._prepare_dataset``, ``KTOTrainer._prepare_dataset``),
    batched: text answers get EOS; the prompt is what the tokenized prompt and each tokenized
    prompt+answer share (conversational: the chat template, the prompt with the generation prompt).
    Pairs give ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``; feedback rows ``prompt_ids``,
    ``completion_ids``, ``label`` and their source ``row`` (KTO trains them shuffled: the checks name
    rows by it)."""
    eos = tokenizer.eos_token or ""
    answers = ["completion"] if "label" in batch else ["chosen", "rejected"]
    if all(kind == "text" for kind in batch["conversational"]):
        prompts = tokenizer(batch["prompt"])["input_ids"]
        full = [tokenizer([p + (a if a.endswith(eos) else a + eos) for p, a in
                           zip(batch["prompt"], batch[name], strict=True)])["input_ids"] for name in answers]
    else:
        from jinja2 import TemplateError

        def render(chats: list[Any], generation: bool = False) -> list[list[int]]:
            try:
                return tokenizer.apply_chat_template(chats, tokenize=True, return_dict=True,
                                                     chat_template=chat_template,
                                                     add_generation_prompt=generation)["input_ids"]
            except (TemplateError, TypeError, ValueError, KeyError) as err:
                raise InvalidDataset(f"the chat template cannot render the preference rows {min(indices)}-"
                                     f"{max(indices)}: {type(err).__name__}: {err}") from err

        prompt_turns = [json.loads(p) for p in batch["prompt"]]
        prompts = render(prompt_turns, generation=True)
        full = [render([p + json.loads(a) for p, a in zip(prompt_turns, batch[name], strict=True)])
                for name in answers]
    out: dict[str, list[Any]] = {"prompt_ids": [], **{f"{name}_ids": [] for name in answers}}
    for i, p in enumerate(prompts):
        shared = min(_common_prefix(p, ids[i]) for ids in full)
        out["prompt_ids"].append(list(p[:shared]))
        for name, ids in zip(answers, full, strict=True):
            out[f"{name}_ids"].append(list(ids[i][shared:]))
    if "label" in batch:
        out["label"], out["row"] = list(batch["label"]), list(indices)
    return out


@dataclass
class PairStats:
    pairs: int
    tokens: int  # prompt + chosen + rejected (feedback: prompt + completion), before truncation
    truncated: int  # pairs whose prompt + longer answer exceeds maxLength (cut at maxLength, keep_start)
    truncated_tokens: int
    longest_prompt: int
    desirable: int = 0  # feedback rows labelled true


def _listed(rows: list[int]) -> str:
    unique = list(dict.fromkeys(rows))
    return ", ".join(map(str, unique[:MAX_LISTED])) + (
        f" (and {len(unique) - MAX_LISTED} more)" if len(unique) > MAX_LISTED else "")


def check_pairs(tokenized: Any, max_length: int, max_prompt_length: int | None,
                max_truncated_fraction: float = 0.05, setting: str = "dpo.maxPromptLength") -> PairStats:
    """The token checks of preference data (pairs, or KTO's feedback rows): a prompt longer than
    ``max_prompt_length`` (default maxLength - 1: an answer must keep a token) fails, naming the rows;
    sequences cut at maxLength (the prompt and the longer answer, TRL's keep_start truncation) fail
    above maxTruncatedFraction. Feedback rows need both labels: KTO learns from the contrast."""
    limit = max_prompt_length or max_length - 1
    feedback = "completion_ids" in tokenized.column_names
    what = "rows" if feedback else "pairs"
    count = tokens = cut_tokens = longest = desirable = 0
    long_prompts: list[int] = []
    cut_rows: list[int] = []
    for batch in tokenized.iter(batch_size=10_000):
        answers = [batch["completion_ids"]] if feedback else [batch["chosen_ids"], batch["rejected_ids"]]
        rows = batch["row"] if feedback else range(count, count + len(batch["prompt_ids"]))
        for p, row, *ans in zip(batch["prompt_ids"], rows, *answers, strict=True):
            if len(p) > limit:
                long_prompts.append(row)
            over = len(p) + max(map(len, ans)) - max_length
            if over > 0:
                cut_rows.append(row)
                cut_tokens += over
            count += 1
            tokens += len(p) + sum(map(len, ans))
            longest = max(longest, len(p))
        desirable += sum(batch["label"]) if feedback else 0
    if long_prompts:
        raise InvalidDataset(
            f"{len(long_prompts)} of {count} prompts are longer than {limit} tokens ("
            f"{setting if max_prompt_length else 'training.maxLength - 1'}; longest {longest}): "
            f"training split rows {_listed(long_prompts)}; shorten them, or raise training.maxLength")
    if len(cut_rows) > max_truncated_fraction * count:
        raise InvalidDataset(
            f"{len(cut_rows)} of {count} {what} ({len(cut_rows) / count:.1%}) are longer than training.maxLength="
            f"{max_length} tokens (prompt + answer) and would be truncated, cutting {cut_tokens} tokens; training "
            f"split rows {_listed(cut_rows)}. That is more than training.maxTruncatedFraction="
            f"{max_truncated_fraction:g}: raise training.maxLength, shorten the answers, or raise "
            "training.maxTruncatedFraction")
    if feedback and desirable in (0, count):
        raise InvalidDataset(
            f"all {count} training rows are labelled {str(desirable > 0).lower()}: KTO learns from desirable and "
            "undesirable completions both; add rows of the other label (or use method sft on the desirable ones)")
    return PairStats(count, tokens, len(cut_rows), cut_tokens, longest, desirable)


def tokenize(ds: Any, tokenizer: Any, assistant_only: bool = False, chat_template: str | None = None,
             workers: int = 1, unpaired: bool = False) -> Any:
    """The split as TRL's pre-tokenized dataset: ``input_ids`` and ``labels`` (-100 where no loss).

    SFTTrainer uses such a dataset as it is (no second tokenization, no label pass) and only packs
    it, so the check below counts exactly the tokens that are trained. Batched: the Rust tokenizer
    encodes a whole batch on all the CPUs' threads, so one process is the default; ``workers``
    processes measured slower (docs/benchmarks.md, Data preparation). Preference data gets DPO's or
    KTO's columns (:func:`_tokenize_preference`); ``unpaired`` splits pairs into KTO's feedback rows."""
    return ds.map(_tokenize_batch, batched=True, batch_size=TOKENIZE_BATCH, with_indices=True,
                  num_proc=workers if workers > 1 else None, remove_columns=ds.column_names,
                  desc="Tokenizing" if workers > 1 else None,
                  fn_kwargs={"tokenizer": tokenizer, "assistant_only": assistant_only,
                             "chat_template": chat_template, "unpaired": unpaired})


# Packings that cut a sample at maxLength (TRL truncates it before packing or padding); wrapped
# and bfd_split keep every token (the rest of a long sample goes on in the next row or piece).
TRUNCATING = ("none", "bfd")
MAX_TRUNCATED_FRACTION = 0.05  # api.Training.max_truncated_fraction's default


@dataclass
class TokenStats:
    samples: int
    tokens: int  # tokens in all samples (before truncation)
    trainable: int  # tokens that carry loss after truncation to maxLength
    too_long: int  # samples longer than maxLength (truncated, split or wrapped, by packing)
    shortest: int
    longest: int
    truncated_samples: int = 0  # samples cut at maxLength (packing none or bfd)
    truncated_tokens: int = 0  # tokens cut off those samples
    truncated_trainable: int = 0  # of them, tokens that would have carried loss


def check_tokens(tokenized: Any, max_length: int, packing: str, assistant_only: bool = False,
                 max_truncated_fraction: float = MAX_TRUNCATED_FRACTION) -> TokenStats:
    """Count what training sees and fail when it cannot train as asked:

    * for assistant-only conversations, a conversation without an assistant token (it would train
      nothing: fix or remove the row);
    * no token left to carry loss (prompts filling maxLength);
    * with packing ``none`` or ``bfd``, which truncate a sample at maxLength: more than
      ``max_truncated_fraction`` of the samples longer than that (``training.maxTruncatedFraction``;
      1 accepts any truncation). The error names the first rows and what would be cut; the fixes are
      a larger maxLength, shorter samples, or ``bfd_split`` packing, which splits long samples
      instead. ``wrapped`` and ``bfd_split`` truncate nothing."""
    truncates = packing in TRUNCATING
    samples = tokens = trainable = too_long = cut_tokens = cut_trainable = 0
    shortest, longest = 1 << 62, 0
    silent: list[int] = []
    cut_rows: list[int] = []
    for batch in tokenized.iter(batch_size=10_000):
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            total = len(ids)
            if assistant_only and all(label == -100 for label in labels):
                silent.append(samples)
            if total > max_length:
                too_long += 1
                if truncates:
                    cut_rows.append(samples)
                    cut_tokens += total - max_length
                    cut_trainable += sum(label != -100 for label in labels[max_length:])
            samples += 1
            tokens += total
            shortest, longest = min(shortest, total), max(longest, total)
            kept = labels[:max_length] if truncates else labels
            trainable += sum(label != -100 for label in kept)
    if silent and len(silent) == samples:
        raise InvalidDataset("the dataset has zero trainable tokens: no conversation has an assistant turn")
    if silent:
        rows = ", ".join(map(str, silent[:MAX_LISTED])) + (", ..." if len(silent) > MAX_LISTED else "")
        raise InvalidDataset(
            f"{len(silent)} of {samples} conversations have no assistant turn (training split rows {rows}): "
            "the loss covers assistant turns only, so they would train nothing; add the replies or remove the rows")
    if trainable == 0:
        raise InvalidDataset(f"the dataset has zero trainable tokens: every prompt fills training.maxLength="
                             f"{max_length} tokens, so no completion token is trained")
    truncated = len(cut_rows)
    if truncated > max_truncated_fraction * samples:
        fixes = ("raise training.maxLength, shorten the samples, or use training.packing bfd_split (splits long "
                 "samples into maxLength pieces, keeping every token)")
        if truncated == samples:
            raise InvalidDataset(
                f"all {samples} samples are longer than training.maxLength={max_length} tokens (shortest {shortest}): "
                f"they would all be cut; {fixes}")
        rows = ", ".join(map(str, cut_rows[:MAX_LISTED])) + (
            f" (and {truncated - MAX_LISTED} more)" if truncated > MAX_LISTED else "")
        raise InvalidDataset(
            f"{truncated} of {samples} samples ({truncated / samples:.1%}) are longer than training.maxLength="
            f"{max_length} tokens and would be truncated by packing {packing}, cutting {cut_tokens} of {tokens} "
            f"tokens ({cut_trainable} of them trained; longest sample {longest} tokens); training split rows {rows}. "
            f"That is more than training.maxTruncatedFraction={max_truncated_fraction:g}: {fixes}; or raise "
            "training.maxTruncatedFraction to accept the loss")
    if too_long:
        log.warning("%d of %d samples are longer than maxLength=%d and will be %s", too_long, samples, max_length,
                    {"wrapped": "continued in the next row", "bfd_split": "split into maxLength pieces"}.get(
                        packing, f"truncated ({cut_tokens} tokens cut, {cut_trainable} of them trained)"))
    return TokenStats(samples, tokens, trainable, too_long, shortest, longest, truncated, cut_tokens, cut_trainable)
