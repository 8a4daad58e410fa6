"""Packaging and environment: the backend is registered by the entry point alone, `passes/`
installs as `diagpass.passes` (no top-level `passes`), the core stays free of transformers,
and the DIAGPASS_LOG switch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE_MODULES = ["diagpass.backend", "diagpass.passes", "diagpass.analyze", "diagpass.program", "diagpass.lower"]


def run_python(code: str, *, cwd: str | os.PathLike[str] = "/tmp", env: dict[str, str] | None = None):
    """Run ``code`` in a fresh interpreter outside the repository; return the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("DIAGPASS_LOG", "PYTHONPATH")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


# -- registration ---------------------------------------------------------------------------------


def test_backend_listed_without_importing_diagpass():
    out = check(
        run_python(
            """
            import sys, torch
            assert "diagpass" not in sys.modules
            print("diagbatch" in torch._dynamo.list_backends())
            """
        )
    )
    assert out.strip().splitlines()[-1] == "True"


def test_backend_lookup_loads_diagpass_backend():
    out = check(
        run_python(
            """
            import sys, torch
            from torch._dynamo.backends.registry import lookup_backend
            fn = lookup_backend("diagbatch")
            print(fn.__module__, fn.__name__, "diagpass" in sys.modules)
            """
        )
    )
    assert out.split() == ["diagpass.backend", "diagbatch", "True"]


def test_entry_point_resolves_to_backend():
    eps = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "diagbatch"]
    assert len(eps) == 1, eps
    assert eps[0].value == "diagpass.backend:diagbatch"
    import diagpass.backend

    assert eps[0].load() is diagpass.backend.diagbatch


# -- layout ---------------------------------------------------------------------------------------


def test_passes_installs_as_diagpass_passes_only():
    out = check(
        run_python(
            """
            import importlib.util
            import diagpass.passes
            print(importlib.util.find_spec("passes") is None)
            print(hasattr(diagpass.passes, "label_cells"))
            """
        )
    )
    assert out.split() == ["True", "True"]


def test_wheel_has_no_top_level_passes(tmp_path):
    """A built wheel ships `diagpass/passes/` and nothing at the top level but `diagpass/`."""
    src = tmp_path / "src"  # build from a copy: no build/ or egg-info left in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    for name in ("diagpass", "passes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("diagpass-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_text = zf.read(entry).decode()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"diagpass"}, sorted(top)
    assert "diagpass/passes/__init__.py" in names
    assert "diagpass/passes/cells.py" in names
    assert "[torch_dynamo_backends]" in entry_text
    assert "diagbatch = diagpass.backend:diagbatch" in entry_text


def test_core_does_not_import_transformers():
    imports = "\n".join(f"import {m}" for m in CORE_MODULES)
    out = check(
        run_python(
            imports
            + """
import sys
print(sorted(m for m in sys.modules if m == "transformers" or m.startswith(("transformers.", "diagpass.models"))))
"""
        )
    )
    assert out.strip() == "[]", f"the core imported: {out.strip()}"


# -- DIAGPASS_LOG -----------------------------------------------------------------------------------

LOG_PROBE = """
import logging, diagpass
log = logging.getLogger("diagpass.backend")
log.debug("probe-debug")
log.info("probe-info")
log.warning("probe-warning")
print(len(logging.getLogger("diagpass").handlers))
"""


@pytest.mark.parametrize(
    ("value", "shown", "hidden"),
    [
        ("info", ["[diagpass INFO] diagpass.backend: probe-info", "[diagpass WARNING] diagpass.backend: probe-warning"], ["probe-debug"]),
        ("debug", ["[diagpass DEBUG] diagpass.backend: probe-debug", "[diagpass INFO] diagpass.backend: probe-info"], []),
        ("warning", ["[diagpass WARNING] diagpass.backend: probe-warning"], ["probe-info", "probe-debug"]),
    ],
)
def test_diagpass_log_env(value, shown, hidden):
    proc = run_python(LOG_PROBE, env={"DIAGPASS_LOG": value})
    assert check(proc).strip() == "1"
    for line in shown:
        assert line in proc.stderr.splitlines(), proc.stderr
    for text in hidden:
        assert text not in proc.stderr


