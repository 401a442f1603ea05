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
"""

from __future__ import annotations

import json
import logging
import os
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import api, contract
from kubetune_trainer.runtime import InvalidDataset
from kubetune_trainer.storage import Store, is_s3, join

log = logging.getLogger("kubetune.data")

MAX_LISTED = 5  # problems named in one error message
MISSING = object()  # a JSON line without the key (as opposed to null)
EXTENSIONS = {"jsonl": (".jsonl", ".json", ".jsonl.gz"), "parquet": (".parquet",)}
ROLES = ("system", "developer", "user", "assistant", "tool")
# Optional string keys a message keeps (besides role, content and tool_calls).
MESSAGE_TEXT_KEYS = ("name", "tool_call_id", "reasoning_content", "thinking")


@dataclass
class RawSplit:
    """Rows of one split as columns; ``get`` returns one column as Python values."""

    name: str
    columns: list[str]
    num_rows: int
    get: Callable[[str], list[Any]]


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
    train = format_split(train_raw, spec)
    evaluation = None
    if spec.eval is not None and spec.eval.split is not None:
        evaluation = format_split(load_raw(spec, spec.eval.split, store, work_dir), spec)
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
        names = store.list(spec.uri)
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


def load_files(spec: api.Dataset, split: str, store: Store, work_dir: Path) -> RawSplit:
    """JSONL or Parquet files."""
    files = _fetch_files(spec, split, store, work_dir)
    if spec.source == "jsonl":
        rows: list[dict[str, Any]] = []
        for path in files:
            rows.extend(read_jsonl(path))
        columns = list(dict.fromkeys(key for row in rows for key in row))
        return RawSplit(split, columns, len(rows), lambda c: [row.get(c, MISSING) for row in rows])
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        tables = [pq.read_table(path) for path in files]
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowException, OSError) as err:
        raise InvalidDataset(f"cannot read the Parquet data of {spec.uri}: {err}") from err
    return RawSplit(split, table.column_names, table.num_rows, lambda c: table.column(c).to_pylist())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line (blank lines skipped); a bad line is named by its number."""
    opener: Any = open
    if path.name.endswith(".gz"):
        import gzip

        opener = gzip.open
    rows = []
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
            rows.append(row)
    return rows


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
            loaded = datasets.load_dataset(spec.uri, token=token)
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
    return RawSplit(split, list(ds.column_names), len(ds), lambda c: list(ds[c]))


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
    return RawSplit(split, columns, len(ds), lambda c: [_plain(v) for v in ds[c][:]])  # type: ignore[union-attr]


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


def string_column(raw: RawSplit, column: str) -> list[str]:
    """A column whose every value must be a string; the first bad rows are named."""
    values = raw.get(column)
    problems: list[str] = []
    bad = 0
    for row, value in enumerate(values):
        if not isinstance(value, str):
            bad += 1
            if len(problems) < MAX_LISTED:
                problems.append(f"row {row} is {_describe(value)}")
    _raise_problems(problems, bad, f"column {column!r} must hold strings")
    return values


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


def format_rows(raw: RawSplit, spec: api.Dataset) -> dict[str, list[Any]]:
    """Check the rows and build TRL's columns (see the module docstring)."""
    check_columns(raw, spec)
    if spec.format == "text":
        return {"text": string_column(raw, spec.text_field)}
    if spec.format == "promptCompletion":
        return {"prompt": string_column(raw, spec.prompt_field),
                "completion": string_column(raw, spec.completion_field)}
    if spec.format == "template":
        return {"text": template_texts(raw, spec)}
    return conversation_columns(raw, spec)


def template_texts(raw: RawSplit, spec: api.Dataset) -> list[str]:
    """``dataset.template`` applied to every row.

    Rows whose template fields are missing or null are named in an :class:`InvalidDataset`, and so
    are rows whose LAST field (the template's answer: what the row teaches, as the completion of
    ``promptCompletion``) is an empty or blank string: such a row renders to the bare template around
    its prompt and would teach an empty answer. They fail rather than being dropped (as an empty
    ``text`` is) because an empty value in a named column is the same gap in the data as a null one,
    usually from the same export or a wrong column, and a job that trains on silently fewer rows
    hides it. Other fields may be empty: optional parts of a prompt, such as Alpaca's ``input``."""
    template = spec.template or ""
    fields = template_fields(template)
    columns = {field: raw.get(field) for field in fields}
    answer = fields[-1] if fields else None
    problems: list[str] = []
    blank: list[int] = []
    texts: list[str] = []
    bad = 0
    for row in range(raw.num_rows):
        values = {field: columns[field][row] for field in fields}
        wrong = [f"{field!r} is {_describe(v)}" for field, v in values.items()
                 if v is MISSING or v is None or isinstance(v, bytes)]
        if wrong:
            bad += 1
            if len(problems) < MAX_LISTED:
                problems.append(f"row {row}: " + ", ".join(wrong))
            continue
        if answer is not None and isinstance(values[answer], str) and not values[answer].strip():
            blank.append(row)
            continue
        try:
            texts.append(template.format(**values))
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
            raise InvalidDataset(f"dataset.template cannot be applied to row {row}: "
                                 f"{type(err).__name__}: {err}") from err
    _raise_problems(problems, bad, "dataset.template fields must have values")
    if blank:
        rows = ", ".join(map(str, blank[:MAX_LISTED]))
        more = f" (and {len(blank) - MAX_LISTED} more)" if len(blank) > MAX_LISTED else ""
        raise InvalidDataset(
            f"{len(blank)} of {raw.num_rows} rows have an empty {answer!r}, the last field of dataset.template "
            f"(what each row teaches), and would train on the bare template: rows {rows}{more}; "
            f"fill the {answer!r} values or remove these rows")
    return texts


