"""Public entry points: :func:`empirical_ntk` and :func:`layerwise_ntk`."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import blocked as _blocked
from . import structured
from .device import default_budget
from .errors import NTKError
from .generic import RowCheckFailed, explain_failure, generic_kernel
from .modes import TRACE, ModeLike
from .problem import Problem, build_problem, output_shape, resolve_dtype
from .state import cast_floating, frozen_measurement

IMPLEMENTATIONS = ("auto", "generic", "structured")
# check vectors with several cotangent rows; with one row, one fused into the capture pass
SELF_CHECK_VECTORS = 2
log = logging.getLogger("ntk_callback.engine")


def _group(problem: Problem, names: list[str], budget: int) -> list[list[str]]:
    """Split parameter names into consecutive groups whose Jacobian rows for every probe
    fit the budget (one extra forward pass per group); an oversized tensor stays alone and
    is handled by probe blocking."""
    rows_per_probe = problem.mode.row_chunk(problem.cot1.shape[1], 1)
    n_all = problem.n1 + (problem.n2 or 0)
    per_entry = n_all * rows_per_probe * problem.itemsize()
    groups: list[list[str]] = []
    size = 0
    for name in names:
        cost = problem.params[name].numel() * per_entry
        if groups and size + cost <= budget:
            groups[-1].append(name)
            size += cost
        else:
            groups.append([name])
            size = cost
    return groups


def _check(problem: Problem, implementation: str, budget: int | None,
           chunk_size: int | None) -> int:
    if implementation not in IMPLEMENTATIONS:
        raise NTKError(f"unknown implementation {implementation!r}; choose one of "
                       f"{', '.join(map(repr, IMPLEMENTATIONS))}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise NTKError(f"chunk_size={chunk_size!r} must be a positive int (probes per "
                       "vectorised chunk) or None for automatic.")
    if budget is None:
        return default_budget(problem.device)
    if not isinstance(budget, int) or budget < 1:
        raise NTKError(f"memory_budget={budget!r} must be a positive number of bytes "
                       "(e.g. 2**30) or None for the device's default (1 GiB on the CPU, a "
                       "quarter of the free memory up to 16 GiB on CUDA).")
    return budget


@dataclass
class Explanation:
    """How a kernel was computed (``explain=True``).

    ``paths``: trainable parameter -> ``"structured: <Rule>"``, ``"generic: vmap"`` or
    ``"generic: loop"``; ``reasons``: module or parameter name -> why it did not take a
    structured rule; ``self_check``: module -> [(rule side, autograd side)] squared norms
    per check vector (see :mod:`.structured.selfcheck`).
    """

    paths: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    self_check: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{name}: {path}" + (f"  ({self.reasons[name]})" if name in self.reasons else "")
                 for name, path in self.paths.items()]
        owners = [f"{m}: {why}" for m, why in self.reasons.items() if m not in self.paths]
        return "\n".join(lines + (["why modules took the exact path:"] + owners if owners else []))


_MAX_RETRIES = 4


def _by_row_groups(problem: Problem, plan: structured.Plan, keys: dict[str, list[str]],
                   budget: int, self_check: bool, explanation: Explanation, rows: int
                   ) -> structured.Result | None:
    """:func:`_structured` ``rows`` cotangent rows at a time (trace mode: the kernel is a sum
    over rows), each group a sub-problem of its own capture passes, the kernels summed.
    A group that changes the plan (a module sent to the exact path) restarts the groups,
    so that every group's kernel covers the same modules."""
    k = problem.cot1.shape[1]
    for _ in range(_MAX_RETRIES):
        modules = set(plan.modules)
        total: structured.Result | None = None
        for start in range(0, k, rows):
            cs = slice(start, min(k, start + rows))
            sub = dataclasses.replace(problem, cot1=problem.cot1[:, cs], cot2=None
                                      if problem.cot2 is None else problem.cot2[:, cs])
            part = _structured(sub, plan, keys, budget, self_check, explanation,
                               split_rows=False)
            if set(plan.modules) != modules:
                break
            if part is None:
                return None
            if total is None:
                total = part
            else:
                for key, value in part.kernels.items():
                    total.kernels[key] = total.kernels[key] + value \
                        if key in total.kernels else value
        else:
            return total
    # every module left would otherwise count as handled with no kernel: exact path
    for m in list(plan.modules):
        plan.drop(m, "the plan kept changing between groups of output rows")
    return None


