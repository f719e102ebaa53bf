"""Independent references for the callback tests: a float64 torch.func kernel, plain
numpy metrics (the formulas of docs/conventions.md written out again, not imported from
the library), a TensorBoard event-file reader using TensorBoard's own EventAccumulator, and
a callback that snapshots the weights whenever the NTK callback would report.
"""
from __future__ import annotations

import copy
import glob
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

# ----------------------------------------------------------------- float64 kernel


def reference_kernel(
    model: nn.Module,
    state: Optional[Dict[str, torch.Tensor]],
    inputs: torch.Tensor,
    targets: Optional[torch.Tensor],
    mode: str = "target",
    projections: Optional[torch.Tensor] = None,
) -> np.ndarray:
    """Target-mode empirical NTK ``K[i, j] = <d f_{t_i}(x_i)/dθ, d f_{t_j}(x_j)/dθ>``
    in float64, ``(N, N)``; ``mode="trace"``: ``sum_a <d f_a(x_i)/dθ, d f_a(x_j)/dθ>`` (the
    label-free kernel of the alignments), or with ``projections`` V (O, k) the kernel of the
    projected outputs ``sum_c <d (f V)_c(x_i)/dθ, d (f V)_c(x_j)/dθ>`` = ``J V V^T J^T``.

    ``model`` must be a plain ``nn.Module`` (pass ``lightning_module.net``: a deep copy
    of a LightningModule would drag its Trainer along). ``state`` (a ``state_dict``
    snapshot, keys optionally prefixed ``net.``, or None for the model's current state)
    is loaded into a float64 deep copy in ``eval()`` mode (dropout off, BatchNorm on its
    running statistics). θ = the parameters with ``requires_grad``. The per-sample
    Jacobian comes from ``vmap(jacrev)`` of a single-sample ``functional_call``; for an
    ``(N, 1)`` / ``(N,)`` output (regression) the output index is 0.
    """
    m = copy.deepcopy(model).double().eval()
    if state is not None:
        if all(k.startswith("net.") for k in state):
            state = {k[len("net."):]: v for k, v in state.items()}
        m.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    x = inputs.double()
    n = x.shape[0]
    if targets is None or not (targets.dtype in (torch.int64, torch.int32)):
        t = torch.zeros(n, dtype=torch.long)
    else:
        t = targets.long()

    def f_single(p: Dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(m, (p, buffers), (xi.unsqueeze(0),)).reshape(-1)  # (O,)

    # full per-sample Jacobian (N, O, P), then the target row of each sample
    jac = vmap(jacrev(f_single), in_dims=(None, 0))(params, x)
    full = torch.cat([j.reshape(n, j.shape[1], -1) for j in jac.values()], dim=2)
    if mode == "trace":
        if projections is not None:
            full = torch.einsum("nap,ac->ncp", full, projections.double())
        return torch.einsum("iap,jap->ij", full, full).numpy()
    flat = full[torch.arange(n), t]  # (N, P)
    return (flat @ flat.T).numpy()


# ------------------------------------------------------------------ numpy metrics


def _sym(K: np.ndarray) -> np.ndarray:
    return (K + K.T) / 2.0


def eigenvalues(K: np.ndarray) -> np.ndarray:
    """Descending eigenvalues of the symmetrised kernel, negatives clamped to 0."""
    return np.clip(np.linalg.eigvalsh(_sym(K))[::-1], 0.0, None)


def _label_matrix(targets: np.ndarray, centered: bool = True) -> np.ndarray:
    t = np.asarray(targets)
    if np.issubdtype(t.dtype, np.integer):
        Y = np.eye(int(t.max()) + 1)[t.reshape(-1)]
    else:
        Y = t.reshape(len(t), -1).astype(np.float64)
    if centered:
        Y = Y - Y.mean(axis=0, keepdims=True)
    return Y


def _alignment(A: np.ndarray, Y: np.ndarray) -> float:
    YY = Y @ Y.T
    return float(np.sum(A * YY) / (np.linalg.norm(A) * np.linalg.norm(YY)))


def kta(K: np.ndarray, targets: np.ndarray) -> float:
    """Kernel-target alignment with column-centred labels (Cristianini et al. 2001)."""
    return _alignment(_sym(K), _label_matrix(targets))


def cka(K: np.ndarray, targets: np.ndarray) -> float:
    """Centred kernel alignment: ``HKH`` against centred ``YY^T`` (Cortes et al. 2012)."""
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return _alignment(H @ _sym(K) @ H, _label_matrix(targets))


def metrics(
    K: np.ndarray, targets: np.ndarray, K0: Optional[np.ndarray] = None, K_align: Optional[np.ndarray] = None
) -> Dict[str, float]:
    """The main logged scalars (without the ``ntk/`` prefix), float64; the alignments on
    ``K_align`` (the label-free kernel) when given, else on ``K``."""
    Ka = K if K_align is None else K_align
    lam = eigenvalues(K)
    Ks = _sym(K)
    n = K.shape[0]
    lmax, lmin = float(lam[0]), float(lam[-1])
    kappa = np.inf if lmin <= n * np.finfo(np.float64).eps * lmax else lmax / lmin
    out = {
        "lambda_max": lmax,
        "lambda_min": lmin,
        "condition_number": float(kappa),
        "trace": float(np.trace(Ks)),
        "kta": kta(Ka, targets),
        "cka": cka(Ka, targets),
        "effective_rank": float(lam.sum() ** 2 / np.sum(lam**2)),
    }
    if K0 is not None:
        K0s = _sym(K0)
        out["relative_change"] = float(np.linalg.norm(Ks - K0s) / np.linalg.norm(K0s))
        out["kernel_distance"] = float(
            1.0 - np.sum(Ks * K0s) / (np.linalg.norm(Ks) * np.linalg.norm(K0s))
        )
        out["log10_scale_change"] = float(np.log10(np.trace(Ks) / np.trace(K0s)))
    return out


# ------------------------------------------------------------- TensorBoard reader

SCALAR_KEYS: Tuple[str, ...] = (
    "ntk/lambda_max",
    "ntk/lambda_min",
    "ntk/condition_number",
    "ntk/log10_condition_number",
    "ntk/trace",
    "ntk/kta",
    "ntk/cka",
    "ntk/effective_rank",
    "ntk/relative_change",
    "ntk/kernel_distance",
)


class TBContent:
    """Everything in the event files under one directory, read by TensorBoard itself."""

    def __init__(self, log_dir: str) -> None:
        from tensorboard.backend.event_processing import event_accumulator as ea

        self.files = sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True))
        self.scalars: Dict[str, List[Tuple[int, float]]] = {}
        self.histograms: Dict[str, List[Any]] = {}
        self.images: Dict[str, List[Any]] = {}
        self.tensors: Dict[str, List[Any]] = {}
        guidance = {k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE}
        for f in self.files:
            acc = ea.EventAccumulator(f, size_guidance=guidance)
            acc.Reload()
            tags = acc.Tags()
            for tag in tags.get("scalars", []):
                self.scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
            for tag in tags.get("histograms", []):
                self.histograms.setdefault(tag, []).extend(acc.Histograms(tag))
            for tag in tags.get("images", []):
                self.images.setdefault(tag, []).extend(acc.Images(tag))
            for tag in tags.get("tensors", []):
                self.tensors.setdefault(tag, []).extend(acc.Tensors(tag))

    def series(self, tag: str) -> List[Tuple[int, float]]:
        """``[(step, value), ...]`` of one scalar, sorted by step (stable)."""
        return sorted(self.scalars.get(tag, []), key=lambda sv: sv[0])

    def ntk_tags(self, kind: str) -> List[str]:
        d = {"scalars": self.scalars, "histograms": self.histograms, "images": self.images}[kind]
        return [t for t in d if t.startswith("ntk/")]


