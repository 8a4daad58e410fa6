"""Tests of the ``diagpass`` command line: exit codes, JSON, the PNG grid, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diagpass import cli

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
SYNTHETIC = os.path.join(TESTS, "synthetic.py")


def spec(name: str) -> str:
    return f"{SYNTHETIC}:{name}"


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- verdicts ------------------------------------------------------------------------------------------


def test_proven_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "check", spec("diagonal_factory"))
    assert code == cli.EXIT_PROVEN == 0, err
    assert "PROVEN" in out and "NOT PROVEN" not in out
    assert "critical path 6 steps" in out
    assert "l2" in out and "s3" in out  # the grid


def test_refuted_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "check", spec("rmt_factory"))
    assert code == cli.EXIT_REFUTED == 1, err
    assert "NOT PROVEN" in out
    assert "(2, 0) -> (0, 1)" in out and "synthetic.py" in out


def test_factory_with_kwargs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "check", spec("rmt_kwargs_factory"))
    assert code == 1
    assert "(2, 0) -> (0, 1)" in out


def test_model_without_segments_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "check", spec("mlp_factory"))
    assert code == 1
    assert "reason:" in out


def test_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "check", spec("rmt_factory"), "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert (data["num_layers"], data["num_segments"], data["critical_path"]) == (3, 4, 12)
    assert {(tuple(v["src"]), tuple(v["dst"])) for v in data["violations"]} == {
        ((2, s - 1), (0, s)) for s in range(1, 4)
    }
    assert all(v["source"].rsplit(":", 1)[0].endswith("synthetic.py") for v in data["violations"])
    assert sum(e["violation"] for e in data["edges"]) == 3
    assert len(data["schedule"]) == 12
    assert data["uniform"] is True


def test_module_spec_from_the_current_directory(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", TESTS)])
    monkeypatch.delitem(sys.modules, "synthetic", raising=False)
    code, out, err = run_main(capsys, "check", "synthetic:diagonal_factory")
    assert code == 0, err


# -- the picture -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["diagonal_factory", "rmt_factory"])
def test_png(capsys: pytest.CaptureFixture[str], tmp_path, name: str) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / f"{name}.png"
    code, out, err = run_main(capsys, "check", spec(name), "--png", str(png))
    assert code == (0 if name == "diagonal_factory" else 1), err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000
    assert f"wrote {png}" in out


def test_png_of_a_report_without_cells(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    import networkx as nx

    from diagpass.report import DependencyReport

    report = DependencyReport(ok=False, reason="no cells here", num_layers=0, num_segments=0, graph=nx.DiGraph())
    cli.draw_report(report, str(tmp_path / "empty.png"))
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"


def test_png_without_matplotlib_exits_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, out, err = run_main(capsys, "check", spec("diagonal_factory"), "--png", str(tmp_path / "x.png"))
    assert code == 2
    assert "pip install matplotlib" in err
    assert not (tmp_path / "x.png").exists()


def test_png_to_an_unwritable_path_exits_2(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    pytest.importorskip("matplotlib")
    code, _, err = run_main(capsys, "check", spec("diagonal_factory"), "--png", str(tmp_path / "no" / "such" / "dir.png"))
    assert code == 2
    assert "cannot write" in err


# -- usage errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon_here", "expected MODULE:FACTORY"),
        (":factory", "expected MODULE:FACTORY"),
        (f"{SYNTHETIC}:", "expected MODULE:FACTORY"),
        (f"{SYNTHETIC}:not-a-name", "not a Python name"),
        ("/no/such/file.py:factory", "no such file"),
        ("no_such_module_for_diagpass_tests:factory", "cannot import module"),
        (f"{SYNTHETIC}:missing_factory", "no attribute 'missing_factory'"),
        (f"{SYNTHETIC}:not_callable", "not a callable"),
        (f"{SYNTHETIC}:bad_factory", "must return (model, example_args)"),
        (f"{SYNTHETIC}:bad_tuple_factory", "example_args a tuple or list"),
        (f"{SYNTHETIC}:raising_factory", "factory failed on purpose"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], target: str, message: str) -> None:
    code, out, err = run_main(capsys, "check", target)
    assert code == cli.EXIT_USAGE == 2
    assert message in err, err
    assert err.startswith("diagpass check: error:")
    assert out == ""


def test_import_failure_exits_2(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    broken = tmp_path / "broken_factory.py"
    broken.write_text("import torch\nraise ImportError('a dependency is missing')\n")
    code, _, err = run_main(capsys, "check", f"{broken}:make")
    assert code == 2
    assert "importing" in err and "a dependency is missing" in err
    syntax = tmp_path / "syntax_error.py"
    syntax.write_text("def make(:\n")
    code, _, err = run_main(capsys, "check", f"{syntax}:make")
    assert code == 2 and "SyntaxError" in err


def test_no_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys)
    assert code == 2
    assert "check" in err  # the help lists the subcommands


def test_bad_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", spec("diagonal_factory"), "--no-such-option"])
    assert exit_info.value.code == 2


# -- as a program ------------------------------------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_python_m_diagpass() -> None:
    result = _run(sys.executable, "-m", "diagpass", "check", "tests/synthetic.py:rmt_factory", "--json")
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["critical_path"] == 12
    result = _run(sys.executable, "-m", "diagpass", "check", "tests/synthetic.py:nothing")
    assert result.returncode == 2
    assert "no attribute 'nothing'" in result.stderr


def test_console_script() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "diagpass")
    if not os.path.exists(script):
        pytest.skip("the diagpass console script is not installed in this environment")
    result = _run(script, "check", "--help")
    assert result.returncode == 0
    assert "FACTORY" in result.stdout


@pytest.mark.parametrize(("factory", "code"), [("make_safe_variant", 0), ("make_unsafe_variant", 1)])
def test_example_variants(capsys: pytest.CaptureFixture[str], factory: str, code: int) -> None:
    example = os.path.join(REPO, "examples", "check_variant.py")
    if not os.path.exists(example):
        pytest.skip("examples/check_variant.py is not there")
    got, out, err = run_main(capsys, "check", f"{example}:{factory}")
    assert got == code, out + err