def _structured(problem: Problem, plan: structured.Plan, keys: dict[str, list[str]],
                budget: int, self_check: bool, explanation: Explanation, split: Any = None,
                factors: int | None = None, split_rows: bool = True
                ) -> structured.Result | None:
    """Structured contributions of the plan's parameters (kernels, or with ``factors`` the
    per-probe factors of :func:`.structured.compute`'s factor mode), verified by the
    self-check; modules that fail a run-time assumption or the check leave the plan (and
    the structured part is recomputed without them). None when no module is left. When
    the Gram-route cotangents of all cotangent rows would not fit the budget, the kernel
    is computed a group of rows at a time (:func:`_by_row_groups`)."""
    for _ in range(_MAX_RETRIES):
        if not plan:
            return None
        try:
            result = structured.compute(problem, plan, keys, budget,
                                        check=SELF_CHECK_VECTORS if self_check else 0,
                                        split=split, factors=factors, split_rows=split_rows)
        except structured.RowGroups as exc:
            log.debug("structured kernel %s (memory budget)", exc)
            return _by_row_groups(problem, plan, keys, budget, self_check, explanation,
                                  exc.rows)
        except structured.Fallback as exc:
            targets = [exc.module] if exc.module in plan.modules else list(plan.modules)
            for m in targets:
                plan.drop(m, exc.reason)
            continue
        except RuntimeError as exc:
            if explain_failure(exc, problem.model) is not None:
                raise
            reason = f"the structured pass failed: {type(exc).__name__}: {str(exc)[:200]}"
            for m in list(plan.modules):
                plan.drop(m, reason)
            return None
        if not self_check:
            return result
        verdict = structured.verify(plan, result, keys, problem.mode, problem.dtype,
                                    problem.census.dtypes if problem.census else ())
        explanation.self_check.update(verdict.values)
        if not verdict.bad_modules and not verdict.bad_keys:
            return result
        for m, why in verdict.bad_modules.items():
            log.debug("self-check sends %s to the exact path: %s", m, why)
            plan.drop(m, why)
        for key, why in verdict.bad_keys.items():
            log.debug("self-check sends the modules of %r to the exact path: %s", key, why)
            for m in [problem.param_owner.get(p, p) for p in keys[key]]:
                for mname, attrs in list(plan.params.items()):
                    if any(problem.param_owner.get(full) == m for full in attrs.values()):
                        plan.drop(mname, why)
    for m in list(plan.modules):
        plan.drop(m, "the self-check kept failing")
    return None


def _generic(problem: Problem, names: list[str], budget: int, chunk_size: int | None,
             methods: dict[str, str], self_check: bool = True,
             reasons: dict[str, str] | None = None) -> torch.Tensor:
    """Exact kernel of ``names`` by torch.func, or by the per-probe autograd loop where
    vmap cannot run the model (remembered for later groups) or where vmap's rows fail
    the autograd check (``self_check``; only these parameters, the reason in
    ``reasons``)."""
    if methods.get("") != "loop":
        try:
            kernel = generic_kernel(problem, names, budget, chunk_size, method="vmap",
                                    check=self_check)
            methods.update({n: "vmap" for n in names})
            return kernel
        except NTKError:
            raise
        except RowCheckFailed as exc:
            log.debug("self-check: %s; per-probe autograd loop", exc)
            if reasons is not None:
                reasons.update({n: f"self-check: {exc}; per-probe autograd loop"
                                for n in names})
            kernel = generic_kernel(problem, names, budget, chunk_size, method="loop")
            methods.update({n: "loop" for n in names})
            return kernel
        except Exception as exc:  # noqa: BLE001 - anything vmap cannot do, the loop can
            mapped = (explain_failure(exc, problem.model) if isinstance(exc, RuntimeError)
                      else None)
            if mapped is not None:
                raise mapped from exc
            log.debug("vmap failed (%s: %s); per-probe autograd loop", type(exc).__name__, exc)
            methods[""] = "loop"
    kernel = generic_kernel(problem, names, budget, chunk_size, method="loop")
    methods.update({n: "loop" for n in names})
    return kernel


