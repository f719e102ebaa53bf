"""NTKReportCallback: reports the empirical NTK of the LightningModule while it trains.

A thin Lightning adapter: the kernel comes from :func:`ntk_callback.empirical_ntk`, the
numbers from :func:`ntk_callback.analyze_ntk`; this module only decides *when* to measure,
*which* probes to use, and *where* the results go (DESIGN.md section 4).

Timeline of one ``trainer.fit``:

* ``setup``: refuses sharded strategies (FSDP, DeepSpeed, model parallel): one rank's
  module does not hold all parameters, so its kernel would be silently wrong.
* ``on_train_start`` (after the sanity check, before the first optimizer step): probes
  are drawn (or taken from ``probes=`` / the restored state) and broadcast from rank 0,
  then the initial kernel K0 is measured and reported (``tag="init"``).
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

import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

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
from .engine import NTKError, empirical_ntk
from .loggers import LoggerDispatcher, ReportMedia, prefixed_scalars
from .report import NTKReport, analyze_ntk

_MODES = ("target", "trace", "sum")
_SOURCES = ("train", "val")
STATE_VERSION = 1
_HISTORY_PICTURES = ("spectrum", "drift")
_FIGURE_BUDGET = 0.02  # fraction of the training time the history pictures may take before the end


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
            (NTK of the summed outputs). See DESIGN.md section 2.
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
            every report on one plot) and ``ntk/drift`` (drift and alignment against the
            step). They summarise the whole history, so they are always drawn for the last
            report and, during training, only while drawing them takes at most 2 % of the
            training time (needs matplotlib; the heatmap and histogram do not).
        log_console: print ``NTKReport.format()`` on global rank zero (via the progress bar).
        memory_budget: bytes for the engine's Jacobian blocks (engine default when None).
        output_fn: maps ``pl_module(inputs)`` to (N, O) logits / (N,) outputs when
            ``forward`` returns something else (a dict, a tuple, a distribution).

    Logged per report (step = ``trainer.global_step``): every key of
    ``NTKReport.to_dict()`` as ``ntk/<key>`` to every logger and into
    ``trainer.callback_metrics``; TensorBoard also gets ``ntk/eigenvalues`` (histogram of
    log10 lambda) and the images ``ntk/kernel``, ``ntk/spectrum``, ``ntk/drift``.

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
    ) -> None:
        super().__init__()
        self.num_probes = _check_int("num_probes", num_probes, 1)
        self.every_n_epochs = _check_int("every_n_epochs", every_n_epochs, 1)
        if mode not in _MODES:
            hint = " ('full' gives an (N, N, O, O) kernel; use 'trace' or 'sum' for a scalar kernel)" if mode == "full" else ""
            raise NTKCallbackConfigError(f"NTKReportCallback(mode={mode!r}): expected one of {_MODES}{hint}.")
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
        self.log_console = _check_bool("log_console", log_console)
        if memory_budget is not None:
            memory_budget = _check_int("memory_budget", memory_budget, 1)
        self.memory_budget = memory_budget

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
        self._history: List[Dict[str, Any]] = []
        self.last_kernel: Optional[Tensor] = None
        self.last_report: Optional[NTKReport] = None
        self._disabled_reason: Optional[str] = None
        self._fit_start = time.perf_counter()
        self._figures_spent = 0.0  # seconds spent drawing the history pictures in this fit
        self._figures_estimate = 0.3  # seconds one drawing takes (updated after each)
        self._figures_step: Optional[int] = None  # step of the last report drawn with them
        self._dispatcher = LoggerDispatcher(log_images=self.log_images, on_error=self._logger_failed)

    # ------------------------------------------------------------------ public state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            num_probes=self.num_probes,
            every_n_epochs=self.every_n_epochs,
            mode=self.mode,
            probe_source="explicit" if self._explicit else self.probe_source,
            seed=self.seed,
        )

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

    def batch_to_probe(self, batch: Any) -> Probes:
        """Map a batch to ``(inputs, targets)``; override for custom batch structures."""
        if self._batch_to_probe is not None:
            return self._batch_to_probe(batch)
        return default_batch_to_probe(batch)

    def state_dict(self) -> Dict[str, Any]:
        """Checkpointed state (plain tensors, lists and numbers; loadable with ``weights_only=True``).

        ``{"version": 1, "probes": {"inputs": CPU tensor (or tuple/list/dict of tensors),
        "targets": CPU tensor or None} or None, "init_kernel": (N, N) CPU tensor or None,
        "history": [record, ...], "settings": {...}}`` where each history record is
        ``{"tag": "init" | "epoch" | "final", "epoch": int, "step": int, "metrics": {key:
        float} (NTKReport.to_dict(), no prefix), "eigenvalues": [float, ...] (descending)}``.
        """
        probes = None
        if self._probes is not None:
            probes = {"inputs": self._probes[0], "targets": self._probes[1]}
        return {
            "version": STATE_VERSION,
            "probes": probes,
            "init_kernel": self._init_kernel,
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
            },
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore probes, K0 and history; tolerant of missing keys and of older/newer versions."""
        if not isinstance(state_dict, Mapping):
            rank_zero_warn(f"NTKReportCallback: ignoring a saved state of type {type(state_dict).__name__}.")
            return
        saved_mode = state_dict.get("settings", {}).get("mode", self.mode)
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
        if isinstance(k0, Tensor) and saved_mode == self.mode:
            self._init_kernel = k0.detach().cpu()
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

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._disabled_reason = None  # a new fit gets a new chance to draw probes
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
        if self._init_kernel is None:
            if trainer.global_step > 0:
                rank_zero_warn(
                    f"NTKReportCallback: training resumes at step {trainer.global_step} without a saved initial "
                    "kernel; drift (ntk/relative_change, ntk/kernel_distance) is measured against the kernel now."
                )
            self._report(trainer, pl_module, tag="init")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active(trainer):
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

    def _model_inputs(self, trainer: Any, pl_module: Any) -> Tuple[Any, Optional[Tensor]]:
        assert self._probes is not None
        inputs, targets = self._probes
        device = pl_module.device
        inputs = apply_to_tensors(inputs, lambda t: t.to(device))
        # same input dtype conversion Lightning applies to batches ("64-true", "bf16-true", ...)
        plugin = getattr(trainer, "precision_plugin", None)
        if plugin is not None and hasattr(plugin, "convert_input"):
            inputs = plugin.convert_input(inputs)
        return inputs, (targets.to(device) if targets is not None else None)

    def _compute_kernel(self, trainer: Any, pl_module: Any) -> Optional[Tensor]:
        """K on the probes (CPU), or None after a reported fault (re-raised when strict)."""
        try:
            inputs, targets = self._model_inputs(trainer, pl_module)
            kwargs: Dict[str, Any] = {"mode": self.mode, "dtype": self.dtype, "eval_mode": True}
            if self.memory_budget is not None:
                kwargs["memory_budget"] = self.memory_budget
            if self.output_fn is not None:
                kwargs["output_fn"] = self.output_fn
            # hooks may run under no_grad/inference_mode (e.g. after validation): the kernel needs autograd
            with torch.inference_mode(False), torch.enable_grad():
                kernel = empirical_ntk(pl_module, inputs, targets, **kwargs)
            kernel = kernel.detach().to("cpu")
            if not bool(torch.isfinite(kernel).all()):
                raise NTKError(
                    "the kernel has NaN/inf entries: the model's outputs or gradients overflowed on the probes. "
                    "Fix: check the loss and learning rate; dtype=torch.float64 helps when it is float32 overflow."
                )
            return kernel
        except Exception as err:  # noqa: BLE001 - a measurement must never stop training
            self._fault(trainer, err, where=f"report at step {trainer.global_step}")
            return None

    def _fault(self, trainer: Any, err: BaseException, where: str, stage: str = "engine") -> None:
        if self.strict:
            raise err
        if stage == "analysis":
            cause = "the analysis of the kernel failed"
            fix = "Fix: check the probe targets (shape (N,), int class labels or float regression targets)."
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

    def _report(self, trainer: Any, pl_module: Any, tag: str) -> None:
        kernel = self._compute_kernel(trainer, pl_module)
        if kernel is None:
            return
        _, targets = self._probes  # type: ignore[misc]
        init = kernel if tag == "init" else self._init_kernel
        epoch = max(trainer.current_epoch - 1 if tag == "final" else trainer.current_epoch, 0)
        where = {"init": "initial kernel", "final": "end of training"}.get(tag, f"after epoch {epoch}")
        try:
            report = analyze_ntk(kernel, targets, init_kernel=init, title=f"NTK {where}, step {trainer.global_step}")
        except Exception as err:  # noqa: BLE001
            self._fault(trainer, err, where=f"report at step {trainer.global_step}", stage="analysis")
            return
        if tag == "init":
            self._init_kernel = kernel
        flat = {str(k): float(v) for k, v in report.to_dict().items()}
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
        self.last_kernel, self.last_report = kernel, report
        self._publish(trainer, pl_module, record, report, kernel, targets)

    def _publish(
        self, trainer: Any, pl_module: Any, record: Dict[str, Any], report: NTKReport, kernel: Tensor, targets: Any
    ) -> None:
        metrics = prefixed_scalars(record["metrics"])
        step = record["step"]
        # monitorable by ModelCheckpoint / EarlyStopping (set on every rank: they agree across ranks)
        trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
        loggers = list(trainer.loggers)
        self._dispatcher.log_scalars(loggers, metrics, step)
        if trainer.is_global_zero:
            self._dispatcher.warn_scalar_only(loggers)
        if trainer.is_global_zero and self._dispatcher.wants_media(loggers):
            pictures: Tuple[str, ...] = ("kernel",)
            if self._figures_due(record["tag"]):
                pictures += _HISTORY_PICTURES
            self._log_media(loggers, record, kernel, targets, pictures, histogram=True)
        if self.log_console and trainer.is_global_zero:
            pl_module.print("\n" + report.format())

    def _figures_due(self, tag: str) -> bool:
        """Whether the history pictures (spectrum, drift) are redrawn at this report.

        They show every report so far, so one drawing at the end of training holds all the
        information; drawing them (matplotlib, ~0.1-0.3 s) at every report would cost more
        than the kernel of a small model. They are therefore redrawn during training only
        while the time spent drawing them stays within ``_FIGURE_BUDGET`` (2 %) of the
        training time so far (so long runs get fresh pictures at every report and short
        runs do not pay for them), and always for the last report (from ``on_train_end``).
        The initial report alone draws none.
        """
        if not self.log_figures or tag == "init":
            return False
        if tag == "final":
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
        if targets is not None and targets.ndim == 1 and not targets.is_floating_point():
            labels = targets.numpy()
        media = ReportMedia(
            step=record["step"],
            kernel=kernel.double().numpy(),
            labels=labels,
            eigenvalues=np.asarray(record["eigenvalues"], dtype=np.float64),
            history=self._history,
            pictures=pictures,
            histogram=histogram,
        )
        start = time.perf_counter()
        self._dispatcher.log_media(loggers, media)
        if any(p in _HISTORY_PICTURES for p in pictures):
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
        self._log_media(loggers, last, self.last_kernel, targets, _HISTORY_PICTURES, histogram=False)

    def __repr__(self) -> str:
        src = "explicit" if self._explicit else self.probe_source
        return (
            f"{type(self).__name__}(num_probes={self.num_probes}, every_n_epochs={self.every_n_epochs}, "
            f"mode={self.mode!r}, probe_source={src!r}, seed={self.seed})"
        )


__all__ = ["NTKReportCallback"]
