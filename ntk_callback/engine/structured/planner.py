"""The planner: which module computes which parameters, by which route.

A parameter is taken by a structured rule only when the rule provably describes every
way it enters the output (:func:`plan`); each rejected module gets a reason, kept in
``Plan.reasons`` and reported by ``explain=True``. The cost model (:func:`choose`) then
picks the Gram or the rows route per term.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import NTKError
from ..modes import KernelMode
from ..problem import Problem
from .rules import Call, Rule, rule_for
from .terms import Term

ROUTES = ("generic", "gram", "rows")
_STOCHASTIC = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd,
               nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class Plan:
    """Which module computes which parameters, and by which route."""

    modules: dict[str, nn.Module] = field(default_factory=dict)     # name -> module
    rules: dict[str, Rule] = field(default_factory=dict)            # name -> its rule
    params: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {attr: full name}
    calls: dict[str, int] = field(default_factory=dict)             # module -> calls a forward
    forced: dict[str, str] = field(default_factory=dict)            # module name -> route
    reasons: dict[str, str] = field(default_factory=dict)           # module -> why not taken
    # set for good once the model turns out to need it
    copy_outputs: bool = False   # an op modified a captured tensor in place
    broadcast: bool = False      # broadcast calls admitted (the self-check runs)
    broadcasting: set[str] = field(default_factory=set)  # modules taken with such calls
    handled: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.modules)

    def add(self, name: str, module: nn.Module, rule: Rule, attrs: dict[str, str],
            calls: int) -> None:
        self.modules[name], self.rules[name], self.params[name] = module, rule, attrs
        self.calls[name] = calls
        self.handled.update(attrs.values())

    def drop(self, name: str, reason: str) -> None:
        """Send a planned module to the exact path, recording why."""
        if name in self.modules:
            for full in self.params.pop(name).values():
                self.handled.discard(full)
            del self.modules[name], self.rules[name], self.calls[name]
            self.forced.pop(name, None)
            self.broadcasting.discard(name)
        self.reasons[name] = reason


def _inside_compiled(name: str, compiled: list[str]) -> bool:
    return any(name == c or name.startswith(c + ".") for c in compiled)


def plan(problem: Problem, implementation: str,
         layer_paths: dict[str, str] | None = None, broadcast: bool = False) -> Plan:
    """Choose the modules the structured rules take.

    A module is taken for the parameters its rule covers when: it has a rule for its
    exact ``forward`` (:func:`.rules.rule_for`); it is not inside a ``torch.compile``d
    module and has no forward hooks of its own; the trial forward called it at least once
    and every call has the form the rule accepts (e.g. one tensor input batched along
    dim 0, no keyword arguments); and each such parameter is registered once in the model
    and every use of it in the trial forward happened inside this module's own call.
    ``layer_paths`` maps module names to ``"generic"``, ``"gram"`` or ``"rows"`` to force
    a path (``"gram"``/``"rows"`` apply to weight terms that have both routes).
    ``broadcast`` (set when the self-check runs) also admits a rule's broadcast calls
    (:meth:`.rules.Rule.broadcasts`), whose per-probe treatment only the check verifies.
    """
    result = Plan(broadcast=broadcast)
    layer_paths = dict(layer_paths or {})
    for name, route in layer_paths.items():
        if route not in ROUTES:
            raise NTKError(f"layer_paths[{name!r}] = {route!r}; choose one of {ROUTES}.")
    if implementation == "generic":
        return result
    model = problem.model
    census = problem.census
    if census is None or not census.complete:
        return result
    if any(isinstance(m, _STOCHASTIC) and m.training for m in model.modules()):
        result.reasons[""] = ("a BatchNorm/Dropout module is in training mode: probes "
                              "interact, no structured rule applies")
        return result
    if nn.modules.module._global_forward_hooks:
        result.reasons[""] = "global forward hooks are registered"
        return result
    registrations: dict[int, int] = {}
    modules = list(model.named_modules())
    for _, module in modules:
        for p in module._parameters.values():
            if p is not None:
                registrations[id(p)] = registrations.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    compiled = [n for n, m in modules if isinstance(m, _optimized_module_type())]
    for mname, module in modules:
        own = {attr: p for attr, p in module._parameters.items() if p is not None}
        rule = rule_for(module)
        for attr in (rule.params if rule is not None else ()):
            if "." in attr:  # a parameter of a child that the rule's module reads itself
                try:
                    own[attr] = module.get_parameter(attr)
                except AttributeError:
                    pass
        trainable = {attr: names[id(p)] for attr, p in own.items()
                     if names.get(id(p)) in problem.params}
        if not trainable:
            continue
        if rule is None:
            result.reasons[mname] = f"no structured rule for {type(module).__name__}"
            continue
        if layer_paths.get(mname) == "generic":
            result.reasons[mname] = "layer_paths asks for the generic path"
            continue
        if _inside_compiled(mname, compiled):
            result.reasons[mname] = "inside a torch.compile'd module"
            continue
        if module._forward_hooks:
            result.reasons[mname] = "the module has forward hooks"
            continue
        calls = census.calls.get(mname, [])
        if not calls:
            result.reasons[mname] = "never called by the forward"
            continue
        recorded = [Call(c.args, c.kwargs, c.output) for c in calls]
        shared = [c for c in recorded if not rule.accepts(module, c, census.batch)]
        bad = [c for c in shared if not (broadcast and rule.broadcasts(module, c, census.batch))]
        if bad:
            result.reasons[mname] = ("a call's inputs/outputs are not the form the rule "
                                     "covers (e.g. one tensor batched along dim 0)")
            continue
        attrs: dict[str, str] = {}
        for attr, full in trainable.items():
            if attr not in rule.params:
                result.reasons[full] = f"{type(module).__name__}'s rule does not cover {attr!r}"
            elif registrations[id(own[attr])] != 1:
                result.reasons[full] = "registered in several modules (tied)"
            elif census.uses.get(full, set()) != {mname}:
                result.reasons[full] = "used outside its module's own call"
            elif full in result.handled:
                result.reasons[full] = "already covered by another module's rule"
            else:
                attrs[attr] = full
        if attrs:
            result.add(mname, module, rule, attrs, len(calls))
            if shared:
                result.broadcasting.add(mname)
            if mname in layer_paths:
                result.forced[mname] = layer_paths[mname]
    return result


def _optimized_module_type() -> type:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # noqa: BLE001 - torch builds without dynamo
        return type(None)
    return OptimizedModule


# --------------------------------------------------------------------------- cost model

def rows_bytes(term: Term, k: int, n_all: int, itemsize: int) -> int:
    return n_all * k * term.size()[4] * itemsize


def choose(term: Term, k: int, n1: int, n2: int | None, mode: KernelMode, budget: int,
           itemsize: int, forced: str | None) -> str:
    """Cost model for a term with ``k`` cotangent rows: flops of each route; the rows route
    only while its rows fit ``budget``."""
    if term.rows_only:
        return "rows"
    _, s, o, c, p = term.size()
    pairs = mode.pairs(k)
    n_all = n1 + (n2 if n2 is not None else 0)
    nn2 = n1 * (n2 if n2 is not None else n1)
    if forced in ("gram", "rows"):
        return forced
    build = k * n_all * s * (o * c if term.linear else p)
    rows_flops = 2 * build + 2 * pairs * nn2 * p
    gram_flops = 2 * nn2 * s * s * ((c if term.linear else 1) + k * o + pairs)
    if rows_bytes(term, k, n_all, itemsize) > budget:
        return "gram"
    return "rows" if rows_flops <= gram_flops else "gram"
