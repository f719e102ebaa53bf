"""The planner: which module computes which parameters, by which route.

A parameter is taken by a structured rule only when the rule provably describes every
way it enters the output (:func:`plan`); each rejected module gets a reason, kept in
``Plan.reasons`` and reported by ``explain=True``. The cost model (:func:`choose`) then
picks the Gram or the rows route per term.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..census import Census
from ..device import CPU, DeviceProfile
from ..errors import NTKError
from ..modes import KernelMode
from ..problem import Problem
from .rules import BroadcastUseRule, Call, Rule, rule_for
from .terms import ConvTerm, Term

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
    # parameters registered in several modules (tied) and taken by every module that uses
    # them: the per-probe gradient is the sum of the rows of each use (rows route)
    tied: set[str] = field(default_factory=set)
    # parameters used once, through p.expand(n, ...) or x + p broadcast over the probes
    # (ViT's cls token and position embeddings): taken under their own name as a
    # pseudo-module (the owner module, :class:`.rules.BroadcastUseRule`), name -> form
    free: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.modules)

    def add(self, name: str, module: nn.Module, rule: Rule, attrs: dict[str, str],
            calls: int) -> None:
        self.modules[name], self.rules[name], self.params[name] = module, rule, attrs
        self.calls[name] = calls
        self.handled.update(attrs.values())

    def drop(self, name: str, reason: str) -> None:
        """Send a planned module to the exact path, recording why. A tied parameter of it
        leaves every other module too (it is covered only while all its uses are)."""
        if name in self.modules:
            fulls = list(self.params.pop(name).values())
            del self.modules[name], self.rules[name], self.calls[name]
            self.forced.pop(name, None)
            self.broadcasting.discard(name)
            self.free.pop(name, None)
            for full in fulls:
                self.handled.discard(full)
                if full in self.tied:
                    self.tied.discard(full)
                    self._release(full, f"tied with {name!r}, which takes the exact path")
        self.reasons[name] = reason

    def _release(self, full: str, reason: str) -> None:
        """Take the parameter ``full`` from every module that has it (a module left with
        no parameter leaves the plan)."""
        for mname, attrs in list(self.params.items()):
            for attr in [a for a, f in attrs.items() if f == full]:
                del attrs[attr]
            if not attrs:
                self.drop(mname, reason)
        self.handled.discard(full)
        self.reasons[full] = reason

    def units(self) -> dict[str, str]:
        """Planned module -> the module it is checked with: modules that share a tied
        parameter form one unit (the first name of the group in sorted order), since the
        rows of the parameter are the sum over them."""
        unit = {m: m for m in self.modules}

        def find(m: str) -> str:
            while unit[m] != m:
                m = unit[m]
            return m

        for full in self.tied:
            owners = sorted(m for m, attrs in self.params.items() if full in attrs.values())
            for m in owners[1:]:
                a, b = find(owners[0]), find(m)
                unit[max(a, b)] = min(a, b)
        return {m: find(m) for m in self.modules}


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
    ``broadcast`` also admits a rule's broadcast calls (:meth:`.rules.Rule.broadcasts`)
    and free parameters used once through a broadcast; their per-probe copies are
    verified at run time (:func:`.checkdata._separate_copies`, or the two-vector self-check).
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
    owners: dict[int, set[str]] = {}  # parameter -> the modules that register it
    modules = list(model.named_modules())
    for oname, module in modules:
        for p in module._parameters.values():
            if p is not None:
                registrations[id(p)] = registrations.get(id(p), 0) + 1
                owners.setdefault(id(p), set()).add(oname)
    claims: dict[str, set[str]] = {}  # tied parameter -> modules that took it
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
        if broadcast:
            rule = rule.for_calls(module, recorded, census.batch)
        shared = [c for c in recorded if not rule.accepts(module, c, census.batch)]
        bad = [c for c in shared if not (broadcast and rule.broadcasts(module, c, census.batch))]
        if bad:
            result.reasons[mname] = ("a call's inputs/outputs are not the form the rule "
                                     "covers (e.g. one tensor batched along dim 0)")
            continue
        if not _same_form(mname, module, rule, recorded, census, broadcast):
            result.reasons[mname] = ("a call's size matches the number of probes only by "
                                     "coincidence (it does not follow a smaller batch)")
            continue
        attrs: dict[str, str] = {}
        for attr, full in trainable.items():
            if attr not in rule.params:
                result.reasons[full] = f"{type(module).__name__}'s rule does not cover {attr!r}"
            elif registrations[id(own[attr])] != 1:
                # tied: taken while every use is inside a call of a module registering
                # it whose rule writes its rows in the parameter's own layout (checked
                # after the loop: every such module must take it)
                used = census.uses.get(full, set())
                if (attr in rule.tieable and mname in used
                        and used <= owners[id(own[attr])]):
                    attrs[attr] = full
                    claims.setdefault(full, set()).add(mname)
                else:
                    result.reasons[full] = ("registered in several modules (tied) and used "
                                            "where no rule sums its uses")
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
    for full, takers in claims.items():
        if census.uses.get(full, set()) <= takers and len(takers) > 1:
            result.tied.add(full)
        else:
            result._release(full, "registered in several modules (tied) and not every use "
                                  "is covered by a rule")
    if broadcast and census.batch > 1:
        _plan_free(result, problem, layer_paths, compiled, registrations)
    return result


def _same_form(mname: str, module: nn.Module, rule: Rule, recorded: list[Call],
               census: Census, broadcast: bool) -> bool:
    """Whether the module's calls take the same form in the census on one probe fewer
    (:attr:`..census.Census.alt`): an input whose first size equals the trial batch is
    batched only if that size follows the batch."""
    alt = census.alt
    if alt is None:
        return True
    calls = alt.calls.get(mname, [])
    if len(calls) != len(recorded):
        return False
    for c1, c in zip(recorded, calls):
        c2 = Call(c.args, c.kwargs, c.output)
        if rule.accepts(module, c1, census.batch) != rule.accepts(module, c2, alt.batch):
            return False
        if broadcast and (rule.broadcasts(module, c1, census.batch)
                          != rule.broadcasts(module, c2, alt.batch)):
            return False
    return True


def _plan_free(result: Plan, problem: Problem, layer_paths: dict[str, str],
               compiled: list[str], registrations: dict[int, int]) -> None:
    """Parameters no rule took whose one use in the trial forward is a broadcast over the
    probes (:func:`..census.broadcast_form`): the per-probe gradient is the cotangent of
    that op's result for the probe, summed over the broadcast axes (the per-probe
    copies verified to stay per probe at run time, like broadcast calls)."""
    census = problem.census
    if census is None:
        return
    model = problem.model
    for full, p in model.named_parameters():
        if full not in problem.params or full in result.handled or registrations.get(id(p)) != 1:
            continue
        forms = census.forms.get(full, [])
        if len(forms) != 1 or forms[0] not in ("expand", "add"):
            continue
        if census.alt is not None and census.alt.forms.get(full, []) != forms:
            continue  # the broadcast over the probes was a coincidence of sizes
        owner, _, attr = full.rpartition(".")
        if layer_paths.get(owner) == "generic" or layer_paths.get(full) == "generic" \
                or _inside_compiled(owner, compiled):
            continue
        module = model.get_submodule(owner) if owner else model
        result.add(full, module, BroadcastUseRule(), {attr: full}, 1)
        result.broadcasting.add(full)
        result.free[full] = forms[0]


def _optimized_module_type() -> type:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # noqa: BLE001 - torch builds without dynamo
        return type(None)
    return OptimizedModule


# --------------------------------------------------------------------------- cost model

def rows_bytes(term: Term, k: int, n_all: int, itemsize: int) -> int:
    """Bytes of the rows route's per-probe gradient rows of ``term``: (n_all, k, P)."""
    return n_all * k * term.size()[4] * itemsize


