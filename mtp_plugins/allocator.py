"""glibc malloc settings for CPU work: keep large, short-lived buffers off mmap.

glibc serves a request above its mmap threshold (128 KiB at start, raised dynamically to at most
32 MiB) with a fresh ``mmap``, and its release with a ``munmap``: the next buffer of that size is
mapped again and every page of it faults in (the kernel zeroes it) on first touch. Two workloads of
this product pay for that on every step:

- decoding: each step of a Hugging Face ``DynamicCache`` concatenates every layer's keys and values
  into new buffers a little larger than the last (past 128 KiB, e.g. SmolLM2-135M's per-layer K/V at
  ~300 prompt tokens in bfloat16), and the dynamic threshold never catches up with buffers that
  keep growing. What that costs depends on the host: 1.03x a token of HF generate on one 2-core VM;
- training: a distillation step makes and frees float32 logits over the vocabulary for every
  supervised position (the demo's: ``[8, 96, 49153]``, 151 MB, several per step). Above 64 MiB
  (this module's earlier threshold) each was a fresh mapping: on a 2-core AMD EPYC the demo's step
  took 3.4-3.8 s against 2.3-2.5 s with the training thresholds below in two of three benchmark
  runs (the same in both in the third, at an hour when its page faults were cheap;
  ``benchmarks/results/malloc_effect.md``). No value changes: at 1 thread the trained weights were
  bit for bit the same under every setting (at 2 threads training is not bitwise repeatable from
  run to run under any one setting).

:func:`tune_malloc` raises the thresholds through ``mallopt`` (what ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` do when set before start), for the whole process, by workload: a decoding
command (``mtp-sweep``, ``mtp-lm-eval``) to 64 MiB mmap and 256 MiB trim, ``mtp-train`` to 1 GiB
and 2 GiB - 1 (the largest ``mallopt`` takes). Decoding keeps the smaller ones: under the training
values batch-1 decoding was slower in two of three benchmark runs on the same host (prefill 0.79x
twice; the third run: 1.06x, but the engine's passes 0.84-0.91x). A sweep's ``hf`` rows run under the same allocator as its ``mtp`` rows.
It changes speed and memory held (freed memory is kept for reuse rather than returned at once: a
demo training step's peak RSS rose from 2.7 to 3.2 GB), never a computed value. Our commands call it
at start; set ``MTP_PLUGINS_MALLOC=0`` to leave glibc's defaults. It does nothing where the C
library is not glibc, and leaves the thresholds alone when either environment variable was set by
the user.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import asdict, dataclass

#: The opt-out: ``MTP_PLUGINS_MALLOC=0`` keeps glibc's defaults.
ENV = "MTP_PLUGINS_MALLOC"
#: glibc's own variables; when the user set either, their values stand.
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
#: (mmap threshold, trim threshold) per workload. Decoding: large enough for growing KV-cache
#: buffers. Training: above the vocabulary logits of a step as well (trim: the largest int mallopt
#: takes). Decoding keeps its own, measured before: under the training values batch-1 decoding was
#: slower in two of three runs on a 2-core EPYC (``benchmarks/results/malloc_effect.md``).
THRESHOLDS = {"decode": (64 << 20, 256 << 20), "train": (1 << 30, (1 << 31) - 1)}
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class MallocSetting:
    """What the process's allocator runs with, as recorded in a sweep's ``timing.json``."""

    #: ``tuned`` (set by :func:`tune_malloc`), ``user`` (the user's glibc variables), ``off``
    #: (``MTP_PLUGINS_MALLOC=0``), ``default`` (never tuned), ``unavailable`` (not glibc, or mallopt refused).
    state: str
    mmap_threshold: int | None = None
    trim_threshold: int | None = None

    def describe(self) -> str:
        if self.state == "tuned":
            return (f"glibc malloc tuned by mtp-plugins: mmap threshold {self.mmap_threshold >> 20} MiB, "
                    f"trim threshold {self.trim_threshold >> 20} MiB ({ENV}=0 to keep the defaults)")
        if self.state == "user":
            values = zip(GLIBC_ENV, (self.mmap_threshold, self.trim_threshold))
            return "glibc malloc as set by the environment: " + ", ".join(
                f"{name}={value}" for name, value in values if value is not None)
        if self.state == "off":
            return f"glibc malloc defaults ({ENV}=0)"
        if self.state == "unavailable":
            return "the C library's malloc defaults (not glibc, nothing tuned)"
        return "the C library's malloc defaults"

    def to_json(self) -> dict:
        return asdict(self)


_applied: MallocSetting | None = None


def _from_environment() -> MallocSetting:
    def value(name: str) -> int | None:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            return None

    return MallocSetting("user", value("MALLOC_MMAP_THRESHOLD_"), value("MALLOC_TRIM_THRESHOLD_"))


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:  # pragma: no cover - a static or unusual interpreter
        return None


def tune_malloc(workload: str = "decode") -> MallocSetting:
    """Apply the thresholds of ``workload`` (a key of ``THRESHOLDS``) once per process (later calls
    return the first outcome, whatever they ask for)."""
    global _applied
    if _applied is not None:
        return _applied
    mmap_threshold, trim_threshold = THRESHOLDS[workload]
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        _applied = MallocSetting("off")
    elif any(name in os.environ for name in GLIBC_ENV):
        _applied = _from_environment()
    else:
        libc = _glibc()
        mallopt = getattr(libc, "mallopt", None) if libc is not None else None
        if mallopt is not None and mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1:
            _applied = MallocSetting("tuned", mmap_threshold, trim_threshold)
        else:
            _applied = MallocSetting("unavailable")
    return _applied


def current() -> MallocSetting:
    """The setting this process runs with (``default`` when :func:`tune_malloc` was not called)."""
    if _applied is not None:
        return _applied
    return _from_environment() if any(name in os.environ for name in GLIBC_ENV) else MallocSetting("default")
