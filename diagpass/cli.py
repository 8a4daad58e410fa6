"""The ``diagpass`` command line.

    diagpass check module.path:factory [--png FILE] [--json]
    diagpass check path/to/file.py:factory

``check`` imports ``factory``, calls it with no arguments, and expects
``(model, example_args)`` or ``(model, example_args, example_kwargs)``. It runs
:func:`diagpass.analyze` on ``model(*example_args, **example_kwargs)`` and prints the report.

Exit codes: 0 the diagonal schedule is proven, 1 it is not (refuted, graph breaks, no
segment recurrence), 2 usage error (bad spec, import failure, a factory that fails or
returns the wrong thing, matplotlib missing for ``--png``), with the message on stderr.

The CLI sits on top of the library and imports downward only. New subcommands register
themselves in :func:`build_parser` (``add_parser`` + ``set_defaults(run=...)``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diagpass.report import DependencyReport

__all__ = [
    "EXIT_PROVEN",
    "EXIT_REFUTED",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "load_factory",
    "call_factory",
    "report_to_dict",
    "draw_report",
    "main",
]

EXIT_PROVEN = 0
EXIT_REFUTED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake of the caller: reported on stderr with exit code 2, without a traceback."""


# -- loading the factory ---------------------------------------------------------------------------


def _looks_like_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_file(path: str) -> Any:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise UsageError(f"no such file: {path}")
    stem = os.path.splitext(os.path.basename(full))[0]
    name = f"_diagpass_factory_{stem}_{abs(hash(full)) & 0xFFFFFF:x}"
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    # Siblings of the file import as they would when it runs as a script.
    folder = os.path.dirname(full)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as error:
        sys.modules.pop(name, None)
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise UsageError(f"importing {path} failed: {_one_line(error)}\n{_short_traceback(error)}") from error
    return module


def _import_module(target: str) -> Any:
    # Like `python -m`: modules in the current directory import.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        if error.name and target.startswith(error.name):
            raise UsageError(f"cannot import module {target!r}: {error}") from error
        raise UsageError(f"importing {target} failed: {_one_line(error)}\n{_short_traceback(error)}") from error
    except Exception as error:
        raise UsageError(f"importing {target} failed: {_one_line(error)}\n{_short_traceback(error)}") from error


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``module.path:name`` or ``path/to/file.py:name``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UsageError(
            f"expected MODULE:FACTORY or path/to/file.py:FACTORY, got {spec!r} "
            "(e.g. mypackage.models:make_model or examples/model.py:make_model)"
        )
    if not all(part.isidentifier() for part in name.split(".")):
        raise UsageError(f"{name!r} in {spec!r} is not a Python name")
    module = _import_file(target) if _looks_like_file(target) else _import_module(target)
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{target} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec} is a {type(obj).__name__}, not a callable factory")
    return obj


