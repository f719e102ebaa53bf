"""Which learning rate the training-dynamics metrics use (issue 12), with real Trainers.

The linearised model ``r <- r - lr K r`` needs one learning rate for the whole theta the
kernel covers (the trainable parameters). The model used here is linear in its parameters
(frozen random tanh features and two trainable linear heads ``body`` and ``head`` whose
outputs add), trained full batch on ``F.mse_loss`` with the probes = the training set, so
linearised gradient descent is exact: wherever the callback logs
``predicted_vs_observed_residual`` it must be 1 and ``linearization_gap`` 0 to round-off.

* automatic optimization, one optimizer (unchanged), two param groups of one lr,
  gradient accumulation: the lr is charged once per optimizer step;
* manual optimization, two optimizers of one lr each stepping its own head once per
  batch: one step of theta per batch (``trainer.global_step`` counts two), so
  ``lr_sum`` = batches * lr, not twice that;
* different lrs (two param groups, two optimizers, a trainable parameter in no
  optimizer): one warning naming the groups and lrs, and the lr-dependent metrics are
  absent (not wrong numbers) for the reports they would be wrong at; the lr-free ones
  stay;
* the counters survive ``state_dict`` / ``load_state_dict`` (and older states load).
"""
from __future__ import annotations

import io
import warnings
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_models import Flavour, flavour, load_flavour, quiet_trainer_kwargs  # noqa: F401 (fixture)

N = 24  # probes = training points (full batch)
EPOCHS, EVERY = 9, 3

LR_KEYS = (
    "steps_to_halve_residual",
    "epochs_to_halve_residual",
    "slowest_mode_time_constant",
    "predicted_residual_norm",
    "predicted_vs_observed_residual",
    "residual_prediction_error",
    "linearization_gap",
    "linearized_heldout_mse",
)
PREDICTION_KEYS = ("predicted_residual_norm", "predicted_vs_observed_residual", "residual_prediction_error")
CURRENT_LR_KEYS = ("steps_to_halve_residual", "epochs_to_halve_residual", "slowest_mode_time_constant")
LR_FREE_KEYS = ("residual_norm", "residual_energy_top5")  # every report
HELDOUT_KEYS = ("heldout_mse",)  # from the second report on (lr-free too)


def two_heads(fl: Flavour, lrs: Tuple[float, Optional[float]], setup: str, equalise_after: Optional[int] = None,
              skip_head_at: Optional[int] = None) -> Any:
    """``features`` (frozen Linear(3, 24) + tanh), then ``body(h) + head(h)``, both Linear(24, 1).

    ``setup``: ``"single"`` (one SGD over ``self.parameters()``, lr ``lrs[0]``; the frozen
    features are in it too), ``"groups"`` (one SGD, param groups body: ``lrs[0]``, head:
    ``lrs[1]``; ``lrs[1] = None`` leaves the head, still trainable, out of every optimizer),
    ``"manual"`` (manual optimization, SGD(body, ``lrs[0]``) and SGD(head, ``lrs[1]``), each
    stepped once per batch from one backward). ``equalise_after``: from that batch on the
    second lr is set to the first. ``skip_head_at`` (manual): in that batch only the body's
    optimizer steps. Plain SGD, no momentum.
    """

    class TwoHeads(fl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Linear(3, 24), nn.Tanh()).requires_grad_(False)
            self.body = nn.Linear(24, 1)
            self.head = nn.Linear(24, 1)
            self.automatic_optimization = setup != "manual"
            self.batches = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.features(x)
            return (self.body(h) + self.head(h)).squeeze(-1)

        def _equalise(self, opts: List[Any]) -> None:
            if equalise_after is not None and self.batches == equalise_after:
                last = opts[-1].param_groups[-1]
                last["lr"] = opts[0].param_groups[0]["lr"]

        def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
            loss = F.mse_loss(self(batch[0]), batch[1])
            if setup != "manual":
                self._equalise([self.trainer.optimizers[0]])
                self.batches += 1
                return loss
            opts = self.optimizers()
            self._equalise([o.optimizer for o in opts])
            for o in opts:
                o.zero_grad()
            self.manual_backward(loss)
            for o in opts[:1] if self.batches == skip_head_at else opts:
                o.step()
            self.batches += 1
            return None

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

        def configure_optimizers(self) -> Any:
            if setup == "single":
                return torch.optim.SGD(self.parameters(), lr=lrs[0])
            if setup == "groups":
                groups: List[Dict[str, Any]] = [{"params": self.body.parameters(), "lr": lrs[0]}]
                if lrs[1] is not None:
                    groups.append({"params": self.head.parameters(), "lr": lrs[1]})
                return torch.optim.SGD(groups, lr=lrs[0])
            return [torch.optim.SGD(self.body.parameters(), lr=lrs[0]),
                    torch.optim.SGD(self.head.parameters(), lr=lrs[1])]

    return TwoHeads()


