"""NTKMonitor: the empirical NTK of a model reported during training, without Lightning.

The state and the math of :class:`ntk_callback.NTKReportCallback`, usable from any
training loop: the probes, the initial kernels K0 (total, per layer and the label-free
alignment kernel), the report history, the learning-rate/step accounting of the training
dynamics and their tracker, one report's computation (engine call, analysis, layer and
dynamics metrics) and ``state_dict`` / ``load_state_dict``. It never imports Lightning;
the callback is an adapter that calls it from Lightning's hooks.

A hand-written loop::

    mon = NTKMonitor(model, probes=(x, y))
    mon.start(writer=writer)                      # K0, before the first optimizer step
    for epoch in range(epochs):
        for xb, yb in loader:
            ...; optimizer.step(); step += 1
            mon.on_optimizer_step(optimizer)      # one step of theta, its learning rate
        metrics, report = mon.report(step=step, epoch=epoch, writer=writer)

Whole-dataset spectra: :meth:`NTKMonitor.spectrum` (``ntk_callback.ntk_spectrum``).
"""

from __future__ import annotations

import math
import time
import types
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import plotting
from ._probes import ProbeError, Probes, apply_to_tensors, num_samples, to_cpu, validate_probes
from .engine import KernelMode, NTKError, empirical_ntk, layerwise_ntk, mode_names, model_outputs
from .engine.distributed import Communicator
from .engine.projection import output_projections, projected_output_fn
from .engine.spectrum import ntk_spectrum, ntk_spectrum_and_norms
from .insight import DynamicsTracker, layer_drift, layer_shares
from .loggers import (
    DEFAULT_PREFIX,
    LoggerDispatcher,
    ReportMedia,
    check_prefix,
    prefixed_scalars,
    rank_zero_warn,
)
from .plotting import HEATMAP_SCALES
from .report import NTKReport, analyze_ntk

_ALIGNMENTS = ("auto", "trace", "projected")
_EXACT_TRACE_MAX_OUTPUTS = 16  # alignment="auto": the exact trace kernel up to this many outputs
_PROJECTION_SEED_OFFSET = (
    2  # the projections' generator seed is seed + 2 (probes: seed, held-out: seed + 1)
)
_FIGURE_EVERY = 5  # history pictures: always at the first, every 5th and the last report
_BN_SCALE_WARN = (
    0.3  # |log10(tr K / tr K0)| (a factor 2) from which a BatchNorm statistics change is flagged
)
_REDUCTIONS = ("mean", "sum", "half_sum")
STATE_VERSION = 1
_BASE_PICTURES = (
    "spectrum",
    "drift",
)  # history pictures always drawn; "layers" / "dynamics" when active
_FIGURE_BUDGET = 0.02  # fraction of the training time the history pictures may take before the end
# dynamics keys that depend on the learning rate: at the current lr, over the report
# interval, since the linearised network started (see _dynamics_metrics)
_CURRENT_LR_KEYS = (
    "steps_to_halve_residual",
    "epochs_to_halve_residual",
    "slowest_mode_time_constant",
)
_PREDICTION_KEYS = (
    "predicted_residual_norm",
    "predicted_vs_observed_residual",
    "residual_prediction_error",
)
_LINEARIZED_KEYS = ("linearization_gap", "linearized_heldout_mse")
_LR_RTOL = 1e-9  # learning rates this close count as one

# (id of an optimizer's param_groups list, [(the group's params, its lr)]): one optimizer step
_StepRecord = tuple[int, list[tuple[Any, float]]]


def _step_record(optimizer: Any) -> _StepRecord | None:
    """The param groups and their lrs of ``optimizer`` now (a Lightning-wrapped optimizer
    shares the raw one's ``param_groups`` list, hence the key); None when unreadable."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return None
    try:
        return id(groups), [(g["params"], float(g["lr"])) for g in groups]
    except (KeyError, TypeError, ValueError):
        return None


def _add_lrs(lrs: dict[int, list[float]], record: _StepRecord) -> None:
    """Append a step's lr to the sequence of every parameter in ``lrs`` it steps."""
    for params, lr in record[1]:
        for p in params:
            seq = lrs.get(id(p))
            if seq is not None:
                seq.append(lr)


def _one_sequence(lrs: dict[int, list[float]]) -> tuple[float, ...] | None:
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


def _name_list(names: list[str], limit: int = 4) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}({name}={value!r}): expected an integer >= {minimum}.")
    return int(value)


def _check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}({name}={value!r}): expected True or False.")
    return value


