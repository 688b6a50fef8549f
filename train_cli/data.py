"""Training data: rows from ``datasets`` (a hub id or a local file), templated and tokenized, served
in a seeded order whose position is part of every checkpoint."""

from __future__ import annotations

import codecs
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train_cli.config import ConfigError, TrainConfig

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
EVAL_SPLITS = ("validation", "test", "eval")


def load_rows(config: TrainConfig) -> tuple[Any, Any | None]:
    """The train rows and, where the data has one, a held-out split (else None)."""
    from datasets import Dataset, DatasetDict, load_dataset

    from mtp_plugins import synthetic

    try:
        source = synthetic.parse_source(config.data)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if source is not None:
        size, level = source
        # Held-out rows are further train-split problems, never the test split the task evaluates.
        rows = synthetic.problems("train", size + config.eval_rows, config.seed, level)
        _check_fields(config, list(rows[0]))
        return Dataset.from_list(rows[:size]), Dataset.from_list(rows[size:]) if config.eval_rows else None

    path = Path(config.data)
    if path.is_dir():  # a local dataset directory reads like a hub name
        path = None
    if path is not None and (path.suffix in LOCAL_FORMATS or path.exists()):
        if not path.is_file():
            raise ConfigError(f"--data {config.data}: no such file")
        builder = LOCAL_FORMATS.get(path.suffix)
        if builder is None:
            raise ConfigError(f"--data {config.data}: unsupported file type; use one of {', '.join(LOCAL_FORMATS)}")
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as error:
            raise ConfigError(f"--data {config.data}: cannot read it ({error.strerror or error}); check its permissions") from None
        if builder == "json":
            _check_text(path, config.data)
        splits = _json_columns(path, config.data) if path.suffix == ".json" else None
        if splits is None:
            splits = _load_file(path, builder, config)
    else:
        try:
            splits = load_dataset(config.data)
        except Exception as error:
            raise ConfigError(
                f"--data {config.data}: not a local file or dataset directory, and not loadable from the hub "
                f"({type(error).__name__}: {error})"
            ) from None
    if not isinstance(splits, DatasetDict) or "train" not in splits:
        raise ConfigError(f"--data {config.data}: expected a 'train' split, found {list(splits)}")
    held_out = next((splits[name] for name in EVAL_SPLITS if name in splits), None)
    _check_fields(config, splits["train"].column_names)
    for rows in (splits["train"], held_out):
        if rows is not None:
            _check_text_fields(rows, config)
    train = _drop_empty(splits["train"], config)
    if len(train) == 0:
        raise ConfigError(
            f"--data {config.data}: every row has an empty {config.prompt_field!r} and {config.response_field!r}; "
            "nothing to train on"
        )
    return train, None if held_out is None else _drop_empty(held_out, config)


def _load_file(path: Path, builder: str, config: TrainConfig) -> Any:
    from datasets import load_dataset

    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)  # its log of a parse error would precede ours, less clearly
    try:
        return load_dataset(builder, data_files=str(path))
    except Exception as error:  # datasets raises many kinds for unreadable files
        fields = (config.prompt_field, config.response_field)
        raise ConfigError(f"--data {config.data}: cannot read it as {builder} ({_read_error(path, error, fields)})") from None
    finally:
        datasets_log.setLevel(level)