def data(batch_size: int = N) -> Tuple[DataLoader, DataLoader, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N + 8, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1)) + 0.3 * x[:, 0]
    train = DataLoader(TensorDataset(x[:N], y[:N]), batch_size=batch_size)  # fixed order
    val = DataLoader(TensorDataset(x[N:], y[N:]), batch_size=8)
    return train, val, x[:N], y[:N]


def stable_lr(fl: Flavour) -> float:
    """0.35 n / lambda_max of the initial kernel (sum-loss rate 2 lr / n; GD is stable below n /
    lambda_max): large enough that a wrong step count or lr mispredicts by far more than
    round-off."""
    from ntk_callback import empirical_ntk

    fl.seed_everything(0, verbose=False)
    model = two_heads(fl, (0.1, 0.1), "single").double()
    x = data()[2]
    return 0.35 * N / float(torch.linalg.eigvalsh(empirical_ntk(model, x)).max())


def fit(fl: Flavour, lrs: Tuple[float, Optional[float]], setup: str, batch_size: int = N,
        **trainer_kw: Any) -> Tuple[Any, Any, List[str], Any]:
    from ntk_callback import NTKReportCallback

    train, val, x, y = data(batch_size)
    fl.seed_everything(0, verbose=False)
    model = two_heads(fl, lrs, setup, equalise_after=trainer_kw.pop("equalise_after", None),
                      skip_head_at=trainer_kw.pop("skip_head_at", None))
    cb = NTKReportCallback(probes=(x, y), every_n_epochs=EVERY, dynamics=True, num_heldout=8,
                           log_console=False, log_figures=False)
    trainer = fl.Trainer(max_epochs=EPOCHS, callbacks=[cb], precision="64-true",
                         **quiet_trainer_kwargs(**trainer_kw))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(model, train, val)
    return cb, trainer, [str(w.message) for w in rec], model


def lr_warnings(messages: List[str]) -> List[str]:
    return [m for m in messages if "learning rate" in m and "NTKReportCallback" in m]


def assert_exact(cb: Any) -> None:
    """Every report after the first predicts the observed residual, and the network is its
    own linearisation (the lr and the step count charged are the ones training used)."""
    hist = cb.history
    assert len(hist) == EPOCHS // EVERY + 1
    for i, rec in enumerate(hist):
        for key in LR_FREE_KEYS + CURRENT_LR_KEYS + (HELDOUT_KEYS if i else ()):
            assert key in rec["metrics"], (rec["step"], key)
    for rec in hist[1:]:
        m = rec["metrics"]
        assert m["predicted_vs_observed_residual"] == pytest.approx(1.0, abs=1e-9), rec["step"]
        assert m["residual_prediction_error"] < 1e-8, rec["step"]
        assert m["linearization_gap"] < 1e-8, rec["step"]
    # ... and not trivially: the residual moved a lot between reports
    norms = [h["metrics"]["residual_norm"] for h in hist]
    assert norms[-1] < 0.8 * norms[0], norms


# ------------------------------------------------------------------ one learning rate


def test_single_optimizer_automatic_is_unchanged(flavour: Flavour) -> None:
    lr = stable_lr(flavour)
    cb, trainer, msgs, _ = fit(flavour, (lr, None), "single")
    assert trainer.global_step == EPOCHS
    assert cb.lr_sum == pytest.approx(EPOCHS * lr, rel=1e-14)
    assert cb.param_steps == EPOCHS
    assert [h["step"] for h in cb.history] == [0, 3, 6, 9]
    assert_exact(cb)
    assert lr_warnings(msgs) == []