def _device(model: Any) -> torch.device:
    """The device of ``model`` (a LightningModule's ``device``, else its first parameter's)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _check_probes(owner: str, probes: Any, what: str = "probes") -> Probes:
    """``(inputs, targets)`` validated and on CPU (targets may be None)."""
    if not (isinstance(probes, (tuple, list)) and len(probes) == 2):
        raise ValueError(
            f"{owner}({what}=...): expected a pair (inputs, targets), targets may be None; "
            f"got {type(probes).__name__}"
            + (f" of length {len(probes)}" if isinstance(probes, (tuple, list)) else "")
        )
    inputs, targets = probes
    if targets is not None and not isinstance(targets, Tensor):
        targets = torch.as_tensor(targets)
    try:
        validate_probes(inputs, targets)
    except ProbeError as err:
        raise ValueError(f"{owner}({what}=...): {err}") from None
    return to_cpu(inputs), to_cpu(targets) if targets is not None else None


class NTKMonitor:
    """The empirical NTK of ``model`` on a fixed probe set, reported during training.

    Plain PyTorch: construct it with the model and the probes, call :meth:`start` before
    the first optimizer step (K0, the reference of every drift metric), :meth:`on_optimizer_step`
    after each optimizer step (the learning-rate accounting of the training dynamics), and
    :meth:`report` whenever a report is wanted. Each report is the callback's (same keys,
    same conventions: README.md and docs/conventions.md): every key of
    ``NTKReport.to_dict()``, ``layer_share/<l>`` and ``layer_drift/<l>`` with
    ``layerwise``, and the training-dynamics keys for regression models.

    Args:
        model: the ``torch.nn.Module`` (may be set later as ``monitor.model``).
        probes: ``(inputs, targets)`` (targets may be None), the N probes of the (N, N)
            kernel; kept on CPU, moved to the model's device for each report.
        mode, dtype, memory_budget, output_fn, layerwise, dynamics, loss_reduction,
            residual_top_k, alignment, alignment_projections, prefix, log_images,
            log_figures, heatmap_scale, strict: as for
            :class:`ntk_callback.NTKReportCallback`.
        heldout: ``(inputs, targets)`` held-out probes of ``linearization_gap`` and the
            held-out errors (dynamics only), or None.
        seed: seeds the alignment kernel's output projections (``seed + 2``).
        steps_per_epoch: optimizer steps per epoch, for ``epochs_to_halve_residual``.

    Faults (NaN/inf kernel, out-of-memory, an engine error) warn and skip the report
    (``report`` returns None); ``strict=True`` raises instead. The monitor never changes
    weights, buffers, gradients, optimizer state or global RNG streams.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        probes: tuple[Any, Tensor | None] | None = None,
        *,
        mode: str = "target",
        seed: int = 0,
        strict: bool = False,
        dtype: torch.dtype | None = None,
        memory_budget: int | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        layerwise: bool = True,
        dynamics: bool | str = "auto",
        heldout: tuple[Any, Tensor | None] | None = None,
        loss_reduction: str = "mean",
        residual_top_k: int = 5,
        prefix: str = DEFAULT_PREFIX,
        alignment: str = "auto",
        alignment_projections: int = 8,
        log_images: bool = True,
        log_figures: bool = True,
        heatmap_scale: str = "per_report",
        steps_per_epoch: float | None = None,
        _owner: str = "NTKMonitor",
    ) -> None:
        owner = self._owner = _owner  # the name warnings and errors start with
        self.model = model
        if not isinstance(mode, str) or mode not in mode_names(scalar_only=True):  # (N, N) kernels
            known = isinstance(mode, str) and mode in mode_names()
            hint = (
                f" ({mode!r} gives an (N, N, O, O) kernel; use 'trace' or 'sum' for a scalar kernel)"
                if known
                else ""
            )
            raise ValueError(
                f"{owner}(mode={mode!r}): expected one of {mode_names(scalar_only=True)}{hint}."
            )
        self.mode = mode
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"{owner}(seed={seed!r}): expected an integer.")
        self.seed = int(seed)
        if output_fn is not None and not callable(output_fn):
            raise ValueError(f"{owner}(output_fn={output_fn!r}): expected a callable or None.")
        self.output_fn = output_fn
        self.strict = _check_bool(owner, "strict", strict)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(
                f"{owner}(dtype={dtype!r}): expected None or a floating torch.dtype such as torch.float64."
            )
        self.dtype = dtype
        self.log_images = _check_bool(owner, "log_images", log_images)
        self.log_figures = _check_bool(owner, "log_figures", log_figures)
        if heatmap_scale not in HEATMAP_SCALES:
            raise ValueError(
                f"{owner}(heatmap_scale={heatmap_scale!r}): expected one of {HEATMAP_SCALES} "
                "('per_report': each heatmap its own colour range; 'initial': the initial kernel's)."
            )
        self.heatmap_scale = heatmap_scale
        if memory_budget is not None:
            memory_budget = _check_int(owner, "memory_budget", memory_budget, 1)
        self.memory_budget = memory_budget
        self.layerwise = _check_bool(owner, "layerwise", layerwise)
        if dynamics not in (True, False, "auto") or not isinstance(dynamics, (bool, str)):
            raise ValueError(f"{owner}(dynamics={dynamics!r}): expected True, False or 'auto'.")
        self.dynamics = dynamics
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(
                f"{owner}(loss_reduction={loss_reduction!r}): expected one of {_REDUCTIONS} "
                "('mean' for F.mse_loss's default, 'sum' for reduction='sum', 'half_sum' for 1/2 sum (f - y)^2)."
            )
        self.loss_reduction = loss_reduction
        self.residual_top_k = _check_int(owner, "residual_top_k", residual_top_k, 1)
        try:
            self.prefix = check_prefix(prefix)
        except ValueError as err:
            raise ValueError(f"{owner}({err}") from None
        if alignment not in _ALIGNMENTS:
            raise ValueError(
                f"{owner}(alignment={alignment!r}): expected one of {_ALIGNMENTS} ('auto': the exact trace "
                f"kernel up to {_EXACT_TRACE_MAX_OUTPUTS} outputs, its random-projection estimate beyond)."
            )
        self.alignment = alignment
        self.alignment_projections = _check_int(
            owner, "alignment_projections", alignment_projections, 1
        )
        self.steps_per_epoch = steps_per_epoch
        self._probes: Probes | None = _check_probes(owner, probes) if probes is not None else None
        # set by an adapter: the input conversion of its batches (Lightning's precision plugin)
        self.input_transform: Callable[[Any], Any] | None = None
        self.optimizers: list[Any] = []  # the optimizers whose param groups the lr keys read

        self._init_kernel: Tensor | None = None
        self._init_alignment_kernel: Tensor | None = (
            None  # label-free K0 for kta_change (target mode)
        )
        self._init_label = ""  # which K0 drift is measured against ("step 0, train start")
        self._bn_stats0: dict[str, Tensor] | None = (
            None  # BatchNorm running statistics when K0 was measured
        )
        self._num_outputs: int | None = None  # O, read once per fit for the alignment kernel
        self.last_alignment_kernel: Tensor | None = None
        self._init_layer_kernels: dict[str, Tensor] | None = None
        self._history: list[dict[str, Any]] = []
        self._spectra: list[dict[str, Any]] = []  # whole-set spectra (spectrum())
        self.last_kernel: Tensor | None = None
        self.last_layer_kernels: dict[str, Tensor] | None = None
        self.last_report: NTKReport | None = None
        # training dynamics: held-out probes, the tracker and the cumulative learning rate
        self._heldout: Probes | None = (
            _check_probes(owner, heldout, "heldout") if heldout is not None else None
        )
        self._tracker: DynamicsTracker | None = None
        self._tracker_state: Mapping[str, Any] | None = (
            None  # restored, loaded when the tracker is built
        )
        self._dynamics_on = False
        self._lr_sum = (
            0.0  # sum of the learning rates of the steps of theta taken so far (one lr for all)
        )
        self._lr_step: int | None = None  # (adapter) global step _lr_sum is up to date with
        self._param_steps = 0  # steps of the whole theta so far (the dynamics' step count)
        self._lr_mixed = 0  # batches whose steps moved the trainable parameters at different lrs
        self._lr_mixed_init: int | None = None  # _lr_mixed at the tracker's first measurement
        self._lr_mixed_prev: int | None = None  # _lr_mixed at the tracker's last measurement
        self._fit_start = time.perf_counter()
        self._figures_spent = 0.0  # seconds spent drawing the history pictures in this fit
        self._figures_estimate = 0.3  # seconds one drawing takes (updated after each)
        self._figures_step: int | None = None  # step of the last report drawn with them
        self._dispatcher = LoggerDispatcher(
            log_images=self.log_images, on_error=self._logger_failed, prefix=self.prefix
        )

    # ------------------------------------------------------------------ public state
    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per report: ``{"tag", "epoch", "step", "metrics", "eigenvalues"}`` (see :meth:`state_dict`)."""
        return self._history

    @property
    def probes(self) -> Probes | None:
        """The probe set ``(inputs, targets)`` on CPU."""
        return self._probes

    @probes.setter
    def probes(self, probes: Probes | None) -> None:
        self._probes = _check_probes(self._owner, probes) if probes is not None else None

    @property
    def init_kernel(self) -> Tensor | None:
        """K0, the kernel measured before the first optimizer step (CPU), or None."""
        return self._init_kernel

    @property
    def init_layer_kernels(self) -> dict[str, Tensor] | None:
        """``{layer: K0_l}`` (CPU), the per-layer kernels drift is measured against, or None."""
        return self._init_layer_kernels

    @property
    def heldout(self) -> Probes | None:
        """The held-out probes ``(inputs, targets)`` of the dynamics metrics (CPU), or None."""
        return self._heldout

    @heldout.setter
    def heldout(self, heldout: Probes | None) -> None:
        self._heldout = heldout

    @property
    def dynamics_active(self) -> bool:
        """Whether the training-dynamics metrics are computed (decided by :meth:`start`)."""
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
        dynamics metrics (one per batch in which all trainable parameters were stepped once)."""
        return self._param_steps

    # ------------------------------------------------------------------ the training loop
    def start(
        self, step: int = 0, writer: Any = None, optimizers: Sequence[Any] = ()
    ) -> tuple[dict[str, float], NTKReport] | None:
        """Before the first optimizer step: decide whether the dynamics metrics apply (they
        need one output per probe and float targets), then measure and report K0
        (``tag="init"``). ``optimizers``: the ones training will step, whose current
        learning rate the K0 report's lr-dependent keys read (otherwise they are known from
        the first :meth:`on_optimizer_step`). Returns :meth:`report`'s value."""
        if optimizers:
            self.optimizers = list(optimizers)
        self.begin_run()
        self.setup_dynamics(step)
        return self.report(step=step, epoch=0, tag="init", writer=writer)

    def on_optimizer_step(self, *optimizers: Any) -> None:
        """Account one step of the whole theta, taken by ``optimizers`` (usually one; several
        when each steps its own parameters in the same step) at the learning rates in their
        ``param_groups`` now (read only): call it right after ``optimizer.step()``. The lrs
        must be one for all trainable parameters for the lr-dependent dynamics keys (see
        :class:`ntk_callback.NTKReportCallback`)."""
        if optimizers:
            self.optimizers = list(optimizers)
        if not self._dynamics_on:
            return
        records = [_step_record(opt) for opt in optimizers]
        known = None if any(r is None for r in records) else [r for r in records if r is not None]
        self.count_steps(known, f"in optimizer step {self._param_steps + 1}")

    def report(
        self, step: int, epoch: int = 0, tag: str | None = None, writer: Any = None
    ) -> tuple[dict[str, float], NTKReport] | None:
        """Measure the kernel now and report it: ``(metrics, NTKReport)``, the metrics without
        prefix (the history record's), or None when the report was skipped after a fault.

        ``tag``: ``"init"`` (this kernel becomes K0), ``"epoch"`` or ``"final"``; default
        ``"init"`` while no K0 exists, else ``"epoch"``. ``writer``: a
        ``torch.utils.tensorboard.SummaryWriter`` that gets ``<prefix>/<key>`` scalars, the
        ``<prefix>/eigenvalues`` histogram and the ``<prefix>/kernel`` (and history) images,
        at ``global_step=step``."""
        if tag is None:
            tag = "init" if self._init_kernel is None else "epoch"
        measured = self.measure(step=step, epoch=epoch, tag=tag)
        if measured is None:
            return None
        record, report, kernel = measured
        if writer is not None:
            self.write(writer, record, kernel)
        return record["metrics"], report

    def begin_run(self) -> None:
        """Restart the clock of the history pictures' time budget (a new fit)."""
        self._fit_start, self._figures_spent, self._figures_step = time.perf_counter(), 0.0, None

    def _logger_failed(self, what: str, err: BaseException) -> None:
        if self.strict:
            raise err
        rank_zero_warn(
            f"{self._owner}: {what} failed ({type(err).__name__}: {err}); training continues."
        )

    # ------------------------------------------------------------------ TensorBoard
    def write(self, writer: Any, record: dict[str, Any], kernel: Tensor) -> None:
        """Write one report (a history record and its kernel) to a ``SummaryWriter``."""
        step = record["step"]
        for key, value in prefixed_scalars(record["metrics"], self.prefix).items():
            writer.add_scalar(key, value, global_step=step)
        if self.log_images:
            self.publish_media(self._writer_sink(writer), record, kernel)

    def _writer_sink(self, writer: Any) -> Callable[[ReportMedia], None]:
        # the TensorBoard logger's media writer, fed the bare SummaryWriter as its experiment
        shim = types.SimpleNamespace(experiment=writer)
        return lambda media: self._dispatcher._media_tensorboard(shim, media)

    def refresh_figures(self, writer: Any) -> None:
        """Draw the history pictures for the last report if its own report skipped them
        (call once at the end of training)."""
        self._refresh_figures(self._writer_sink(writer))

    # ------------------------------------------------------------------ whole-set spectrum
    @property
    def spectra(self) -> list[dict[str, Any]]:
        """One record per whole-set spectrum: ``{"tag": "spectrum_set", "epoch", "step",
        "metrics", "eigenvalues"}`` (the top k, descending)."""
        return self._spectra

    def spectrum(
        self,
        data: Any,
        *,
        k: int = 20,
        step: int = 0,
        epoch: int = 0,
        trace_samples: int = 16,
        batch_to_probe: Callable[[Any], Any] | None = None,
        comm: Communicator | None = None,
        writer: Any = None,
    ) -> dict[str, Any] | None:
        """The top-``k`` NTK eigenvalues of the model over a whole data set, in the monitor's
        ``mode`` and ``dtype``, without forming the N x N kernel (:func:`ntk_callback.ntk_spectrum`:
        Lanczos on ``v -> K v``, or the parameter-space Gram when the parameters are few),
        and the trace of that kernel (:func:`ntk_callback.ntk_trace_estimate`: Hutchinson
        over ``trace_samples`` Rademacher vectors, exact on the Gram and "factors" routes; 0
        skips it).

        ``data``: a ``DataLoader`` or iterable of ``(inputs, targets)`` batches (or one probe
        batch), in a fixed order; ``comm`` splits each pass over the data across ranks (every
        rank passes the same data). Returns the record appended to :attr:`spectra`:
        ``metrics`` holds ``lambda_1 .. lambda_k``, ``trace``, ``trace_stderr`` (0 when exact)
        and ``seconds`` (the wall time of the spectrum and trace); logged to ``writer`` as
        ``<prefix>/spectrum_set/<key>`` scalars and the ``<prefix>/spectrum_set`` picture
        (every whole-set spectrum so far). None after a reported fault (raised when ``strict``).
        """
        kwargs: dict[str, Any] = {
            "mode": self.mode,
            "dtype": self.dtype,
            "batch_to_probe": batch_to_probe,
            "memory_budget": self.memory_budget,
            "output_fn": self.output_fn,
            "eval_mode": True,
            "comm": comm,
        }
        start = time.perf_counter()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                est = None
                if trace_samples:
                    # one setup (and, on the "factors" route, one capture) for both
                    eig, est = ntk_spectrum_and_norms(
                        self._net(), data, k=k, num_samples=trace_samples, seed=self.seed,
                        **kwargs
                    )
                else:
                    eig = ntk_spectrum(self._net(), data, k=k, seed=self.seed, **kwargs)
            eig = eig.detach().double().cpu()
            if not bool(torch.isfinite(eig).all()):
                raise NTKError(
                    "the whole-set spectrum has NaN/inf eigenvalues: the model's outputs or gradients "
                    "overflowed. Fix: dtype=torch.float64, or check the loss and learning rate."
                )
        except Exception as err:  # noqa: BLE001 - a measurement must never stop training
            self._fault(err, where=f"whole-set spectrum at step {step}")
            return None
        metrics = {f"lambda_{i + 1}": float(v) for i, v in enumerate(eig.tolist())}
        if est is not None:
            metrics.update(trace=float(est.trace), trace_stderr=float(est.trace_stderr))
        metrics["seconds"] = time.perf_counter() - start
        record = {
            "tag": "spectrum_set",
            "epoch": int(epoch),
            "step": int(step),
            "metrics": metrics,
            "eigenvalues": eig.tolist(),
        }
        self._spectra.append(record)
        if writer is not None:
            for key, value in prefixed_scalars(metrics, f"{self.prefix}/spectrum_set").items():
                writer.add_scalar(key, value, global_step=step)
            image = self.spectrum_image()
            if image is not None:
                writer.add_image(
                    f"{self.prefix}/spectrum_set", image, global_step=step, dataformats="CHW"
                )
        return record

    def spectrum_image(self) -> np.ndarray | None:
        """The (3, H, W) picture of every whole-set spectrum so far (``plotting.spectrum_figure``),
        or None without matplotlib or spectra."""
        if not (self.log_images and self._spectra):
            return None
        try:
            return plotting.figure_to_image(plotting.spectrum_figure(self._spectra))
        except ImportError:
            return None

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state (plain tensors, lists and numbers; loadable with ``weights_only=True``).

        ``{"version": 1, "probes": {"inputs": CPU tensor (or tuple/list/dict of tensors),
        "targets": CPU tensor or None} or None, "init_kernel": (N, N) CPU tensor or None,
        "init_alignment_kernel": (N, N) CPU tensor or None (the label-free K0 of the alignments,
        target mode only), "init_label": str (which K0: step and when),
        "init_layer_kernels": {layer: (N, N) CPU tensor} or None, "dynamics": {"lr_sum":
        float, "lr_step": int or None, "param_steps": int, "lr_mixed": {"count": int,
        "at_init": int or None, "at_prev": int or None}, "heldout": {"inputs", "targets"} or
        None, "tracker": DynamicsTracker.state_dict() or None}, "history": [record, ...],
        "spectra": [record, ...] (whole-set spectra, tag "spectrum_set", eigenvalues the top k),
        "settings": {...}}`` (the callback adds its own settings)
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
            "init_layer_kernels": dict(self._init_layer_kernels)
            if self._init_layer_kernels is not None
            else None,
            "dynamics": {
                "lr_sum": self._lr_sum,
                "lr_step": self._lr_step,
                "param_steps": self._param_steps,
                "lr_mixed": {
                    "count": self._lr_mixed,
                    "at_init": self._lr_mixed_init,
                    "at_prev": self._lr_mixed_prev,
                },
                "heldout": heldout,
                "tracker": tracker,
            },
            "history": _copy_records(self._history),
            "spectra": _copy_records(self._spectra),
            "settings": {
                "mode": self.mode,
                "seed": self.seed,
                "dtype": str(self.dtype) if self.dtype is not None else None,
                "prefix": self.prefix,
                "layerwise": self.layerwise,
                "dynamics": str(self.dynamics),
                "alignment": self.alignment,
                "alignment_projections": self.alignment_projections,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore probes, K0 and history; tolerant of missing keys and of older/newer versions."""
        if not isinstance(state_dict, Mapping):
            rank_zero_warn(
                f"{self._owner}: ignoring a saved state of type {type(state_dict).__name__}."
            )
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
                rank_zero_warn(
                    f"{self._owner}: the saved probes are unusable ({err}); new probes will be drawn."
                )
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
                settings.get(k, getattr(self, k)) == getattr(self, k)
                for k in ("alignment", "alignment_projections")
            )
            k0a = state_dict.get("init_alignment_kernel")
            # an alignment K0 of other settings (exact vs projected) would make kta_change compare two kernels
            self._init_alignment_kernel = (
                k0a.detach().cpu() if isinstance(k0a, Tensor) and same_alignment else None
            )
        elif k0 is not None:
            rank_zero_warn(
                f"{self._owner}: the saved initial kernel was measured in mode {saved_mode!r}, this callback uses "
                f"{self.mode!r}; drift cannot be compared and is reported against the kernel at resume time."
            )
        self._history = _load_records(state_dict.get("history"))
        self._spectra = _load_records(state_dict.get("spectra"))

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
            self._lr_mixed_init = (
                int(mixed["at_init"]) if mixed.get("at_init") is not None else None
            )
            self._lr_mixed_prev = (
                int(mixed["at_prev"]) if mixed.get("at_prev") is not None else None
            )
        except (TypeError, ValueError):
            self._lr_mixed, self._lr_mixed_init, self._lr_mixed_prev = 0, None, None
        held = saved.get("heldout")
        if isinstance(held, Mapping) and held.get("inputs") is not None:
            inputs, targets = held.get("inputs"), held.get("targets")
            try:
                validate_probes(inputs, targets)
                self._heldout = (to_cpu(inputs), to_cpu(targets) if targets is not None else None)
            except ProbeError as err:
                rank_zero_warn(
                    f"{self._owner}: the saved held-out probes are unusable ({err}); new ones will be drawn."
                )
        tracker = saved.get("tracker")
        if isinstance(tracker, Mapping):
            self._tracker, self._tracker_state = (
                None,
                tracker,
            )  # rebuilt with the probes' targets at train start

    def _model_inputs(self, probes: Probes | None = None) -> tuple[Any, Tensor | None]:
        """``probes`` (default: the probe set) on the module's device, inputs converted like Lightning's batches."""
        probes = self._probes if probes is None else probes
        assert probes is not None
        inputs, targets = probes
        device = _device(self.model)
        inputs = apply_to_tensors(inputs, lambda t: t.to(device))
        # the adapter's input conversion of batches (Lightning's "64-true", "bf16-true", ...)
        if self.input_transform is not None:
            inputs = self.input_transform(inputs)
        return inputs, (targets.to(device) if targets is not None else None)

    def _engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"mode": self.mode, "dtype": self.dtype, "eval_mode": True}
        if self.memory_budget is not None:
            kwargs["memory_budget"] = self.memory_budget
        if self.output_fn is not None:
            kwargs["output_fn"] = self.output_fn
        return kwargs

    def _compute_kernel(self, step: int) -> tuple[Tensor, dict[str, Tensor] | None] | None:
        """``(K, {layer: K_l} or None)`` on the probes (CPU), or None after a reported fault
        (re-raised when strict). With ``layerwise`` K is the sum of the layer kernels
        (exactly ``empirical_ntk``: the NTK is a sum over parameters), added in float64."""
        try:
            inputs, targets = self._model_inputs()
            kwargs = self._engine_kwargs()
            layers: dict[str, Tensor] | None = None
            # hooks may run under no_grad/inference_mode (e.g. after validation): the kernel needs autograd
            with torch.inference_mode(False), torch.enable_grad():
                if self.layerwise:
                    parts = layerwise_ntk(self._net(), inputs, targets, **kwargs)
                    if not parts:
                        raise NTKError(
                            "the model has no trainable parameters (requires_grad=True), so its NTK is empty. "
                            "Fix: unfreeze at least one layer."
                        )
                    layers = {name: k.detach().to("cpu") for name, k in parts.items()}
                    first = next(iter(layers.values()))
                    kernel = (
                        torch.stack([k.double() for k in layers.values()]).sum(0).to(first.dtype)
                    )
                else:
                    kernel = empirical_ntk(self._net(), inputs, targets, **kwargs)
            kernel = kernel.detach().to("cpu")
            if not bool(torch.isfinite(kernel).all()):
                raise NTKError(
                    "the kernel has NaN/inf entries: the model's outputs or gradients overflowed on the probes. "
                    "Fix: check the loss and learning rate; dtype=torch.float64 helps when it is float32 overflow."
                )
            return kernel, layers
        except Exception as err:  # noqa: BLE001 - a measurement must never stop training
            self._fault(err, where=f"report at step {step}")
            return None

    # -------------------------------------------------------------- training dynamics

    def _net(self) -> torch.nn.Module:
        """The model, which a monitor may be given after construction."""
        if self.model is None:
            raise NTKError(f"{self._owner} has no model yet: pass `model=` or set `.model` "
                           "before the first report.")
        return self.model

    @staticmethod
    def _trainable(model: Any) -> dict[int, str]:
        """``{id(p): name}`` of the parameters the kernel covers (``requires_grad=True``)."""
        return {id(p): name for name, p in model.named_parameters() if p.requires_grad}

    def _current_lr(self) -> float | None:
        """The one learning rate of every trainable parameter in the optimizers' param groups
        now; 0 when none is in an optimizer (or there is none); None when they differ (a
        parameter in no optimizer, or in several, next to ones in one)."""
        trainable = self._trainable(self.model)
        lrs: dict[int, list[float]] = {pid: [] for pid in trainable}
        for opt in self.optimizers:
            record = _step_record(opt)
            if record is not None:
                _add_lrs(lrs, record)
        one = _one_sequence(lrs)
        if one is None or len(one) > 1:
            return None
        return one[0] if one else 0.0

    def count_steps(self, records: list[_StepRecord] | None, where: str, unknown: str = "") -> None:
        """Charge one batch's optimizer steps (``records``: the param groups and lrs of each
        step, see ``_step_record``; None when which optimizers stepped is unknown, then
        ``unknown`` says why): each trainable parameter's sequence of lrs in it; one sequence
        for all is ``len`` steps of theta at those lrs, otherwise a mixed batch (one warning,
        ``where`` names it)."""
        trainable = self._trainable(self.model)
        if not trainable:
            return
        one: tuple[float, ...] | None = None
        if records is not None:
            lrs: dict[int, list[float]] = {pid: [] for pid in trainable}
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
            detail = unknown + self._describe_lrs(None)
        else:
            self._param_steps += max(len(v) for v in lrs.values())
            detail = self._describe_lrs(records)
        self._warn_mixed_lrs(where, detail)

    def _describe_lrs(self, records: list[_StepRecord] | None) -> str:
        """``optimizer i param group j (names): lr ...`` for every group holding trainable
        parameters (the lrs of this batch's steps when ``records`` is given, else the current
        ones), and the trainable parameters in no optimizer."""
        names = self._trainable(self.model)
        parts: list[str] = []
        covered: set[int] = set()
        for i, opt in enumerate(self.optimizers):
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
                    text = (
                        "lr "
                        + ", ".join(f"{v:.4g}" for v in used)
                        + (f" ({len(used)} steps)" if len(used) > 1 else "")
                    )
                parts.append(f"optimizer {i} param group {j} ({_name_list(inside)}): {text}")
        orphans = [name for pid, name in names.items() if pid not in covered]
        if orphans:
            parts.append(f"in no optimizer (never stepped, lr 0): {_name_list(orphans)}")
        return "; ".join(parts)

    def _warn_mixed_lrs(self, where: str, detail: str) -> None:
        p = self.prefix
        self._dispatcher._warn_once(
            "lr-mixed",
            f"{self._owner}: the trainable parameters (the ones the kernel covers) do not all train with one "
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

    def _outputs(self, inputs: Any) -> Tensor:
        """f(x) as the kernel sees it, (N, O) on CPU (no gradient, no side effects)."""
        with torch.inference_mode(False):
            out = model_outputs(
                self._net(), inputs, dtype=self.dtype, eval_mode=True, output_fn=self.output_fn
            )
        return out.detach().to("cpu")

    def _dynamics_blocker(self) -> str | None:
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
            outputs = self._outputs(self._model_inputs()[0])
        except Exception as err:  # noqa: BLE001
            if self.strict and self.dynamics is True:
                raise
            return f"the model's outputs on the probes could not be computed ({type(err).__name__}: {err})"
        if outputs.ndim != 2 or outputs.shape[1] != 1:
            return f"the model has {outputs.shape[1] if outputs.ndim == 2 else 'several'} outputs per probe, not 1"
        return None

    def setup_dynamics(self, step: int = 0) -> None:
        """Decide whether the dynamics metrics apply (one output per probe, float targets;
        ``dynamics``) and build their tracker; ``step``: the (adapter's) step training starts at."""
        self._dynamics_on = False
        if self.dynamics is False:
            return
        reason = self._dynamics_blocker()
        if reason is not None:
            if self.dynamics is True:
                self._dispatcher._warn_once(
                    "dynamics-off",
                    f"{self._owner}(dynamics=True): {reason}, so the training-dynamics metrics "
                    f"({self.prefix}/predicted_vs_observed_residual, /linearization_gap, ...) are off. They apply to "
                    "models with one output per probe trained on float regression targets (MSE loss).",
                )
            return
        assert self._probes is not None and self._probes[1] is not None
        if self._tracker is None:
            self._tracker = DynamicsTracker(
                self._probes[1],
                residual_top_k=self.residual_top_k,
                loss_reduction=self.loss_reduction,
            )
            if self._tracker_state is not None:
                self._tracker.load_state_dict(self._tracker_state)
                self._tracker_state = None
        if self._lr_step is None or self._lr_step != step:
            self._lr_step = step  # the lr sum is up to date with the step training starts at
        self._dynamics_on = True

    def _dynamics_metrics(self, kernel: Tensor, step: int) -> dict[str, float]:
        """The tracker's metrics at this report (empty when off or after a reported fault)."""
        if not self._dynamics_on or self._tracker is None:
            return {}
        try:
            inputs, targets = self._model_inputs()
            outputs = self._outputs(inputs)
            kwargs: dict[str, Any] = {}
            if self._heldout is not None:
                h_inputs, h_targets = self._model_inputs(self._heldout)
                kwargs["heldout_outputs"] = self._outputs(h_inputs)
                if (
                    h_targets is not None
                    and h_targets.is_floating_point()
                    and h_targets.numel() == len(h_targets)
                ):
                    kwargs["heldout_targets"] = h_targets.cpu()
                if self._tracker.init is None:
                    # K0(held-out, probes): with K0 and f0 it defines the network linearised at initialisation
                    with torch.inference_mode(False), torch.enable_grad():
                        cross = empirical_ntk(
                            self._net(),
                            h_inputs,
                            None,
                            inputs2=inputs,
                            targets2=targets,
                            **self._engine_kwargs(),
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
            current = self._current_lr()
            if current is None:
                self._warn_mixed_lrs(f"at the report at step {step}", self._describe_lrs(None))
            first = self._tracker.init is None
            # the tracker counts steps of theta (param_steps), not Lightning's global step
            out = self._tracker.update(
                kernel,
                outputs,
                self._param_steps,
                self._lr_sum,
                0.0 if current is None else current,
                **kwargs,
            )
        except Exception as err:  # noqa: BLE001 - a measurement must never stop training
            self._fault(err, where=f"training-dynamics metrics at step {step}", stage="dynamics")
            return {}
        # leave out what a step at different learning rates makes wrong (the tracker assumes lr K)
        if first:
            self._lr_mixed_init = self._lr_mixed
        drop: tuple[str, ...] = ()
        if current is None:
            drop += _CURRENT_LR_KEYS
        if self._lr_mixed != (self._lr_mixed_prev or 0):
            drop += _PREDICTION_KEYS
        if self._lr_mixed != (self._lr_mixed_init or 0):
            drop += _LINEARIZED_KEYS
        self._lr_mixed_prev = self._lr_mixed
        out = {k: v for k, v in out.items() if k not in drop}
        per_epoch = self.steps_per_epoch
        if per_epoch and "steps_to_halve_residual" in out:
            out["epochs_to_halve_residual"] = out["steps_to_halve_residual"] / per_epoch
        return out

    def _layer_metrics(self, layers: dict[str, Tensor], step: int) -> dict[str, float]:
        """``layer_share/<l>`` and ``layer_drift/<l>``; a layer first seen now (K0 not measured, or
        unfrozen later) gets this kernel as its reference."""
        if self._init_layer_kernels is None:
            self._init_layer_kernels = {}
        new = [k for k in layers if k not in self._init_layer_kernels]
        for k in new:
            self._init_layer_kernels[k] = layers[k]
        out = {f"layer_share/{k}": v for k, v in layer_shares(layers).items()}
        out.update(
            {
                f"layer_drift/{k}": v
                for k, v in layer_drift(layers, self._init_layer_kernels).items()
            }
        )
        return out

    def _fault(self, err: BaseException, where: str, stage: str = "engine") -> None:
        if self.strict:
            raise err
        if stage == "analysis":
            cause = "the analysis of the kernel failed"
            fix = "Fix: check the probe targets (shape (N,), int class labels or float regression targets)."
        elif stage == "dynamics" and "out of memory" not in str(err).lower():
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
            f"{self._owner}: {where} skipped, {cause}: {type(err).__name__}: {err} {fix}".rstrip()
            + " Training continues (strict=True turns this into an error)."
        )

    def _alignment_kernel(self) -> tuple[Tensor | None, str]:
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
        inputs, _ = self._model_inputs()
        if self._num_outputs is None:
            out = self._outputs(inputs)
            self._num_outputs = int(out.shape[1]) if out.ndim == 2 else 1
        num_outputs = self._num_outputs
        if num_outputs == 1:
            return None, ""  # the target kernel of a single output is its trace kernel
        kwargs = self._engine_kwargs()
        kwargs["mode"] = "trace"
        if self.alignment == "trace" or (
            self.alignment == "auto" and num_outputs <= _EXACT_TRACE_MAX_OUTPUTS
        ):
            source = "trace kernel"
        else:
            k = self.alignment_projections
            V = output_projections(num_outputs, k, self.seed + _PROJECTION_SEED_OFFSET)
            kwargs["output_fn"] = projected_output_fn(V, self.output_fn)
            source = f"trace kernel est. from {k} output projections"
        with torch.inference_mode(False), torch.enable_grad():
            kernel = empirical_ntk(self._net(), inputs, None, **kwargs)
        kernel = kernel.detach().to("cpu")
        if not bool(torch.isfinite(kernel).all()):
            raise NTKError(
                "the alignment (trace) kernel has NaN/inf entries: the model's outputs or gradients overflowed."
            )
        return kernel, source

    @staticmethod
    def _bn_stats(pl_module: Any) -> dict[str, Tensor]:
        """``{module name: [running_mean, running_var]}`` (CPU copies) of every BatchNorm layer
        that tracks running statistics: eval-mode kernels depend on them."""
        out: dict[str, Tensor] = {}
        for name, m in pl_module.named_modules():
            if (isinstance(m, torch.nn.modules.batchnorm._NormBase)
                    and m.running_mean is not None and m.running_var is not None):
                out[name] = torch.cat(
                    [m.running_mean.detach().reshape(-1), m.running_var.detach().reshape(-1)]
                ).cpu()
        return out

    def _check_bn_scale(self, metrics: Mapping[str, float], step: int) -> None:
        """Warn once when the kernel's scale moved by a factor 2 or more, accounting for at
        least half of relative_change (``|s - 1| >= relative_change / 2``, s = tr K / tr K0;
        K = s K0 gives ``relative_change = |s - 1|``), while BatchNorm running statistics
        changed since K0 (the eval-mode kernel follows them)."""
        scale = metrics.get("log10_scale_change")
        if (
            scale is None
            or not math.isfinite(scale)
            or abs(scale) < _BN_SCALE_WARN
            or not self._bn_stats0
        ):
            return
        rel = metrics.get("relative_change")
        if rel is not None and math.isfinite(rel) and abs(10.0**scale - 1.0) < 0.5 * rel:
            return  # the change of shape, not of scale, makes most of the drift
        now = self._bn_stats(self.model)
        moved = [n for n, v in self._bn_stats0.items() if n in now and not torch.equal(now[n], v)]
        if not moved:
            return
        p = self.prefix
        self._dispatcher._warn_once(
            "bn-scale",
            f"{self._owner}: at step {step} the kernel's scale is 10^{scale:+.1f} times that of K0 "
            f"({p}/log10_scale_change = {scale:+.2f}) and the BatchNorm running statistics of {len(moved)} layer(s) "
            f"({_name_list(moved)}) changed since K0 was measured. The kernel is measured in eval mode, so K0 used "
            "BatchNorm's initial running mean 0 and variance 1 rather than the data's statistics, and the scale "
            f"change, which makes most of {p}/relative_change and {p}/lambda_max_change, is then largely this change "
            f"of normalisation rather than feature learning. Read {p}/kernel_distance (scale-free) for the change of the kernel's shape, or "
            "measure K0 once the statistics have warmed up: NTKReportCallback(init_kernel_at='first_epoch_end').",
        )

    def measure(
        self,
        step: int,
        epoch: int,
        tag: str,
        title: str | None = None,
        init_when: str = "train start",
    ) -> tuple[dict[str, Any], NTKReport, Tensor] | None:
        """One report's computation: the kernel (and per-layer kernels) on the probes, the
        alignment kernel, ``analyze_ntk`` against K0, the layer and dynamics metrics; the
        record is appended to the history. Returns ``(record, report, kernel)``, or None
        after a reported fault (re-raised when ``strict``).

        ``tag="init"`` makes this kernel K0 (``init_when`` says when, for its label); a
        report while K0 is missing (it failed) makes its kernel the reference instead.
        ``title``: where the report is, for its title (default from ``tag`` and ``epoch``)."""
        if self._probes is None:
            raise NTKError(f"{self._owner}: no probes; pass probes=(inputs, targets).")
        measured = self._compute_kernel(step)
        if measured is None:
            return None
        kernel, layers = measured
        _, targets = self._probes
        try:
            align, source = self._alignment_kernel()
        except Exception as err:  # noqa: BLE001 - a measurement must never stop training
            self._fault(err, where=f"alignment kernel at step {step}")
            return None
        # K0 failed (NaN, OOM, ...) at the initial report: the first kernel measured becomes the reference
        fallback = tag != "init" and self._init_kernel is None
        new_init = tag == "init" or fallback
        init = kernel if new_init else self._init_kernel
        init_align = align if new_init else self._init_alignment_kernel
        where = title or {"init": "initial kernel K0", "final": "end of training"}.get(
            tag, f"after epoch {epoch}"
        )
        if new_init:
            init_label = f"step {step}, " + ("first successful report" if fallback else init_when)
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
            self._fault(err, where=f"report at step {step}", stage="analysis")
            return None
        if new_init:
            self._init_kernel, self._init_alignment_kernel, self._init_label = (
                kernel,
                align,
                init_label,
            )
            self._bn_stats0 = self._bn_stats(self.model)
        if fallback:
            self._dispatcher._warn_once(
                "k0-fallback",
                f"{self._owner}: the initial kernel could not be measured, so drift ({self.prefix}/relative_change, "
                f"/kernel_distance, /layer_drift/...) is measured against the kernel at step {step} (the first "
                "successful report) from now on.",
            )
        elif layers is not None and self._init_layer_kernels is None and tag != "init":
            self._dispatcher._warn_once(
                "layer-k0-fallback",
                f"{self._owner}: no initial per-layer kernels (an older checkpoint, or layerwise was off), so "
                f"{self.prefix}/layer_drift/... is measured against the kernels at step {step}.",
            )
        flat = {str(k): float(v) for k, v in report.to_dict().items()}
        self._check_bn_scale(flat, step)
        if layers is not None:
            flat.update(self._layer_metrics(layers, step))
            self.last_layer_kernels = layers
        flat.update(self._dynamics_metrics(kernel, step))
        eig = (
            report.eigenvalues.detach().cpu().double()
            if isinstance(report.eigenvalues, Tensor)
            else torch.as_tensor(np.asarray(report.eigenvalues, dtype=np.float64))
        )
        record = {
            "tag": tag,
            "epoch": int(epoch),
            "step": int(step),
            "metrics": flat,
            "eigenvalues": eig.tolist(),
        }
        self._history.append(record)
        self.last_kernel, self.last_report, self.last_alignment_kernel = kernel, report, align
        return record, report, kernel

    def publish_media(
        self, sink: Callable[[ReportMedia], None], record: dict[str, Any], kernel: Tensor
    ) -> None:
        """Hand one report's pictures to ``sink`` (a logger's media writer): the heatmap
        (K0's also as ``kernel_init``), the histogram, and the history pictures when due."""
        pictures: tuple[str, ...] = ("kernel",)
        if record["tag"] == "init":
            pictures += ("kernel_init",)  # its own tag: TensorBoard keeps only 10 images per tag
        if self._figures_due(record["tag"]):
            pictures += self._history_pictures()
        targets = self._probes[1] if self._probes is not None else None
        self._log_media(sink, record, kernel, targets, pictures, histogram=True)

    def _history_pictures(self) -> tuple[str, ...]:
        """The pictures drawn from the whole history: spectrum, drift, layers, dynamics."""
        pictures: tuple[str, ...] = _BASE_PICTURES
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
        sink: Callable[[ReportMedia], None],
        record: dict[str, Any],
        kernel: Tensor,
        targets: Tensor | None,
        pictures: tuple[str, ...],
        histogram: bool,
    ) -> None:
        labels = None
        if targets is not None and targets.ndim in (1, 2) and targets.numel() == targets.shape[0]:
            # integer labels group the heatmap by class; real (regression) targets sort it
            labels = (
                (targets.double() if targets.is_floating_point() else targets).reshape(-1).numpy()
            )
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
            init_kernel=self._init_kernel.double().numpy()
            if scale == "initial" and self._init_kernel is not None
            else None,
        )
        start = time.perf_counter()
        sink(media)
        if any(p not in ("kernel", "kernel_init") for p in pictures):
            self._figures_estimate = time.perf_counter() - start
            self._figures_spent += self._figures_estimate
            self._figures_step = record["step"]

    def _refresh_figures(self, sink: Callable[[ReportMedia], None]) -> None:
        """Draw the history pictures for the last report if its own report skipped them."""
        if not (
            self.log_figures and self.log_images and self._history and self.last_kernel is not None
        ):
            return
        last = self._history[-1]
        if self._figures_step == last["step"]:
            return
        targets = self._probes[1] if self._probes is not None else None
        self._log_media(
            sink, last, self.last_kernel, targets, self._history_pictures(), histogram=False
        )


def _copy_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "tag": r["tag"],
            "epoch": r["epoch"],
            "step": r["step"],
            "metrics": dict(r["metrics"]),
            "eigenvalues": list(r["eigenvalues"]),
        }
        for r in records
    ]


def _load_records(saved: Any) -> list[dict[str, Any]]:
    """History records from a saved state; malformed ones are dropped."""
    records = []
    for rec in saved or []:
        try:
            records.append(
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
    return records


__all__ = ["NTKMonitor", "STATE_VERSION"]
