"""NTKReportCallback: reports the empirical NTK of the LightningModule while it trains.

A thin Lightning adapter: the kernel comes from :func:`ntk_callback.empirical_ntk`, the
numbers from :func:`ntk_callback.analyze_ntk`; this module only decides *when* to measure,
*which* probes to use, and *where* the results go (the logged keys and their conventions:
README.md and docs/conventions.md).

Timeline of one ``trainer.fit``:

* ``setup``: refuses sharded strategies (FSDP, DeepSpeed, model parallel): one rank's
  module does not hold all parameters, so its kernel would be silently wrong.
* ``on_train_start`` (after the sanity check, before the first optimizer step): probes
  are drawn (or taken from ``probes=`` / the restored state) and broadcast from rank 0;
  when the training-dynamics metrics apply, held-out probes are drawn from the validation
  data the same way; then the initial kernel K0 is measured and reported (``tag="init"``;
  with ``init_kernel_at="first_epoch_end"`` at the end of the first epoch instead).
* ``on_before_optimizer_step`` / ``on_train_batch_end`` (dynamics only): the learning rate
  every trainable parameter is stepped with is read from its optimizer's ``param_groups``
  (read only); a batch whose steps moved all of them with one learning rate adds it to the
  learning-rate sum, once per step of the whole theta (however many optimizers took it).
* ``on_train_epoch_end``: when ``(current_epoch + 1) % every_n_epochs == 0`` a report
  (``tag="epoch"``). It runs before ``ModelCheckpoint`` / ``EarlyStopping``, which can
  therefore monitor e.g. ``ntk/kta``.
* ``on_train_end``: a final report (``tag="final"``) when the weights changed since the
  last report (the last epoch was not a multiple of ``every_n_epochs``, or training
  stopped mid-epoch).

Under ``fast_dev_run`` the callback runs as usual (K0, then the report after the single
epoch), but Lightning replaces every logger with a no-op ``DummyLogger``: only the
console report and ``trainer.callback_metrics`` remain.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._lightning import (
    Callback,
    NTKCallbackConfigError,
    MisconfigurationException,
    rank_zero_warn,
    sharded_strategy_name,
)
from ._probes import (
    ProbeError,
    Probes,
    apply_to_tensors,
    default_batch_to_probe,
    draw_probes,
    find_dataloader,
    num_samples,
    to_cpu,
    validate_probes,
)
from .engine import KernelMode, NTKError, empirical_ntk, layerwise_ntk, mode_names, model_outputs
from .engine.projection import output_projections, projected_output_fn
from .insight import DynamicsTracker, layer_drift, layer_shares
from .loggers import DEFAULT_PREFIX, LoggerDispatcher, ReportMedia, check_prefix, prefixed_scalars
from .plotting import HEATMAP_SCALES
from .report import NTKReport, analyze_ntk

_SOURCES = ("train", "val")
_ALIGNMENTS = ("auto", "trace", "projected")
_INIT_AT = ("train_start", "first_epoch_end")
_CONSOLE = ("full", "compact", "off")
_EXACT_TRACE_MAX_OUTPUTS = 16  # alignment="auto": the exact trace kernel up to this many outputs
_PROJECTION_SEED_OFFSET = 2  # the projections' generator seed is seed + 2 (probes: seed, held-out: seed + 1)
_FIGURE_EVERY = 5  # history pictures: always at the first, every 5th and the last report
_BN_SCALE_WARN = 0.3  # |log10(tr K / tr K0)| (a factor 2) from which a BatchNorm statistics change is flagged
_REDUCTIONS = ("mean", "sum", "half_sum")
STATE_VERSION = 1
_BASE_PICTURES = ("spectrum", "drift")  # history pictures always drawn; "layers" / "dynamics" when active
_FIGURE_BUDGET = 0.02  # fraction of the training time the history pictures may take before the end
_CONSOLE_LAYERS = 4  # layers named in the console line
# dynamics keys that depend on the learning rate: at the current lr, over the report
# interval, since the linearised network started (see _dynamics_metrics)
_CURRENT_LR_KEYS = ("steps_to_halve_residual", "epochs_to_halve_residual", "slowest_mode_time_constant")
_PREDICTION_KEYS = ("predicted_residual_norm", "predicted_vs_observed_residual", "residual_prediction_error")
_LINEARIZED_KEYS = ("linearization_gap", "linearized_heldout_mse")
_LR_RTOL = 1e-9  # learning rates this close count as one

# (id of an optimizer's param_groups list, [(the group's params, its lr)]): one optimizer step
_StepRecord = Tuple[int, List[Tuple[Any, float]]]


def _step_record(optimizer: Any) -> Optional[_StepRecord]:
    """The param groups and their lrs of ``optimizer`` now (a Lightning-wrapped optimizer
    shares the raw one's ``param_groups`` list, hence the key); None when unreadable."""
    groups = getattr(optimizer, "param_groups", None)
    try:
        return id(groups), [(g["params"], float(g["lr"])) for g in groups]
    except (KeyError, TypeError, ValueError):
        return None


def _add_lrs(lrs: Dict[int, List[float]], record: _StepRecord) -> None:
    """Append a step's lr to the sequence of every parameter in ``lrs`` it steps."""
    for params, lr in record[1]:
        for p in params:
            seq = lrs.get(id(p))
            if seq is not None:
                seq.append(lr)


def _one_sequence(lrs: Dict[int, List[float]]) -> Optional[Tuple[float, ...]]:
    """The lr sequence all parameters share (``()`` for none or no parameters), or None."""
    distinct = {tuple(v) for v in lrs.values()}
    if not distinct:
        return ()
    first = next(iter(distinct))
    for other in distinct:
        if len(other) != len(first) or not all(
            math.isclose(a, b, rel_tol=_LR_RTOL, abs_tol=0.0) for a, b in zip(first, other)
        ):
            return None
    return first


def _name_list(names: List[str], limit: int = 4) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise NTKCallbackConfigError(f"NTKReportCallback({name}={value!r}): expected an integer >= {minimum}.")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise NTKCallbackConfigError(f"NTKReportCallback({name}={value!r}): expected True or False.")
    return value


class NTKReportCallback(Callback):
    """Measure, analyse and log the empirical NTK of the model during ``trainer.fit``.

    Args:
        num_probes: probes drawn from the data when ``probes`` is not given (>= 1). The
            kernel is (num_probes, num_probes); cost grows like num_probes (Jacobian) and
            num_probes^2 (kernel).
        every_n_epochs: report after epoch ``e`` when ``(e + 1) % every_n_epochs == 0``.
        mode: ``"target"`` (NTK of the logit of each probe's own label; regression
            models: their single output), ``"trace"`` (sum over outputs) or ``"sum"``
            (NTK of the summed outputs); see docs/conventions.md. The spectrum, drift and
            layer metrics are computed on this kernel; the alignments on a label-free one
            (``alignment``).
        probes: explicit ``(inputs, targets)`` (targets may be None); overrides drawing.
        probe_source: ``"train"`` or ``"val"``: which dataloader probes are drawn from.
        seed: seed of the callback's own ``torch.Generator`` used to draw probes (the
            global RNGs never move).
        batch_to_probe: ``batch -> (inputs, targets)`` for batch structures the default
            mapping (tensor, ``(x, y, ...)``, dicts with ``x``/``input(s)`` and
            ``y``/``target(s)``/``label(s)``) does not understand. Subclasses may override
            the :meth:`batch_to_probe` method instead.
        strict: re-raise faults (NaN/inf kernels, out-of-memory, engine errors) instead
            of warning and skipping the report.
        dtype: dtype of the kernel computation (e.g. ``torch.float64`` for reference
            grade numbers); default the model's dtype.
        log_images: write the heatmap/histogram/pictures to loggers that support media.
        log_figures: include the matplotlib pictures ``ntk/spectrum`` (the spectrum of
            every report on one plot), ``ntk/drift`` (drift and alignment against the
            step), ``ntk/layers`` and ``ntk/dynamics``. They summarise the whole history, so
            they are drawn at the first report, at every 5th report and at the last one,
            and at the reports in between only while drawing them takes at most 2 % of the
            training time (needs matplotlib; the heatmap and histogram do not).
        log_console: print the report on the console; ``False`` is ``console="off"``.
        memory_budget: bytes for the engine's Jacobian blocks (engine default when None).
        output_fn: maps ``pl_module(inputs)`` to (N, O) logits / (N,) outputs when
            ``forward`` returns something else (a dict, a tuple, a distribution).
        layerwise: also compute the per-layer kernels (``ntk_callback.layerwise_ntk``; the
            total kernel is their sum, so this costs little) and log each layer's share of
            the trace ``ntk/layer_share/<layer>`` = tr K_l / tr K and its own drift
            ``ntk/layer_drift/<layer>`` = ||K_l - K0_l||_F / ||K0_l||_F, plus the picture
            ``ntk/layers``. Layer names are ``named_modules()`` names (``net.0``).
        dynamics: the training-dynamics metrics of a regression model (see below):
            ``"auto"`` turns them on when the model has one output per probe and the probe
            targets are floating point, ``True`` asks for them (one warning when they
            cannot apply), ``False`` turns them off.
        num_heldout: held-out probes drawn at train start from the validation dataloader
            (own generator, seed ``seed + 1``) for ``ntk/linearization_gap`` and the
            held-out errors; 0, or no validation dataloader, skips those metrics.
        loss_reduction: how the training loss reduces the squared errors, which fixes the
            learning-rate convention (the linearised dynamics use the SUM loss
            ``1/2 sum (f - y)^2``, docs/conventions.md): ``"mean"`` (PyTorch ``mse_loss`` default; an optimizer
            step ``lr`` counts as ``2 lr / n`` with n the number of probes, exact for
            full-batch training on the probes and the Monte-Carlo estimate for mini-batches
            drawn from the training set the probes come from), ``"sum"`` (``2 lr``) or
            ``"half_sum"`` (``lr``); the last two are exact only when every batch is the
            probe set (full-batch).
        residual_top_k: k of ``ntk/residual_energy_top{k}``.
        prefix: the first part of every logged name (``<prefix>/kta``), TensorBoard media
            tag, MLflow artifact path and of the CSV logger's subfolder; give two callbacks
            on one logger different prefixes. Default ``"ntk"``.
        alignment: the label-free kernel ``kta``, ``kta_uncentered``, ``cka`` and
            ``kta_change`` are computed on. The target-mode kernel reads each probe's own
            label logit, so it is aligned with the labels before any training (KTA 0.66-0.84
            on untrained nets with random labels); in target mode the callback therefore
            computes a second kernel: ``"auto"`` (default) the exact trace kernel (sum over
            outputs, O backward rows per probe) up to 16 outputs, beyond that its unbiased
            estimate ``J V V^T J^T`` from ``alignment_projections`` Gaussian output
            projections (``E[V V^T] = I``; k rows per probe); ``"trace"`` always exact;
            ``"projected"`` always the estimate. In ``"trace"``/``"sum"`` mode, or with one
            output, the report's own kernel is label-free and used as it is.
        alignment_projections: k, the number of output projections of the estimate (>= 1).
            They are drawn once from ``torch.Generator().manual_seed(seed + 2)`` (global RNGs
            untouched) and reused at every report, so K0 and later kernels share them.
        init_kernel_at: when K0, the reference of every drift metric, is measured:
            ``"train_start"`` (default, before the first optimizer step) or
            ``"first_epoch_end"`` (after one epoch, once BatchNorm running statistics have
            left their initial mean 0 / variance 1; the kernel is measured in eval mode, so
            a K0 at train start normalises with those). The console and ``init_label`` in
            the state say which K0 is used.
        console: ``"full"`` (the report with the text heatmap and histogram), ``"compact"``
            (one or two lines per report, for long runs) or ``"off"``; default ``"full"``
            (``"off"`` when ``log_console=False``). Printed on global rank zero, through the
            progress bar while one of its bars is open, plainly otherwise.
        heatmap_scale: colours of the ``ntk/kernel`` heatmap: ``"per_report"`` (default;
            each heatmap spans its own min..max, so its structure always shows and the
            colour bar gives the values) or ``"initial"`` (fixed to the initial kernel K0's
            range, so colours compare across steps; entries beyond it clip, marked by arrows
            on the colour bar).

    Logged per report (step = ``trainer.global_step``): every key of
    ``NTKReport.to_dict()`` as ``ntk/<key>`` to every logger and into
    ``trainer.callback_metrics``; TensorBoard also gets ``ntk/eigenvalues`` (histogram of
    log10 lambda) and the images ``ntk/kernel`` (K0's also once under ``ntk/kernel_init``),
    ``ntk/spectrum``, ``ntk/drift``, ``ntk/layers`` and (dynamics) ``ntk/dynamics``.

    BatchNorm: the kernel is measured in eval mode, on the running statistics. When the
    kernel's scale moved by a factor 2 or more since K0 (``|ntk/log10_scale_change| >= 0.3``),
    accounting for at least half of ``ntk/relative_change``, while the
    BatchNorm running statistics changed, one warning names this cause and the fixes (read
    the scale-free ``ntk/kernel_distance``; ``init_kernel_at="first_epoch_end"``).

    Training dynamics (regression, O = 1; Lee et al. 2019; Jacot et al. 2018), computed by
    :class:`ntk_callback.insight.DynamicsTracker` from the kernel, the outputs on the probes
    (``r = f - y``) and the learning rates actually used (read from the param groups of
    every optimizer as it steps, summed over the steps of the whole theta)::

        ntk/residual_norm                  ||r|| on the probes
        ntk/residual_energy_top{k}         share of ||r||^2 in the k top eigenvectors of K
        ntk/steps_to_halve_residual        linearised GD steps at the current lr until ||r|| halves,
                                           with the kernel frozen (an estimate, not a forecast)
        ntk/epochs_to_halve_residual       the same in epochs (optimizer steps per epoch)
        ntk/slowest_mode_time_constant     steps per e-fold of the slowest mode holding residual
        ntk/predicted_residual_norm        ||r|| predicted from the previous report: its residual
                                           evolved by (I - lr K_prev)^steps with the mean lr since
        ntk/predicted_vs_observed_residual predicted / observed (1: the kernel predicted the
                                           progress; > 1: the network learned faster than it)
        ntk/residual_prediction_error      ||r_pred - r|| / ||r||
        ntk/linearization_gap              held-out ||f - f_lin|| / ||f - f_0||, f_lin the
                                           network linearised at initialisation (0: lazy regime)
        ntk/heldout_mse, ntk/linearized_heldout_mse   with held-out targets

    Constant-lr plain SGD on a network in the lazy regime gives
    ``predicted_vs_observed_residual`` ~ 1; momentum, Adam or a changing lr between reports
    are outside the linear model (the mean lr between reports is used).

    The linear model needs one learning rate for all trainable parameters (the ones the
    kernel covers): several param groups or optimizers (manual optimization) are fine when
    they step every trainable parameter with the same lr in a batch, which counts as one
    step. When the lrs differ (per-group lrs, an optimizer that did not step, a trainable
    parameter in no optimizer, i.e. lr 0) the dynamics are ``r <- r - J diag(lr) J^T r``,
    not ``lr K r``: one warning names the groups and their lrs, and the lr-dependent keys
    are left out (not logged) where they would be wrong: ``steps_to_halve_residual``,
    ``epochs_to_halve_residual``, ``slowest_mode_time_constant`` while the current lrs
    differ, the three ``predicted_*`` / ``residual_prediction_error`` keys for a report
    interval with such a step, ``linearization_gap`` and ``linearized_heldout_mse`` from
    the first such step on. ``residual_norm``, ``residual_energy_top{k}`` and
    ``heldout_mse`` do not depend on the lr and stay.

    Faults (NaN/inf kernel, out-of-memory, an engine error, a failing logger) give a
    warning that names the cause and the fix; the report is skipped and training goes on
    (``strict=True`` raises instead). The callback never changes weights, buffers,
    gradients, optimizer state, global RNG streams or the dataloader order: training with
    it is bit-identical to training without it.

    Distributed (``ddp``, ``ddp_spawn``): rank 0's probes are broadcast, every rank computes
    the same kernel on its unwrapped module (no collective inside, so a failure on one rank
    cannot deadlock the others) and fills ``callback_metrics``; loggers and the console get
    it once, from global rank zero. Sharded strategies are refused in ``setup``.

    Attributes after fitting: :attr:`history` (one record per report, the format of
    :meth:`state_dict`), :attr:`probes`, :attr:`init_kernel`, :attr:`last_kernel`,
    :attr:`last_report`.
    """

    def __init__(
        self,
        num_probes: int = 64,
        every_n_epochs: int = 1,
        mode: str = "target",
        probes: Optional[Tuple[Any, Optional[Tensor]]] = None,
        probe_source: str = "train",
        seed: int = 0,
        batch_to_probe: Optional[Callable[[Any], Tuple[Any, Optional[Tensor]]]] = None,
        strict: bool = False,
        dtype: Optional[torch.dtype] = None,
        log_images: bool = True,
        log_figures: bool = True,
        log_console: bool = True,
        memory_budget: Optional[int] = None,
        output_fn: Optional[Callable[[Any], Tensor]] = None,
        layerwise: bool = True,
        dynamics: Union[bool, str] = "auto",
        num_heldout: int = 32,
        loss_reduction: str = "mean",
        residual_top_k: int = 5,
        prefix: str = DEFAULT_PREFIX,
        alignment: str = "auto",
        alignment_projections: int = 8,
        init_kernel_at: str = "train_start",
        console: Optional[str] = None,
        heatmap_scale: str = "per_report",
    ) -> None:
        super().__init__()
        self.num_probes = _check_int("num_probes", num_probes, 1)
        self.every_n_epochs = _check_int("every_n_epochs", every_n_epochs, 1)
        if not isinstance(mode, str) or mode not in mode_names(scalar_only=True):  # (N, N) kernels
            known = isinstance(mode, str) and mode in mode_names()
            hint = f" ({mode!r} gives an (N, N, O, O) kernel; use 'trace' or 'sum' for a scalar kernel)" if known else ""
            raise NTKCallbackConfigError(f"NTKReportCallback(mode={mode!r}): expected one of {mode_names(scalar_only=True)}{hint}.")
        self.mode = mode
        if probe_source not in _SOURCES:
            raise NTKCallbackConfigError(
                f"NTKReportCallback(probe_source={probe_source!r}): expected 'train' or 'val' "
                "(or pass probes=(inputs, targets))."
            )
        self.probe_source = probe_source
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise NTKCallbackConfigError(f"NTKReportCallback(seed={seed!r}): expected an integer.")
        self.seed = int(seed)
        if batch_to_probe is not None and not callable(batch_to_probe):
            raise NTKCallbackConfigError(
                f"NTKReportCallback(batch_to_probe={batch_to_probe!r}): expected a callable batch -> (inputs, targets)."
            )
        self._batch_to_probe = batch_to_probe
        if output_fn is not None and not callable(output_fn):
            raise NTKCallbackConfigError(f"NTKReportCallback(output_fn={output_fn!r}): expected a callable or None.")
        self.output_fn = output_fn
        self.strict = _check_bool("strict", strict)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise NTKCallbackConfigError(
                f"NTKReportCallback(dtype={dtype!r}): expected None or a floating torch.dtype such as torch.float64."
            )
        self.dtype = dtype
        self.log_images = _check_bool("log_images", log_images)
        self.log_figures = _check_bool("log_figures", log_figures)
        if heatmap_scale not in HEATMAP_SCALES:
            raise NTKCallbackConfigError(
                f"NTKReportCallback(heatmap_scale={heatmap_scale!r}): expected one of {HEATMAP_SCALES} "
                "('per_report': each heatmap its own colour range; 'initial': the initial kernel's)."
            )
        self.heatmap_scale = heatmap_scale
        self.log_console = _check_bool("log_console", log_console)
        if memory_budget is not None:
            memory_budget = _check_int("memory_budget", memory_budget, 1)
        self.memory_budget = memory_budget
        self.layerwise = _check_bool("layerwise", layerwise)
        if dynamics not in (True, False, "auto") or not isinstance(dynamics, (bool, str)):
            raise NTKCallbackConfigError(f"NTKReportCallback(dynamics={dynamics!r}): expected True, False or 'auto'.")
        self.dynamics = dynamics
        self.num_heldout = _check_int("num_heldout", num_heldout, 0)
        if loss_reduction not in _REDUCTIONS:
            raise NTKCallbackConfigError(
                f"NTKReportCallback(loss_reduction={loss_reduction!r}): expected one of {_REDUCTIONS} "
                "('mean' for F.mse_loss's default, 'sum' for reduction='sum', 'half_sum' for 1/2 sum (f - y)^2)."
            )
        self.loss_reduction = loss_reduction
        self.residual_top_k = _check_int("residual_top_k", residual_top_k, 1)
        try:
            self.prefix = check_prefix(prefix)
        except ValueError as err:
            raise NTKCallbackConfigError(f"NTKReportCallback({err}") from None
        if alignment not in _ALIGNMENTS:
            raise NTKCallbackConfigError(
                f"NTKReportCallback(alignment={alignment!r}): expected one of {_ALIGNMENTS} ('auto': the exact trace "
                f"kernel up to {_EXACT_TRACE_MAX_OUTPUTS} outputs, its random-projection estimate beyond)."
            )
        self.alignment = alignment
        self.alignment_projections = _check_int("alignment_projections", alignment_projections, 1)
        if init_kernel_at not in _INIT_AT:
            raise NTKCallbackConfigError(
                f"NTKReportCallback(init_kernel_at={init_kernel_at!r}): expected one of {_INIT_AT} ('first_epoch_end' "
                "measures K0 after one epoch, once BatchNorm running statistics have warmed up)."
            )
        self.init_kernel_at = init_kernel_at
        if console is None:
            console = "full" if self.log_console else "off"
        elif console not in _CONSOLE:
            raise NTKCallbackConfigError(
                f"NTKReportCallback(console={console!r}): expected one of {_CONSOLE} ('compact': one or two lines "
                "per report)."
            )
        self.console = console
        self.log_console = console != "off"

        self._explicit = probes is not None
        self._probes: Optional[Probes] = None
        if probes is not None:
            if not (isinstance(probes, (tuple, list)) and len(probes) == 2):
                raise NTKCallbackConfigError(
                    "NTKReportCallback(probes=...): expected a pair (inputs, targets), targets may be None; "
                    f"got {type(probes).__name__}" + (f" of length {len(probes)}" if isinstance(probes, (tuple, list)) else "")
                )
            inputs, targets = probes
            if targets is not None and not isinstance(targets, Tensor):
                targets = torch.as_tensor(targets)
            try:
                validate_probes(inputs, targets)
            except ProbeError as err:
                raise NTKCallbackConfigError(f"NTKReportCallback(probes=...): {err}") from None
            self._probes = (to_cpu(inputs), to_cpu(targets) if targets is not None else None)

        self._init_kernel: Optional[Tensor] = None
        self._init_alignment_kernel: Optional[Tensor] = None  # label-free K0 for kta_change (target mode)
        self._init_label = ""  # which K0 drift is measured against ("step 0, train start")
        self._bn_stats0: Optional[Dict[str, Tensor]] = None  # BatchNorm running statistics when K0 was measured
        self._num_outputs: Optional[int] = None  # O, read once per fit for the alignment kernel
        self.last_alignment_kernel: Optional[Tensor] = None
        self._init_layer_kernels: Optional[Dict[str, Tensor]] = None
        self._history: List[Dict[str, Any]] = []
        self.last_kernel: Optional[Tensor] = None
        self.last_layer_kernels: Optional[Dict[str, Tensor]] = None
        self.last_report: Optional[NTKReport] = None
        # training dynamics: held-out probes, the tracker and the cumulative learning rate
        self._heldout: Optional[Probes] = None
        self._tracker: Optional[DynamicsTracker] = None
        self._tracker_state: Optional[Mapping[str, Any]] = None  # restored, loaded when the tracker is built
        self._dynamics_on = False
        self._lr_sum = 0.0  # sum of the learning rates of the steps of theta taken so far (one lr for all)
        self._lr_step: Optional[int] = None  # global step _lr_sum is up to date with
        self._param_steps = 0  # steps of the whole theta so far (the dynamics' step count)
        self._lr_mixed = 0  # batches whose steps moved the trainable parameters at different lrs
        self._lr_mixed_init: Optional[int] = None  # _lr_mixed at the tracker's first measurement
        self._lr_mixed_prev: Optional[int] = None  # _lr_mixed at the tracker's last measurement
        self._lr_pending: Optional[_StepRecord] = None  # optimizers[0]'s lrs at batch start (fallback)
        self._lr_records: List[_StepRecord] = []  # the optimizer steps seen in the current batch
        self._disabled_reason: Optional[str] = None
        self._fit_start = time.perf_counter()
        self._figures_spent = 0.0  # seconds spent drawing the history pictures in this fit
        self._figures_estimate = 0.3  # seconds one drawing takes (updated after each)
        self._figures_step: Optional[int] = None  # step of the last report drawn with them
        self._dispatcher = LoggerDispatcher(log_images=self.log_images, on_error=self._logger_failed, prefix=self.prefix)

    # ------------------------------------------------------------------ public state
    @property
    def state_key(self) -> str:
        settings: Dict[str, Any] = dict(
            num_probes=self.num_probes,
            every_n_epochs=self.every_n_epochs,
            mode=self.mode,
            probe_source="explicit" if self._explicit else self.probe_source,
            seed=self.seed,
        )
        if self.prefix != DEFAULT_PREFIX:  # the default keeps the key of checkpoints written before `prefix`
            settings["prefix"] = self.prefix
        return self._generate_state_key(**settings)

    @property
    def history(self) -> List[Dict[str, Any]]:
        """One record per report: ``{"tag", "epoch", "step", "metrics", "eigenvalues"}`` (see :meth:`state_dict`)."""
        return self._history

    @property
    def probes(self) -> Optional[Probes]:
        """The probe set ``(inputs, targets)`` on CPU, once drawn (or given)."""
        return self._probes

    @property
    def init_kernel(self) -> Optional[Tensor]:
        """K0, the kernel measured before the first optimizer step (CPU), or None."""
        return self._init_kernel

    @property
    def init_layer_kernels(self) -> Optional[Dict[str, Tensor]]:
        """``{layer: K0_l}`` (CPU), the per-layer kernels drift is measured against, or None."""
        return self._init_layer_kernels

    @property
    def heldout(self) -> Optional[Probes]:
        """The held-out probes ``(inputs, targets)`` of the dynamics metrics (CPU), or None."""
        return self._heldout

    @property
    def dynamics_active(self) -> bool:
        """Whether the training-dynamics metrics are computed in the current/last fit."""
        return self._dynamics_on

    @property
    def lr_sum(self) -> float:
        """Sum of the learning rates of the steps of the whole theta seen so far (dynamics only).

        A batch in which the optimizers stepped every trainable parameter with one learning
        rate adds it once per step (two optimizers of one lr, each stepping its own
        parameters once, are one step); a batch that moved them at different lrs adds
        nothing (the dynamics metrics it affects are not logged)."""
        return self._lr_sum

    @property
    def param_steps(self) -> int:
        """Steps of the whole theta seen so far (dynamics only): the step count of the
        dynamics metrics. ``trainer.global_step`` under automatic optimization; under manual
        optimization Lightning counts every optimizer's step, this one step per batch in
        which all trainable parameters were stepped once."""
        return self._param_steps

    def batch_to_probe(self, batch: Any) -> Probes:
        """Map a batch to ``(inputs, targets)``; override for custom batch structures."""
        if self._batch_to_probe is not None:
            return self._batch_to_probe(batch)
        return default_batch_to_probe(batch)

    def state_dict(self) -> Dict[str, Any]:
        """Checkpointed state (plain tensors, lists and numbers; loadable with ``weights_only=True``).

        ``{"version": 1, "probes": {"inputs": CPU tensor (or tuple/list/dict of tensors),
        "targets": CPU tensor or None} or None, "init_kernel": (N, N) CPU tensor or None,
        "init_alignment_kernel": (N, N) CPU tensor or None (the label-free K0 of the alignments,
        target mode only), "init_label": str (which K0: step and when),
        "init_layer_kernels": {layer: (N, N) CPU tensor} or None, "dynamics": {"lr_sum":
        float, "lr_step": int or None, "param_steps": int, "lr_mixed": {"count": int,
        "at_init": int or None, "at_prev": int or None}, "heldout": {"inputs", "targets"} or
        None, "tracker": DynamicsTracker.state_dict() or None}, "history": [record, ...],
        "settings": {...}}``
        where each history record is ``{"tag": "init" | "epoch" | "final", "epoch": int,
        "step": int, "metrics": {key: float} (NTKReport.to_dict() plus the layer and
        dynamics keys, no prefix), "eigenvalues": [float, ...] (descending)}``.
        """
        probes = None
        if self._probes is not None:
            probes = {"inputs": self._probes[0], "targets": self._probes[1]}
        heldout = None
        if self._heldout is not None:
            heldout = {"inputs": self._heldout[0], "targets": self._heldout[1]}
        tracker = self._tracker.state_dict() if self._tracker is not None else self._tracker_state
        return {
            "version": STATE_VERSION,
            "probes": probes,
            "init_kernel": self._init_kernel,
            "init_alignment_kernel": self._init_alignment_kernel,
            "init_label": self._init_label,
            "init_layer_kernels": dict(self._init_layer_kernels) if self._init_layer_kernels is not None else None,
            "dynamics": {
                "lr_sum": self._lr_sum,
                "lr_step": self._lr_step,
                "param_steps": self._param_steps,
                "lr_mixed": {"count": self._lr_mixed, "at_init": self._lr_mixed_init, "at_prev": self._lr_mixed_prev},
                "heldout": heldout,
                "tracker": tracker,
            },
            "history": [
                {
                    "tag": r["tag"],
                    "epoch": r["epoch"],
                    "step": r["step"],
                    "metrics": dict(r["metrics"]),
                    "eigenvalues": list(r["eigenvalues"]),
                }
                for r in self._history
            ],
            "settings": {
                "num_probes": self.num_probes,
                "every_n_epochs": self.every_n_epochs,
                "mode": self.mode,
                "probe_source": "explicit" if self._explicit else self.probe_source,
                "seed": self.seed,
                "dtype": str(self.dtype) if self.dtype is not None else None,
                "prefix": self.prefix,
                "layerwise": self.layerwise,
                "dynamics": str(self.dynamics),
                "alignment": self.alignment,
                "alignment_projections": self.alignment_projections,
                "init_kernel_at": self.init_kernel_at,
            },
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore probes, K0 and history; tolerant of missing keys and of older/newer versions."""
        if not isinstance(state_dict, Mapping):
            rank_zero_warn(f"NTKReportCallback: ignoring a saved state of type {type(state_dict).__name__}.")
            return
        saved_mode = state_dict.get("settings", {}).get("mode", self.mode)
        same_kernel = str(saved_mode) == str(self.mode)  # K0 of the same kernel mode: comparable
        saved = state_dict.get("probes")
        if isinstance(saved, Mapping):
            inputs, targets = saved.get("inputs"), saved.get("targets")
        elif isinstance(saved, (tuple, list)) and len(saved) == 2:
            inputs, targets = saved
        else:
            inputs, targets = None, None
        if inputs is not None:
            try:
                validate_probes(inputs, targets)
                self._probes = (to_cpu(inputs), to_cpu(targets) if targets is not None else None)
            except ProbeError as err:
                rank_zero_warn(f"NTKReportCallback: the saved probes are unusable ({err}); new probes will be drawn.")
        k0 = state_dict.get("init_kernel")
        layers0 = state_dict.get("init_layer_kernels")
        if isinstance(layers0, Mapping) and same_kernel:
            self._init_layer_kernels = {
                str(k): v.detach().cpu() for k, v in layers0.items() if isinstance(v, Tensor)
            } or None
        self._load_dynamics_state(state_dict.get("dynamics"))
        if isinstance(k0, Tensor) and same_kernel:
            self._init_kernel = k0.detach().cpu()
            self._init_label = str(state_dict.get("init_label") or "")
            settings = state_dict.get("settings", {}) or {}
            same_alignment = all(
                settings.get(k, getattr(self, k)) == getattr(self, k) for k in ("alignment", "alignment_projections")
            )
            k0a = state_dict.get("init_alignment_kernel")
            # an alignment K0 of other settings (exact vs projected) would make kta_change compare two kernels
            self._init_alignment_kernel = k0a.detach().cpu() if isinstance(k0a, Tensor) and same_alignment else None
        elif k0 is not None:
            rank_zero_warn(
                f"NTKReportCallback: the saved initial kernel was measured in mode {saved_mode!r}, this callback uses "
                f"{self.mode!r}; drift cannot be compared and is reported against the kernel at resume time."
            )
        history = []
        for rec in state_dict.get("history", []) or []:
            try:
                history.append(
                    {
                        "tag": str(rec.get("tag", "epoch")),
                        "epoch": int(rec.get("epoch", 0)),
                        "step": int(rec.get("step", 0)),
                        "metrics": {str(k): float(v) for k, v in dict(rec.get("metrics", {})).items()},
                        "eigenvalues": [float(v) for v in rec.get("eigenvalues", [])],
                    }
                )
            except (AttributeError, TypeError, ValueError):
                continue
        self._history = history

    def _load_dynamics_state(self, saved: Any) -> None:
        if not isinstance(saved, Mapping):
            return
        try:
            self._lr_sum = float(saved.get("lr_sum", 0.0))
            step = saved.get("lr_step")
            self._lr_step = int(step) if step is not None else None
        except (TypeError, ValueError):
            self._lr_sum, self._lr_step = 0.0, None
        try:
            # states written before the count: automatic optimization, a step of theta is a global step
            steps = saved.get("param_steps", self._lr_step)
            self._param_steps = int(steps) if steps is not None else 0
        except (TypeError, ValueError):
            self._param_steps = self._lr_step or 0
        mixed = saved.get("lr_mixed")
        mixed = mixed if isinstance(mixed, Mapping) else {}
        try:
            self._lr_mixed = int(mixed.get("count", 0) or 0)
            self._lr_mixed_init = int(mixed["at_init"]) if mixed.get("at_init") is not None else None
            self._lr_mixed_prev = int(mixed["at_prev"]) if mixed.get("at_prev") is not None else None
        except (TypeError, ValueError):
            self._lr_mixed, self._lr_mixed_init, self._lr_mixed_prev = 0, None, None
        held = saved.get("heldout")
        if isinstance(held, Mapping) and held.get("inputs") is not None:
            inputs, targets = held.get("inputs"), held.get("targets")
            try:
                validate_probes(inputs, targets)
                self._heldout = (to_cpu(inputs), to_cpu(targets) if targets is not None else None)
            except ProbeError as err:
                rank_zero_warn(f"NTKReportCallback: the saved held-out probes are unusable ({err}); new ones will be drawn.")
        tracker = saved.get("tracker")
        if isinstance(tracker, Mapping):
            self._tracker, self._tracker_state = None, tracker  # rebuilt with the probes' targets at train start

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._disabled_reason = None  # a new fit gets a new chance to draw probes
        self._dynamics_on = False
        self._num_outputs = None
        name = sharded_strategy_name(trainer.strategy)
        if name is not None:
            raise MisconfigurationException(
                f"NTKReportCallback does not support sharded models ({name}): each rank holds only a shard of the "
                "parameters, so the kernel it could compute would be wrong. Fix: run the callback with a "
                "non-sharded strategy (single device, 'ddp', 'ddp_spawn'), or compute the NTK on a gathered copy "
                "of the model with ntk_callback.empirical_ntk after training."
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._active(trainer, need_probes=False):
            return
        self._warn_about_loggers(trainer)
        self._fit_start, self._figures_spent, self._figures_step = time.perf_counter(), 0.0, None
        if self._probes is None or trainer.world_size > 1:
            self._probes = self._resolve_probes(trainer)
            if self._probes is None:
                return
        self._setup_dynamics(trainer, pl_module)
        if self._init_kernel is None and self.init_kernel_at == "train_start":
            if trainer.global_step > 0:
                rank_zero_warn(
                    f"NTKReportCallback: training resumes at step {trainer.global_step} without a saved initial "
                    "kernel; drift (ntk/relative_change, ntk/kernel_distance) is measured against the kernel now."
                )
            self._report(trainer, pl_module, tag="init")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # Lightning steps "step"-interval LR schedulers *before* on_train_batch_end, so the
        # lr of this batch's optimizer step is the one in param_groups now (read only); it is
        # the fallback for an optimizer step that on_before_optimizer_step did not see.
        if self._dynamics_on:
            self._lr_records = []
            optimizers = list(getattr(trainer, "optimizers", None) or [])
            self._lr_pending = _step_record(optimizers[0]) if len(optimizers) == 1 else None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any, *args: Any) -> None:
        # Called inside optimizer.step(), after the closure (backward) and before the update:
        # param_groups hold the lrs this step uses (read only). Every optimizer of manual
        # optimization passes through here, each time it steps.
        if self._dynamics_on:
            record = _step_record(optimizer)
            if record is not None:
                self._lr_records.append(record)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._dynamics_on:
            return
        step = trainer.global_step
        if self._lr_step is None or step < self._lr_step:
            self._lr_step = step
        elif step > self._lr_step:  # optimizer step(s) taken in this batch (not while accumulating)
            records: Optional[List[_StepRecord]] = self._lr_records
            taken = step - self._lr_step  # every optimizer's every step (manual optimization: all of them)
            if len(self._lr_records) != taken:
                if len({key for key, _ in self._lr_records}) == 1:  # one optimizer (an LBFGS closure runs often)
                    records = [self._lr_records[0]] * taken
                elif not self._lr_records and self._lr_pending is not None:  # the only optimizer, unseen
                    records = [self._lr_pending] * taken
                else:
                    records = None  # several optimizers: which of them stepped is unknown
            self._count_steps(trainer, pl_module, records, taken)
            self._lr_step = step
        self._lr_pending = None
        self._lr_records = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active(trainer):
            return
        if self._init_kernel is None and self.init_kernel_at == "first_epoch_end":
            self._report(trainer, pl_module, tag="init")  # K0 after BatchNorm statistics warmed up
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._report(trainer, pl_module, tag="epoch")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active(trainer):
            return
        if not self._history or self._history[-1]["step"] != trainer.global_step:
            self._report(trainer, pl_module, tag="final")
        self._refresh_figures(trainer)

    # ------------------------------------------------------------------ internals
    def _active(self, trainer: Any, need_probes: bool = True) -> bool:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._disabled_reason is not None:
            return False
        return self._probes is not None or not need_probes

    def _warn_about_loggers(self, trainer: Any) -> None:
        if not trainer.loggers:
            self._dispatcher._warn_once(
                "no-logger",
                "NTKReportCallback: the Trainer has no logger, so NTK reports go to the console and "
                "trainer.callback_metrics only. Fix: Trainer(logger=TensorBoardLogger('logs')) to keep them.",
            )

    def _logger_failed(self, what: str, err: BaseException) -> None:
        if self.strict:
            raise err
        rank_zero_warn(f"NTKReportCallback: {what} failed ({type(err).__name__}: {err}); training continues.")

    def _resolve_probes(self, trainer: Any) -> Optional[Probes]:
        """Probes for this run: given, restored or drawn on rank 0; broadcast so every rank uses rank 0's."""
        probes, error, local_err = self._probes, None, None
        if probes is None and trainer.is_global_zero:
            try:
                probes = self._draw(trainer)
            except Exception as err:  # noqa: BLE001 - reported below, after the collective
                error, local_err = f"{type(err).__name__}: {err}", err
        if trainer.world_size > 1:
            # every rank must reach broadcast, even when rank 0 failed, or the others would hang
            probes, error = trainer.strategy.broadcast((probes, error), src=0)
        if probes is None:
            self._disabled_reason = error or "no probes"
            msg = (
                f"NTKReportCallback: could not draw probes ({self._disabled_reason}); no NTK reports for this run. "
                "Fix: pass probes=(inputs, targets), or batch_to_probe=... for custom batches."
            )
            if self.strict:
                raise ProbeError(msg) from local_err
            rank_zero_warn(msg)
            return None
        return probes

    def _draw(self, trainer: Any) -> Probes:
        source = self.probe_source
        loader = None
        if source == "val":
            loader = find_dataloader(trainer.val_dataloaders)
            if loader is None:
                rank_zero_warn(
                    "NTKReportCallback(probe_source='val'): no validation dataloader is loaded at train start "
                    "(no val_dataloader, or check_val_every_n_epoch > 1 with num_sanity_val_steps=0); "
                    "drawing probes from the training data instead."
                )
        if loader is None:
            loader = find_dataloader(trainer.train_dataloader)
        generator = torch.Generator().manual_seed(self.seed)
        inputs, targets = draw_probes(loader, self.num_probes, generator, self.batch_to_probe)
        got = num_samples(inputs)
        if got < self.num_probes:
            rank_zero_warn(f"NTKReportCallback: only {got} probes available (num_probes={self.num_probes}); using {got}.")
        return inputs, targets

    def _model_inputs(self, trainer: Any, pl_module: Any, probes: Optional[Probes] = None) -> Tuple[Any, Optional[Tensor]]:
        """``probes`` (default: the probe set) on the module's device, inputs converted like Lightning's batches."""
        probes = self._probes if probes is None else probes
        assert probes is not None
        inputs, targets = probes
        device = pl_module.device
        inputs = apply_to_tensors(inputs, lambda t: t.to(device))
        # same input dtype conversion Lightning applies to batches ("64-true", "bf16-true", ...)
        plugin = getattr(trainer, "precision_plugin", None)
        if plugin is not None and hasattr(plugin, "convert_input"):
            inputs = plugin.convert_input(inputs)
        return inputs, (targets.to(device) if targets is not None else None)

    def _engine_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"mode": self.mode, "dtype": self.dtype, "eval_mode": True}
        if self.memory_budget is not None:
            kwargs["memory_budget"] = self.memory_budget
        if self.output_fn is not None:
            kwargs["output_fn"] = self.output_fn
        return kwargs

    def _compute_kernel(self, trainer: Any, pl_module: Any) -> Optional[Tuple[Tensor, Optional[Dict[str, Tensor]]]]:
        """``(K, {layer: K_l} or None)`` on the probes (CPU), or None after a reported fault
        (re-raised when strict). With ``layerwise`` K is the sum of the layer kernels
        (exactly ``empirical_ntk``: the NTK is a sum over parameters), added in float64."""
        try:
            inputs, targets = self._model_inputs(trainer, pl_module)
            kwargs = self._engine_kwargs()
            layers: Optional[Dict[str, Tensor]] = None
            # hooks may run under no_grad/inference_mode (e.g. after validation): the kernel needs autograd
            with torch.inference_mode(False), torch.enable_grad():
                if self.layerwise:
                    parts = layerwise_ntk(pl_module, inputs, targets, **kwargs)
                    if not parts:
                        raise NTKError(
                            "the model has no trainable parameters (requires_grad=True), so its NTK is empty. "
                            "Fix: unfreeze at least one layer."
                        )
                    layers = {name: k.detach().to("cpu") for name, k in parts.items()}
                    first = next(iter(layers.values()))
                    kernel = torch.stack([k.double() for k in layers.values()]).sum(0).to(first.dtype)
                else:
                    kernel = empirical_ntk(pl_module, inputs, targets, **kwargs)
            kernel = kernel.detach().to("cpu")
            if not bool(torch.isfinite(kernel).all()):
                raise NTKError(
                    "the kernel has NaN/inf entries: the model's outputs or gradients overflowed on the probes. "
                    "Fix: check the loss and learning rate; dtype=torch.float64 helps when it is float32 overflow."
                )
            return kernel, layers
        except Exception as err:  # noqa: BLE001 - a measurement must never stop training
            self._fault(trainer, err, where=f"report at step {trainer.global_step}")
            return None

    # -------------------------------------------------------------- training dynamics
    @staticmethod
    def _trainable(pl_module: Any) -> Dict[int, str]:
        """``{id(p): name}`` of the parameters the kernel covers (``requires_grad=True``)."""
        return {id(p): name for name, p in pl_module.named_parameters() if p.requires_grad}

    def _current_lr(self, trainer: Any, pl_module: Any) -> Optional[float]:
        """The one learning rate of every trainable parameter in the optimizers' param groups
        now; 0 when none is in an optimizer (or there is none); None when they differ (a
        parameter in no optimizer, or in several, next to ones in one)."""
        trainable = self._trainable(pl_module)
        lrs: Dict[int, List[float]] = {pid: [] for pid in trainable}
        for opt in list(getattr(trainer, "optimizers", None) or []):
            record = _step_record(opt)
            if record is not None:
                _add_lrs(lrs, record)
        one = _one_sequence(lrs)
        if one is None or len(one) > 1:
            return None
        return one[0] if one else 0.0

    def _count_steps(
        self, trainer: Any, pl_module: Any, records: Optional[List["_StepRecord"]], taken: int
    ) -> None:
        """Charge one batch's optimizer steps: each trainable parameter's sequence of lrs in
        it; one sequence for all is ``len`` steps of theta at those lrs, otherwise a mixed batch."""
        trainable = self._trainable(pl_module)
        if not trainable:
            return
        one: Optional[Tuple[float, ...]] = None
        if records is not None:
            lrs: Dict[int, List[float]] = {pid: [] for pid in trainable}
            for record in records:
                _add_lrs(lrs, record)
            one = _one_sequence(lrs)
        if one is not None:
            self._param_steps += len(one)
            self._lr_sum += sum(one)
            return
        self._lr_mixed += 1
        if records is None:
            self._param_steps += 1
            detail = (
                f"global_step advanced by {taken} in one batch, but "
                f"{len(self._lr_records)} optimizer step(s) of {len(trainer.optimizers)} optimizers were seen, "
                "so which parameters were stepped is unknown; " + self._describe_lrs(trainer, pl_module, None)
            )
        else:
            self._param_steps += max(len(v) for v in lrs.values())
            detail = self._describe_lrs(trainer, pl_module, records)
        self._warn_mixed_lrs(f"in the optimizer step(s) before global step {trainer.global_step}", detail)

    def _describe_lrs(self, trainer: Any, pl_module: Any, records: Optional[List["_StepRecord"]]) -> str:
        """``optimizer i param group j (names): lr ...`` for every group holding trainable
        parameters (the lrs of this batch's steps when ``records`` is given, else the current
        ones), and the trainable parameters in no optimizer."""
        names = self._trainable(pl_module)
        parts, covered = [], set()
        for i, opt in enumerate(list(getattr(trainer, "optimizers", None) or [])):
            record = _step_record(opt)
            if record is None:
                continue
            key, groups = record
            steps = None if records is None else [g for k, g in records if k == key]
            for j, (params, lr) in enumerate(groups):
                inside = [names[id(p)] for p in params if id(p) in names]
                if not inside:
                    continue
                covered.update(id(p) for p in params)
                if steps is None:
                    text = f"lr {lr:.4g}"
                elif not steps:
                    text = f"lr {lr:.4g}, not stepped in this batch"
                else:
                    used = [g[j][1] for g in steps if j < len(g)]
                    text = "lr " + ", ".join(f"{v:.4g}" for v in used) + (f" ({len(used)} steps)" if len(used) > 1 else "")
                parts.append(f"optimizer {i} param group {j} ({_name_list(inside)}): {text}")
        orphans = [name for pid, name in names.items() if pid not in covered]
        if orphans:
            parts.append(f"in no optimizer (never stepped, lr 0): {_name_list(orphans)}")
        return "; ".join(parts)

    def _warn_mixed_lrs(self, where: str, detail: str) -> None:
        p = self.prefix
        self._dispatcher._warn_once(
            "lr-mixed",
            f"NTKReportCallback: the trainable parameters (the ones the kernel covers) do not all train with one "
            f"learning rate ({where}): {detail}. The linearised dynamics r <- r - lr K r need one learning rate "
            "for all of theta; with one per parameter they are r <- r - J diag(lr) J^T r, which is not lr K. So "
            f"{p}/steps_to_halve_residual, /epochs_to_halve_residual and /slowest_mode_time_constant are not logged "
            f"while the learning rates differ, {p}/predicted_residual_norm, /predicted_vs_observed_residual and "
            f"/residual_prediction_error not for a report interval with such a step, {p}/linearization_gap and "
            f"/linearized_heldout_mse not from the first such step on ({p}/residual_norm, "
            f"/residual_energy_top{self.residual_top_k} and /heldout_mse are). Fix: one learning rate for every "
            "trainable parameter (all param groups and optimizers, stepped together), and requires_grad=False for "
            "parameters that are not trained.",
        )

    def _outputs(self, pl_module: Any, inputs: Any) -> Tensor:
        """f(x) as the kernel sees it, (N, O) on CPU (no gradient, no side effects)."""
        with torch.inference_mode(False):
            out = model_outputs(pl_module, inputs, dtype=self.dtype, eval_mode=True, output_fn=self.output_fn)
        return out.detach().to("cpu")

    def _dynamics_blocker(self, trainer: Any, pl_module: Any) -> Optional[str]:
        """Why the dynamics metrics cannot apply to this model and probe set, or None."""
        assert self._probes is not None
        inputs, targets = self._probes
        n = num_samples(inputs)
        if targets is None:
            return "the probes have no targets (regression targets y are needed for the residual f - y)"
        if not targets.is_floating_point():
            return "the probe targets are not floating point (class labels: the residual f - y needs regression targets)"
        if targets.numel() != n:
            return f"the probe targets have shape {tuple(targets.shape)}, not one value per probe"
        try:
            outputs = self._outputs(pl_module, self._model_inputs(trainer, pl_module)[0])
        except Exception as err:  # noqa: BLE001
            if self.strict and self.dynamics is True:
                raise
            return f"the model's outputs on the probes could not be computed ({type(err).__name__}: {err})"
        if outputs.ndim != 2 or outputs.shape[1] != 1:
            return f"the model has {outputs.shape[1] if outputs.ndim == 2 else 'several'} outputs per probe, not 1"
        return None

    def _setup_dynamics(self, trainer: Any, pl_module: Any) -> None:
        """Decide whether the dynamics metrics apply; build the tracker; draw the held-out probes."""
        self._dynamics_on = False
        if self.dynamics is False:
            return
        reason = self._dynamics_blocker(trainer, pl_module)
        if reason is not None:
            if self.dynamics is True:
                self._dispatcher._warn_once(
                    "dynamics-off",
                    f"NTKReportCallback(dynamics=True): {reason}, so the training-dynamics metrics "
                    f"({self.prefix}/predicted_vs_observed_residual, /linearization_gap, ...) are off. They apply to "
                    "models with one output per probe trained on float regression targets (MSE loss).",
                )
            return
        assert self._probes is not None
        if self._tracker is None:
            self._tracker = DynamicsTracker(
                self._probes[1], residual_top_k=self.residual_top_k, loss_reduction=self.loss_reduction
            )
            if self._tracker_state is not None:
                self._tracker.load_state_dict(self._tracker_state)
                self._tracker_state = None
        if self._lr_step is None or self._lr_step != trainer.global_step:
            self._lr_step = trainer.global_step  # the lr sum is up to date with the step training starts at
        self._lr_pending, self._lr_records = None, []
        if self.num_heldout > 0 and (self._heldout is None or trainer.world_size > 1):
            self._heldout = self._resolve_heldout(trainer)
        self._dynamics_on = True

    def _resolve_heldout(self, trainer: Any) -> Optional[Probes]:
        """Held-out probes from the validation data, drawn on rank 0 and broadcast (like the probes)."""
        heldout, error, missing, local_err = self._heldout, None, False, None
        if heldout is None and trainer.is_global_zero:
            loader = find_dataloader(trainer.val_dataloaders)
            if loader is None:
                missing = True
            else:
                try:
                    generator = torch.Generator().manual_seed(self.seed + 1)
                    heldout = draw_probes(loader, self.num_heldout, generator, self.batch_to_probe)
                except Exception as err:  # noqa: BLE001 - reported below, after the collective
                    error, local_err = f"{type(err).__name__}: {err}", err
        if trainer.world_size > 1:
            heldout, error, missing = trainer.strategy.broadcast((heldout, error, missing), src=0)
        if heldout is not None:
            return heldout
        if missing:
            self._dispatcher._warn_once(
                "no-heldout",
                f"NTKReportCallback: no validation dataloader is loaded at train start, so the held-out metrics "
                f"({self.prefix}/linearization_gap, /heldout_mse) are skipped; the other dynamics metrics are logged. "
                "Fix: pass val_dataloaders to trainer.fit (validated in the first epoch, or with the sanity check on).",
                info=True,
            )
        elif error is not None:
            msg = (
                f"NTKReportCallback: could not draw held-out probes from the validation data ({error}); the held-out "
                "dynamics metrics are skipped. Fix: batch_to_probe=... for custom batches, or num_heldout=0."
            )
            if self.strict:
                raise ProbeError(msg) from local_err
            rank_zero_warn(msg)
        return None

    def _dynamics_metrics(self, trainer: Any, pl_module: Any, kernel: Tensor) -> Dict[str, float]:
        """The tracker's metrics at this report (empty when off or after a reported fault)."""
        if not self._dynamics_on or self._tracker is None:
            return {}
        step = int(trainer.global_step)
        try:
            inputs, targets = self._model_inputs(trainer, pl_module)
            outputs = self._outputs(pl_module, inputs)
            kwargs: Dict[str, Any] = {}
            if self._heldout is not None:
                h_inputs, h_targets = self._model_inputs(trainer, pl_module, self._heldout)
                kwargs["heldout_outputs"] = self._outputs(pl_module, h_inputs)
                if h_targets is not None and h_targets.is_floating_point() and h_targets.numel() == len(h_targets):
                    kwargs["heldout_targets"] = h_targets.cpu()
                if self._tracker.init is None:
                    # K0(held-out, probes): with K0 and f0 it defines the network linearised at initialisation
                    with torch.inference_mode(False), torch.enable_grad():
                        cross = empirical_ntk(
                            pl_module, h_inputs, None, inputs2=inputs, targets2=targets, **self._engine_kwargs()
                        )
                    kwargs["cross_kernel"] = cross.detach().to("cpu")
            checks = {
                "the model's outputs on the probes": outputs,
                "the model's outputs on the held-out probes": kwargs.get("heldout_outputs"),
                "the cross kernel K0(held-out, probes)": kwargs.get("cross_kernel"),
            }
            for name, t in checks.items():
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise NTKError(f"{name} contain NaN/inf entries.")
            current = self._current_lr(trainer, pl_module)
            if current is None:
                self._warn_mixed_lrs(f"at the report at step {step}", self._describe_lrs(trainer, pl_module, None))
            first = self._tracker.init is None
            # the tracker counts steps of theta (param_steps), not Lightning's global step
            out = self._tracker.update(
                kernel, outputs, self._param_steps, self._lr_sum, 0.0 if current is None else current, **kwargs
            )
        except Exception as err:  # noqa: BLE001 - a measurement must never stop training
            self._fault(trainer, err, where=f"training-dynamics metrics at step {step}", stage="dynamics")
            return {}
        # leave out what a step at different learning rates makes wrong (the tracker assumes lr K)
        if first:
            self._lr_mixed_init = self._lr_mixed
        drop: Tuple[str, ...] = ()
        if current is None:
            drop += _CURRENT_LR_KEYS
        if self._lr_mixed != (self._lr_mixed_prev or 0):
            drop += _PREDICTION_KEYS
        if self._lr_mixed != (self._lr_mixed_init or 0):
            drop += _LINEARIZED_KEYS
        self._lr_mixed_prev = self._lr_mixed
        out = {k: v for k, v in out.items() if k not in drop}
        per_epoch = self._steps_per_epoch(trainer)
        if per_epoch and "steps_to_halve_residual" in out:
            out["epochs_to_halve_residual"] = out["steps_to_halve_residual"] / per_epoch
        return out

    @staticmethod
    def _steps_per_epoch(trainer: Any) -> Optional[float]:
        """Optimizer steps per epoch, ceil(batches / accumulate_grad_batches); None when unknown."""
        try:
            batches = float(trainer.num_training_batches)
            accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        except (AttributeError, TypeError, ValueError):
            return None
        if not math.isfinite(batches) or batches <= 0:
            return None
        return float(math.ceil(batches / accumulate))  # Lightning also steps on an epoch's last, partial accumulation

    def _layer_metrics(self, layers: Dict[str, Tensor], step: int) -> Dict[str, float]:
        """``layer_share/<l>`` and ``layer_drift/<l>``; a layer first seen now (K0 not measured, or
        unfrozen later) gets this kernel as its reference."""
        if self._init_layer_kernels is None:
            self._init_layer_kernels = {}
        new = [k for k in layers if k not in self._init_layer_kernels]
        for k in new:
            self._init_layer_kernels[k] = layers[k]
        out = {f"layer_share/{k}": v for k, v in layer_shares(layers).items()}
        out.update({f"layer_drift/{k}": v for k, v in layer_drift(layers, self._init_layer_kernels).items()})
        return out

    def _fault(self, trainer: Any, err: BaseException, where: str, stage: str = "engine") -> None:
        if self.strict:
            raise err
        if stage == "analysis":
            cause = "the analysis of the kernel failed"
            fix = "Fix: check the probe targets (shape (N,), int class labels or float regression targets)."
        elif stage == "dynamics" and not ("out of memory" in str(err).lower()):
            cause = "the training-dynamics metrics could not be computed"
            fix = (
                "Fix: forward() (or output_fn=...) must give one finite output per probe; dynamics=False turns "
                "these metrics off."
            )
        elif isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            fix = (
                "Fix: fewer probes (num_probes=...), a smaller memory_budget=... for the engine's Jacobian blocks, "
                "or mode='target' instead of 'trace'."
            )
            cause = "out of memory"
        elif isinstance(err, NTKError):
            cause, fix = "NTK engine error", ""
        else:
            cause = "the NTK engine could not handle this model"
            fix = (
                "Fix: if forward() does not return (N, O) logits pass output_fn=...; otherwise compute "
                "ntk_callback.empirical_ntk(model, inputs, targets) outside the Trainer to see the full traceback."
            )
        rank_zero_warn(
            f"NTKReportCallback: {where} skipped, {cause}: {type(err).__name__}: {err} {fix}".rstrip()
            + " Training continues (strict=True turns this into an error)."
        )

    def _alignment_kernel(self, trainer: Any, pl_module: Any) -> Tuple[Optional[Tensor], str]:
        """The label-free kernel the alignments (kta, cka, ...) are computed on, and its name.

        ``(None, name)`` when the report's own kernel is label-free already (``mode`` trace
        or sum; one output, where the target kernel is the trace kernel) or there are no
        targets. Otherwise the trace kernel ``J J^T`` (sum over outputs; exact up to
        ``_EXACT_TRACE_MAX_OUTPUTS`` outputs with ``alignment="auto"``) or its unbiased
        estimate ``J V V^T J^T`` from ``alignment_projections`` seeded Gaussian output
        projections V, the same V at every report (see ``engine/projection.py``)."""
        assert self._probes is not None
        if not KernelMode.parse(self.mode).needs_targets:  # label-free: alignment uses it as is
            return None, f"{self.mode} kernel"
        if self._probes[1] is None:
            return None, ""
        inputs, _ = self._model_inputs(trainer, pl_module)
        if self._num_outputs is None:
            out = self._outputs(pl_module, inputs)
            self._num_outputs = int(out.shape[1]) if out.ndim == 2 else 1
        num_outputs = self._num_outputs
        if num_outputs == 1:
            return None, ""  # the target kernel of a single output is its trace kernel
        kwargs = self._engine_kwargs()
        kwargs["mode"] = "trace"
        if self.alignment == "trace" or (self.alignment == "auto" and num_outputs <= _EXACT_TRACE_MAX_OUTPUTS):
            source = "trace kernel"
        else:
            k = self.alignment_projections
            V = output_projections(num_outputs, k, self.seed + _PROJECTION_SEED_OFFSET)
            kwargs["output_fn"] = projected_output_fn(V, self.output_fn)
            source = f"trace kernel est. from {k} output projections"
        with torch.inference_mode(False), torch.enable_grad():
            kernel = empirical_ntk(pl_module, inputs, None, **kwargs)
        kernel = kernel.detach().to("cpu")
        if not bool(torch.isfinite(kernel).all()):
            raise NTKError("the alignment (trace) kernel has NaN/inf entries: the model's outputs or gradients overflowed.")
        return kernel, source

    @staticmethod
    def _bn_stats(pl_module: Any) -> Dict[str, Tensor]:
        """``{module name: [running_mean, running_var]}`` (CPU copies) of every BatchNorm layer
        that tracks running statistics: eval-mode kernels depend on them."""
        out: Dict[str, Tensor] = {}
        for name, m in pl_module.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                out[name] = torch.cat([m.running_mean.detach().reshape(-1), m.running_var.detach().reshape(-1)]).cpu()
        return out

    def _check_bn_scale(self, pl_module: Any, metrics: Mapping[str, float], step: int) -> None:
        """Warn once when the kernel's scale moved by a factor 2 or more, accounting for at
        least half of relative_change (``|s - 1| >= relative_change / 2``, s = tr K / tr K0;
        K = s K0 gives ``relative_change = |s - 1|``), while BatchNorm running statistics
        changed since K0 (the eval-mode kernel follows them)."""
        scale = metrics.get("log10_scale_change")
        if scale is None or not math.isfinite(scale) or abs(scale) < _BN_SCALE_WARN or not self._bn_stats0:
            return
        rel = metrics.get("relative_change")
        if rel is not None and math.isfinite(rel) and abs(10.0**scale - 1.0) < 0.5 * rel:
            return  # the change of shape, not of scale, makes most of the drift
        now = self._bn_stats(pl_module)
        moved = [n for n, v in self._bn_stats0.items() if n in now and not torch.equal(now[n], v)]
        if not moved:
            return
        p = self.prefix
        self._dispatcher._warn_once(
            "bn-scale",
            f"NTKReportCallback: at step {step} the kernel's scale is 10^{scale:+.1f} times that of K0 "
            f"({p}/log10_scale_change = {scale:+.2f}) and the BatchNorm running statistics of {len(moved)} layer(s) "
            f"({_name_list(moved)}) changed since K0 was measured. The kernel is measured in eval mode, so K0 used "
            "BatchNorm's initial running mean 0 and variance 1 rather than the data's statistics, and the scale "
            f"change, which makes most of {p}/relative_change and {p}/lambda_max_change, is then largely this change "
            f"of normalisation rather than feature learning. Read {p}/kernel_distance (scale-free) for the change of the kernel's shape, or "
            "measure K0 once the statistics have warmed up: NTKReportCallback(init_kernel_at='first_epoch_end').",
        )

    def _report(self, trainer: Any, pl_module: Any, tag: str) -> None:
        measured = self._compute_kernel(trainer, pl_module)
        if measured is None:
            return
        kernel, layers = measured
        _, targets = self._probes  # type: ignore[misc]
        step = int(trainer.global_step)
        try:
            align, source = self._alignment_kernel(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - a measurement must never stop training
            self._fault(trainer, err, where=f"alignment kernel at step {step}")
            return
        # K0 failed (NaN, OOM, ...) at the initial report: the first kernel measured becomes the reference
        fallback = tag != "init" and self._init_kernel is None
        new_init = tag == "init" or fallback
        init = kernel if new_init else self._init_kernel
        init_align = align if new_init else self._init_alignment_kernel
        epoch = max(trainer.current_epoch - 1 if tag == "final" else trainer.current_epoch, 0)
        warmed = tag == "init" and self.init_kernel_at == "first_epoch_end"
        if warmed:
            where = f"initial kernel K0 (after epoch {trainer.current_epoch})"
        else:
            where = {"init": "initial kernel K0", "final": "end of training"}.get(tag, f"after epoch {epoch}")
        if new_init:
            init_label = f"step {step}, " + (
                "first successful report" if fallback else (f"end of epoch {epoch}" if warmed else "train start")
            )
        else:
            init_label = self._init_label
        try:
            report = analyze_ntk(
                kernel,
                targets,
                init_kernel=init,
                title=f"NTK {where}, step {step}",
                alignment_kernel=align,
                init_alignment_kernel=init_align,
                alignment_source=source,
                init_label=init_label,
            )
        except Exception as err:  # noqa: BLE001
            self._fault(trainer, err, where=f"report at step {step}", stage="analysis")
            return
        if new_init:
            self._init_kernel, self._init_alignment_kernel, self._init_label = kernel, align, init_label
            self._bn_stats0 = self._bn_stats(pl_module)
        if fallback:
            self._dispatcher._warn_once(
                "k0-fallback",
                f"NTKReportCallback: the initial kernel could not be measured, so drift ({self.prefix}/relative_change, "
                f"/kernel_distance, /layer_drift/...) is measured against the kernel at step {step} (the first "
                "successful report) from now on.",
            )
        elif layers is not None and self._init_layer_kernels is None and tag != "init":
            self._dispatcher._warn_once(
                "layer-k0-fallback",
                f"NTKReportCallback: no initial per-layer kernels (an older checkpoint, or layerwise was off), so "
                f"{self.prefix}/layer_drift/... is measured against the kernels at step {step}.",
            )
        flat = {str(k): float(v) for k, v in report.to_dict().items()}
        if trainer.is_global_zero:
            self._check_bn_scale(pl_module, flat, step)
        if layers is not None:
            flat.update(self._layer_metrics(layers, step))
            self.last_layer_kernels = layers
        flat.update(self._dynamics_metrics(trainer, pl_module, kernel))
        eig = report.eigenvalues.detach().cpu().double() if isinstance(report.eigenvalues, Tensor) else torch.as_tensor(
            np.asarray(report.eigenvalues, dtype=np.float64)
        )
        record = {
            "tag": tag,
            "epoch": int(epoch),
            "step": int(trainer.global_step),
            "metrics": flat,
            "eigenvalues": eig.tolist(),
        }
        self._history.append(record)
        self.last_kernel, self.last_report, self.last_alignment_kernel = kernel, report, align
        self._publish(trainer, pl_module, record, report, kernel, targets)

    def _publish(
        self, trainer: Any, pl_module: Any, record: Dict[str, Any], report: NTKReport, kernel: Tensor, targets: Any
    ) -> None:
        metrics = prefixed_scalars(record["metrics"], self.prefix)
        step = record["step"]
        # monitorable by ModelCheckpoint / EarlyStopping (set on every rank: they agree across ranks)
        trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
        loggers = list(trainer.loggers)
        self._dispatcher.log_scalars(loggers, metrics, step)
        if trainer.is_global_zero:
            self._dispatcher.warn_scalar_only(loggers)
        if trainer.is_global_zero and self._dispatcher.wants_media(loggers):
            pictures: Tuple[str, ...] = ("kernel",)
            if record["tag"] == "init":
                pictures += ("kernel_init",)  # its own tag: TensorBoard keeps only 10 images per tag
            if self._figures_due(record["tag"]):
                pictures += self._history_pictures()
            self._log_media(loggers, record, kernel, targets, pictures, histogram=True)
        if self.console != "off" and trainer.is_global_zero:
            if self.console == "compact":
                text = report.format_compact() + _insight_lines(record["metrics"], compact=True)
            else:
                text = "\n" + report.format() + _insight_lines(record["metrics"])
            _console_print(trainer, text)

    def _history_pictures(self) -> Tuple[str, ...]:
        """The pictures drawn from the whole history: spectrum, drift, layers, dynamics."""
        pictures = _BASE_PICTURES
        if self.layerwise:
            pictures += ("layers",)
        if self._dynamics_on:
            pictures += ("dynamics",)
        return pictures

    def _figures_due(self, tag: str) -> bool:
        """Whether the history pictures (spectrum, drift, layers, dynamics) are drawn at this report.

        Rule: always at the first report, at every ``_FIGURE_EVERY``-th (5th) report after it
        and at the last one (``on_train_end`` redraws them if that report skipped them); at
        the reports in between only while the time spent drawing them (matplotlib, ~0.1-0.3
        s a time) stays within ``_FIGURE_BUDGET`` (2 %) of the training time so far, so
        short runs do not pay for a drawing at every report and long runs still get one.
        Called after the report's record was appended to the history.
        """
        if not self.log_figures:
            return False
        index = len(self._history) - 1
        if tag == "final" or index % _FIGURE_EVERY == 0:
            return True
        elapsed = time.perf_counter() - self._fit_start
        return self._figures_spent + self._figures_estimate <= _FIGURE_BUDGET * elapsed

    def _log_media(
        self,
        loggers: List[Any],
        record: Dict[str, Any],
        kernel: Tensor,
        targets: Optional[Tensor],
        pictures: Tuple[str, ...],
        histogram: bool,
    ) -> None:
        labels = None
        if targets is not None and targets.ndim in (1, 2) and targets.numel() == targets.shape[0]:
            # integer labels group the heatmap by class; real (regression) targets sort it
            labels = (targets.double() if targets.is_floating_point() else targets).reshape(-1).numpy()
        scale = self.heatmap_scale
        media = ReportMedia(
            step=record["step"],
            kernel=kernel.double().numpy(),
            labels=labels,
            eigenvalues=np.asarray(record["eigenvalues"], dtype=np.float64),
            history=self._history,
            pictures=pictures,
            histogram=histogram,
            epoch=record["epoch"],
            tag=record["tag"],
            inputs=self._probes[0] if self._probes is not None else None,
            heatmap_scale=scale,
            init_kernel=self._init_kernel.double().numpy() if scale == "initial" and self._init_kernel is not None else None,
        )
        start = time.perf_counter()
        self._dispatcher.log_media(loggers, media)
        if any(p not in ("kernel", "kernel_init") for p in pictures):
            self._figures_estimate = time.perf_counter() - start
            self._figures_spent += self._figures_estimate
            self._figures_step = record["step"]

    def _refresh_figures(self, trainer: Any) -> None:
        """Draw the history pictures for the last report if its own report skipped them."""
        if not (self.log_figures and self._history and self.last_kernel is not None and trainer.is_global_zero):
            return
        last = self._history[-1]
        loggers = list(trainer.loggers)
        if self._figures_step == last["step"] or not self._dispatcher.wants_media(loggers):
            return
        targets = self._probes[1] if self._probes is not None else None
        self._log_media(loggers, last, self.last_kernel, targets, self._history_pictures(), histogram=False)

    def __repr__(self) -> str:
        src = "explicit" if self._explicit else self.probe_source
        extra = f", prefix={self.prefix!r}" if self.prefix != DEFAULT_PREFIX else ""
        return (
            f"{type(self).__name__}(num_probes={self.num_probes}, every_n_epochs={self.every_n_epochs}, "
            f"mode={self.mode!r}, probe_source={src!r}, seed={self.seed}{extra})"
        )


_BAR_ATTRS = ("_train_progress_bar", "_val_progress_bar", "_test_progress_bar", "_predict_progress_bar")


def _console_print(trainer: Any, text: str) -> None:
    """Print on the console (call on global rank zero) without breaking the progress bar.

    ``LightningModule.print`` hands the text to an enabled progress bar, and the TQDM bar
    drops it while none of its bars is open (``on_train_start``, ``on_train_end``): print
    through the bar only while one of its bars is open, plainly otherwise."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and getattr(bar, "is_enabled", False):
        present = [a for a in _BAR_ATTRS if hasattr(bar, a)]
        open_bar = any(getattr(bar, a) is not None and not getattr(getattr(bar, a), "disable", True) for a in present)
        if open_bar or not present:  # not a TQDM bar: its own print does not drop text
            bar.print(text)
            return
    print(text, flush=True)


def _fmt(v: Optional[float], spec: str = ".3g") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def _insight_lines(metrics: Mapping[str, float], compact: bool = False) -> str:
    """Console lines for the per-layer shares and the dynamics metrics ("" when neither is present);
    ``compact``: the dynamics on one line, no layer line."""
    lines = []
    shares = {k[len("layer_share/"):]: v for k, v in metrics.items() if k.startswith("layer_share/")}
    if shares and not compact:
        top = sorted(shares, key=lambda k: -shares[k] if math.isfinite(shares[k]) else math.inf)
        cells = [
            f"{k} {_fmt(100 * shares[k], '.0f')}% (drift {_fmt(metrics.get('layer_drift/' + k))})"
            for k in top[:_CONSOLE_LAYERS]
        ]
        more = f"  +{len(top) - _CONSOLE_LAYERS} more" if len(top) > _CONSOLE_LAYERS else ""
        lines.append("layers     " + "  ".join(cells) + more)
    if "residual_norm" in metrics:
        cells = [f"residual {_fmt(metrics['residual_norm'])}"]
        if "predicted_residual_norm" in metrics:
            cells[0] += (
                f" (predicted {_fmt(metrics['predicted_residual_norm'])}, "
                f"ratio {_fmt(metrics.get('predicted_vs_observed_residual'))})"
            )
        energy = next((k for k in metrics if k.startswith("residual_energy_top")), None)
        if energy is not None:
            cells.append(f"top-{energy[len('residual_energy_top'):]} energy {_fmt(metrics[energy], '.2f')}")
        if "steps_to_halve_residual" in metrics:
            halve = f"halves in {_fmt(metrics['steps_to_halve_residual'], '.0f')} steps"
            if "epochs_to_halve_residual" in metrics:
                halve += f" ({_fmt(metrics['epochs_to_halve_residual'])} epochs)"
            cells.append(halve + " if the kernel stayed frozen")
        if "linearization_gap" in metrics:
            cells.append(f"lin. gap {_fmt(metrics['linearization_gap'])}")
        lines.append(("    " if compact else "dynamics   ") + "  ".join(cells))
    return "".join("\n" + line for line in lines)


__all__ = ["NTKReportCallback"]
