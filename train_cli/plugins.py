"""Built-in hook plugins, registered through the ``mtp_plugins.hooks`` entry points exactly like a
third party's: the JSONL metrics file and the console progress display (always on), and the
Weights & Biases and TensorBoard loggers (opt-in: ``--report-to wandb,tensorboard``; each needs its
package installed and never picks an entity or project of its own)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from mtp_plugins.files import append_line, write_atomic
from mtp_plugins.hooks import HookPluginError, hookimpl


def json_line(record: dict[str, Any]) -> str:
    """``record`` as one line of strict JSON: a NaN or infinite number is written as null (a bare
    ``NaN`` is not JSON, and readers of the file would reject the line)."""
    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(record), allow_nan=False)


class MetricsFile:
    """``OUTPUT_DIR/metrics.jsonl``: one line per optimizer step (``"kind": "train"``) and per
    validation (``"kind": "eval"``), strict JSON (a NaN/inf value is null). On resume, lines past the
    resumed step (and a line a kill cut short) are dropped, in one atomic rewrite; each line is
    appended by one system call."""

    def __init__(self) -> None:
        self.path: Path | None = None

    @hookimpl
    def mtp_train_start(self, config: dict[str, Any], output_dir: str, start_step: int, total_steps: int | None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        from train_cli.checkpoints import complete_jsonl

        kept = [r for r in complete_jsonl(self.path) if r.get("step", 0) <= start_step] if start_step > 0 else []
        write_atomic(self.path, "".join(json_line(r) + "\n" for r in kept))

    def _append(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            append_line(self.path, json_line(record))

    @hookimpl
    def mtp_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        self._append({"kind": "train", **metrics})

    @hookimpl
    def mtp_validation_end(self, step: int, metrics: dict[str, Any]) -> None:
        self._append({"kind": "eval", **metrics})


class Progress:
    """A progress bar with loss, tokens/s and ETA on a terminal; elsewhere (a log, a pipe) a whole
    line per 10% of the run, with the elapsed time and an ETA, never wrapped."""

    def __init__(self) -> None:
        self.progress = None
        self.task = None
        self.total: int | None = None
        self.max_tokens: int | None = None
        self.reference: tuple[float, float] | None = None  # (time, share of the run done) the ETA counts from

    @hookimpl
    def mtp_train_start(self, config: dict[str, Any], output_dir: str, start_step: int, total_steps: int | None) -> None:
        from rich.console import Console

        self.total, self.max_tokens = total_steps, config.get("max_tokens")
        self.reference = (time.monotonic(), start_step / total_steps) if total_steps else None
        self.console = Console(stderr=True)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("mtp-train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(), console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()
        else:
            budget = f"steps {start_step}..{total_steps}" if total_steps is not None else f"until {self.max_tokens} tokens"
            _line(f"mtp-train: {config['model']} -> {output_dir}, {budget}")

    @hookimpl
    def mtp_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        status = f"loss {metrics['loss']:.4f}  k {metrics['k']}  {metrics['tokens_per_s']:.0f} tok/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)
            return
        if self.total:  # a line per 10% of the steps
            done, where = step / self.total, f"step {step}/{self.total}"
            due = step == self.total or step % max(1, self.total // 10) == 0
        elif self.max_tokens:  # a line per 10% of the token budget
            seen = metrics.get("tokens_seen", 0)
            done, where = min(1.0, seen / self.max_tokens), f"step {step}, tokens {seen}/{self.max_tokens}"
            before = (seen - metrics.get("tokens", 0)) / self.max_tokens
            due = done >= 1.0 or math.floor(done * 10) > math.floor(before * 10)
        else:
            return
        if self.reference is None:  # the first step seen: the ETA counts from here
            self.reference = (time.monotonic(), done)
        if due:
            now = time.monotonic()
            elapsed, share = now - self.reference[0], done - self.reference[1]
            eta = _clock(elapsed * (1.0 - done) / share) if share > 0 else "?"
            _line(f"{where}  {status}  elapsed {_clock(elapsed)}  ETA {eta}")

    @hookimpl
    def mtp_validation_end(self, step: int, metrics: dict[str, Any]) -> None:
        from train_cli.trainer import EST_EFF_K, TAU

        agree = " ".join(f"{a:.2f}" for a in metrics["agreement"])
        line = (f"eval @ {step}: loss {metrics['loss']:.4f}  agreement by offset [{agree}]  "
                f"est. Eff. k@{TAU} (one pass) {metrics[EST_EFF_K]:.2f}")
        if self.progress is not None:
            self.progress.console.print(line, soft_wrap=True)
        else:
            _line(line)

    @hookimpl
    def mtp_train_end(self, summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
        print(f"mtp-train: model written to {summary['output_dir']}", file=sys.stderr)


def _line(text: str) -> None:
    """One whole line on stderr (a log or a pipe: no wrapping at any width, flushed)."""
    print(text, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a metrics dict, lists spread per index (``agreement`` -> ``agreement/1``, ...)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[prefix + key] = float(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            out.update({f"{prefix}{key}/{i + 1}": float(v) for i, v in enumerate(value)})
    return out


def _require(module: str, plugin: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise HookPluginError(
            f"--report-to {plugin}: the {module.split('.')[0]} package is not installed (pip install {plugin}); "
            f"leave {plugin} out of --report-to to train without it"
        ) from None


class WandbLogger:
    """``--report-to wandb``: log train/eval metrics and the lm-eval decode statistics to Weights & Biases.

    The run's entity and project are wandb's own settings (``WANDB_ENTITY``, ``WANDB_PROJECT``, or
    ``wandb login`` defaults); this plugin never chooses one. The run lives in ``OUTPUT_DIR/wandb``.
    """

    opt_in = True

    def __init__(self) -> None:
        self.run: Any = None

    def require(self) -> None:
        _require("wandb", "wandb")

    @hookimpl
    def mtp_train_start(self, config: dict[str, Any], output_dir: str, start_step: int, total_steps: int | None) -> None:
        wandb = _require("wandb", "wandb")
        self.run = wandb.init(config=config, dir=output_dir, name=Path(output_dir).name, job_type="train", resume="allow")

    @hookimpl
    def mtp_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(scalars(metrics, "train/"), step=step)

    @hookimpl
    def mtp_validation_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(scalars(metrics, "eval/"), step=step)

    @hookimpl
    def mtp_train_end(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary["output_dir"] = summary["output_dir"]
            self.run.finish()
            self.run = None

    @hookimpl
    def mtp_generation_finished(self, summary: dict[str, Any], samples_path: str | None) -> None:
        wandb = _require("wandb", "wandb")
        run = wandb.run or wandb.init(job_type="eval", config={"mtp": summary})
        run.log(scalars(summary, "mtp/"))


class TensorBoardLogger:
    """``--report-to tensorboard``: scalars for TensorBoard in ``OUTPUT_DIR/tensorboard`` (needs the
    ``tensorboard`` package); after an lm-eval run, beside its per-sample statistics file."""

    opt_in = True

    def __init__(self) -> None:
        self.writer: Any = None

    def require(self) -> None:
        _require("tensorboard", "tensorboard")

    def _writer(self, log_dir: Path) -> Any:
        self.require()
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(log_dir))

    @hookimpl
    def mtp_train_start(self, config: dict[str, Any], output_dir: str, start_step: int, total_steps: int | None) -> None:
        self.writer = self._writer(Path(output_dir) / "tensorboard")
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def _log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    @hookimpl
    def mtp_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is not None:
            self._log(scalars(metrics, "train/"), step)

    @hookimpl
    def mtp_validation_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is not None:
            self._log(scalars(metrics, "eval/"), step)

    @hookimpl
    def mtp_train_end(self, summary: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @hookimpl
    def mtp_generation_finished(self, summary: dict[str, Any], samples_path: str | None) -> None:
        if samples_path is None:
            print("tensorboard: no --output_path or stats_path, so no place to write the decode statistics", file=sys.stderr)
            return
        writer = self._writer(Path(samples_path).parent / "tensorboard")
        for tag, value in scalars(summary, "mtp/").items():
            writer.add_scalar(tag, value, 0)
        writer.close()


metrics_file = MetricsFile()
progress = Progress()
wandb_logger = WandbLogger()
tensorboard_logger = TensorBoardLogger()
