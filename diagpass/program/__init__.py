"""The diagonal program, built once from the proof and run by both front ends.

The pipeline, one stage per module:

* :mod:`~diagpass.program.plan`: from the proof (``passes.reroll``) to a
  :class:`~diagpass.program.plan.ProgramPlan`: variants, unit forms, carried lanes;
* :mod:`~diagpass.program.chunks`: the nodes outside the layers as small modules;
* :mod:`~diagpass.program.lifetime`: when each value dies;
* :mod:`~diagpass.program.schedule`: the steps of one run and their batched calls;
* :mod:`~diagpass.program.steps`: one batched call (weight stacks, lane views, compiled steps);
* :mod:`~diagpass.program.runtime`: :class:`DiagonalProgram`, which runs all of it;
* :mod:`~diagpass.program.pipeline`: one stage of it per rank of a process group
  (``options={"pipeline": True}``, :mod:`diagpass.distributed`);
* :mod:`~diagpass.program.unrolled`: the backend's path for graphs the plan cannot express yet.
"""

from diagpass.program.plan import ProgramPlan, plan_program
from diagpass.program.runtime import DiagonalProgram, RunStats
from diagpass.program.steps import lane_view
from diagpass.program.unrolled import UnrolledProgram, build_unrolled

__all__ = ["DiagonalProgram", "RunStats", "ProgramPlan", "plan_program", "UnrolledProgram", "build_unrolled", "lane_view"]