def conversation_columns(raw: RawSplit, spec: api.Dataset) -> dict[str, list[Any]]:
    """The ``messages`` column (and ``tools`` when the data has ``dataset.toolsField``), each row a
    JSON string: tool calls and tool schemas differ from row to row, which Arrow would merge into one
    struct type (adding null keys) or refuse; :func:`_tokenize_batch` reads them back."""
    conversations: list[str] = []
    problems: list[str] = []
    bad = 0
    for row, value in enumerate(raw.get(spec.messages_field)):
        checked = check_messages(value, row)
        if isinstance(checked, str):
            bad += 1
            if len(problems) < MAX_LISTED:
                problems.append(checked)
        else:
            conversations.append(json.dumps(checked, ensure_ascii=False))
    _raise_problems(problems, bad, f"column {spec.messages_field!r} must hold conversations")
    if spec.tools_field not in raw.columns:
        return {"messages": conversations}
    tools: list[str | None] = []
    for row, value in enumerate(raw.get(spec.tools_field)):
        checked_tools = check_tools(value, row)
        if isinstance(checked_tools, str):
            bad += 1
            if len(problems) < MAX_LISTED:
                problems.append(checked_tools)
        else:
            tools.append(None if checked_tools is None else json.dumps(checked_tools, ensure_ascii=False))
    _raise_problems(problems, bad, f"column {spec.tools_field!r} (dataset.toolsField) must hold lists of tools")
    if all(t is None for t in tools):
        return {"messages": conversations}
    return {"messages": conversations, "tools": tools}


def drop_empty(columns: dict[str, list[Any]], split: str) -> dict[str, list[Any]]:
    """Rows with nothing to learn from (empty text or completion) are dropped, and counted in the log."""
    key = "text" if "text" in columns else "completion" if "completion" in columns else None
    if key is None:
        return columns
    keep = [i for i, value in enumerate(columns[key]) if value.strip()]
    if len(keep) < len(columns[key]):
        log.warning("split %s: dropped %d rows whose %s is empty", split, len(columns[key]) - len(keep), key)
        columns = {name: [values[i] for i in keep] for name, values in columns.items()}
    return columns


def format_split(raw: RawSplit, spec: api.Dataset) -> Any:
    """A ``datasets.Dataset`` with TRL's columns for one split."""
    import datasets

    columns = drop_empty(format_rows(raw, spec), raw.name)
    if not next(iter(columns.values())):
        raise InvalidDataset(f"the dataset {spec.uri} (split {raw.name!r}) has no non-empty samples")
    return datasets.Dataset.from_dict(columns)


# ----------------------------------------------------------------------------------------------
# Tokenization (once, batched) and the token-level checks
# ----------------------------------------------------------------------------------------------

TOKENIZE_BATCH = 500


def _labelled(ids: list[int], mask: list[int] | None) -> list[int]:
    return list(ids) if mask is None else [t if m else -100 for t, m in zip(ids, mask, strict=True)]


def _tokenize_batch(batch: dict[str, list[Any]], indices: list[int], tokenizer: Any, assistant_only: bool,
                    chat_template: str | None) -> dict[str, list[Any]]:
    """TRL's per-sample tokenization (``SFTTrainer._prepare_dataset``), for a batch at once.

    text: text + EOS; prompt/completion: prompt + completion + EOS, loss on the tokens after the
    longest common prefix of the tokenized prompt and the tokenized whole; messages: the chat
    template (with the row's ``tools``, as TRL passes them), loss on the assistant tokens
    (``{% generation %}``) or on everything. A conversation the template cannot render is named by
    its row (``indices``) in an InvalidDataset."""
    eos = tokenizer.eos_token or ""
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


def tokenize(ds: Any, tokenizer: Any, assistant_only: bool = False, chat_template: str | None = None,
             workers: int = 1) -> Any:
    """The split as TRL's pre-tokenized dataset: ``input_ids`` and ``labels`` (-100 where no loss).

    SFTTrainer uses such a dataset as it is (no second tokenization, no label pass) and only packs
    it, so the check below counts exactly the tokens that are trained. Batched: the Rust tokenizer
    encodes a whole batch on all the CPUs' threads, so one process is the default; ``workers``
    processes measured slower (docs/benchmarks.md, Data preparation)."""
    return ds.map(_tokenize_batch, batched=True, batch_size=TOKENIZE_BATCH, with_indices=True,
                  num_proc=workers if workers > 1 else None, remove_columns=ds.column_names,
                  desc="Tokenizing" if workers > 1 else None,
                  fn_kwargs={"tokenizer": tokenizer, "assistant_only": assistant_only,
                             "chat_template": chat_template})


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
