"""tests/_optional.py: a missing optional dependency skips its tests on a developer's machine and
fails the run under CI=true (where `.ci/run` installs every extra), in a real pytest process."""

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))

MODULE = f"""
import sys
sys.path.insert(0, {TESTS!r})
from _optional import require

missing = require("deit_jax_no_such_module")

def test_uses_it():
    assert missing
"""


def run_pytest(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_needs_missing.py").write_text(MODULE)
    (tmp_path / "test_other.py").write_text("def test_other():\n    assert True\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-c", os.devnull,
         "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )  # fmt: skip


def test_a_missing_optional_dependency_skips_outside_ci(tmp_path):
    result = run_pytest(tmp_path, ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout and "deit_jax_no_such_module" in result.stdout


def test_a_missing_optional_dependency_fails_the_run_in_ci(tmp_path):
    result = run_pytest(tmp_path, ci="true")
    assert result.returncode != 0, result.stdout
    assert "ModuleNotFoundError: No module named 'deit_jax_no_such_module'" in result.stdout
    assert "skipped" not in result.stdout
