"""Checkpoints that survive a crash at any moment, and the final HF export.

A checkpoint is written into a hidden temporary directory and renamed into place when complete, so
``OUTPUT_DIR/checkpoints/step-NNNNNNN`` either holds a whole checkpoint or does not exist; an old one
is renamed to a hidden name before it is deleted, so a kill mid-deletion leaves no half of one
under a checkpoint's name either. ``remove_leftovers`` clears what a kill left behind. It holds
the student as an ordinary HF directory (safetensors, tokenizer, ``mtp`` block) plus
``trainer_state.pt`` (optimizer, scheduler, RNG states, data position, step), read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^step-(\d{7,})$")
_LEFTOVERS = (".partial-", ".stale-")  # hidden names of a write or a deletion that a kill cut short


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return checkpoint_dir(output_dir) / f"step-{step:07d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted writes are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
    weights: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` and delete all but the newest ``keep_last``. A complete one of
    the same step is kept as it is (a run resumes from its newest checkpoint, so it holds this very
    state). ``weights``: the gathered state dict of a sharded model (None: the model's own)."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(output_dir, step)
    if not (final / STATE_FILE).exists():
        staging = root / f".partial-step-{step:07d}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            model.save_pretrained(staging, safe_serialization=True, state_dict=weights)
            tokenizer.save_pretrained(staging)
            (staging / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            torch.save(state, staging / STATE_FILE)
            _fsync_dir(staging)
            _remove(final)  # a directory of that name without a state file is not a checkpoint
            staging.rename(final)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    for old in complete_checkpoints(output_dir)[:-keep_last]:
        _remove(old)
    return final


def remove_leftovers(output_dir: Path) -> None:
    """Delete the hidden temporary directories of checkpoint writes and deletions that a kill cut
    short (they are never taken for checkpoints)."""
    root = checkpoint_dir(output_dir)
    for path in root.iterdir() if root.is_dir() else []:
        if path.name.startswith(_LEFTOVERS):
            shutil.rmtree(path, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: first renamed to a hidden name (one atomic step), then removed."""
    if path.exists():
        stale = path.with_name(f".stale-{path.name}-{os.getpid()}")
        shutil.rmtree(stale, ignore_errors=True)
        path.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)


def export_model(
    output_dir: Path, model: Any, tokenizer: Any, weights: dict[str, Any] | None = None, config: dict[str, Any] | None = None
) -> None:
    """Write the final HF directory at ``output_dir`` itself (so ``pretrained=OUTPUT_DIR`` works),
    with the run's settings as ``train_config.yaml`` (``mtp-sweep`` reads the source model there).

    Files are written to a staging directory and moved in one by one, ``config.json`` last: until
    it arrives, the directory is not loadable, never half a model that loads."""
    staging = output_dir / ".export-partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(staging)
    if config is not None:
        (staging / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    _fsync_dir(staging)
    (output_dir / "config.json").unlink(missing_ok=True)
    files = sorted(staging.iterdir(), key=lambda p: p.name == "config.json")
    for f in files:
        os.replace(f, output_dir / f.name)
    staging.rmdir()
    _fsync_dir(output_dir)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file written line by line, up to the first line a crash cut short
    (none if the file does not exist)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