# ---------------------------------------------------------------- weight snapshots


def snapshot_callback(callback_base: type) -> Any:
    """A callback (subclass of ``callback_base``) that stores ``{global_step: state_dict}``
    at train start, every train-epoch end and train end: the weights the NTK callback sees
    when it reports at that step. ``on_train_epoch_end`` runs before any optimizer step of
    the next epoch, so the order among callbacks does not matter."""

    class WeightSnapshots(callback_base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.states: Dict[int, Dict[str, torch.Tensor]] = {}

        def _take(self, trainer: Any, pl_module: nn.Module) -> None:
            self.states[int(trainer.global_step)] = {
                k: v.detach().clone() for k, v in pl_module.state_dict().items()
            }

        def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
            self._take(trainer, pl_module)

        def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
            self._take(trainer, pl_module)

        def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
            self._take(trainer, pl_module)

    return WeightSnapshots()


def assert_close(logged: float, ref: float, rel: float = 1e-3, abs_: float = 0.0, what: str = "") -> None:
    """``|logged - ref| <= rel * |ref| + abs_`` with a message naming the quantity."""
    err = abs(logged - ref)
    assert err <= rel * abs(ref) + abs_, f"{what}: logged {logged!r} vs reference {ref!r} (err {err:.3g})"


def probes_from_state(state: Dict[str, Any]) -> Tuple[Any, Any]:
    """The ``(inputs, targets)`` probes kept in a callback ``state_dict`` (the
    checkpointed copy), read through the public API: loaded into a fresh
    ``NTKReportCallback`` whose ``probes`` property returns them. Independent of the
    state's key names, and it exercises the ``load_state_dict`` round trip."""
    from ntk_callback import NTKReportCallback

    fresh = NTKReportCallback()
    with warnings.catch_warnings():
        # a fresh default (target-mode) instance may warn that a trace-mode K0 is not
        # comparable: irrelevant here, only the probes are read
        warnings.simplefilter("ignore")
        fresh.load_state_dict(state)
    assert fresh.probes is not None, f"no probes in the callback state (keys {sorted(state)})"
    return fresh.probes
