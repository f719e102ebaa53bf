"""Per-logger dispatch of one NTK report: scalars to every logger, media where supported.

Scalars go through ``logger.log_metrics`` (flat ``{"ntk/<key>": float}``; dict-valued
metrics would make TensorBoard create one sub-run per key). Media differ per logger and
are only written on global rank zero (on other ranks ``logger.experiment`` is a no-op
dummy, and touching it on rank zero creates the run/writer):

==============  ==============================================================
TensorBoard     ``add_histogram("ntk/eigenvalues", log10 lambda)``, ``add_image`` of
                ``ntk/kernel`` (heatmap) and the history pictures ``ntk/spectrum``,
                ``ntk/drift``, ``ntk/layers``, ``ntk/dynamics``
W&B             ``log_image`` of the same pictures (+ a ``wandb.Histogram``)
MLflow          ``experiment.log_image`` of the pictures, ``log_dict`` of the spectrum
CSV             PNG and ``.npy`` files written into ``<log_dir>/ntk/``
other           scalars only; warned once per logger class
==============  ==============================================================

``ntk`` is the default prefix; a dispatcher built with ``prefix="ntk_b"`` writes every
key, media tag, artifact path and the CSV subfolder under ``ntk_b`` instead, so two
callbacks can share one logger.

Loggers of both Lightning flavours (``pytorch_lightning`` and ``lightning.pytorch``) are
recognised by :func:`ntk_callback._lightning.logger_kind` without importing either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np

from . import plotting

try:
    from ._lightning import logger_kind, rank_zero_info, rank_zero_warn
except ImportError:  # no Lightning (NTKMonitor in a plain loop): no Lightning logger can exist
    import logging
    import warnings

    def logger_kind(logger: Any) -> str:
        return "other"

    def rank_zero_warn(message: str) -> None:
        warnings.warn(message, UserWarning, stacklevel=2)

    def rank_zero_info(message: str) -> None:
        logging.getLogger("ntk_callback").info(message)

DEFAULT_PREFIX = "ntk"
PREFIX = DEFAULT_PREFIX + "/"
MEDIA_KINDS = frozenset({"tensorboard", "wandb", "mlflow", "csv"})


def check_prefix(prefix: Any) -> str:
    """Validate a key prefix: a non-empty string without leading/trailing ``/``, whitespace
    or ``.``/``..`` path parts (it also names a folder inside the CSV logger's directory).
    Returns it; raises ``ValueError`` naming the problem otherwise."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise ValueError(
            f"prefix={prefix!r}: expected a non-empty string such as 'ntk' or 'ntk_val'."
        )
    if prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(
            f"prefix={prefix!r}: no leading or trailing '/' (keys are '<prefix>/<name>'); use e.g. "
            f"{prefix.strip('/')!r}."
        )
    parts = prefix.split("/")
    if any(p != p.strip() or p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"prefix={prefix!r}: empty, '.', '..' or space-padded path parts are not allowed."
        )
    return prefix


def prefixed_scalars(flat: Mapping[str, Any], prefix: str = DEFAULT_PREFIX) -> dict[str, float]:
    """``{prefix + "/" + key: float(value)}`` for every scalar of ``flat`` (non-scalars dropped)."""
    out: dict[str, float] = {}
    for key, value in flat.items():
        try:
            out[f"{prefix}/{key}"] = float(value)
        except (TypeError, ValueError):
            continue  # not a scalar: never sent to a logger's scalar API
    return out


