"""MTP statistics of an lm-eval run: one record per generated sample, their aggregate, the JSONL
file beside lm-eval's results, and the summary table printed at the end of generation."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mtp_plugins.files import atomic_writer


@dataclass
class SampleStats:
    """One generation request: joinable with lm-eval's ``--log_samples`` on (task, doc_id)."""

    task: str | None
    doc_id: int | None
    tokens: int  # generated, up to and including the stop
    forward_passes: int
    tokens_per_pass: list[int]
    eff_k: float
    stop_reason: str | None
    batch_size: int
    seconds: float  # wall time of the batch this sample was decoded in


def aggregate(
    samples: list[SampleStats], *, strategy: str, k: int, tau: float, seconds: float, calls: int,
    decoder_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run-level statistics (what ``get_model_info`` puts in ``results["config"]["mtp"]``)."""
    tokens = sum(s.tokens for s in samples)
    passes = sum(s.forward_passes for s in samples)
    per_sample = [s.eff_k for s in samples if s.forward_passes]
    return {
        "strategy": strategy,
        "k": k,
        "tau": tau,
        "decoder_options": dict(decoder_options or {}),
        "samples": len(samples),
        "forward_passes": passes,
        "model_calls": calls,
        "tokens": tokens,
        "eff_k": tokens / passes if passes else 0.0,
        "mean_eff_k": sum(per_sample) / len(per_sample) if per_sample else 0.0,
        "generation_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
    }


CLI_NAMES = {"lm_eval", "lm-eval", "mtp-lm-eval"}


def output_path_from_argv(argv: list[str] | None = None) -> str | None:
    """lm-eval's ``--output_path``/``-o`` when this process is the lm-eval command line (lm-eval does
    not tell the model); None in any other program, whose flags mean something else."""
    argv = sys.argv if argv is None else argv
    program = Path(argv[0]) if argv else Path()
    if program.name not in CLI_NAMES and program.parts[-2:] != ("lm_eval", "__main__.py"):
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path", "--output-path", "-o")
    known, _ = parser.parse_known_args(argv[1:])
    return known.output_path


def default_stats_path(output_path: str, model_name: str, stamp: str | None = None) -> Path:
    """Where the per-sample JSONL goes: beside lm-eval's ``results_*.json`` for that model."""
    from lm_eval.utils import sanitize_model_name

    stamp = stamp or datetime.now().isoformat().replace(":", "-")
    path = Path(output_path)
    if path.suffix == ".json":
        return path.with_name(f"{path.stem}_mtp_samples_{stamp}.jsonl")
    return path / sanitize_model_name(model_name) / f"mtp_samples_{stamp}.jsonl"


def write_jsonl(path: Path, samples: list[SampleStats]) -> None:
    """Write all records atomically: a complete file or none."""
    with atomic_writer(path) as f:
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")


def summary_table(summary: dict[str, Any], stats_path: Path | None, *, uses_tau: bool = True) -> None:
    """Print the run's MTP statistics as one table (to stderr, beside lm-eval's own logging).

    ``tau`` is shown only for a strategy that reads it (``Decoder.uses_tau``). The statistics file's
    path goes on a line of its own after the table, whole (a table cell would cut a long path).
    """
    from rich.console import Console
    from rich.table import Table

    settings = [f"k={summary['k']}"] + ([f"tau={summary['tau']:g}"] if uses_tau else [])
    settings += [f"{name}={value!r}" for name, value in sorted((summary.get("decoder_options") or {}).items())]
    rows = [
        ("strategy", f"{summary['strategy']} ({', '.join(settings)})"),
        ("samples", str(summary["samples"])),
        ("tokens generated", str(summary["tokens"])),
        ("forward passes", f"{summary['forward_passes']} ({summary['model_calls']} batched calls)"),
        ("Eff. k pooled / per-sample mean", f"{summary['eff_k']:.2f} / {summary['mean_eff_k']:.2f}"),
        ("generation seconds", f"{summary['generation_seconds']:.1f}"),
        ("tokens per second", f"{summary['tokens_per_second']:.1f}"),
    ]
    table = Table(title="MTP decoding", show_header=False)
    table.add_column("statistic")
    table.add_column("value")
    for name, value in rows:
        table.add_row(name, value)
    Console(stderr=True, width=max(100, Console(stderr=True).width)).print(table)
    where = str(stats_path) if stats_path else "not written (no --output_path or stats_path)"
    print(f"MTP per-sample statistics: {where}", file=sys.stderr, flush=True)


def unwritable_reason(path: Path, *, directory: bool = False) -> str | None:
    """Why ``path`` cannot be written as a file (or, with ``directory``, as a directory of outputs),
    or None where it can: checked before any work, so that a run never fails at its end.

    The nearest existing ancestor must be a directory in which a file can be created (tried with a
    hidden temporary file, removed at once: permission bits say nothing to root, a read-only or
    virtual file system does)."""
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            return "it is a file, not a directory"
        if not directory and path.is_dir():
            return "it is a directory; give a file path (e.g. DIR/mtp_samples.jsonl)"
        if not directory and not os.access(path, os.W_OK):
            return "it is not writable"
    where = path if directory and path.is_dir() else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        return f"{where} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".mtp-write-check-")
    except OSError as error:
        return f"cannot create a file in {where} ({error.strerror or error})"
    os.close(fd)
    os.unlink(probe)
    return None
