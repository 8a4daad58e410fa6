"""FX passes of diagpass. Installed as ``diagpass.passes`` (the repository keeps them in
``passes/`` at the top level, as the design card asks).

Every pass is pure: it takes a graph (and the plain data of earlier passes) and returns
plain data or a new graph. Passes never import the backend, the runtime or the models.
"""

from .cells import Cell, CellLabels, label_cells
from .dependencies import DependencyAnalysis, Violation, analyze_dependencies, diagonal_schedule, source_line
from .template import CellBinding, CellTemplate, TemplateAnalysis, build_template_module, extract_templates

__all__ = [
    "Cell",
    "CellLabels",
    "label_cells",
    "DependencyAnalysis",
    "Violation",
    "analyze_dependencies",
    "diagonal_schedule",
    "source_line",
    "CellBinding",
    "CellTemplate",
    "TemplateAnalysis",
    "build_template_module",
    "extract_templates",
]
