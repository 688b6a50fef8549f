"""Checkpoints that survive a crash at any moment, and the final HF export.

A checkpoint is written into a hidden temporary directory and renamed into place when complete, so
``OUTPUT_DIR/checkpoints/step-NNNNNNN`` either holds a whole checkpoint or does not exist; an old one
is renamed to a hidden name before it is deleted, so a kill mid-deletion leaves no half of one
under a checkpoint's name either. ``remove_leftovers`` clears what a kill left behind. It holds
the student as an ordinary HF directory (safetensors, tokenizer, ``mtp`` block) plus
``trainer_state.pt`` (optimizer, scheduler, RNG states, data position, step), read back with
``torch.load(weights_only=True)``, and ``checkpoint_files.json``, the size of every other file.

``--resume`` takes the newest *intact* checkpoint (``resume_point``): every file the manifest lists
present with its size, the JSON and YAML files readable, the safetensors headers whole and the
trainer state loadable. A damaged newer one is named in a warning and moved aside to
``checkpoints/damaged-step-NNNNNNN`` (kept for inspection, never resumed from or counted).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from train_cli.config import ConfigError

STATE_FILE = "trainer_state.pt"
MANIFEST = "checkpoint_files.json"  # {"files": {name: size in bytes}} of every other file, written last
CONFIG_FILE = "train_config.yaml"
STATE_KEYS = ("step", "tokens_seen", "optimizer", "scheduler", "data", "rng")


class ResumeError(ConfigError):
    """No checkpoint to resume from (a user error: the message names the directory and why)."""


_NAME = re.compile(r"^step-(\d{7,})$")
_LEFTOVERS = (".partial-", ".stale-")  # hidden names of a write or a deletion that a kill cut short


def check_output_dir(output_dir: Path) -> None:
    """Refuse an ``--output-dir`` that cannot hold a run, before any work: a file, a path under a
    file, or a place where no directory can be made (probed by making and removing one)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir}: is a file; give a directory (a new one, or a run's to --resume)")
    parent = output_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--output-dir {output_dir}: {parent} is a file, so no directory can be made under it")
    try:
        probe = tempfile.mkdtemp(prefix=".mtp-write-check-", dir=parent)
    except OSError as error:
        raise ConfigError(
            f"--output-dir {output_dir}: cannot write in {parent} ({error.strerror or error}); give a writable directory"
        ) from None
    os.rmdir(probe)


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
    adapter: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` and delete all but the newest ``keep_last``. A complete one of
    the same step is kept as it is (a run resumes from its newest checkpoint, so it holds this very
    state). ``weights``: the gathered state dict of a sharded model (None: the model's own);
    ``adapter``: the ``save_adapter`` arguments of a gated-lora run (only the adapter is written)."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(output_dir, step)
    if not (final / STATE_FILE).exists():
        staging = root / f".partial-step-{step:07d}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            write_model(staging, model, tokenizer, weights, adapter)
            (staging / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            torch.save(state, staging / STATE_FILE)
            _write_manifest(staging)
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


def _write_manifest(directory: Path) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": sizes}, indent=1), encoding="utf-8")


def damage(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from without reading its trainer state (None: it looks
    intact): a file missing or of another size than recorded, an unreadable JSON/YAML file, a
    safetensors file whose header does not cover it. ``load_state`` is the last check."""
    manifest = checkpoint / MANIFEST
    if manifest.exists():
        try:
            expected = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError, OSError):
            return f"{MANIFEST} is unreadable"
    else:  # written before the manifest: the files every checkpoint has
        expected = dict.fromkeys(("config.json", CONFIG_FILE, STATE_FILE, "tokenizer_config.json"))
        if not any((checkpoint / n).exists() for n in ("model.safetensors", "model.safetensors.index.json")):
            return "model.safetensors is missing"
    for name, size in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return _unreadable_file(checkpoint)


def _unreadable_file(checkpoint: Path) -> str | None:
    from safetensors import safe_open

    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.name == CONFIG_FILE and not isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict):
                return f"{path.name} is not a mapping of settings"
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
        except Exception as error:  # noqa: BLE001  (json, yaml, safetensors and OS errors alike)
            return f"{path.name} is unreadable ({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__})"
    return None


def _state_or_damage(checkpoint: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        state = load_state(checkpoint)
    except Exception as error:  # noqa: BLE001  (torch.load raises many kinds for a cut or corrupt file)
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, f"{STATE_FILE} is unreadable ({text})"
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        return None, f"{STATE_FILE} lacks the trainer state ({', '.join(STATE_KEYS)})"
    return state, None


def intact_checkpoints(output_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The complete checkpoints newest first, split into those that look intact (``damage``) and the
    damaged ones with the reason; only the newest intact one matters to a resume."""
    good, bad = [], []
    for path in reversed(complete_checkpoints(output_dir)):
        reason = damage(path)
        if reason is None:
            good.append(path)
        else:
            bad.append((path, reason))
    return good, bad


def resume_point(output_dir: Path) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]]:
    """The newest intact checkpoint, its trainer state, and the damaged checkpoints newer than it
    (each with the reason). ``ResumeError`` when there is none to resume from."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(complete_checkpoints(output_dir)):
        reason = damage(path)
        if reason is None:
            state, reason = _state_or_damage(path)
            if state is not None:
                return path, state, damaged
        damaged.append((path, reason))
    raise _nothing_to_resume(output_dir, damaged)


def recorded_settings(output_dir: Path) -> tuple[dict[str, Any], Path]:
    """The settings a run recorded in its newest intact-looking checkpoint, and that file's path."""
    good, bad = intact_checkpoints(output_dir)
    if not good:
        raise _nothing_to_resume(output_dir, bad)
    path = good[0] / CONFIG_FILE
    return yaml.safe_load(path.read_text(encoding="utf-8")), path


def _nothing_to_resume(output_dir: Path, damaged: list[tuple[Path, str]]) -> ResumeError:
    if not damaged:
        return ResumeError(f"--resume: no complete checkpoint in {checkpoint_dir(output_dir)}")
    problems = "; ".join(f"{p.name}: {why}" for p, why in damaged)
    return ResumeError(f"--resume: no intact checkpoint in {checkpoint_dir(output_dir)} ({problems}); start a new run")


def move_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the checkpoints' names (kept for inspection)."""
    target = checkpoint.with_name(f"damaged-{checkpoint.name}")
    if target.exists():
        target = checkpoint.with_name(f"damaged-{checkpoint.name}-{os.getpid()}")
    checkpoint.rename(target)
    return target


def write_model(
    directory: Path, model: Any, tokenizer: Any, weights: dict[str, Any] | None, adapter: dict[str, Any] | None
) -> None:
    """The model files of a checkpoint or export: an HF model directory, or (``adapter``: the
    ``save_adapter`` arguments) a gated adapter checkpoint."""
    if adapter is not None:
        from mtp_plugins.adapter_checkpoint import save_adapter

        save_adapter(directory, model, tokenizer, state_dict=weights, **adapter)
        return
    model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(directory)


#: The files whose presence makes a directory loadable (an HF model, a gated adapter): an export
#: removes them first and moves them in last.
MARKERS = ("config.json", "mtp_adapter.json")


def export_model(
    output_dir: Path, model: Any, tokenizer: Any, weights: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
    adapter: dict[str, Any] | None = None,
) -> None:
    """Write the final HF directory (or gated adapter, ``adapter``) at ``output_dir`` itself (so
    ``pretrained=OUTPUT_DIR`` works), with the run's settings as ``train_config.yaml`` (``mtp-sweep``
    reads the source model there).

    Files are written to a staging directory and moved in one by one, ``config.json`` and
    ``mtp_adapter.json`` last: until they arrive, the directory is not loadable, never half a model
    that loads."""
    staging = output_dir / ".export-partial"
    shutil.rmtree(staging, ignore_errors=True)
    write_model(staging, model, tokenizer, weights, adapter)
    if config is not None:
        (staging / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    _fsync_dir(staging)
    for marker in MARKERS:
        (output_dir / marker).unlink(missing_ok=True)
    files = sorted(staging.iterdir(), key=lambda p: p.name in MARKERS)
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