def test_two_param_groups_with_one_lr_count_as_one_lr() -> None:
    fl = load_flavour("lightning.pytorch")
    lr = stable_lr(fl)
    cb, trainer, msgs, _ = fit(fl, (lr, lr), "groups")
    assert len(trainer.optimizers[0].param_groups) == 2
    assert cb.lr_sum == pytest.approx(EPOCHS * lr, rel=1e-14) and cb.param_steps == EPOCHS
    assert_exact(cb)
    assert lr_warnings(msgs) == []


def test_gradient_accumulation_charges_one_lr_per_optimizer_step() -> None:
    """Two half batches accumulated: the summed gradient of the two halves of a mean loss,
    divided by 2 by Lightning, is the full-batch gradient, so it is still exact GD."""
    fl = load_flavour("pytorch_lightning")
    lr = stable_lr(fl)
    cb, trainer, msgs, _ = fit(fl, (lr, None), "single", batch_size=N // 2, accumulate_grad_batches=2)
    assert trainer.global_step == EPOCHS and cb.param_steps == EPOCHS
    assert cb.lr_sum == pytest.approx(EPOCHS * lr, rel=1e-14)
    assert_exact(cb)
    assert lr_warnings(msgs) == []


def test_manual_optimization_two_optimizers_one_lr_count_one_step_per_batch(flavour: Flavour) -> None:
    lr = stable_lr(flavour)
    cb, trainer, msgs, _ = fit(flavour, (lr, lr), "manual")
    assert len(trainer.optimizers) == 2
    assert trainer.global_step == 2 * EPOCHS  # Lightning counts every optimizer's step ...
    assert cb.param_steps == EPOCHS  # ... but theta took one step per batch
    assert cb.lr_sum == pytest.approx(EPOCHS * lr, rel=1e-14)
    assert [h["step"] for h in cb.history] == [0, 6, 12, 18]  # logged at the global step
    assert_exact(cb)
    # steps_to_halve_residual counts steps of theta, like epochs_to_halve (1 step per epoch here)
    for h in cb.history:
        m = h["metrics"]
        assert m["epochs_to_halve_residual"] == pytest.approx(m["steps_to_halve_residual"])
    assert lr_warnings(msgs) == []


# ----------------------------------------------------------- different learning rates


def assert_lr_metrics_absent(cb: Any, trainer: Any, msgs: List[str], names: Tuple[str, ...]) -> str:
    about = lr_warnings(msgs)
    assert len(about) == 1, about
    for name in names:
        assert name in about[0], (name, about[0])
    for i, rec in enumerate(cb.history):
        m = rec["metrics"]
        for key in LR_KEYS:
            assert key not in m, (rec["step"], key)
        for key in LR_FREE_KEYS + (HELDOUT_KEYS if i else ()):
            assert key in m, (rec["step"], key)
    assert not any(f"ntk/{k}" in trainer.callback_metrics for k in LR_KEYS)
    assert "ntk/residual_norm" in trainer.callback_metrics
    return about[0]


def test_two_param_groups_with_different_lrs_warn_and_skip_the_lr_metrics() -> None:
    fl = load_flavour("lightning.pytorch")
    lr = stable_lr(fl)
    cb, trainer, msgs, _ = fit(fl, (lr, lr / 3), "groups")
    text = assert_lr_metrics_absent(cb, trainer, msgs, ("param group 0", "param group 1", "body.weight",
                                                         "head.weight", f"{lr:.4g}", f"{lr / 3:.4g}"))
    assert "J diag(lr) J^T" in text


def test_manual_optimization_two_optimizers_different_lrs_warn_and_skip(flavour: Flavour) -> None:
    lr = stable_lr(flavour)
    cb, trainer, msgs, _ = fit(flavour, (lr, lr / 3), "manual")
    assert_lr_metrics_absent(cb, trainer, msgs, ("optimizer 0", "optimizer 1", "body.bias", "head.bias",
                                                 f"{lr:.4g}", f"{lr / 3:.4g}"))
    assert cb.param_steps == EPOCHS


def test_trainable_parameter_in_no_optimizer_is_an_lr_of_zero() -> None:
    """The head is trainable (in the kernel) but in no optimizer: it never moves, so the
    dynamics are r <- r - lr K_body r, not lr K."""
    fl = load_flavour("pytorch_lightning")
    lr = stable_lr(fl)
    cb, trainer, msgs, model = fit(fl, (lr, None), "groups")
    assert all(p.requires_grad for p in model.head.parameters())
    text = assert_lr_metrics_absent(cb, trainer, msgs, ("head.weight", "no optimizer"))
    assert "body.weight" in text


def test_metrics_come_back_after_the_lrs_agree_again() -> None:
    """Different lrs for the first 3 batches, then one lr: the prediction over an interval
    with a mixed step and the lr-dependent metrics while the lrs differ are absent; the
    intervals after are exact again; the linearised network went through the mixed steps,
    so the gap stays absent."""
    fl = load_flavour("lightning.pytorch")
    lr = stable_lr(fl)
    cb, trainer, msgs, _ = fit(fl, (lr, lr / 3), "manual", equalise_after=3)
    assert len(lr_warnings(msgs)) == 1
    hist = cb.history
    assert [h["step"] for h in hist] == [0, 6, 12, 18]
    assert cb.param_steps == EPOCHS
    assert cb.lr_sum == pytest.approx((EPOCHS - 3) * lr, rel=1e-14)  # the mixed steps are in no lr
    for rec in hist[:2]:  # lrs differ at these reports
        assert not any(k in rec["metrics"] for k in PREDICTION_KEYS + CURRENT_LR_KEYS), rec["step"]
    for rec in hist[2:]:
        m = rec["metrics"]
        assert all(k in m for k in CURRENT_LR_KEYS), rec["step"]
        assert m["predicted_vs_observed_residual"] == pytest.approx(1.0, abs=1e-9), rec["step"]
    assert not any("linearization_gap" in h["metrics"] or "linearized_heldout_mse" in h["metrics"] for h in hist)
    assert all("heldout_mse" in h["metrics"] for h in hist[1:])

    # the counters are checkpointed: a restored callback knows the gap must stay off
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    from ntk_callback import NTKReportCallback

    fresh = NTKReportCallback(probes=cb.probes)
    fresh.load_state_dict(state)
    assert fresh.param_steps == cb.param_steps and fresh.lr_sum == cb.lr_sum
    saved = {k: v for k, v in state["dynamics"].items() if k not in ("tracker", "heldout")}
    again = {k: v for k, v in fresh.state_dict()["dynamics"].items() if k not in ("tracker", "heldout")}
    assert again == saved and saved["lr_mixed"]["count"] == 3


def test_an_optimizer_that_does_not_step_in_a_batch_is_a_mixed_step() -> None:
    """One lr, but in batch 4 only the body's optimizer steps (the head's lr is 0 there):
    the interval holding that batch has no prediction, the gap is gone from then on, the
    lrs at every report agree (steps_to_halve stays), and the warning comes from the batch."""
    fl = load_flavour("pytorch_lightning")
    lr = stable_lr(fl)
    cb, trainer, msgs, _ = fit(fl, (lr, lr), "manual", skip_head_at=4)
    about = lr_warnings(msgs)
    assert len(about) == 1 and "not stepped in this batch" in about[0] and "optimizer 1 param group 0" in about[0]
    assert trainer.global_step == 2 * EPOCHS - 1 and cb.param_steps == EPOCHS
    assert cb.lr_sum == pytest.approx((EPOCHS - 1) * lr, rel=1e-14)
    hist = cb.history
    assert [h["step"] for h in hist] == [0, 6, 11, 17]
    assert all(k in h["metrics"] for h in hist for k in CURRENT_LR_KEYS)
    for i in (1, 3):
        assert hist[i]["metrics"]["predicted_vs_observed_residual"] == pytest.approx(1.0, abs=1e-9), i
    assert not any(k in hist[2]["metrics"] for k in PREDICTION_KEYS)
    assert hist[1]["metrics"]["linearization_gap"] < 1e-8
    assert not any("linearization_gap" in h["metrics"] for h in hist[2:])


def test_state_without_the_step_counter_loads_it_from_the_global_step() -> None:
    """A state saved before ``param_steps`` existed: automatic optimization with one
    optimizer, where a step of theta is a global step."""
    from ntk_callback import NTKReportCallback

    cb = NTKReportCallback(num_probes=4)
    cb.load_state_dict({"version": 1, "dynamics": {"lr_sum": 0.5, "lr_step": 7, "heldout": None, "tracker": None}})
    assert cb.lr_sum == 0.5 and cb.param_steps == 7
    assert cb.state_dict()["dynamics"]["param_steps"] == 7