def _kernels(problem: Problem, keys: dict[str, list[str]], implementation: str, budget: int,
             chunk_size: int | None, layer_paths: dict[str, str] | None = None,
             self_check: bool = True, split: Any = None
             ) -> tuple[dict[str, torch.Tensor], Explanation]:
    """Kernel of each key's parameters. Structured rules take the layers they provably
    cover (unless implementation='generic'), checked against autograd; the rest goes
    through torch.func (or the per-probe loop)."""
    out: dict[str, torch.Tensor] = {}
    explanation = Explanation()
    plan = structured.plan(problem, implementation, layer_paths, broadcast=True)
    methods: dict[str, str] = {}
    try:
        result = _structured(problem, plan, keys, budget, self_check, explanation, split)
        done = result.kernels if result is not None else {}
        handled = plan.handled
        if any(n not in handled for names in keys.values() for n in names):
            problem.check_single_probe()
        for key, names in keys.items():
            rest = [n for n in names if n not in handled]
            kernel = done.get(key)
            for group in _group(problem, rest, budget):
                part = _generic(problem, group, budget, chunk_size, methods, self_check,
                                explanation.reasons)
                kernel = part if kernel is None else kernel + part
            if kernel is None:
                kernel = torch.zeros(output_shape(problem), dtype=problem.dtype,
                                     device=problem.device)
            out[key] = kernel
    except RuntimeError as exc:
        mapped = explain_failure(exc, problem.model)
        if mapped is not None:
            raise mapped from exc
        raise
    explain_paths(problem, plan, methods, explanation)
    return out, explanation


def explain_paths(problem: Problem, plan: structured.Plan, methods: dict[str, str],
                  explanation: Explanation) -> None:
    """Fill ``explanation.paths`` (every trainable parameter's path) and the reasons of the
    modules some of whose parameters took the exact path."""
    for mname, attrs in plan.params.items():
        for full in attrs.values():
            explanation.paths[full] = f"structured: {type(plan.rules[mname]).__name__}"
    for name in problem.params:
        if name not in explanation.paths:
            explanation.paths[name] = f"generic: {methods.get(name, 'vmap')}"
    generic = {n for n in problem.params if n not in plan.handled}
    for name, why in plan.reasons.items():
        # a module's reason matters only while some parameter of it took the exact path
        if name in generic or any(n.startswith(name + ".") or name == "" for n in generic):
            explanation.reasons[name] = why


