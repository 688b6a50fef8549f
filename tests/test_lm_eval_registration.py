"""How ``--model mtp`` and our tasks reach lm-eval 0.4.x: the ``.pth`` startup shim (cheap, never
raising, switchable, retiring under native discovery), the fallback console script, and a regular
wheel install next to the editable one the test suite runs in."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

BIN = Path(sys.executable).parent
SWITCH = "MTP_PLUGINS_LM_EVAL_SHIM"


def python(code: str, env: dict | None = None, exe: str = sys.executable, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != SWITCH}
    environment.update(env or {})
    return subprocess.run(
        [exe, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, cwd=cwd, timeout=600
    )


def test_startup_installs_only_a_watcher():
    proc = python(
        """
        import sys
        print(sorted(m for m in ("torch", "transformers", "lm_eval", "mtp_plugins") if m in sys.modules))
        print(any(getattr(f, "mtp_plugins_watcher", False) for f in sys.meta_path))
        """
    )
    assert proc.stdout.split() == ["[]", "True"], proc.stderr


def test_environment_switch_turns_the_shim_off_and_the_fallback_script_still_works(tiny_checkpoints):
    off = {SWITCH: "0"}
    proc = python(
        """
        import sys
        print(any(getattr(f, "mtp_plugins_watcher", False) for f in sys.meta_path))
        from lm_eval.api.registry import get_model
        get_model("hf")
        try:
            get_model("mtp")
        except ValueError as e:
            print("no mtp:", "no model for this name" in str(e))
        """,
        env=off,
    )
    assert proc.stdout.split() == ["False", "no", "mtp:", "True"], proc.stderr
    fallback = subprocess.run(
        [str(BIN / "mtp-lm-eval"), "--model", "mtp", "--model_args", f"pretrained={tiny_checkpoints['mtp']},tau=2",
         "--tasks", "gsm8k_cot_mtp", "--limit", "1", "--device", "cpu"],
        capture_output=True, text=True, env={**os.environ, **off}, timeout=600,
    )
    # `mtp` resolved (its own argument check ran) and the task name was known.
    assert fallback.returncode != 0
    assert "model_args tau=2 is not allowed" in fallback.stderr


def fake_lm_eval(root: Path, registry_source: str, models_source: str = "") -> Path:
    """A stand-in ``lm_eval`` package, first on PYTHONPATH, to drive the shim's edge cases."""
    package = root / "lm_eval"
    (package / "api").mkdir(parents=True)
    (package / "models").mkdir()
    (package / "__init__.py").write_text("")
    (package / "api" / "__init__.py").write_text("")
    (package / "api" / "registry.py").write_text(textwrap.dedent(registry_source))
    (package / "models" / "__init__.py").write_text(textwrap.dedent(models_source))
    return root


RECORDING_REGISTRY = """
    class Registry(dict):
        def register(self, name, target):
            self[name] = target
    model_registry = Registry()
"""


