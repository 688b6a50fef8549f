"""Built-in hook plugins of the trainer, registered through the ``mtp_plugins.hooks`` entry points
exactly like a third party's: the JSONL metrics file (always) and the console progress display."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mtp_plugins.hooks import hookimpl


class MetricsFile:
    """``OUTPUT_DIR/metrics.jsonl``: one line per optimizer step (``"kind": "train"``) and per
    validation (``"kind": "eval"``). On resume, lines past the resumed step are dropped."""

    def __init__(self) -> None:
        self.path: Path | None = None

    @hookimpl
    def mtp_train_start(self, config: dict[str, Any], output_dir: str, start_step: int, total_steps: int | None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        kept = []
        if start_step > 0 and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a crash ends the usable file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _append(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    @hookimpl
    def mtp_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        self._append({"kind": "train", **metrics})

    @hookimpl
    def mtp_validation_end(self, step: int, metrics: dict[str, Any]) -> None:
        self._append({"kind": "eval", **metrics})


class Progress:
    """A progress bar with loss, tokens/s and ETA on a terminal; a line per 10% of the run elsewhere."""

    def __init__(self) -> None:
        self.progress = None
        self.task = None
        self.total: int | None = None

    @hookimpl
    def mtp_train_start(self, config: dict[str, Any], output_dir: str, start_step: int, total_steps: int | None) -> None:
        from rich.console import Console

        self.total = total_steps
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
            self.console.print(f"mtp-train: {config['model']} -> {output_dir}, steps {start_step}..{total_steps}")

    @hookimpl
    def mtp_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        status = f"loss {metrics['loss']:.4f}  k {metrics['k']}  {metrics['tokens_per_s']:.0f} tok/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)
        elif self.total and (step == self.total or step % max(1, self.total // 10) == 0):
            self.console.print(f"step {step}/{self.total}  {status}")

    @hookimpl
    def mtp_validation_end(self, step: int, metrics: dict[str, Any]) -> None:
        agree = " ".join(f"{a:.2f}" for a in metrics["agreement"])
        line = f"eval @ {step}: loss {metrics['loss']:.4f}  agreement by offset [{agree}]  Eff. k@0.9 {metrics['eff_k_tau_0.9']:.2f}"
        (self.progress.console if self.progress is not None else self.console).print(line)

    @hookimpl
    def mtp_train_end(self, summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
        print(f"mtp-train: model written to {summary['output_dir']}", file=sys.stderr)


metrics_file = MetricsFile()
progress = Progress()
