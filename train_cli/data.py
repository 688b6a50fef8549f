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
        size = synthetic.parse_source(config.data)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if size is not None:
        # Held-out rows are further train-split problems, never the test split the task evaluates.
        rows = synthetic.problems("train", size + config.eval_rows, config.seed)
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
        if builder == "json":
            _check_text(path, config.data)
        datasets_log = logging.getLogger("datasets")
        level = datasets_log.level
        datasets_log.setLevel(logging.CRITICAL)  # its log of a parse error would precede ours, less clearly
        try:
            splits = load_dataset(builder, data_files=str(path))
        except Exception as error:  # datasets raises many kinds for unreadable files
            raise ConfigError(f"--data {config.data}: cannot read it as {builder} ({_read_error(path, error)})") from None
        finally:
            datasets_log.setLevel(level)
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
    train = _drop_empty(splits["train"], config)
    if len(train) == 0:
        raise ConfigError(
            f"--data {config.data}: every row has an empty {config.prompt_field!r} and {config.response_field!r}; "
            "nothing to train on"
        )
    return train, None if held_out is None else _drop_empty(held_out, config)


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


def _read_error(path: Path, error: Exception) -> str:
    """Why datasets could not read ``path``: the first bad line of a JSONL file, else the root cause."""
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

    def tokens(self, indices: list[int], limit: int) -> list[list[int]]:
        """Token ids of the documents at ``indices`` (at most ``limit`` each); empty rows give []."""
        texts = [self.text(i) for i in indices]
        present = [t for t in texts if t is not None]
        encoded = iter(self.tokenizer(present, add_special_tokens=True).input_ids if present else [])
        eos = self.tokenizer.eos_token_id
        out = []
        for t in texts:
            ids = [] if t is None else list(next(encoded))
            if ids and eos is not None and ids[-1] != eos:
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
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
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
    generator = torch.Generator().manual_seed(seed * 7919 + 17)
    return torch.randperm(size, generator=generator)[:rows].tolist()