@pytest.mark.parametrize("native", [False, True])
def test_registers_after_builtins_and_retires_under_native_discovery(native, tmp_path):
    source = textwrap.dedent(RECORDING_REGISTRY) + ("\n# native: entry_points(group='lm_eval.models')\n" if native else "")
    root = fake_lm_eval(tmp_path, source, models_source="from lm_eval.api.registry import model_registry\nmodel_registry.register('hf', 'builtin')\n")
    proc = python(
        """
        import lm_eval.api.registry as r
        print(sorted(r.model_registry.items()))
        """,
        env={"PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr
    if native:
        assert proc.stdout.strip() == "[]"
    else:
        assert proc.stdout.strip() == "[('hf', 'builtin'), ('mtp', 'mtp_plugins.lm_eval.model:MTPLM')]"


def test_the_shim_never_raises(tmp_path):
    # A registry without model_registry and a models package that fails to import: the program
    # that imports lm-eval still runs.
    root = fake_lm_eval(tmp_path, "VALUE = 42\n", models_source="raise RuntimeError('broken install')\n")
    proc = python("import lm_eval.api.registry as r; print(r.VALUE)", env={"PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "42"


@pytest.mark.parametrize(
    "startup_source",
    ["raise RuntimeError('broken startup')\n", "def broken(:\n", "import no_such_module_anywhere\n", None],
    ids=["raises", "syntax-error", "import-error", "missing"],
)
def test_the_bootstrap_never_raises_when_its_target_fails(startup_source, tmp_path):
    # A stand-in mtp_plugins first on sys.path, whose _startup.py fails (or is missing); its
    # __init__ raises too, so importing the package would show.
    package = tmp_path / "mtp_plugins"
    (package / "lm_eval").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the bootstrap imported the package')\n")
    if startup_source is not None:
        (package / "lm_eval" / "_startup.py").write_text(startup_source)
    proc = python(
        """
        import sys
        print("ran", "mtp_plugins" in sys.modules, any(getattr(f, "mtp_plugins_watcher", False) for f in sys.meta_path))
        """,
        env={"PYTHONPATH": str(tmp_path)},
    )
    # No watcher: the stand-in, not the real shim, was the bootstrap's target.
    assert (proc.returncode, proc.stdout.split(), proc.stderr) == (0, ["ran", "False", "False"], "")


def test_startup_imports_only_the_standard_library():
    listing = "import sys, json; print(json.dumps(sorted(sys.modules)))"
    on = set(json.loads(python(listing).stdout))
    off = set(json.loads(python(listing, env={SWITCH: "0"}).stdout))
    assert on == off  # the watcher costs no import
    outside = sorted(m for m in on if m.split(".")[0] not in sys.stdlib_module_names and m != "__main__")
    assert "_mtp_plugins_startup" in outside
    # Other .pth helpers (_distutils_hack, __editable__ finders) are private modules; nothing else may load.
    assert [m for m in outside if not m.startswith("_")] == []
    for name in ("_bootstrap.py", "_startup.py"):  # module-level imports: the standard library only
        tree = ast.parse((REPO / "mtp_plugins" / "lm_eval" / name).read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert all(n.split(".")[0] in sys.stdlib_module_names for n in names), (name, names)


@pytest.mark.parametrize(
    ("value", "watching"), [("0", False), ("false", False), (" OFF ", False), ("no", False), ("1", True), ("", True)]
)
def test_the_environment_switch(value, watching):
    proc = python("import sys; print(any(getattr(f, 'mtp_plugins_watcher', False) for f in sys.meta_path))", env={SWITCH: value})
    assert proc.stdout.strip() == str(watching), proc.stderr


def test_regular_wheel_install(tmp_path, tiny_checkpoints):
    """Build the wheel and install it (not editable) into a fresh environment that borrows the
    dependencies of this one; lm-eval there finds `mtp` and our tasks."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True, capture_output=True, timeout=600,
    )
    (wheel,) = wheels.glob("mtp_plugins-*.whl")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=600)
    exe = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(exe), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # A plain path entry: this environment's .pth files (the editable install) are not processed there.
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(exe), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, timeout=600,
    )
    assert (site / "mtp_plugins.pth").exists() and (site / "mtp_plugins" / "tasks" / "gsm8k_cot_mtp.yaml").exists()
    proc = python(
        """
        import mtp_plugins.lm_eval
        print(mtp_plugins.__file__.startswith(%r))
        from lm_eval.api.registry import get_model
        print(get_model("mtp").__name__, get_model("hf").__name__)
        from lm_eval.tasks import TaskManager
        print("gsm8k_cot_mtp" in TaskManager().all_tasks, mtp_plugins.lm_eval.tasks_dir().startswith(%r))
        """ % (str(site), str(site)),
        exe=str(exe),
        cwd=tmp_path,  # not the checkout, whose mtp_plugins/ would shadow the installed one
    )
    assert proc.stdout.split() == ["True", "MTPLM", "HFLM", "True", "True"], proc.stderr[-2000:]
    run = subprocess.run(
        [str(exe), "-m", "lm_eval", "--model", "mtp", "--model_args", f"pretrained={tiny_checkpoints['mtp']},k=2",
         "--tasks", "gsm8k_cot_mtp_zeroshot", "--limit", "2", "--device", "cpu", "--gen_kwargs", "max_gen_toks=8"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MTP decoding" in run.stderr and "gsm8k_cot_mtp_zeroshot" in run.stdout