def empirical_ntk(model: torch.nn.Module, inputs: Any, targets: Any = None, *,
                  mode: ModeLike = "target", dtype: torch.dtype | None = None,
                  chunk_size: int | None = None, eval_mode: bool = True,
                  inputs2: Any = None, targets2: Any = None,
                  memory_budget: int | None = None,
                  output_fn: Callable[[Any], torch.Tensor] | None = None,
                  implementation: str = "auto",
                  layer_paths: dict[str, str] | None = None,
                  self_check: bool = True, explain: bool = False,
                  batch_to_probe: Callable[[Any], Any] | None = None,
                  block_size: int | None = None, out: str | None = None,
                  progress: bool = False, comm: Any = None) -> Any:
    r"""Empirical Neural Tangent Kernel of ``model`` over a probe batch.

    With theta the parameters that have ``requires_grad=True`` (buffers are used, never
    differentiated) and f(x) the output reshaped to (N, O) (a (N,) output is O = 1):

    ========  =====================================================================  ==============
    mode      definition                                                             shape
    ========  =====================================================================  ==============
    target    K[i,j] = <d f_{t_i}(x_i)/d theta, d f_{t_j}(x_j)/d theta>, t = targets  (N, N)
              (int64 labels; for O = 1, t_i = 0 and targets may be float or None)
    trace     K[i,j] = sum_a full[i,j,a,a]  (a sum; neural-tangents' trace_axes
              averages)                                                              (N, N)
    sum       NTK of g(x) = sum_a f_a(x) = sum_{a,b} full[i,j,a,b]                    (N, N)
    full      K[i,j,a,b] = <d f_a(x_i)/d theta, d f_b(x_j)/d theta>                   (N, N, O, O)
    ========  =====================================================================  ==============

    The empirical NTK of Jacot, Gabriel & Hongler (2018), "Neural Tangent Kernel:
    Convergence and Generalization in Neural Networks".

    Args:
        model: any ``nn.Module``; it is called as ``model(inputs)`` (a tuple batch is
            unpacked when ``forward`` takes several positional arguments, a dict batch
            when ``forward``'s parameters are its keys).
        inputs: a tensor (float features or int64 token ids) or a tuple/dict of tensors
            whose first dimension indexes the N probes.
        targets: (N,) int64 labels for ``mode="target"`` (ignored by the other modes).
        mode: ``"target"``, ``"trace"``, ``"sum"`` or ``"full"`` (or a
            :class:`.modes.KernelMode`, which owns what each mode means).
        dtype: compute in this dtype (``torch.float64`` for reference-grade kernels of a
            float32 model; the model itself is not changed). Default: the model's dtype.
        chunk_size: probes vectorised together by ``vmap`` on the generic path
            (default: as many as the memory budget allows).
        eval_mode: measure with the model in ``eval()`` (dropout off, BatchNorm uses its
            running statistics); every submodule's flag is restored afterwards.
        inputs2, targets2: a second probe set; the result is then the (N1, N2) (or
            (N1, N2, O, O)) cross kernel between ``inputs`` and ``inputs2``.
        memory_budget: bytes of Jacobian rows (generic path) or of per-probe gradient
            rows and activation Grams (structured path) held at once (default: 1 GiB
            on the CPU; on CUDA a quarter of the device's free memory, at most 16 GiB,
            see :mod:`.device`);
            larger problems are chunked over probes, outputs and parameter tensors. The
            peak memory of a call is this plus transient autograd buffers, in practice
            below 2-4x the budget.
        output_fn: maps the model's output to an (N, O) or (N,) tensor (e.g. for models
            returning dicts or tuples).
        implementation: ``"auto"`` / ``"structured"`` (structured per-layer rules for the
            layers that have one -- Linear, Conv1d/2d, BatchNorm (eval), LayerNorm,
            GroupNorm, Embedding -- torch.func for every other parameter) or
            ``"generic"`` (torch.func for every parameter).
        layer_paths: per-module override, ``{module_name: "generic" | "gram" | "rows"}``:
            force the generic path for a module, or one of the two structured routes
            (Gram of inputs and cotangents, or materialised per-probe gradient rows)
            instead of the cost model's choice.
        self_check: verify every structured contribution against autograd before using
            it (on by default; see "Exactness" below). ``False`` saves its cost.
        explain: also return an :class:`Explanation` of which path computed each
            parameter, why a module took the exact path, and the self-check's values.
        batch_to_probe, block_size, out, progress, comm: whole-dataset kernels.
            ``inputs`` / ``inputs2`` may be a ``DataLoader`` (or any iterable of
            batches; a batch is ``(inputs, targets)`` or a tensor, other shapes map
            through ``batch_to_probe(batch) -> (inputs, targets)``); the kernel is then
            built in blocks of ``block_size`` probes (:mod:`.blocked`), optionally
            written to the ``.npy`` file ``out`` (returned as a ``numpy.memmap``), with
            a tqdm bar if ``progress``, and split across ranks by the communicator
            ``comm`` (:mod:`.distributed`; every rank passes the same probes).

    Exactness: a structured rule takes a parameter only when the trial forward shows
    that every use of it happens inside its own module's call, in the form the rule
    covers (so weights read by ``nn.MultiheadAttention``, used through ``F.linear``
    elsewhere, tied, or reparametrised by hooks take the exact path). The self-check
    then draws two Gaussian probe weightings ``w`` and compares, per module,
    ``|| sum_i w_i g_i ||^2`` from the rule's per-probe gradients ``g_i`` with autograd's
    gradient of ``sum_i w_i f(x_i)`` (one extra batched backward pass a weighting: about
    the cost of one gradient of the batch, i.e. +40-100 % in target mode, less in trace
    mode), and the kernel's quadratic form ``w^T K w`` with the same quantity from the
    rows; a mismatch beyond round-off sends the module to the exact path. The exact
    path is torch.func (``vmap`` over probes of ``vjp``), or a per-probe
    ``torch.autograd.grad`` loop where ``vmap`` cannot run the model (RNNs, activation
    checkpointing, saved-tensor hooks).

    Returns:
        The kernel as a tensor of dtype ``dtype`` on the model's device (with
        ``explain=True``: a tuple ``(kernel, Explanation)``).

    Raises:
        NTKError: on input the kernel cannot be measured for; the message names the fix.

    Side effects: none. Parameters, buffers, ``.grad``, the global and CUDA RNG states and
    every submodule's train/eval flag are as they were; TF32 is disabled during the
    computation on CUDA.
    """
    return _dispatch(model, inputs, targets, mode, dtype, chunk_size, eval_mode, inputs2,
                     targets2, memory_budget, output_fn, implementation, layer_paths,
                     self_check, False, batch_to_probe, block_size, out, progress, comm, explain)