def log10_spectrum(eigenvalues: Any) -> np.ndarray:
    """log10 of the (descending, clamped) eigenvalues, zeros floored at ``lambda_max * N * eps64``.

    The floor is the level below which a float64 eigenvalue of the kernel is round-off
    (the same threshold that makes the condition number infinite), so a singular kernel
    gives a finite histogram instead of ``-inf`` or ``log10(tiny) = -308``.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    lam = lam[np.isfinite(lam)]
    if lam.size == 0:
        return lam
    floor = max(float(lam.max()) * lam.size * np.finfo(np.float64).eps, np.finfo(np.float64).tiny)
    return np.log10(np.maximum(lam, floor))


@dataclass
class ReportMedia:
    """Everything one report may write besides scalars (all on CPU, numpy).

    The kernel heatmap (``"kernel"``) is :func:`plotting.kernel_heatmap_figure` (colour
    bar, class labels, the report in the title) when matplotlib is installed, else the
    bare :func:`plotting.kernel_heatmap_image`. ``labels`` are integer classes (probes
    grouped by class) or real regression targets (sorted by value, or by ``inputs`` when
    each probe's input is one scalar). ``heatmap_scale`` is ``"per_report"`` (each
    heatmap spans its own min..max: structure always visible, values read off the colour
    bar) or ``"initial"`` (fixed to the range of ``init_kernel``, K0: colours compare
    across steps, entries beyond it clip).
    """

    step: int
    kernel: np.ndarray  # (N, N), probe order as drawn
    labels: np.ndarray | None  # (N,) integer labels or real targets, or None
    eigenvalues: np.ndarray  # (N,) descending, clamped at 0
    history: Sequence[Mapping[str, Any]]  # every report so far, this one included
    # which pictures to write: "kernel" and any of plotting.FIGURES
    # ("spectrum", "drift", "layers", "dynamics")
    pictures: tuple[str, ...] = ("kernel", "spectrum", "drift")
    histogram: bool = True  # the log10-eigenvalue histogram
    epoch: int | None = (
        None  # the report's epoch and tag ("init", "epoch", "final"), for the heatmap's title
    )
    tag: str | None = None
    inputs: Any | None = (
        None  # the probe inputs; used only to sort regression probes by a scalar input
    )
    heatmap_scale: str = "per_report"  # or "initial": see the class docstring
    init_kernel: np.ndarray | None = None  # (N, N) K0 for heatmap_scale="initial"
    _cache: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.heatmap_scale not in plotting.HEATMAP_SCALES:
            raise ValueError(
                f"heatmap_scale={self.heatmap_scale!r}: expected one of {plotting.HEATMAP_SCALES} "
                "('per_report': each heatmap its own colour range; "
                "'initial': the initial kernel's range)."
            )

    def image(self, name: str) -> np.ndarray | None:
        """The (3, H, W) uint8 picture ``name`` ("kernel" or a key of ``plotting.FIGURES``),
        rendered once;
        None if unavailable (matplotlib missing)."""
        # "kernel" and e.g. "kernel_init" (the initial report's heatmap under its own tag) are one
        # picture
        key = "kernel" if name not in plotting.FIGURES and "kernel" in name else name
        if key not in self._cache:
            self._cache[key] = self._render(name)
        return self._cache[key]

    def names(self) -> list[str]:
        return list(self.pictures)

    @property
    def figure_names(self) -> list[str]:
        """The requested history pictures (spectrum, drift, layers, dynamics); need matplotlib."""
        return [p for p in self.pictures if p in plotting.FIGURES]

    @property
    def figures(self) -> bool:
        """Whether a matplotlib picture (spectrum, drift, layers, dynamics) is requested."""
        return bool(self.figure_names)

    def heatmap_range(self) -> tuple[float | None, float | None]:
        """The fixed ``(vmin, vmax)`` of the heatmap's colours; ``(None, None)``: each report's own
        range."""
        k0 = self.init_kernel
        if self.heatmap_scale != "initial" or k0 is None or np.shape(k0) != np.shape(self.kernel):
            return None, None
        return plotting.kernel_color_range(k0, self.labels, inputs=self.inputs)

    def _render(self, name: str) -> np.ndarray | None:
        if name in plotting.FIGURES:
            try:
                fig = plotting.FIGURES[name](self.history)
            except ImportError:
                return None
            return plotting.figure_to_image(fig)
        if "kernel" not in name:
            raise ValueError(
                f"unknown picture {name!r}: expected 'kernel' or one of {sorted(plotting.FIGURES)}"
            )
        vmin, vmax = self.heatmap_range()
        note = None if vmin is None else "colour range: initial kernel (fixed)"
        try:
            fig = plotting.kernel_heatmap_figure(
                self.kernel,
                self.labels,
                inputs=self.inputs,
                step=self.step,
                epoch=self.epoch,
                tag=self.tag,
                vmin=vmin,
                vmax=vmax,
                scale_note=note,
            )
        except ImportError:
            return plotting.kernel_heatmap_image(
                self.kernel, self.labels, inputs=self.inputs, vmin=vmin, vmax=vmax
            )
        return plotting.figure_to_image(fig)


class LoggerDispatcher:
    """Sends reports to ``trainer.loggers``; remembers which warnings it already gave."""

    def __init__(
        self,
        *,
        log_images: bool = True,
        on_error: Callable[[str, BaseException], None] | None = None,
        prefix: str = DEFAULT_PREFIX,
    ):
        self.log_images = log_images
        self.prefix = check_prefix(prefix)
        self._warned: set = set()
        self._on_error = on_error

    # -- helpers -------------------------------------------------------------------
    def _warn_once(self, key: str, message: str, info: bool = False) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        (rank_zero_info if info else rank_zero_warn)(message)

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        # A logger failing (network, disk, a backend rejecting a value) must not stop training.
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - any logger error is reported, not raised
            if self._on_error is not None:
                self._on_error(what, err)
            else:
                raise

    # -- scalars -------------------------------------------------------------------
    def log_scalars(self, loggers: Sequence[Any], metrics: Mapping[str, float], step: int) -> None:
        """``logger.log_metrics(metrics, step=step)`` for every logger (rank-zero-only inside
        Lightning)."""
        for lg in loggers:
            if logger_kind(lg) == "dummy":
                continue
            self._guard(
                f"{type(lg).__name__}.log_metrics",
                partial(lg.log_metrics, dict(metrics), step=step),
            )

    # -- media ---------------------------------------------------------------------
    def wants_media(self, loggers: Sequence[Any]) -> bool:
        return self.log_images and any(logger_kind(lg) in MEDIA_KINDS for lg in loggers)

    def warn_scalar_only(self, loggers: Sequence[Any]) -> None:
        """Warn once per logger class that gets the scalars but no pictures."""
        if not self.log_images:
            return
        for lg in loggers:
            if logger_kind(lg) not in MEDIA_KINDS and logger_kind(lg) != "dummy":
                self._warn_once(
                    f"other:{type(lg).__module__}.{type(lg).__qualname__}",
                    f"NTKReportCallback: {type(lg).__name__} receives the `{self.prefix}/` scalars "
                    "only; the kernel heatmap, eigenvalue histogram and the "
                    "spectrum/drift/layers/dynamics pictures are written for "
                    "TensorBoard, W&B, MLflow and CSV loggers.",
                )

    def log_media(self, loggers: Sequence[Any], media: ReportMedia) -> None:
        """Write histogram/images for every logger that supports them. Global rank zero only."""
        if media.figures and media.image(media.figure_names[0]) is None:
            self._warn_once(
                "matplotlib",
                f"NTKReportCallback: matplotlib is not installed, so the `{self.prefix}/spectrum`, "
                "`/drift`, `/layers` and `/dynamics` pictures are skipped, and the kernel heatmap "
                "has no colour bar or labels (the bare "
                "heatmap, the histogram and the scalars are still logged). "
                "Fix: pip install matplotlib.",
                info=True,
            )
        for lg in loggers:
            kind = logger_kind(lg)
            if kind == "dummy":
                continue
            if not self.log_images:
                continue
            writer = getattr(self, f"_media_{kind}", None)
            if writer is None:
                continue  # scalars only: see warn_scalar_only
            self._guard(
                f"{type(lg).__name__} media", partial(writer, lg, media)
            )

    def _images(self, media: ReportMedia) -> list[tuple]:
        out = []
        for name in media.names():
            img = media.image(name)
            if img is not None:
                out.append((name, img))
        return out

    def _media_tensorboard(self, lg: Any, media: ReportMedia) -> None:
        exp = lg.experiment  # torch.utils.tensorboard.SummaryWriter
        hist = log10_spectrum(media.eigenvalues) if media.histogram else np.zeros(0)
        if hist.size:
            exp.add_histogram(f"{self.prefix}/eigenvalues", hist, global_step=media.step)
        for name, img in self._images(media):
            exp.add_image(f"{self.prefix}/{name}", img, global_step=media.step, dataformats="CHW")

    def _media_wandb(self, lg: Any, media: ReportMedia) -> None:
        for name, img in self._images(media):
            lg.log_image(
                key=f"{self.prefix}/{name}", images=[img.transpose(1, 2, 0)], step=media.step
            )
        try:
            import wandb  # noqa: PLC0415 - only present with the W&B logger
        except ImportError:
            return
        hist = log10_spectrum(media.eigenvalues) if media.histogram else np.zeros(0)
        if hist.size:
            histogram = wandb.Histogram(hist.tolist())
            lg.log_metrics({f"{self.prefix}/eigenvalues": histogram}, step=media.step)

    def _media_mlflow(self, lg: Any, media: ReportMedia) -> None:
        exp, run_id = lg.experiment, lg.run_id  # an mlflow.tracking.MlflowClient
        for name, img in self._images(media):
            exp.log_image(
                run_id,
                img.transpose(1, 2, 0),
                artifact_file=f"{self.prefix}/{name}/step_{media.step:07d}.png",
            )
        if not media.histogram:
            return
        exp.log_dict(
            run_id,
            {"step": media.step, "eigenvalues": [float(v) for v in media.eigenvalues]},
            f"{self.prefix}/eigenvalues/step_{media.step:07d}.json",
        )

    def _media_csv(self, lg: Any, media: ReportMedia) -> None:
        out = os.path.join(lg.log_dir, *self.prefix.split("/"))
        os.makedirs(out, exist_ok=True)
        tag = f"step_{media.step:07d}"
        if media.histogram:  # a full report, not a figures-only refresh
            np.save(
                os.path.join(out, f"kernel_{tag}.npy"), np.asarray(media.kernel, dtype=np.float64)
            )
            np.save(
                os.path.join(out, f"eigenvalues_{tag}.npy"),
                np.asarray(media.eigenvalues, dtype=np.float64),
            )
        if media.labels is not None and not os.path.exists(os.path.join(out, "probe_labels.npy")):
            np.save(os.path.join(out, "probe_labels.npy"), np.asarray(media.labels))
        for name, img in self._images(media):
            # the heatmap is per report; the history pictures already show every report: keep
            # the latest
            fname = f"kernel_{tag}.png" if name == "kernel" else f"{name}.png"
            plotting.save_png(os.path.join(out, fname), img)
        with open(os.path.join(out, "history.json"), "w") as fh:
            json.dump([_jsonable(rec) for rec in media.history], fh, allow_nan=True)


def _jsonable(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "tag": rec.get("tag"),
        "epoch": rec.get("epoch"),
        "step": rec.get("step"),
        "metrics": {k: float(v) for k, v in rec.get("metrics", {}).items()},
        "eigenvalues": [float(v) for v in rec.get("eigenvalues", [])],
    }


__all__ = [
    "DEFAULT_PREFIX",
    "LoggerDispatcher",
    "ReportMedia",
    "check_prefix",
    "log10_spectrum",
    "prefixed_scalars",
]
