"""Checkpoints that survive a crash at any moment, and the final HF export.

A checkpoint is written into a hidden temporary directory and renamed into place when complete, so
``OUTPUT_DIR/checkpoints/step-NNNNNNN`` either holds a whole checkpoint or does not exist. It holds
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


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


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
    """``weights``: the gathered state dict of a sharded model (None: the model's own)."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    staging = root / f".partial-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(staging)
        (staging / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        torch.save(state, staging / STATE_FILE)
        _fsync_dir(staging)
        if final.exists():  # the same step written again after a resume
            shutil.rmtree(final)
        staging.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