def _json_columns(path: Path, name: str) -> Any | None:
    """A ``.json`` file holding one object of columns (``{"question": [...], "answer": [...]}``) as
    rows (datasets would read it as one row of lists); None for anything else (a list of rows, or
    JSON Lines), which ``load_dataset`` reads. Another object is refused."""
    from datasets import Dataset, DatasetDict

    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if not head.startswith("{"):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one object per line: JSON Lines in a .json file
            return None
        raise ConfigError(f"--data {name}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    lengths = {key: len(value) for key, value in data.items() if isinstance(value, list)}
    if not data or len(lengths) < len(data) or len(set(lengths.values())) > 1:
        found = ", ".join(f"{k!r}: {type(v).__name__}" + (f" of {len(v)}" if isinstance(v, list) else "") for k, v in data.items())
        raise ConfigError(
            f"--data {name}: a JSON object must hold columns, each field a list of values of one length "
            f"(or give a list of rows, or JSON Lines); found {{{found}}}"
        )
    return DatasetDict({"train": Dataset.from_dict(data)})


def _check_text_fields(rows: Any, config: TrainConfig) -> None:
    """The prompt and response fields hold text (numbers read as text too); a list or an object in
    one is refused, naming the first row that holds one (it would be trained on as its repr)."""
    from datasets import Value

    for field in (config.prompt_field, config.response_field):
        feature = rows.features[field]
        if isinstance(feature, Value):  # strings, numbers, bools, nulls: one kind per column
            continue
        values = rows[field]  # lists, structs, or mixed (datasets' Json feature): find the first non-text one
        row = next((i for i, v in enumerate(values) if isinstance(v, (list, tuple, dict))), None)
        if row is None:
            continue
        kind = "an object" if isinstance(values[row], dict) else "a list"
        flag = "--prompt-field" if field == config.prompt_field else "--response-field"
        raise ConfigError(
            f"--data {config.data}: row {row + 1}, field {field!r} ({flag}) holds {kind}, not text; "
            "each row's prompt and response must be text"
        )


def _check_text(path: Path, name: str) -> None:
    """A JSON(L) file must hold some text, all of it UTF-8 (read in chunks; says on which line not)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    blank, line = True, 1
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                bad = error.object[error.start : error.start + 1].hex()
                line += error.object[: error.start].count(b"\n")
                raise ConfigError(f"--data {name}: line {line} is not UTF-8 text (byte 0x{bad}); save the file as UTF-8") from None
            if not chunk:
                break
            blank = blank and not text.strip()
            line += chunk.count(b"\n")
    if blank:
        raise ConfigError(f"--data {name}: the file is empty (no rows)")


def _read_error(path: Path, error: Exception, fields: tuple[str, ...] = ()) -> str:
    """Why datasets could not read ``path``: the first bad line of a JSONL file (not JSON, not an
    object, a list or object in a text field), else the root cause."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip())
                except json.JSONDecodeError as bad:
                    return f"line {number} is not valid JSON: {bad.msg} at column {bad.colno}"
                if not isinstance(row, dict):
                    return f"line {number} is a JSON {type(row).__name__}, not an object of fields"
                for field in fields:
                    if isinstance(row.get(field), (list, dict)):
                        kind = "an object" if isinstance(row[field], dict) else "a list"
                        return f"line {number}, field {field!r} holds {kind}, not text"
    while error.__cause__ is not None:  # datasets wraps the parser's own error
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _drop_empty(rows: Any, config: TrainConfig) -> Any:
    """The rows whose prompt or response holds some text (says how many were left out)."""
    fields = (config.prompt_field, config.response_field)

    def keep(batch: dict[str, list]) -> list[bool]:
        return [any(v is not None and str(v).strip() for v in values) for values in zip(*(batch[f] for f in fields))]

    kept = rows.filter(keep, batched=True, keep_in_memory=True)
    if 0 < len(kept) < len(rows):
        print(f"mtp-train: --data {config.data}: left out {len(rows) - len(kept)} rows with an empty prompt and response",
              file=sys.stderr)
    return kept


def _check_fields(config: TrainConfig, columns: list[str]) -> None:
    for name in (config.prompt_field, config.response_field):
        if name not in columns:
            flag = "--prompt-field" if name == config.prompt_field else "--response-field"
            raise ConfigError(f"{flag} {name!r}: no such field in {config.data}; its fields are {', '.join(columns)}")


#: What a few-shot prompt puts between worked examples (and after the last, before the question).
SHOT_SEPARATOR = "\n\n"


class Documents:
    """Templated, tokenized documents (each ends with EOS)."""

    def __init__(self, rows: Any, tokenizer: Any, config: TrainConfig) -> None:
        self.rows = rows
        self.tokenizer = tokenizer
        self.config = config
        if config.template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"--template chat: the tokenizer of {config.model} has no chat template; use --template plain")

    def __len__(self) -> int:
        return len(self.rows)

    def text(self, index: int) -> str | None:
        row = self.rows[int(index)]
        prompt, response = row[self.config.prompt_field], row[self.config.response_field]
        prompt = "" if prompt is None else str(prompt)
        response = "" if response is None else str(response)
        if not prompt.strip() and not response.strip():
            return None
        if self.config.template == "chat":
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        if self.config.template == "completion":
            return prompt + response
        return f"{prompt}\n\n{response}"

    def few_shot(self, indices: Any) -> str:
        """The documents at ``indices`` as a few-shot prompt shows worked examples: each text followed
        by a blank line (empty rows left out); "" for none."""
        texts = (self.text(i) for i in indices)
        return "".join(t + SHOT_SEPARATOR for t in texts if t is not None)

    def tokens(self, indices: list[int], limit: int, special_tokens: bool = True,
               after: list[str] | None = None) -> list[list[int]]:
        """Token ids of the documents at ``indices`` (at most ``limit`` each); empty rows give [].
        ``special_tokens=False``: without the tokenizer's leading special tokens (a document that
        follows a context, which has them). ``after``: per document, text that follows it (tokenized
        with it) instead of EOS."""
        texts = [self.text(i) for i in indices]
        if after is not None:
            texts = [t if t is None else t + a for t, a in zip(texts, after, strict=True)]
        present = [t for t in texts if t is not None]
        encoded = iter(self.tokenizer(present, add_special_tokens=special_tokens).input_ids if present else [])
        eos = self.tokenizer.eos_token_id
        out = []
        for t in texts:
            ids = [] if t is None else list(next(encoded))
            if ids and after is None and eos is not None and ids[-1] != eos:
                ids.append(eos)
            out.append(ids[:limit])
        return out


@dataclass
class DataPosition:
    """Where the sampler is: resumed exactly from a checkpoint."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


class Sampler:
    """Row indices in a fresh seeded permutation each epoch, skipping held-out rows."""

    def __init__(self, size: int, seed: int, exclude: set[int] | None = None, position: DataPosition | None = None) -> None:
        self.pool = torch.tensor([i for i in range(size) if not exclude or i not in exclude])
        if len(self.pool) == 0:
            raise ConfigError("no training rows left (all rows are held out or empty)")
        self.seed = seed
        self.position = position or DataPosition()

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)  # torch's seed range
        return self.pool[torch.randperm(len(self.pool), generator=generator)]

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._order(self.position.epoch)
            step = min(n - len(out), len(order) - self.position.index)
            out += order[self.position.index : self.position.index + step].tolist()
            self.position.index += step
            if self.position.index >= len(order):
                self.position = DataPosition(self.position.epoch + 1, 0)
        return out


def held_out_indices(size: int, rows: int, seed: int) -> list[int]:
    """Rows kept out of training when the data has no validation split (seeded, stable)."""
    rows = min(rows, max(0, size - 1))
    generator = torch.Generator().manual_seed((seed * 7919 + 17) % 2**64)
    return torch.randperm(size, generator=generator)[:rows].tolist()