def test_diagpass_log_unset_adds_no_handler():
    proc = run_python(LOG_PROBE)
    assert check(proc).strip() == "0"
    # library default: the warning reaches Python's last-resort handler, unformatted; info does not
    assert "probe-warning" in proc.stderr
    assert "probe-info" not in proc.stderr and "[diagpass" not in proc.stderr


def test_diagpass_log_bad_value_warns_and_adds_nothing():
    proc = run_python(LOG_PROBE, env={"DIAGPASS_LOG": "loud"})
    assert check(proc).strip() == "0"
    assert "DIAGPASS_LOG='loud' ignored" in proc.stderr


def test_set_log_level_is_idempotent_and_reversible():
    import logging

    import diagpass
    from diagpass.logs import configure_from_env

    logger = logging.getLogger("diagpass")
    before_handlers, before_level = list(logger.handlers), logger.level
    try:
        diagpass.set_log_level("info")
        diagpass.set_log_level("debug")
        configure_from_env({"DIAGPASS_LOG": " INFO "})  # case and spaces do not matter
        ours = [h for h in logger.handlers if getattr(h, "_diagpass_handler", False)]
        assert len(ours) == 1
        assert logger.level == logging.INFO and ours[0].level == logging.INFO
        assert ours[0].formatter._fmt == "[diagpass %(levelname)s] %(name)s: %(message)s"
        assert configure_from_env({}) is None  # unset: no change
        assert len([h for h in logger.handlers if getattr(h, "_diagpass_handler", False)]) == 1
        diagpass.set_log_level(None)
        assert not [h for h in logger.handlers if getattr(h, "_diagpass_handler", False)]
        assert logger.level == logging.NOTSET
        with pytest.raises(ValueError):
            diagpass.set_log_level("chatty")
    finally:
        diagpass.set_log_level(None)
        for handler in before_handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.setLevel(before_level)


def test_log_handler_writes_to_current_stderr(capsys):
    import logging

    import diagpass

    try:
        diagpass.set_log_level("info")
        logging.getLogger("diagpass.analyze").info("to-captured-stderr")
        assert "[diagpass INFO] diagpass.analyze: to-captured-stderr" in capsys.readouterr().err
    finally:
        diagpass.set_log_level(None)


# -- README ---------------------------------------------------------------------------------------


def test_readme_options_table_matches_config():
    """Every DiagbatchConfig option (but `mode`) has a row in the README options table, with its default."""
    import dataclasses
    import json

    from diagpass.config import DiagbatchConfig

    readme = (REPO / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in readme.splitlines() if line.startswith("| `")}
    for f in dataclasses.fields(DiagbatchConfig):
        if f.name == "mode":
            continue
        assert f"`{f.name}`" in rows, f"README options table lacks `{f.name}`"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = json.dumps(default) if isinstance(default, str) else repr(default)
        assert f"`{shown}`" in rows[f"`{f.name}`"], f"README shows a stale default for `{f.name}` (want {shown})"


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the pytest command of the README's test set-up line."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    lines = [line for line in readme.splitlines() if "pip install -e '.[test]'" in line and "pytest" in line]
    assert len(lines) == 1, lines
    command = lines[0].split("&&")[-1].strip()
    assert command.startswith("python -m pytest")
    assert command in ci.splitlines() or any(line.strip() == command for line in ci.splitlines())
    # ... after the same set-up steps.
    for step in lines[0].split("&&")[:-1]:
        step = step.strip()
        if step.startswith("pip install"):
            package = step.removeprefix("pip install").strip()
            assert any(package in line and "pip install" in line for line in ci.splitlines()), step
    assert os.access(REPO / ".ci" / "run", os.X_OK)
