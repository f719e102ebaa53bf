r"""Training-dynamics insight between reports: per-layer shares and drift, predicted versus
observed residuals, and the gap to the network linearised at initialisation.

Pure torch/numpy (no Lightning): :class:`DynamicsTracker` is fed one measurement per
report and returns flat metrics; the callback only supplies the measurements.

Conventions (see :mod:`ntk_callback.dynamics`): residual ``r = f(x) - y`` on the probes of
a scalar-output model (O = 1, float targets), loss ``1/2 sum r^2`` and plain gradient
descent; an optimizer step with learning rate ``eta`` on PyTorch's ``mse_loss`` (mean)
counts as the sum-loss rate ``2 eta / n`` with n the number of probes, which is exact when
the probes are the whole (full-batch) training set and the Monte-Carlo estimate of the
training-set sum otherwise (Lee et al. 2019).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import analysis as A
from . import dynamics as D


def layer_shares(layer_kernels: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each layer's share of the kernel trace, ``tr K_l / sum_l tr K_l`` (sums to 1;
    the NTK is a sum over parameters, so the shares say which layers make the kernel)."""
    traces = {k: float(torch.diagonal(v.detach().double()).sum()) for k, v in layer_kernels.items()}
    total = sum(traces.values())
    return {k: (t / total if total > 0 else float("nan")) for k, t in traces.items()}


