"""``mtp_plugins/allocator.py``: our commands keep growing buffers off mmap on glibc, measurably, and
leave the allocator alone when told to (or when the user set glibc's own variables)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mtp_plugins import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

#: Allocates 1 MiB (or --size=BYTES) with C malloc and says whether it became its own mmap region
#: (mallinfo2's hblks), after calling tune_malloc() or, with --app, after running a Typer command
#: through run_app.
PROBE = r"""
import ctypes, json, sys
size = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--size=")), 1 << 20))

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

from mtp_plugins import allocator
if "--app" in sys.argv:
    import typer
    from mtp_plugins.console import run_app
    app = typer.Typer()

    @app.command()
    def noop() -> None:
        pass

    sys.argv = ["probe"]  # run_app parses it
    try:
        run_app(app, "probe", ())
    except SystemExit:
        pass
    setting = allocator.current()
else:
    setting = allocator.tune_malloc("train" if "--train" in sys.argv else "decode")
before = libc.mallinfo2().hblks
block = libc.malloc(size)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"setting": setting.to_json(), "describe": setting.describe(), "mapped": mapped}))
"""


def probe(*args: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items()
                   if k not in (allocator.ENV, *allocator.GLIBC_ENV)} | env
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=environment,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt and mallinfo2")
def test_a_1_mib_block_is_mapped_by_default_and_kept_in_the_heap_once_tuned():
    off = probe(**{allocator.ENV: "0"})
    assert off["setting"] == {"state": "off", "mmap_threshold": None, "trim_threshold": None}
    assert off["mapped"] == 1  # glibc's default threshold (128 KiB): its own mmap region
    tuned = probe()
    assert tuned["setting"] == {"state": "tuned", "mmap_threshold": 64 << 20, "trim_threshold": 256 << 20}
    assert tuned["mapped"] == 0
    assert tuned["describe"].startswith("glibc malloc tuned by mtp-plugins: mmap threshold 64 MiB, trim threshold 256 MiB")


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt and mallinfo2")
def test_a_training_steps_vocabulary_sized_logits_stay_in_the_heap_under_the_training_thresholds():
    # The demo step's float32 logits [8, 96, 49153] are 151 MB: above glibc's largest dynamic
    # threshold (32 MiB) and the decoding threshold (64 MiB), each is a fresh mapping there.
    size = f"--size={8 * 96 * 49153 * 4}"
    assert probe(size, **{allocator.ENV: "0"})["mapped"] == 1
    assert probe(size)["mapped"] == 1
    train = probe(size, "--train")
    assert train["mapped"] == 0
    assert train["setting"] == {"state": "tuned", "mmap_threshold": 1 << 30, "trim_threshold": (1 << 31) - 1}


def test_mtp_train_runs_under_the_training_thresholds_and_the_others_under_decodings(monkeypatch):
    import mtp_plugins.console as console
    import train_cli.app
    import train_cli.demo
    from mtp_plugins.lm_eval import sweep

    import signal

    # mtp-train's main installs its start-up SIGINT handler and unraisable hook: put them back after.
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    sigint = signal.getsignal(signal.SIGINT)
    calls = []
    monkeypatch.setattr(console, "run_app", lambda app, program, *args, **kwargs: calls.append((program, kwargs.get("workload", "decode"))))
    try:
        for main in (train_cli.app.main, train_cli.demo.main, sweep.main):
            main()
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert calls == [("mtp-train", "train"), ("mtp-demo", "decode"), ("mtp-sweep", "decode")]


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt and mallinfo2")
def test_our_commands_tune_it_at_start():
    assert probe("--app")["setting"]["state"] == "tuned"
    assert probe("--app", **{allocator.ENV: "off"})["setting"]["state"] == "off"


@pytest.mark.skipif(not GLIBC, reason="glibc reads MALLOC_MMAP_THRESHOLD_")
def test_the_users_own_glibc_variables_stand_and_are_what_is_recorded():
    user = probe(MALLOC_MMAP_THRESHOLD_="4096")
    assert user["setting"] == {"state": "user", "mmap_threshold": 4096, "trim_threshold": None}
    assert user["mapped"] == 1  # their 4 KiB threshold, not ours
    assert user["describe"] == "glibc malloc as set by the environment: MALLOC_MMAP_THRESHOLD_=4096"


def test_elsewhere_it_does_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.delenv(allocator.ENV, raising=False)
    for name in allocator.GLIBC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.current().state == "default"
    setting = allocator.tune_malloc()
    assert setting.state == "unavailable" and "nothing tuned" in setting.describe()
    assert allocator.tune_malloc() is setting and allocator.current() is setting  # once per process