def choose(term: Term, k: int, n1: int, n2: int | None, mode: KernelMode, budget: int,
           itemsize: int, forced: str | None, device: DeviceProfile = CPU) -> str:
    """Cost model for a term with ``k`` cotangent rows: the rows route only while its rows
    fit ``budget``; then the cheaper route on ``device`` (:mod:`..device`).

    Flops (S positions, o outputs, c inputs, P parameters, n1 x n2 probe pairs, ``pairs``
    row pairs a probe pair): the rows route builds the rows, ``k n S o c`` (linear terms)
    or ``k n S P``, and multiplies them, ``2 pairs n1 n2 P``; the Gram route multiplies
    (n S) x (n S) Grams of inputs and cotangents, ``2 n1 n2 S^2 (c + k o + pairs)``. On
    the CPU (``flops_per_byte = flops_per_launch = 0``) that is the whole model. On CUDA
    the memory traffic of each route (rows written and read; the Gram route's blocks and
    the unfolded patches of a convolution) and the Gram route's launches (one set a block
    of probes, as :func:`.driver._add_term_gram` blocks them) are added in
    flop-equivalents; and rows that would take more than ``device.reserve_share`` of the
    budget left must save at least ``device.reserve_density * n1`` flop-equivalents a
    byte (the Gram route's cost grows as n^2, the rows as n):
    terms come deepest layer first, and the budget is kept for the high-resolution
    convolutions met last, whose im2col Gram route costs the most of all.
    """
    if term.rows_only:
        return "rows"
    _, s, o, c, p = term.size()
    pairs = mode.pairs(k)
    n_all = n1 + (n2 if n2 is not None else 0)
    nn2 = n1 * (n2 if n2 is not None else n1)
    if forced in ("gram", "rows"):
        return forced
    build = k * n_all * s * (o * c if term.linear else p)
    rows_flops: float = 2 * build + 2 * pairs * nn2 * p
    gram_flops: float = 2 * nn2 * s * s * ((c if term.linear else 1) + k * o + pairs)
    rows_size = rows_bytes(term, k, n_all, itemsize)
    if rows_size > budget:
        return "gram"
    if not (device.flops_per_byte or device.flops_per_launch):
        return "rows" if rows_flops <= gram_flops else "gram"
    # the Gram route's blocks: per block row, n2 S^2 entries of each Gram and their
    # product (as _add_term_gram sizes them); a conv's patches unfolded, written and read
    per_row = (n2 if n2 is not None else n1) * s * s * itemsize * (3 + mode.term_gram_extra(k))
    blocks = -(-n1 * per_row // max(1, budget))
    unfold = 2 * n_all * s * c * itemsize if isinstance(term, ConvTerm) else 0
    rows_cost = rows_flops + device.flops_per_byte * 2 * rows_size + device.flops_per_launch * 4 * k
    gram_cost = (gram_flops + device.flops_per_byte * (n1 * per_row + unfold)
                 + device.flops_per_launch * 6 * blocks)
    if rows_cost > gram_cost:
        return "gram"
    # The backward offers the deep layers (small S, large P) first; rows that take a large
    # share of what is left must save enough per byte, or the budget is gone before the
    # high-resolution layers, whose Gram route costs orders of magnitude more.
    if rows_size > device.reserve_share * budget \
            and gram_cost - rows_cost < device.reserve_density * n1 * rows_size:
        return "gram"
    return "rows"