def call_factory(factory: Callable[[], Any], spec: str = "factory") -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Call ``factory()`` and check it returns ``(model, args)`` or ``(model, args, kwargs)``."""
    try:
        result = factory()
    except Exception as error:
        raise UsageError(f"{spec}() raised {_one_line(error)}\n{_short_traceback(error)}") from error
    expected = "(model, example_args) or (model, example_args, example_kwargs)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise UsageError(f"{spec}() must return {expected}; it returned {_describe(result)}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not callable(model):
        raise UsageError(f"{spec}() returned a model that is not callable: {_describe(model)}")
    if not isinstance(args, (tuple, list)):
        raise UsageError(
            f"{spec}() must return {expected}, with example_args a tuple or list; "
            f"got {_describe(args)} (write (model, (x,)) for a single input)"
        )
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise UsageError(f"{spec}() must return example_kwargs as a dict with str keys; got {_describe(kwargs)}")
    return model, tuple(args), dict(kwargs)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return f"a {type(value).__name__}"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _short_traceback(error: BaseException, limit: int = 4) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__, limit=-limit)
    return "".join(lines).rstrip()


# -- output ------------------------------------------------------------------------------------------


def report_to_dict(report: DependencyReport) -> dict[str, Any]:
    """Plain JSON-able data of a report."""
    violations = {(v.src, v.dst) for v in report.violations}
    return {
        "ok": report.ok,
        "reason": report.reason,
        "num_layers": report.num_layers,
        "num_segments": report.num_segments,
        "layer_container": report.layer_container,
        "critical_path": report.critical_path,
        "num_steps": report.num_steps,
        "schedule": [[list(cell) for cell in step] for step in report.schedule],
        "edges": [
            {"src": list(src), "dst": list(dst), "source": data.get("source"), "violation": (src, dst) in violations}
            for src, dst, data in sorted(report.graph.edges(data=True))
        ],
        "violations": [
            {"src": list(v.src), "dst": list(v.dst), "reason": v.reason, "source": v.source, "code": v.code}
            for v in report.violations
        ],
        "uniform": report.uniform,
        "uniformity": report.uniformity,
        "variants": [{"role": role, "cells": n} for role, n in report.variants],
        "graph_breaks": list(report.graph_breaks),
        "num_graphs": report.num_graphs,
        "num_nodes": report.num_nodes,
        "analysis_s": report.analysis_s,
        "trace_s": report.trace_s,
    }


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise UsageError(f"--png needs matplotlib ({error}); pip install matplotlib") from error


def draw_report(report: DependencyReport, path: str) -> None:
    """Draw the cell grid of ``report`` to the PNG file ``path``.

    x: segment, y: layer (layer 0 at the bottom). Each cell shows its step in the schedule
    (the diagonal ``l + s`` when proven). Dependency edges are grey, violating edges red.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, Rectangle

    L, S = report.num_layers, report.num_segments
    cell_in = 0.55 if L * S <= 400 else 0.3
    width = min(max(6.5, 3.2 + cell_in * max(S, 1)), 40.0)
    height = min(max(3.2, 1.6 + cell_in * max(L, 1)), 30.0)
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    verdict = "diagonal schedule PROVEN" if report.ok else "diagonal schedule NOT PROVEN"
    detail = f"L={L}, S={S}"
    if report.graph.number_of_nodes():
        detail += f": critical path {report.critical_path} steps (diagonal {L + S - 1}, sequential {L * S})"
    fig.suptitle(f"{verdict}\n{detail}", fontsize=10, color="black" if report.ok else "firebrick")

    if L == 0 or S == 0:
        ax.text(0.5, 0.5, report.reason or "no cells", ha="center", va="center", wrap=True, fontsize=9)
        ax.set_axis_off()
        fig.savefig(path)
        return

    step_of = {cell: i for i, step in enumerate(report.schedule) for cell in step}
    bad_edges = {(v.src, v.dst) for v in report.violations}
    bad_cells = {v.dst for v in report.violations}
    num_steps = max(len(report.schedule), 1)
    import matplotlib

    cmap = matplotlib.colormaps["Blues"]
    show_text = L * S <= 1200
    fontsize = 9 if L * S <= 200 else 6
    size = 0.72
    for (layer, seg) in report.graph.nodes:
        step = step_of.get((layer, seg))
        shade = 0.15 + 0.45 * (step / max(num_steps - 1, 1)) if step is not None else 0.0
        ax.add_patch(
            Rectangle(
                (seg - size / 2, layer - size / 2),
                size,
                size,
                facecolor=cmap(shade),
                edgecolor="red" if (layer, seg) in bad_cells else "#555555",
                linewidth=1.6 if (layer, seg) in bad_cells else 0.6,
                zorder=2,
            )
        )
        if show_text and step is not None:
            ax.text(seg, layer, str(step), ha="center", va="center", fontsize=fontsize, zorder=4)

    half = size / 2
    for src, dst in report.graph.edges:
        bad = (src, dst) in bad_edges
        (l0, s0), (l1, s1) = src, dst
        dx, dy = s1 - s0, l1 - l0
        # Start and end on the cells' borders (data units), so heads stay visible.
        scale = half / max(abs(dx), abs(dy), 1e-9)
        start = (s0 + dx * scale, l0 + dy * scale)
        end = (s1 - dx * scale, l1 - dy * scale)
        adjacent = abs(dx) + abs(dy) == 1
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="-|>",
                mutation_scale=10 if bad else 7,
                color="red" if bad else "#7a7a7a",
                alpha=0.95 if bad else 0.8,
                linewidth=1.6 if bad else 0.8,
                connectionstyle="arc3" if adjacent else "arc3,rad=0.2",
                shrinkA=0,
                shrinkB=0,
                zorder=5 if bad else 3,
            )
        )

    ax.set_xlim(-0.6, S - 0.4)
    ax.set_ylim(-0.6, L - 0.4)
    ax.set_aspect("equal")
    tick_every = max(1, S // 32)
    ax.set_xticks(range(0, S, tick_every))
    ax.set_xticklabels([f"s{s}" for s in range(0, S, tick_every)], fontsize=8)
    layer_every = max(1, L // 24)
    ax.set_yticks(range(0, L, layer_every))
    ax.set_yticklabels([f"l{layer}" for layer in range(0, L, layer_every)], fontsize=8)
    ax.set_xlabel("segment")
    ax.set_ylabel("layer")
    for spine in ax.spines.values():
        spine.set_visible(False)
    handles = [Line2D([], [], color="#8c8c8c", label="dependency")]
    if bad_edges:
        handles.append(Line2D([], [], color="red", linewidth=1.5, label="violation"))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
        title="number = schedule step",
        title_fontsize=8,
    )
    fig.savefig(path)


# -- commands ----------------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    if args.png:
        _require_matplotlib()
    factory = load_factory(args.spec)
    model, example_args, example_kwargs = call_factory(factory, args.spec)

    from diagpass.analyze import analyze

    report = analyze(model, *example_args, **example_kwargs)
    _print(json.dumps(report_to_dict(report), indent=2, default=str) if args.json else str(report))
    if args.png:
        try:
            draw_report(report, args.png)
        except OSError as error:
            raise UsageError(f"cannot write {args.png}: {error}") from error
        if not args.json:
            _print(f"wrote {args.png}")
    return EXIT_PROVEN if report.ok else EXIT_REFUTED


def _print(text: str) -> None:
    """Print to stdout; a reader that went away (``diagpass check ... | head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail too


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets ``run`` (a function of the parsed args -> exit code)."""
    parser = argparse.ArgumentParser(
        prog="diagpass",
        description="Prove (or refute) that a recurrent-memory transformer can run with diagonal batching.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="analyse a model's forward and print the dependency report",
        description=(
            "Import FACTORY, call it with no arguments, and analyse model(*example_args, **example_kwargs). "
            "FACTORY returns (model, example_args) or (model, example_args, example_kwargs). "
            "Exit code 0: proven, 1: not proven, 2: usage error."
        ),
    )
    check.add_argument("spec", metavar="FACTORY", help="module.path:factory or path/to/file.py:factory")
    check.add_argument("--png", metavar="FILE", help="draw the cell grid and its dependency edges to FILE")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(run=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diagpass`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with 2 on its own usage errors
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return run(args)
    except UsageError as error:
        print(f"diagpass {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