def layer_drift(layer_kernels: Mapping[str, torch.Tensor],
                init_layer_kernels: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per-layer ``||K_l - K0_l||_F / ||K0_l||_F`` for the layers present in both."""
    out = {}
    for k, v in layer_kernels.items():
        if k in init_layer_kernels:
            k0 = init_layer_kernels[k].detach().double().cpu()
            num = float((v.detach().double().cpu() - k0).norm())
            den = float(k0.norm())
            out[k] = num / den if den > 0 else float("nan")
    return out


@dataclass
class _Snapshot:
    kernel: torch.Tensor      # (n, n) float64
    residual: torch.Tensor    # (n,) float64
    step: int
    lr_sum: float             # cumulative learning rate up to this step


class DynamicsTracker:
    """Linearised-dynamics metrics across reports for a scalar-output model.

    Call :meth:`update` at every report with the kernel on the probes, the outputs on the
    probes (and on held-out probes), the global step and the cumulative sum of the
    optimizer's learning rate over the steps taken so far (so a schedule is averaged
    between reports). ``residual_top_k`` sets the eigenvectors in
    ``residual_energy_top{k}``.

    Returned keys (floats, no prefix): ``residual_norm``, ``residual_energy_top{k}``,
    ``steps_to_halve_residual`` (linearised GD at the current lr; inf if never),
    ``slowest_mode_time_constant`` (steps per e-fold of the slowest mode holding
    residual energy), and from the second report on ``predicted_residual_norm``,
    ``predicted_vs_observed_residual`` = ||r_pred|| / ||r_obs|| (1: the kernel predicted the
    progress exactly; > 1: the network learned faster than its kernel predicts) and
    ``residual_prediction_error`` = ||r_pred - r_obs|| / ||r_obs||, where r_pred evolves
    the previous report's residual under the previous report's kernel. With held-out
    probes: ``linearization_gap`` = ||f - f_lin|| / ||f - f_0|| on them, f_lin being the
    network linearised at initialisation (K0) trained for the same steps (advanced one
    report interval at a time at that interval's mean learning rate), and
    ``linearized_heldout_mse`` / ``heldout_mse`` when held-out targets are given.
    """

    def __init__(self, targets: torch.Tensor, num_train: int | None = None,
                 residual_top_k: int = 5, loss_reduction: str = "mean") -> None:
        y = torch.as_tensor(targets).detach().double().cpu()
        self.y = y.reshape(y.shape[0])
        self.n = self.y.shape[0]
        self.num_train = int(num_train or self.n)
        self.k = max(1, min(int(residual_top_k), self.n))
        self.loss_reduction = loss_reduction
        self.init: _Snapshot | None = None
        self.prev: _Snapshot | None = None
        self.f0_heldout: torch.Tensor | None = None
        self.k0_cross: torch.Tensor | None = None
        # the linearised network, advanced one report interval at a time so that a learning
        # rate that changes between reports is followed exactly: (probe outputs, held-out
        # outputs, step, cumulative lr)
        self.lin: tuple | None = None

    def _rate(self, lr: float) -> float:
        return D.sum_loss_lr(lr, self.num_train, 1, self.loss_reduction)

    def update(self, kernel: torch.Tensor, outputs: torch.Tensor, step: int, lr_sum: float,
               current_lr: float, heldout_outputs: torch.Tensor | None = None,
               cross_kernel: torch.Tensor | None = None,
               heldout_targets: torch.Tensor | None = None) -> dict[str, float]:
        K = kernel.detach().double().cpu()
        f = outputs.detach().double().cpu().reshape(self.n)
        r = f - self.y
        snap = _Snapshot(K, r, int(step), float(lr_sum))
        norm = float(r.norm())
        out: dict[str, float] = {"residual_norm": norm}
        out[f"residual_energy_top{self.k}"] = (A.residual_spectral_energy(K, r, self.k)
                                               if norm > 0 else float("nan"))
        rate = self._rate(current_lr)
        if rate > 0 and norm > 0:
            out["steps_to_halve_residual"] = D.steps_to_reduce(K, r, rate, 0.5)
            slow = D.slowest_modes(K, r, rate, k=1)
            out["slowest_mode_time_constant"] = slow[0]["time_constant"] if slow else float("nan")
        if self.prev is not None and step > self.prev.step:
            steps = step - self.prev.step
            mean_rate = self._rate((lr_sum - self.prev.lr_sum) / steps)
            pred = A.predicted_residual(self.prev.kernel, self.prev.residual, mean_rate, steps)
            pn = float(pred.norm())
            out["predicted_residual_norm"] = pn
            out["predicted_vs_observed_residual"] = pn / norm if norm > 0 else float("nan")
            out["residual_prediction_error"] = (float((pred - r).norm()) / norm if norm > 0
                                                else float("nan"))
        if self.init is None:
            self.init = snap
            if heldout_outputs is not None and cross_kernel is not None:
                self.f0_heldout = heldout_outputs.detach().double().cpu().reshape(-1)
                self.k0_cross = cross_kernel.detach().double().cpu()
                self.lin = (f, self.f0_heldout, int(step), float(lr_sum))
        elif (heldout_outputs is not None and self.lin is not None and self.k0_cross is not None
              and step > self.lin[2]):
            lin_train, lin_heldout, lin_step, lin_lr_sum = self.lin
            steps = step - lin_step
            mean_rate = self._rate((lr_sum - lin_lr_sum) / steps)
            f_lin = D.linearized_predictions(self.init.kernel, self.k0_cross, lin_train,
                                             lin_heldout, self.y, lr=mean_rate, steps=steps)
            r_lin = A.predicted_residual(self.init.kernel, lin_train - self.y, mean_rate, steps)
            self.lin = (self.y + r_lin, f_lin, int(step), float(lr_sum))
            f_h = heldout_outputs.detach().double().cpu().reshape(-1)
            out["linearization_gap"] = D.linearization_gap(f_h, f_lin, self.f0_heldout)
            if heldout_targets is not None:
                yh = torch.as_tensor(heldout_targets).detach().double().cpu().reshape(-1)
                out["heldout_mse"] = float(((f_h - yh) ** 2).mean())
                out["linearized_heldout_mse"] = float(((f_lin - yh) ** 2).mean())
        self.prev = snap
        return {k: (float(v) if v is not None else math.nan) for k, v in out.items()}

    def state_dict(self) -> dict:
        def snap(s: _Snapshot | None):
            return None if s is None else {"kernel": s.kernel, "residual": s.residual,
                                           "step": s.step, "lr_sum": s.lr_sum}
        lin = None
        if self.lin is not None:
            lin = {"train": self.lin[0], "heldout": self.lin[1], "step": self.lin[2],
                   "lr_sum": self.lin[3]}
        return {"init": snap(self.init), "prev": snap(self.prev), "f0_heldout": self.f0_heldout,
                "k0_cross": self.k0_cross, "lin": lin}

    def load_state_dict(self, state: Mapping) -> None:
        def snap(d):
            if not d:
                return None
            return _Snapshot(d["kernel"], d["residual"], int(d["step"]), float(d["lr_sum"]))
        self.init, self.prev = snap(state.get("init")), snap(state.get("prev"))
        self.f0_heldout, self.k0_cross = state.get("f0_heldout"), state.get("k0_cross")
        lin = state.get("lin")
        self.lin = None if not lin else (lin["train"], lin["heldout"], int(lin["step"]),
                                         float(lin["lr_sum"]))


__all__ = ["DynamicsTracker", "layer_drift", "layer_shares"]