def layerwise_ntk(model: torch.nn.Module, inputs: Any, targets: Any = None, *,
                  mode: ModeLike = "target", dtype: torch.dtype | None = None,
                  chunk_size: int | None = None, eval_mode: bool = True,
                  inputs2: Any = None, targets2: Any = None,
                  memory_budget: int | None = None,
                  output_fn: Callable[[Any], torch.Tensor] | None = None,
                  implementation: str = "auto",
                  layer_paths: dict[str, str] | None = None,
                  self_check: bool = True, explain: bool = False,
                  batch_to_probe: Callable[[Any], Any] | None = None,
                  block_size: int | None = None, out: str | None = None,
                  progress: bool = False, comm: Any = None) -> Any:
    """Per-layer breakdown of :func:`empirical_ntk`: ``{name: K_name}`` with
    ``sum(K_name) == empirical_ntk(...)``.

    The NTK is a sum over parameters, ``K = sum_p J_p J_p^T``, so it splits exactly by
    layer. Keys are the ``named_modules()`` names of the (leaf) modules that own
    parameters directly, e.g. ``"net.0"``; a free ``nn.Parameter`` owned by a container
    module or by the root is keyed by its ``named_parameters()`` name. Only trainable
    parameters count: a layer whose parameters are all frozen is absent. Arguments,
    shapes and side-effect guarantees are those of :func:`empirical_ntk`.
    """
    return _dispatch(model, inputs, targets, mode, dtype, chunk_size, eval_mode, inputs2,
                     targets2, memory_budget, output_fn, implementation, layer_paths,
                     self_check, True, batch_to_probe, block_size, out, progress, comm, explain)


def _dispatch(model: torch.nn.Module, inputs: Any, targets: Any, mode: ModeLike,
              dtype: torch.dtype | None, chunk_size: int | None, eval_mode: bool,
              inputs2: Any, targets2: Any, memory_budget: int | None,
              output_fn: Callable[[Any], torch.Tensor] | None, implementation: str,
              layer_paths: dict[str, str] | None, self_check: bool, by_layer: bool,
              batch_to_probe: Callable[[Any], Any] | None, block_size: int | None,
              out: str | None, progress: bool, comm: Any, explain: bool) -> Any:
    """The kernel (``by_layer``: the dict of per-layer kernels), with its
    :class:`Explanation` if ``explain``: blocked (:mod:`.blocked`) when the probes come
    from a loader, a file, blocks or ranks are asked for, else in one engine call."""
    result: Any
    if _blocked.wanted(inputs, inputs2, block_size, out, comm):
        result, explanation = _blocked_run(
            model, inputs, targets, mode, dtype, chunk_size, eval_mode, inputs2, targets2,
            memory_budget, output_fn, implementation, layer_paths, self_check, by_layer,
            batch_to_probe, block_size, out, progress, comm)
    else:
        kernels, explanation = _run(model, inputs, targets, mode, dtype, chunk_size,
                                    eval_mode, inputs2, targets2, memory_budget, output_fn,
                                    implementation, layer_paths, self_check, by_layer)
        result = kernels if by_layer else kernels[""]
    return (result, explanation) if explain else result


