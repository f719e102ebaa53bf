"""NTKReportCallback: reports the empirical NTK of the LightningModule while it trains.

A thin Lightning adapter over :class:`ntk_callback.NTKMonitor`, which holds the state
(probes, K0, history, learning-rate accounting, dynamics) and computes each report; this
module only decides *when* to measure, *which* probes to use (drawn from the trainer's
dataloaders, broadcast from rank 0), and *where* the results go (Lightning's loggers, the
console, ``callback_metrics``; the logged keys and their conventions: README.md and
docs/conventions.md).

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
* ``on_train_epoch_end`` with ``spectrum_every_n_epochs=M``: every M epochs the top-k
  spectrum of the NTK over the first ``spectrum_probes`` training examples (or all of
  them), matrix-free, split across ranks under DDP.
* ``on_train_end``: a final report (``tag="final"``) when the weights changed since the
  last report (the last epoch was not a multiple of ``every_n_epochs``, or training
  stopped mid-epoch).

Under ``fast_dev_run`` the callback runs as usual (K0, then the report after the single
epoch), but Lightning replaces every logger with a no-op ``DummyLogger``: only the
console report and ``trainer.callback_metrics`` remain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from ._lightning import (
    Callback,
    MisconfigurationException,
    NTKCallbackConfigError,
    logger_kind,
    rank_zero_warn,
    sharded_strategy_name,
)
from ._probes import (
    ProbeError,
    Probes,
    default_batch_to_probe,
    draw_probes,
    find_dataloader,
    num_samples,
)
from .engine import NTKError
from .loggers import DEFAULT_PREFIX, prefixed_scalars
from .monitor import NTKMonitor, _check_bool, _check_int, _step_record, _StepRecord
from .report import NTKReport

_SOURCES = ("train", "val")
_INIT_AT = ("train_start", "first_epoch_end")
_CONSOLE = ("full", "compact", "off")
_CONSOLE_LAYERS = 4  # layers named in the console line
_OWNER = "NTKReportCallback"


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
        spectrum_every_n_epochs: every this many epochs (after epoch ``e`` when
            ``(e + 1) % spectrum_every_n_epochs == 0``; None, the default: never) also the
            top-``spectrum_k`` NTK spectrum over a whole data set, in the callback's
            ``mode`` and ``dtype``, without forming the kernel
            (:meth:`ntk_callback.NTKMonitor.spectrum`): ``<prefix>/spectrum_set/lambda_1``
            .. ``/lambda_{k}``, ``/trace`` (Hutchinson estimate, ``/trace_stderr``; exact on
            the Gram route), ``/seconds`` (its cost) and ``/num_examples``, and the picture
            ``<prefix>/spectrum_set`` (TensorBoard; every whole-set spectrum so far).
            Under DDP each pass over the data is split across the ranks.
        spectrum_k: k, the eigenvalues of the whole-set spectrum (>= 1, < the examples).
        spectrum_probes: its data: ``"train"`` (default) the whole training dataset, or
            an int n, its first n examples (dataset indices 0..n-1, the same at every
            spectrum and on every rank; needs a map-style dataset), batched like the
            training dataloader without shuffling.
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
    it once, from global rank zero. Sharded strategies are refused in ``setup``. The
    whole-set spectrum is the exception: its passes over the data are split across the
    ranks through the process group (``engine/distributed.py``), every rank taking part;
    a failure on one rank is agreed on before each collective, so every rank warns and
    skips it instead of waiting.

    Attributes after fitting: :attr:`history` (one record per report, the format of
    :meth:`state_dict`), :attr:`spectra` (the whole-set spectra), :attr:`probes`,
    :attr:`init_kernel`, :attr:`last_kernel`, :attr:`last_report`; :attr:`monitor`, the
    :class:`~ntk_callback.NTKMonitor` holding them.
    """

    def __init__(
        self,
        num_probes: int = 64,
        every_n_epochs: int = 1,
        mode: str = "target",
        probes: tuple[Any, Tensor | None] | None = None,
        probe_source: str = "train",
        seed: int = 0,
        batch_to_probe: Callable[[Any], tuple[Any, Tensor | None]] | None = None,
        strict: bool = False,
        dtype: torch.dtype | None = None,
        log_images: bool = True,
        log_figures: bool = True,
        log_console: bool = True,
        memory_budget: int | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        layerwise: bool = True,
        dynamics: bool | str = "auto",
        num_heldout: int = 32,
        loss_reduction: str = "mean",
        residual_top_k: int = 5,
        prefix: str = DEFAULT_PREFIX,
        alignment: str = "auto",
        alignment_projections: int = 8,
        init_kernel_at: str = "train_start",
        console: str | None = None,
        heatmap_scale: str = "per_report",
        spectrum_every_n_epochs: int | None = None,
        spectrum_k: int = 20,
        spectrum_probes: int | str = "train",
    ) -> None:
        super().__init__()
        try:
            self.num_probes = _check_int(_OWNER, "num_probes", num_probes, 1)
            self.every_n_epochs = _check_int(_OWNER, "every_n_epochs", every_n_epochs, 1)
            self.log_console = _check_bool(_OWNER, "log_console", log_console)
            self.num_heldout = _check_int(_OWNER, "num_heldout", num_heldout, 0)
            if spectrum_every_n_epochs is not None:
                spectrum_every_n_epochs = _check_int(
                    _OWNER, "spectrum_every_n_epochs", spectrum_every_n_epochs, 1
                )
            self.spectrum_k = _check_int(_OWNER, "spectrum_k", spectrum_k, 1)
            if spectrum_probes != "train" and (
                isinstance(spectrum_probes, bool)
                or not isinstance(spectrum_probes, int)
                or spectrum_probes < 2
            ):
                raise ValueError(
                    f"{_OWNER}(spectrum_probes={spectrum_probes!r}): expected 'train' (the whole training dataset) "
                    "or an integer >= 2 (its first n examples)."
                )
            monitor = NTKMonitor(
                None,
                probes,
                mode=mode,
                seed=seed,
                strict=strict,
                dtype=dtype,
                memory_budget=memory_budget,
                output_fn=output_fn,
                layerwise=layerwise,
                dynamics=dynamics,
                loss_reduction=loss_reduction,
                residual_top_k=residual_top_k,
                prefix=prefix,
                alignment=alignment,
                alignment_projections=alignment_projections,
                log_images=log_images,
                log_figures=log_figures,
                heatmap_scale=heatmap_scale,
                _owner=_OWNER,
            )
        except ValueError as err:
            raise NTKCallbackConfigError(str(err)) from None
        self.spectrum_every_n_epochs = spectrum_every_n_epochs
        self.spectrum_probes = spectrum_probes
        if probe_source not in _SOURCES:
            raise NTKCallbackConfigError(
                f"NTKReportCallback(probe_source={probe_source!r}): expected 'train' or 'val' "
                "(or pass probes=(inputs, targets))."
            )
        self.probe_source = probe_source
        if batch_to_probe is not None and not callable(batch_to_probe):
            raise NTKCallbackConfigError(
                f"NTKReportCallback(batch_to_probe={batch_to_probe!r}): expected a callable batch -> (inputs, targets)."
            )
        self._batch_to_probe = batch_to_probe
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
        self._monitor = monitor
        self._dispatcher = monitor._dispatcher  # one set of once-only warnings
        self._lr_pending: _StepRecord | None = None  # optimizers[0]'s lrs at batch start (fallback)
        self._lr_records: list[_StepRecord] = []  # the optimizer steps seen in the current batch
        self._disabled_reason: str | None = None

    # ------------------------------------------------------------------ public state
    @property
    def monitor(self) -> NTKMonitor:
        """The :class:`~ntk_callback.NTKMonitor` holding the state and computing the reports."""
        return self._monitor

    # the monitor's settings, read through the callback (its constructor's arguments)
    mode = property(lambda self: self._monitor.mode)
    seed = property(lambda self: self._monitor.seed)
    strict = property(lambda self: self._monitor.strict)
    dtype = property(lambda self: self._monitor.dtype)
    memory_budget = property(lambda self: self._monitor.memory_budget)
    output_fn = property(lambda self: self._monitor.output_fn)
    layerwise = property(lambda self: self._monitor.layerwise)
    dynamics = property(lambda self: self._monitor.dynamics)
    loss_reduction = property(lambda self: self._monitor.loss_reduction)
    residual_top_k = property(lambda self: self._monitor.residual_top_k)
    prefix = property(lambda self: self._monitor.prefix)
    alignment = property(lambda self: self._monitor.alignment)
    alignment_projections = property(lambda self: self._monitor.alignment_projections)
    log_images = property(lambda self: self._monitor.log_images)
    log_figures = property(lambda self: self._monitor.log_figures)
    heatmap_scale = property(lambda self: self._monitor.heatmap_scale)
    # its state after fitting
    last_kernel = property(lambda self: self._monitor.last_kernel)
    last_layer_kernels = property(lambda self: self._monitor.last_layer_kernels)
    last_alignment_kernel = property(lambda self: self._monitor.last_alignment_kernel)
    last_report = property(lambda self: self._monitor.last_report)

    @property
    def state_key(self) -> str:
        settings: dict[str, Any] = dict(
            num_probes=self.num_probes,
            every_n_epochs=self.every_n_epochs,
            mode=self.mode,
            probe_source="explicit" if self._explicit else self.probe_source,
            seed=self.seed,
        )
        if (
            self.prefix != DEFAULT_PREFIX
        ):  # the default keeps the key of checkpoints written before `prefix`
            settings["prefix"] = self.prefix
        return self._generate_state_key(**settings)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per report: ``{"tag", "epoch", "step", "metrics", "eigenvalues"}`` (see :meth:`state_dict`)."""
        return self._monitor.history

    @property
    def spectra(self) -> list[dict[str, Any]]:
        """One record per whole-set spectrum (``spectrum_every_n_epochs``), as :attr:`history`."""
        return self._monitor.spectra

    @property
    def probes(self) -> Probes | None:
        """The probe set ``(inputs, targets)`` on CPU, once drawn (or given)."""
        return self._monitor.probes

    @property
    def init_kernel(self) -> Tensor | None:
        """K0, the kernel measured before the first optimizer step (CPU), or None."""
        return self._monitor.init_kernel

    @property
    def init_layer_kernels(self) -> dict[str, Tensor] | None:
        """``{layer: K0_l}`` (CPU), the per-layer kernels drift is measured against, or None."""
        return self._monitor.init_layer_kernels

    @property
    def heldout(self) -> Probes | None:
        """The held-out probes ``(inputs, targets)`` of the dynamics metrics (CPU), or None."""
        return self._monitor.heldout

    @property
    def dynamics_active(self) -> bool:
        """Whether the training-dynamics metrics are computed in the current/last fit."""
        return self._monitor.dynamics_active

    @property
    def lr_sum(self) -> float:
        """:attr:`NTKMonitor.lr_sum`: the sum of the learning rates of the steps of the whole theta."""
        return self._monitor.lr_sum

    @property
    def param_steps(self) -> int:
        """Steps of the whole theta seen so far (dynamics only): the step count of the
        dynamics metrics. ``trainer.global_step`` under automatic optimization; under manual
        optimization Lightning counts every optimizer's step, this one step per batch in
        which all trainable parameters were stepped once."""
        return self._monitor.param_steps

    def batch_to_probe(self, batch: Any) -> Probes:
        """Map a batch to ``(inputs, targets)``; override for custom batch structures."""
        if self._batch_to_probe is not None:
            return self._batch_to_probe(batch)
        return default_batch_to_probe(batch)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state: :meth:`NTKMonitor.state_dict` (its format), with the callback's
        settings (``num_probes``, ``every_n_epochs``, ``probe_source``, ``init_kernel_at``) added
        to ``"settings"``."""
        state = self._monitor.state_dict()
        state["settings"].update(
            num_probes=self.num_probes,
            every_n_epochs=self.every_n_epochs,
            probe_source="explicit" if self._explicit else self.probe_source,
            init_kernel_at=self.init_kernel_at,
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore probes, K0 and history (:meth:`NTKMonitor.load_state_dict`); tolerant of
        missing keys and of older/newer versions."""
        self._monitor.load_state_dict(state_dict)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._disabled_reason = None  # a new fit gets a new chance to draw probes
        self._monitor._dynamics_on = False
        self._monitor._num_outputs = None
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
        mon = self._attach(trainer, pl_module)
        mon.begin_run()
        if mon.probes is None or trainer.world_size > 1:
            mon._probes = self._resolve_probes(trainer)
            if mon.probes is None:
                return
        mon.setup_dynamics(trainer.global_step)
        self._lr_pending, self._lr_records = None, []
        if (
            mon.dynamics_active
            and self.num_heldout > 0
            and (mon.heldout is None or trainer.world_size > 1)
        ):
            mon.heldout = self._resolve_heldout(trainer)
        if mon.init_kernel is None and self.init_kernel_at == "train_start":
            if trainer.global_step > 0:
                rank_zero_warn(
                    f"NTKReportCallback: training resumes at step {trainer.global_step} without a saved initial "
                    "kernel; drift (ntk/relative_change, ntk/kernel_distance) is measured against the kernel now."
                )
            self._report(trainer, pl_module, tag="init")

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning steps "step"-interval LR schedulers *before* on_train_batch_end, so the
        # lr of this batch's optimizer step is the one in param_groups now (read only); it is
        # the fallback for an optimizer step that on_before_optimizer_step did not see.
        if self._monitor.dynamics_active:
            self._lr_records = []
            optimizers = list(getattr(trainer, "optimizers", None) or [])
            self._lr_pending = _step_record(optimizers[0]) if len(optimizers) == 1 else None

    def on_before_optimizer_step(
        self, trainer: Any, pl_module: Any, optimizer: Any, *args: Any
    ) -> None:
        # Called inside optimizer.step(), after the closure (backward) and before the update:
        # param_groups hold the lrs this step uses (read only). Every optimizer of manual
        # optimization passes through here, each time it steps.
        if self._monitor.dynamics_active:
            record = _step_record(optimizer)
            if record is not None:
                self._lr_records.append(record)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mon = self._monitor
        if not mon.dynamics_active:
            return
        step = trainer.global_step
        if mon._lr_step is None or step < mon._lr_step:
            mon._lr_step = step
        elif step > mon._lr_step:  # optimizer step(s) taken in this batch (not while accumulating)
            records: list[_StepRecord] | None = self._lr_records
            taken = (
                step - mon._lr_step
            )  # every optimizer's every step (manual optimization: all of them)
            if len(self._lr_records) != taken:
                if (
                    len({key for key, _ in self._lr_records}) == 1
                ):  # one optimizer (an LBFGS closure runs often)
                    records = [self._lr_records[0]] * taken
                elif (
                    not self._lr_records and self._lr_pending is not None
                ):  # the only optimizer, unseen
                    records = [self._lr_pending] * taken
                else:
                    records = None  # several optimizers: which of them stepped is unknown
            self._attach(trainer, pl_module)
            unknown = (
                f"global_step advanced by {taken} in one batch, but {len(self._lr_records)} optimizer step(s) of "
                f"{len(trainer.optimizers)} optimizers were seen, so which parameters were stepped is unknown; "
            )
            mon.count_steps(records, f"in the optimizer step(s) before global step {step}", unknown)
            mon._lr_step = step
        self._lr_pending = None
        self._lr_records = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active(trainer):
            return
        if self.init_kernel is None and self.init_kernel_at == "first_epoch_end":
            self._report(trainer, pl_module, tag="init")  # K0 after BatchNorm statistics warmed up
        elif (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._report(trainer, pl_module, tag="epoch")
        every = self.spectrum_every_n_epochs
        if every is not None and (trainer.current_epoch + 1) % every == 0:
            self._spectrum(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active(trainer):
            return
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self._report(trainer, pl_module, tag="final")
        loggers = list(trainer.loggers)
        if trainer.is_global_zero and self._dispatcher.wants_media(loggers):
            self._monitor._refresh_figures(lambda media: self._dispatcher.log_media(loggers, media))

    # ------------------------------------------------------------------ internals
    def _active(self, trainer: Any, need_probes: bool = True) -> bool:
        if (
            trainer.sanity_checking
            or trainer.state.fn != "fit"
            or self._disabled_reason is not None
        ):
            return False
        return self.probes is not None or not need_probes

    def _attach(self, trainer: Any, pl_module: Any) -> NTKMonitor:
        """The monitor, pointed at this fit's module, optimizers and input conversion."""
        mon = self._monitor
        mon.model = pl_module
        mon.optimizers = list(getattr(trainer, "optimizers", None) or [])
        # same input dtype conversion Lightning applies to batches ("64-true", "bf16-true", ...)
        plugin = getattr(trainer, "precision_plugin", None)
        mon.input_transform = (
            plugin.convert_input
            if plugin is not None and hasattr(plugin, "convert_input")
            else None
        )
        mon.steps_per_epoch = self._steps_per_epoch(trainer)
        return mon

    def _warn_about_loggers(self, trainer: Any) -> None:
        if not trainer.loggers:
            self._dispatcher._warn_once(
                "no-logger",
                "NTKReportCallback: the Trainer has no logger, so NTK reports go to the console and "
                "trainer.callback_metrics only. Fix: Trainer(logger=TensorBoardLogger('logs')) to keep them.",
            )

    def _resolve_probes(self, trainer: Any) -> Probes | None:
        """Probes for this run: given, restored or drawn on rank 0; broadcast so every rank uses rank 0's."""
        probes, error, local_err = self.probes, None, None
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
            rank_zero_warn(
                f"NTKReportCallback: only {got} probes available (num_probes={self.num_probes}); using {got}."
            )
        return inputs, targets

    def _resolve_heldout(self, trainer: Any) -> Probes | None:
        """Held-out probes from the validation data, drawn on rank 0 and broadcast (like the probes)."""
        heldout, error, missing, local_err = self.heldout, None, False, None
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

    @staticmethod
    def _steps_per_epoch(trainer: Any) -> float | None:
        """Optimizer steps per epoch, ceil(batches / accumulate_grad_batches); None when unknown."""
        try:
            batches = float(trainer.num_training_batches)
            accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        except (AttributeError, TypeError, ValueError):
            return None
        if not math.isfinite(batches) or batches <= 0:
            return None
        return float(
            math.ceil(batches / accumulate)
        )  # Lightning also steps on an epoch's last, partial accumulation

    def _report(self, trainer: Any, pl_module: Any, tag: str) -> None:
        mon = self._attach(trainer, pl_module)
        epoch = max(trainer.current_epoch - 1 if tag == "final" else trainer.current_epoch, 0)
        warmed = tag == "init" and self.init_kernel_at == "first_epoch_end"
        measured = mon.measure(
            step=int(trainer.global_step),
            epoch=epoch,
            tag=tag,
            title=f"initial kernel K0 (after epoch {trainer.current_epoch})" if warmed else None,
            init_when=f"end of epoch {epoch}" if warmed else "train start",
        )
        if measured is not None:
            record, report, kernel = measured
            self._publish(trainer, record, report, kernel)

    def _publish(
        self, trainer: Any, record: dict[str, Any], report: NTKReport, kernel: Tensor
    ) -> None:
        metrics = prefixed_scalars(record["metrics"], self.prefix)
        step = record["step"]
        # monitorable by ModelCheckpoint / EarlyStopping (set on every rank: they agree across ranks)
        trainer.callback_metrics.update(
            {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}
        )
        loggers = list(trainer.loggers)
        self._dispatcher.log_scalars(loggers, metrics, step)
        if trainer.is_global_zero:
            self._dispatcher.warn_scalar_only(loggers)
        if trainer.is_global_zero and self._dispatcher.wants_media(loggers):
            self._monitor.publish_media(
                lambda media: self._dispatcher.log_media(loggers, media), record, kernel
            )
        if self.console != "off" and trainer.is_global_zero:
            if self.console == "compact":
                text = report.format_compact() + _insight_lines(record["metrics"], compact=True)
            else:
                text = "\n" + report.format() + _insight_lines(record["metrics"])
            _console_print(trainer, text)

    def _spectrum_loader(self, trainer: Any) -> tuple[Any, int]:
        """The whole-set spectrum's data: the first ``spectrum_probes`` examples (or all) of
        the training dataset, in index order, batched like the training dataloader."""
        from torch.utils.data import DataLoader, Subset

        loader = find_dataloader(trainer.train_dataloader)
        dataset = getattr(loader, "dataset", None)
        try:
            size = len(dataset)  # type: ignore[arg-type]
            dataset[0]  # type: ignore[index]
        except Exception:  # noqa: BLE001 - not a map-style dataset
            raise NTKError(
                "the whole-set spectrum needs a map-style training dataset (len() and indexing), so that every "
                "spectrum and every rank uses the same examples. Fix: a map-style dataset, or compute "
                "ntk_callback.ntk_spectrum(model, loader) yourself."
            ) from None
        n = size if self.spectrum_probes == "train" else min(int(self.spectrum_probes), size)
        batch_size = getattr(loader, "batch_size", None) or 256
        assert dataset is not None  # len() and indexing worked above
        subset = Subset(dataset, range(n))
        return DataLoader(
            subset, batch_size=batch_size, shuffle=False, collate_fn=loader.collate_fn
        ), n

    def _comm(self, trainer: Any) -> Any:
        """The communicator splitting the spectrum's passes across ranks: the process group
        the strategy initialised (DDP), or None for one process."""
        if (
            trainer.world_size <= 1
            or not torch.distributed.is_available()
            or not torch.distributed.is_initialized()
        ):
            return None
        from .engine.distributed import TorchDistributedComm

        return TorchDistributedComm()

    def _spectrum(self, trainer: Any, pl_module: Any) -> None:
        mon = self._attach(trainer, pl_module)
        step = int(trainer.global_step)
        try:
            loader, n = self._spectrum_loader(trainer)
        except Exception as err:  # noqa: BLE001 - a measurement must never stop training
            mon._fault(err, where=f"whole-set spectrum at step {step}")
            return
        record = mon.spectrum(
            loader,
            k=self.spectrum_k,
            step=step,
            epoch=int(trainer.current_epoch),
            batch_to_probe=self.batch_to_probe,
            comm=self._comm(trainer),
        )
        if record is None:
            return
        record["metrics"]["num_examples"] = float(n)
        metrics = prefixed_scalars(record["metrics"], f"{self.prefix}/spectrum_set")
        trainer.callback_metrics.update(
            {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}
        )
        loggers = list(trainer.loggers)
        self._dispatcher.log_scalars(loggers, metrics, step)
        if not trainer.is_global_zero:
            return
        image = (
            mon.spectrum_image()
            if any(logger_kind(lg) == "tensorboard" for lg in loggers)
            else None
        )
        for lg in loggers:
            if image is not None and logger_kind(lg) == "tensorboard":
                self._dispatcher._guard(
                    f"{type(lg).__name__} media",
                    partial(_add_image, lg, f"{self.prefix}/spectrum_set", image, step),
                )
        if self.console != "off":
            m = record["metrics"]
            trace = f", trace {m['trace']:.4g}" if "trace" in m else ""
            _console_print(
                trainer,
                f"NTK spectrum over {n} training examples (step {step}): lambda_1 {m['lambda_1']:.4g}, "
                f"lambda_{self.spectrum_k} {m[f'lambda_{self.spectrum_k}']:.4g}{trace} ({m['seconds']:.2f} s)",
            )

    def __repr__(self) -> str:
        src = "explicit" if self._explicit else self.probe_source
        extra = f", prefix={self.prefix!r}" if self.prefix != DEFAULT_PREFIX else ""
        return (
            f"{type(self).__name__}(num_probes={self.num_probes}, every_n_epochs={self.every_n_epochs}, "
            f"mode={self.mode!r}, probe_source={src!r}, seed={self.seed}{extra})"
        )


_BAR_ATTRS = (
    "_train_progress_bar",
    "_val_progress_bar",
    "_test_progress_bar",
    "_predict_progress_bar",
)


def _console_print(trainer: Any, text: str) -> None:
    """Print on the console (call on global rank zero) without breaking the progress bar.

    ``LightningModule.print`` hands the text to an enabled progress bar, and the TQDM bar
    drops it while none of its bars is open (``on_train_start``, ``on_train_end``): print
    through the bar only while one of its bars is open, plainly otherwise."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and getattr(bar, "is_enabled", False):
        present = [a for a in _BAR_ATTRS if hasattr(bar, a)]
        open_bar = any(
            getattr(bar, a) is not None and not getattr(getattr(bar, a), "disable", True)
            for a in present
        )
        if open_bar or not present:  # not a TQDM bar: its own print does not drop text
            bar.print(text)
            return
    print(text, flush=True)


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def _insight_lines(metrics: Mapping[str, float], compact: bool = False) -> str:
    """Console lines for the per-layer shares and the dynamics metrics ("" when neither is present);
    ``compact``: the dynamics on one line, no layer line."""
    lines = []
    shares = {
        k[len("layer_share/") :]: v for k, v in metrics.items() if k.startswith("layer_share/")
    }
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
            cells.append(
                f"top-{energy[len('residual_energy_top') :]} energy {_fmt(metrics[energy], '.2f')}"
            )
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


def _add_image(logger: Any, tag: str, image: Any, step: int) -> None:
    """A CHW image to a TensorBoard logger's writer (``.experiment`` touched only here)."""
    logger.experiment.add_image(tag, image, global_step=step, dataformats="CHW")
