"""``fast.generate``: the model's own ``generate``, with the prefill on the diagonal program.

    fast = diagpass.compile(model, probe_ids)
    tokens = fast.generate(input_ids, attention_mask=mask, max_new_tokens=32)   # == model.generate(...)

An ARMT's ``generate`` (the reference's ``AssociativeRecurrentWrapper.generate``, the zoo's
``SegmentedMemoryLM.generate``) runs the prompt's full segments one module call each, with the
memory read and written, and then enters Hugging Face ``generate`` on the last segment. Only the
first part is worth batching, and the model's code says exactly where it ends. So the model's
``generate`` runs as written, eagerly, with three things installed for the duration:

1. **collect**: the per-segment module (a strict descendant of the model on the path to the HF
   model it generates with; the first such module the code calls) does not run: each call's
   arguments are recorded, and a :class:`_PendingOutput` is returned in place of its output;
2. **flush**: on the first call into HF ``generate`` (or into any other module, or on return),
   the recorded calls are concatenated along dim 1 and run by a ``diagpass.compile``'d loop over
   the module (:class:`SegmentLoop`), which leaves the module state exactly as the calls would;
3. everything is uninstalled, and decoding runs the model's own code.

Where this does not apply (no HF model inside, the recorded calls are not alike, a segment's
output is used before decoding, the loop cannot be proven...) the state is restored, the reason
goes to ``fast.report`` and the ``diagpass.generate`` logger, and the model's own ``generate``
runs instead. Never silently different: what runs is the model's code, or the proven program of
the same calls.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys
import time
from collections.abc import Hashable, Iterator
from operator import is_, itemgetter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from diagpass.anylength import _NOT_STATE, _SCALARS, _same
from diagpass.errors import DiagpassError, InputError
from diagpass.write_watch import MISSING, WriteWatch

if TYPE_CHECKING:
    from diagpass.anylength import AnyLengthModel

log = logging.getLogger("diagpass.generate")

__all__ = ["GenerateRecord", "NotApplicable", "SegmentLoop", "generate", "install_generate_hook"]

_HISTORY = 32


class NotApplicable(DiagpassError):
    """The diagonal prefill does not apply to this ``generate`` call (the model's own runs)."""


@dataclass(kw_only=True)
class GenerateRecord:
    """One call of ``fast.generate``."""

    path: str
    """``"diagonal"`` (the prefill ran on the diagonal program) or ``"own"`` (the model's ``generate``)."""
    reason: str | None = None
    """Why the model's own ``generate`` ran, or why the prefill was not batched."""
    cell: str | None = None
    """The per-segment module whose calls were collected, by path."""
    prefill_segments: int = 0
    compiled: bool = False
    """A prefill program was compiled for this call (first call with these shapes)."""
    prefill_s: float = 0.0
    """Host time of the diagonal prefill, compile included."""
    wall_s: float = 0.0

    def __str__(self) -> str:
        where = f" via {self.cell}" if self.cell else ""
        extra = f" ({self.reason})" if self.reason else ""
        return (
            f"generate: {self.path}{where}, {self.prefill_segments} prefill segments{extra}, "
            f"prefill {self.prefill_s:.3f}s{' (compiled)' if self.compiled else ''}, total {self.wall_s:.3f}s"
        )


class _PendingOutput:
    """Stands for the output of a collected segment call, which has not run yet: any use raises."""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise NotApplicable(
            f"the output of {self._what} is used before decoding starts; diagpass batches the prefill only when "
            "the per-segment outputs are discarded"
        )

    __getattr__ = __getitem__ = __iter__ = __len__ = __bool__ = __contains__ = _refuse
    __add__ = __radd__ = __mul__ = __eq__ = __setitem__ = _refuse
    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise NotApplicable(f"a prefill segment's output reached {getattr(func, '__name__', func)} before decoding")


# -- the loop the prefill runs --------------------------------------------------------------------------


class SegmentLoop(nn.Module):
    """``forward(*segmented, *shared)`` calls ``cell`` once per ``length`` positions of dim 1.

    Rebuilds each recorded call from the call's structure ``spec``: ``slots[i]`` says where leaf i
    comes from, ``("cut", j)`` (positions ``s*length : (s+1)*length`` of ``segmented[j]``),
    ``("shared", j)`` (the same tensor every call) or ``("const", value)``. It first puts back the
    state the calls start from (``resets``: the attributes the calls write; a tensor value is read
    from this module's ``initial_<i>`` attribute, set before every call by :meth:`set_initial`), so
    that each of ``diagpass.compile``'s probes, and every run, starts where the calls started.
    Returns nothing: the calls' outputs were discarded; what is kept is the state the cell writes.
    """

    def __init__(
        self,
        cell: nn.Module,
        length: int,
        spec: Any,
        slots: list[tuple[str, Any]],
        n_cut: int,
        resets: list[tuple[nn.Module, str, Any]],
    ) -> None:
        super().__init__()
        self.cell = cell
        self.length = length
        self.spec = spec
        self.slots = slots
        self.n_cut = n_cut
        self.resets = [(module, name, None if isinstance(v, torch.Tensor) else v) for module, name, v in resets]
        self.tensor_resets = [i for i, (_, _, v) in enumerate(resets) if isinstance(v, torch.Tensor)]
        self.set_initial(resets)

    def set_initial(self, resets: list[tuple[nn.Module, str, Any]]) -> None:
        """Take the tensor values the next call starts from (same attributes, in the same order)."""
        for i in self.tensor_resets:
            setattr(self, f"initial_{i}", resets[i][2])

    def forward(self, *tensors: torch.Tensor) -> None:
        for i, (module, name, value) in enumerate(self.resets):
            setattr(module, name, getattr(self, f"initial_{i}") if i in self.tensor_resets else value)
        cut, shared = tensors[: self.n_cut], tensors[self.n_cut :]
        total = cut[0].shape[1]
        for start in range(0, total, self.length):
            leaves = []
            for kind, what in self.slots:
                if kind == "cut":
                    leaves.append(cut[what][:, start : start + self.length])
                elif kind == "shared":
                    leaves.append(shared[what])
                else:
                    leaves.append(what)
            args, kwargs = pytree.tree_unflatten(leaves, self.spec)
            self.cell(*args, **kwargs)
        return None


@dataclass(kw_only=True)
class _Calls:
    """The recorded calls, concatenated: the arguments of one :class:`SegmentLoop` call."""

    spec: Any
    slots: list[tuple[str, Any]]
    cut: list[torch.Tensor]
    shared: list[torch.Tensor]
    length: int
    segments: int

    def key(self) -> Hashable:
        """What a compiled loop depends on besides the number of segments."""
        metas = tuple((t.dtype, t.device, tuple(t.shape[:1]) + tuple(t.shape[2:])) for t in self.cut)
        shared = tuple((t.dtype, t.device, tuple(t.shape)) for t in self.shared)
        consts = tuple((kind, repr(v)) for kind, v in self.slots)
        return (repr(self.spec), consts, metas, shared, self.length)


_LEAVES = (torch.Tensor, *_SCALARS)
"""Values pytree flattens as leaves (a flat call: positional and keyword arguments of these only)."""


def _flatten_calls(calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[tuple[list[Any], Any]]:
    """``pytree.tree_flatten((args, kwargs))`` of each call. When the first call is flat, a later
    call with the same positional count and keyword names in the same order, all leaves, has the
    first call's spec: its leaves are taken as they are (pytree's flatten costs about 25 us a call)."""
    args0, kwargs0 = calls[0]
    leaves0, spec0 = pytree.tree_flatten((args0, kwargs0))
    flat0 = len(leaves0) == len(args0) + len(kwargs0) and all(isinstance(v, _LEAVES) for v in leaves0)
    names0 = list(kwargs0)
    out = [(leaves0, spec0)]
    for args, kwargs in calls[1:]:
        if flat0 and type(args) is tuple and type(kwargs) is dict and len(args) == len(args0) and list(kwargs) == names0:
            leaves = [*args, *kwargs.values()]
            if all(isinstance(v, _LEAVES) for v in leaves):
                out.append((leaves, spec0))
                continue
        out.append(pytree.tree_flatten((args, kwargs)))
    return out


def _concatenate(calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> _Calls:
    """Check the recorded calls are alike and concatenate their per-segment tensors along dim 1."""
    flat = _flatten_calls(calls)
    spec = flat[0][1]
    if any(other != spec for _, other in flat[1:]):
        raise NotApplicable("the per-segment calls do not all pass the same arguments")
    slots: list[tuple[str, Any]] = []
    cut: list[list[torch.Tensor]] = []
    shared: list[torch.Tensor] = []
    length = None
    for i, first in enumerate(flat[0][0]):
        column = [leaves[i] for leaves, _ in flat]
        if not isinstance(first, torch.Tensor):
            if any(not isinstance(v, _SCALARS) or type(v) is not type(first) or v != first for v in column):
                raise NotApplicable(f"argument leaf {i} of the per-segment calls is not the same constant in every call")
            slots.append(("const", first))
        elif all(v is first for v in column):
            slots.append(("shared", len(shared)))
            shared.append(first)
        else:
            if any(not isinstance(v, torch.Tensor) or v.shape != first.shape or v.dtype != first.dtype for v in column):
                raise NotApplicable(f"argument leaf {i} of the per-segment calls changes shape or dtype between segments")
            if first.dim() < 2:
                raise NotApplicable(f"argument leaf {i} of the per-segment calls has no positions dim (shape {tuple(first.shape)})")
            if length is None:
                length = first.shape[1]
            elif first.shape[1] != length:
                raise NotApplicable(
                    f"the per-segment tensors disagree on the segment length along dim 1 ({first.shape[1]} vs {length})"
                )
            slots.append(("cut", len(cut)))
            cut.append(column)
    if length is None or length == 0:
        raise NotApplicable("the per-segment calls pass no tensor that changes from segment to segment")
    return _Calls(
        spec=spec,
        slots=slots,
        cut=[torch.cat(column, dim=1) for column in cut],
        shared=shared,
        length=int(length),
        segments=len(calls),
    )


# -- module state -------------------------------------------------------------------------------------


def _is_plain(name: str, value: Any) -> bool:
    """Whether ``name: value`` of a module's ``__dict__`` is a plain attribute, i.e. model state (flags,
    counters, recurrent state tensors): not module internals (anylength's ``_module_state`` rule),
    nor one of this module's patches."""
    return name not in _NOT_STATE and not name.startswith(("__", "_torchdynamo")) and not getattr(value, "_diagpass_patch", False)


class _Snapshot:
    """Every module's attribute dict, copied at one moment.

    A ``dict.copy()`` per module runs in C: cheap enough to take at every ``generate`` call (the
    ``(path, name)``-keyed form, :meth:`plain`, costs a Python step per attribute: about 6,000 on a
    16-layer Llama). Between segment calls a :class:`~diagpass.write_watch.WriteWatch` says what
    changed, at the cost of the writes alone."""

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        self.modules = modules
        self.dicts = [vars(m) for _, m in modules]
        self.copies = [d.copy() for d in self.dicts]
        self._plain: dict[tuple[str, str], Any] | None = None

    def plain(self) -> dict[tuple[str, str], Any]:
        """The plain attributes, by ``(path, name)``."""
        if self._plain is None:
            self._plain = {
                (path, name): value
                for (path, _), saved in zip(self.modules, self.copies)
                for name, value in saved.items()
                if _is_plain(name, value)
            }
        return self._plain

    def restore(self) -> None:
        """Put back the plain attributes the snapshot holds, and drop the plain ones added since."""
        for (_, module), live, saved in zip(self.modules, self.dicts, self.copies):
            if _same_dict(live, saved):
                continue
            for name in [n for n, v in live.items() if n not in saved and _is_plain(n, v)]:
                delattr(module, name)
            for name, value in saved.items():
                if _is_plain(name, value) and live.get(name, MISSING) is not value:
                    setattr(module, name, value)

    def apply_changes(self, since: _Snapshot) -> None:
        """Set the plain attributes that differ from ``since`` (same modules) to their values here."""
        for (_, module), now, then in zip(self.modules, self.copies, since.copies):
            if _same_dict(now, then):
                continue
            for name, value in now.items():
                if _is_plain(name, value) and not _same(then.get(name, MISSING), value):
                    setattr(module, name, value)

    def fingerprint(self) -> Hashable:
        """What a traced loop specialises on: scalar attributes by value, tensors by dtype, device and shape."""
        items: list[tuple[Any, ...]] = []
        append = items.append
        for (path, _), saved in zip(self.modules, self.copies):
            for name, value in saved.items():
                # Only scalars and tensors count; patches are functions, so the name rule suffices here.
                if isinstance(value, _SCALARS):
                    if name not in _NOT_STATE and not name.startswith(("__", "_torchdynamo")):
                        append(((path, name), type(value).__name__, value))
                elif isinstance(value, torch.Tensor) and not name.startswith(("__", "_torchdynamo")):
                    append(((path, name), "tensor", value.dtype, value.device, tuple(value.shape)))
        items.sort(key=itemgetter(0))
        return tuple(items)


def _same_dict(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same names bound to the same objects (C passes; never calls a value's ``__eq__``)."""
    return len(a) == len(b) and list(a) == list(b) and all(map(is_, a.values(), b.values()))


def _modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_modules(remove_duplicate=False))


# -- the interception -----------------------------------------------------------------------------------


def _generation_parts(
    modules_list: list[tuple[str, nn.Module]],
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """The HF generation models among the model's ``modules_list`` (by duck type: ``generate``
    and ``prepare_inputs_for_generation``), and the candidate per-segment modules: every module on
    the path from the model (excluded) down to one of them (included), outermost first."""
    modules = dict(modules_list)
    generators = {
        path: m
        for path, m in modules.items()
        if path and callable(getattr(m, "generate", None)) and hasattr(m, "prepare_inputs_for_generation")
    }
    candidates: dict[str, nn.Module] = {}
    for path in generators:
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            candidates.setdefault(prefix, modules[prefix])
    return generators, dict(sorted(candidates.items(), key=lambda kv: kv[0].count(".")))


class _Session:
    """One ``fast.generate`` call: collects the segment calls, then runs them as one program."""

    def __init__(
        self,
        fast: AnyLengthModel,
        modules: list[tuple[str, nn.Module]],
        generators: dict[str, nn.Module],
        candidates: dict[str, nn.Module],
    ) -> None:
        self.fast = fast
        self.model: nn.Module = fast.model
        self.modules = modules
        """``named_modules(remove_duplicate=False)``, listed once per call."""
        self.generators = generators
        self.candidates = candidates
        self.candidate_ids = {id(m) for m in candidates.values()}
        self.cell: tuple[str, nn.Module] | None = None
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.grad_enabled: bool | None = None
        self.first: _Snapshot | None = None
        """The model's state when the first segment call was made (every call must see the same)."""
        self.called_since: set[int] = set()
        """Other modules called after the first collected call (they may have read the stale state)."""
        self.record = GenerateRecord(path="own")
        self._undo: list[Any] = []
        self.watch: WriteWatch | None = None
        """Writes through ``nn.Module``'s setters since the first segment call."""
        self.done = False

    @property
    def at_calls(self) -> dict[tuple[str, str], Any]:
        """The model's plain state when the segment calls were made, by ``(path, name)``."""
        assert self.first is not None
        return self.first.plain()

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Collect segment calls and flush on entry into HF ``generate``, while the block runs."""
        for path, module in self.candidates.items():
            self._patch(module, "forward", self._collector(path, module))
        for module in self.generators.values():
            self._patch(module, "generate", self._flushing(module.generate))
        hook = torch.nn.modules.module.register_module_forward_pre_hook(self._seen)
        self._undo.append(hook.remove)
        try:
            yield
            self.flush()  # a generate that never decodes still leaves the state of its prefill
        finally:
            self.uninstall()

    def _patch(self, module: nn.Module, name: str, replacement: Any) -> None:
        had = name in module.__dict__
        old = module.__dict__.get(name)
        replacement._diagpass_patch = True  # not model state: snapshots leave it out
        module.__dict__[name] = replacement

        def undo() -> None:
            if had:
                module.__dict__[name] = old
            else:
                module.__dict__.pop(name, None)

        self._undo.append(undo)

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _seen(self, module: nn.Module, args: Any) -> None:
        if self.calls and id(module) not in self.candidate_ids:
            self.called_since.add(id(module))

    def _unseen_change(self) -> str | None:
        """A plain attribute that differs from the first segment call's now, and was not written
        through ``nn.Module``'s setters (which the watch saw): when it changed cannot be told."""
        assert self.first is not None and self.watch is not None
        for (path, module), live, saved in zip(self.modules, self.first.dicts, self.first.copies):
            if _same_dict(live, saved):
                continue
            for name in {**saved, **live}:
                now, then = live.get(name, MISSING), saved.get(name, MISSING)
                if now is then or any(v is not MISSING and not _is_plain(name, v) for v in (now, then)):
                    continue  # unchanged, or not state (module internals, this module's patches)
                if not _same(now, then) and not self.watch.seen(module, name):
                    return ".".join(filter(None, (path, name)))
        return None

    def _collector(self, path: str, module: nn.Module) -> Any:
        def collect(*args: Any, **kwargs: Any) -> _PendingOutput:
            if self.cell is None:
                self.cell = (path, module)
                self.record.cell = path
            elif self.cell[1] is not module:
                raise NotApplicable(f"segments are run by two different modules ({self.cell[0]} and {path})")
            if self.first is None:
                self.first, self.grad_enabled = _Snapshot(self.modules), torch.is_grad_enabled()
                self.watch = WriteWatch(m for _, m in self.modules)
                self._undo.append(self.watch.install())
            elif self.watch is not None and (name := self.watch.first_change(_same)) is not None:
                raise NotApplicable(f"the model's generate changes the model's state ({name}) between two segment calls")
            elif torch.is_grad_enabled() != self.grad_enabled:
                raise NotApplicable("the segment calls run under different grad modes")
            self.calls.append((args, kwargs))
            return _PendingOutput(f"segment call {len(self.calls)} of {path}")

        return collect

    def _flushing(self, generate: Any) -> Any:
        def flush_then_generate(*args: Any, **kwargs: Any) -> Any:
            self.flush()
            return generate(*args, **kwargs)

        return flush_then_generate

    def flush(self) -> None:
        """Run the collected segment calls (once), leaving the state they and the code after them leave."""
        if self.done:
            return
        self.done = True
        self.uninstall()
        if not self.calls:
            self.record.reason = "the prompt has no segment before the last: nothing to batch"
            return
        assert self.cell is not None and self.first is not None
        self.record.prefill_segments = len(self.calls)
        fresh = _modules(self.model)
        if len(fresh) != len(self.modules) or any(p != q or a is not b for (p, a), (q, b) in zip(fresh, self.modules)):
            raise NotApplicable("the model's generate changed its submodules before decoding")
        unseen = self._unseen_change()
        if unseen is not None:
            raise NotApplicable(
                f"the model's generate changes the model's state ({unseen}) without nn.Module.__setattr__ "
                "(a __dict__ write?) during the segment calls: which calls saw the change cannot be told"
            )
        now = _Snapshot(self.modules)
        self.first.restore()  # the state the calls saw
        started = time.perf_counter()
        reason = self._run_diagonal()
        if reason is not None:  # the calls as the model's code made them
            self.record.reason = reason
            with torch.set_grad_enabled(bool(self.grad_enabled)):
                for args, kwargs in self.calls:
                    self.cell[1](*args, **kwargs)  # outputs discarded, as the model's code did
        else:
            self.record.path = "diagonal"
        self.record.prefill_s = time.perf_counter() - started
        # What the code set after the last segment call (generate-mode flags, say) wins, as in eager.
        now.apply_changes(self.first)
        self.calls.clear()

    def _run_diagonal(self) -> str | None:
        """Run the calls on a compiled :class:`SegmentLoop`; ``None``, or why it did not apply."""
        assert self.cell is not None and self.first is not None
        if len(self.calls) < 2:
            return "a single segment before the last: nothing to batch across"
        try:
            calls = _concatenate(self.calls)
        except NotApplicable as why:
            return str(why)
        path, cell = self.cell
        key = (id(cell), calls.key(), self.first.fingerprint())
        cache = self.fast._prefill_programs
        entry = cache.get(key)
        if entry is None:
            self.record.compiled = True
            try:
                entry = self._compile(calls)
            except DiagpassError as error:
                entry = f"the segment loop over {path} is not proven: {error}"
            finally:
                self.first.restore()  # the probes ran the cell
            cache[key] = entry
        if isinstance(entry, str):
            return entry
        loop, compiled = entry
        loop.set_initial([(m, name, getattr(m, name)) for m, name, _ in loop.resets])
        # A module called between the segment calls and decoding may have read the state they write.
        owners = {path + w.rsplit(".", 1)[0][len("cell") :] for w in compiled.report.state_writes if w.startswith("cell")}
        readers = [
            p
            for p, m in self.modules
            if id(m) in self.called_since and any(p == "" or o == p or o.startswith(p + ".") for o in owners)
        ]
        if readers:
            raise NotApplicable(f"module {readers[0]} ran between the segment calls and decoding, and may read their state")
        with torch.no_grad():
            compiled(*calls.cut, *calls.shared)
        run = compiled.report.runs[-1]
        if run.path != "diagonal":
            self.record.reason = f"prefill loop ran eagerly: {run.reason}"
        return None


    def _compile(self, calls: _Calls) -> tuple[SegmentLoop, AnyLengthModel]:
        """Find what the calls write (two of them, run eagerly), then prove the loop on a 3-segment probe."""
        from diagpass.anylength import compile as diagpass_compile

        assert self.cell is not None and self.first is not None
        cell = self.cell[1]
        with torch.no_grad():
            for args, kwargs in self.calls[:2]:
                cell(*args, **kwargs)
        after = _Snapshot(self.modules).plain()
        self.first.restore()
        modules = dict(self.modules)
        added = [".".join(filter(None, where)) for where in after if where not in self.at_calls]
        if added:
            raise NotApplicable(f"a segment call adds the attribute {added[0]}; the loop cannot put back its absence")
        resets = [
            (modules[p], name, self.at_calls.get((p, name)))
            for (p, name), value in after.items()
            if not _same(value, self.at_calls.get((p, name), MISSING))
        ]
        loop = SegmentLoop(cell, calls.length, calls.spec, calls.slots, len(calls.cut), resets)
        probe = [_probe_of(t, calls.length) for t in calls.cut]
        with torch.no_grad():
            # The loop's calls are whole segments: prove those only (one cut probe traced, not two).
            options = {**(self.fast.options or {}), "short_tail": "none"}
            compiled = diagpass_compile(loop, *probe, *calls.shared, options=options)
        return loop, compiled




def _probe_of(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Three segments of ``tensor`` (repeated when it holds fewer): diagpass.compile's probe."""
    if tensor.shape[1] < 3 * length:
        tensor = torch.cat([tensor] * 3, dim=1)
    return tensor[:, : 3 * length]


# -- the entry point ------------------------------------------------------------------------------------


def generate(fast: AnyLengthModel, *args: Any, **kwargs: Any) -> Any:
    """``fast.model.generate(*args, **kwargs)``, with its prefill segments on the diagonal program."""
    model = fast.model
    own = getattr(model, "generate", None)
    if not callable(own):
        raise InputError(f"{type(model).__name__} has no generate method")
    started = time.perf_counter()
    modules = _modules(model)
    generators, candidates = _generation_parts(modules)
    if not generators:
        return _run_own(fast, own, args, kwargs, started, f"no Hugging Face generation model inside {type(model).__name__}")
    before = _Snapshot(modules)
    session = _Session(fast, modules, generators, candidates)
    try:
        with session.installed():
            result = own(*args, **kwargs)
    except NotApplicable as why:
        before.restore()  # e.g. generate-mode flags the aborted run set
        return _run_own(fast, own, args, kwargs, started, str(why))
    record = session.record
    record.wall_s = time.perf_counter() - started
    _log(fast, record)
    return result


def _run_own(fast: AnyLengthModel, own: Any, args: tuple[Any, ...], kwargs: dict[str, Any], started: float, reason: str) -> Any:
    record = GenerateRecord(path="own", reason=reason)
    result = own(*args, **kwargs)
    record.wall_s = time.perf_counter() - started
    _log(fast, record)
    return result


def _log(fast: AnyLengthModel, record: GenerateRecord) -> None:
    runs = fast.report.generations
    runs.append(record)
    del runs[:-_HISTORY]
    if record.path == "own" or record.reason:
        log.info("diagpass generate: %s", record)
    else:
        log.debug("diagpass generate: %s", record)


# -- torch.compile(model.generate, backend="diagbatch") ---------------------------------------------------
#
# Dynamo traces a model's generate as one frame. Its segment loop is a graph the backend batches on
# the diagonal; Hugging Face ``generate`` after it is not: traced, it breaks on every data-dependent
# stop test under its ``torch.no_grad`` decorator (a break Dynamo cannot resume there, so the whole
# calling frame falls back to per-segment frames), then recompiles as the KV cache grows and falls
# back to dynamic shapes: tens of seconds of compile for graphs that gain nothing. So, under a
# ``diagbatch`` trace only, a call of ``GenerationMixin.generate`` is a graph break and runs the
# model's own decoding eagerly, Dynamo off inside it: what ``fast.generate`` runs after its prefill.

_DIAGBATCH_MARK = "_diagpass_backend"
"""Attribute set on the backend function (``functools.wraps`` copies it onto Dynamo's wrappers)."""
_HOOKED = "_diagpass_generate_hook"


@torch._dynamo.assume_constant_result
def _tracing_for_diagbatch() -> bool:
    """At trace time (a constant of the traced code): whether the frame is compiled by ``diagbatch``.
    Unknown torch internals answer False: HF ``generate`` is then traced, as without diagpass."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        backend: Any = tx.output.compiler_fn
    except Exception:  # not tracing, or another torch layout
        return False
    for _ in range(8):  # Dynamo's wrappers: WrapBackendDebug, torch.compile's _TorchCompileWrapper, partial
        if backend is None:
            return False
        if getattr(backend, _DIAGBATCH_MARK, False):
            _warn_if_the_frame_is_lost(tx)
            return True
        backend = next(
            (getattr(backend, name) for name in ("_torchdynamo_orig_backend", "compiler_fn", "func", "__wrapped__") if hasattr(backend, name)),
            None,
        )
    return False


def _warn_if_the_frame_is_lost(tx: Any) -> None:
    """Dynamo cannot end a graph inside a ``try`` block or a user context manager: then it drops the
    whole frame traced so far (the segment loop with it) and compiles each segment's frame alone,
    which diagbatch cannot batch. Say so once, where it happens, rather than only per segment."""
    try:
        graceful = tx.should_compile_partial_graph()
        ops = sum(1 for node in tx.output.graph.nodes if node.op in ("call_function", "call_method", "call_module"))
        where = f"{tx.f_code.co_name} ({tx.f_code.co_filename}:{tx.lineno})"
    except Exception:  # another torch layout: the per-graph fallback reasons still say it
        return
    if not graceful and ops:
        from torch._dynamo.utils import counters

        counters["diagpass"]["generate_frames_lost"] += 1
        log.warning(
            "diagbatch: Hugging Face generate is called inside a try block or context manager of %s: Dynamo cannot "
            "end the prefill graph there, so it runs that frame eagerly and the segments are not batched. Call "
            "HF generate outside any try/with block of the compiled function (README, generation), or use "
            "diagpass.compile(model, probe).generate(...)",
            where,
        )


def _eager_generate(original: Any, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from torch._dynamo.utils import counters

    counters["diagpass"]["eager_hf_generate"] += 1
    log.info(
        "diagbatch: %s.generate (Hugging Face) runs eagerly, not traced: decoding is the model's own code",
        type(model).__name__,
    )
    return original(model, *args, **kwargs)


_run_eagerly = torch._dynamo.disable(_eager_generate, recursive=True)


def _hook(cls: type) -> None:
    """Wrap ``cls.generate`` (HF ``GenerationMixin``) so that a ``diagbatch`` trace breaks the graph at it."""
    original = cls.__dict__.get("generate")
    if original is None or getattr(original, _HOOKED, False):
        return

    @functools.wraps(original)
    def generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() and _tracing_for_diagbatch():
            return _run_eagerly(original, self, args, kwargs)
        return original(self, *args, **kwargs)

    setattr(generate, _HOOKED, True)
    cls.generate = generate  # type: ignore[attr-defined]


_GENERATION_MODULE = "transformers.generation.utils"


class _HookOnImport(importlib.abc.MetaPathFinder):
    """Hooks ``GenerationMixin`` right after transformers imports it (diagpass was imported first)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _GENERATION_MODULE:
            return None
        sys.meta_path.remove(self)  # find the real spec without us, once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _hook(module.GenerationMixin)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_generate_hook() -> None:
    """Make ``GenerationMixin.generate`` a graph break under ``diagbatch`` traces (now, or when
    transformers imports it). Idempotent; eager calls and other backends' traces are unchanged."""
    module = sys.modules.get(_GENERATION_MODULE)
    if module is not None:
        _hook(module.GenerationMixin)
    elif not any(isinstance(finder, _HookOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HookOnImport())