def _run(model: torch.nn.Module, inputs: Any, targets: Any, mode: ModeLike,
         dtype: torch.dtype | None, chunk_size: int | None, eval_mode: bool, inputs2: Any,
         targets2: Any, memory_budget: int | None,
         output_fn: Callable[[Any], torch.Tensor] | None, implementation: str,
         layer_paths: dict[str, str] | None, self_check: bool, by_layer: bool,
         split: Any = None) -> tuple[dict[str, torch.Tensor], Explanation]:
    with frozen_measurement(model, eval_mode), cast_floating(model, resolve_dtype(model, dtype)):
        problem = build_problem(model, inputs, targets, mode=mode, dtype=dtype,
                                inputs2=inputs2, targets2=targets2, output_fn=output_fn)
        budget = _check(problem, implementation, memory_budget, chunk_size)
        keys: dict[str, list[str]] = {}
        for name in problem.params:
            key = problem.param_owner.get(name, name) if by_layer else ""
            keys.setdefault(key, []).append(name)
        return _kernels(problem, keys, implementation, budget, chunk_size, layer_paths,
                        bool(self_check), split)


def _blocked_run(model: torch.nn.Module, inputs: Any, targets: Any, mode: ModeLike,
                 dtype: torch.dtype | None, chunk_size: int | None, eval_mode: bool,
                 inputs2: Any, targets2: Any, memory_budget: int | None,
                 output_fn: Callable[[Any], torch.Tensor] | None, implementation: str,
                 layer_paths: dict[str, str] | None, self_check: bool, by_layer: bool,
                 batch_to_probe: Callable[[Any], Any] | None, block_size: int | None,
                 out: str | None, progress: bool, comm: Any) -> tuple[Any, Any]:
    """Loader / blocked / memory-mapped / distributed kernels: :mod:`.blocked` calls the
    one-shot engine once a block."""
    def block_fn(x: Any, t: Any, x2: Any, t2: Any, check: bool,
                 paths: dict[str, str] | None, split: Any = None
                 ) -> tuple[dict[str, torch.Tensor], Explanation]:
        return _run(model, x, t, mode, dtype, chunk_size, eval_mode, x2, t2,
                    _blocked.call_budget(memory_budget, device, _blocked.held_bytes(x, x2)),
                    output_fn, implementation, paths,
                    check, by_layer, split)

    def num_outputs(x: Any) -> int:
        return model_outputs(model, x, dtype=dtype, eval_mode=eval_mode,
                             output_fn=output_fn).shape[1]

    first = next((p for p in model.parameters() if p.requires_grad), None)
    device = first.device if first is not None else torch.device("cpu")
    return _blocked.blocked_kernel(
        block_fn, inputs, targets, inputs2, targets2, mode=mode,
        dtype=resolve_dtype(model, dtype),
        device=device,
        num_outputs=num_outputs, budget=memory_budget or default_budget(device),
        batch_to_probe=batch_to_probe, block_size=block_size, out=out, progress=progress,
        comm=comm, self_check=bool(self_check), layer_paths=layer_paths, layerwise=by_layer)


def model_outputs(model: torch.nn.Module, inputs: Any, *, dtype: torch.dtype | None = None,
                  eval_mode: bool = True,
                  output_fn: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The outputs f(x) the kernel is defined on, shape (N, O) (a (N,) output gives O = 1),
    measured exactly like :func:`empirical_ntk` (same call convention, ``output_fn``,
    eval mode and dtype; no gradient) and with the same guarantee of no side effects.
    Non-finite outputs are returned as they are (the kernel functions refuse them)."""
    with frozen_measurement(model, eval_mode), torch.no_grad(), \
            cast_floating(model, resolve_dtype(model, dtype)):
        problem = build_problem(model, inputs, None, mode=TRACE, dtype=dtype,
                                output_fn=output_fn)
        return problem.forward(problem.tensors(), problem.x1)
