"""Checkpoint resume and coexisting instances of NTKReportCallback (issue 4).

A run is fitted for 2 epochs with checkpointing, then a *fresh* Trainer, a *fresh*
model (other random weights) and a *fresh* callback instance resume from the checkpoint
for 2 more epochs. The resumed callback must keep the original probes and K0, so its
``ntk/relative_change`` and ``ntk/kernel_distance`` are measured against the ORIGINAL
initialisation: checked against an independent float64 recomputation from the initial
weights saved before the first run, and shown to differ from the drift against the
weights at resume time (so the check can fail).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callback_reference import (
    SCALAR_KEYS,
    TBContent,
    assert_close,
    metrics,
    probes_from_state,
    reference_kernel,
    snapshot_callback,
)
from lightning_models import (  # noqa: F401  (flavour is a fixture)
    Flavour,
    flavour,
    image_data,
    loaders,
    make_model,
    quiet_trainer_kwargs,
)

BATCHES_PER_EPOCH = 5


def _fit(
    fl: Flavour,
    root: Any,
    name: str,
    model: Any,
    callbacks: list,
    max_epochs: int,
    ckpt_path: Optional[str] = None,
    permute_data: bool = False,
) -> Tuple[Any, Any, Any]:
    train, val = loaders("BNCNN")
    if permute_data:
        # same samples in another order: a callback that drew its probes afresh would
        # pick different ones, one that restored them from the checkpoint would not
        ds = train.dataset
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))
        train = DataLoader(TensorDataset(*(t[perm] for t in ds.tensors)), batch_size=train.batch_size, shuffle=True)
    snaps = snapshot_callback(fl.Callback)
    ckpt = fl.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, save_top_k=-1)
    logger = fl.loggers.TensorBoardLogger(str(root), name=name, version=0)
    trainer = fl.Trainer(
        max_epochs=max_epochs,
        callbacks=[*callbacks, snaps, ckpt],
        **quiet_trainer_kwargs(logger=logger, enable_checkpointing=True),
    )
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer, snaps, TBContent(logger.log_dir)


@pytest.mark.parametrize("explicit_probes", [True, False], ids=["explicit-probes", "drawn-probes"])
def test_resume_measures_drift_against_original_init(flavour: Flavour, tmp_path: Any, explicit_probes: bool) -> None:
    from ntk_callback import NTKReportCallback

    x, y = image_data()
    kw: Dict[str, Any] = dict(num_probes=20, every_n_epochs=1, seed=7)
    if explicit_probes:
        kw = dict(probes=(x[:20].clone(), y[:20].clone()), every_n_epochs=1)

    model1 = make_model(flavour, "BNCNN", seed=0, lr=0.05)
    init_state = {k: v.clone() for k, v in model1.state_dict().items()}
    cb1 = NTKReportCallback(**kw)
    trainer1, snaps1, tb1 = _fit(flavour, tmp_path, "run1", model1, [cb1], max_epochs=2)
    last = os.path.join(str(tmp_path / "ckpt"), "last.ckpt")
    assert os.path.isfile(last)
    state1 = cb1.state_dict()
    probes = probes_from_state(state1)
    assert probes[0].device.type == "cpu", "probes must be checkpointed on CPU"

    # the checkpoint holds the callback's state
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ntk_keys = [k for k in ckpt["callbacks"] if "NTKReportCallback" in str(k)]
    assert len(ntk_keys) == 1, list(ckpt["callbacks"])

    # a fresh model with OTHER weights, a fresh callback with the same settings (its
    # state_key), and the training data in another order
    model2 = make_model(flavour, "BNCNN", seed=99, lr=0.05)
    cb2 = NTKReportCallback(**kw)
    trainer2, snaps2, tb2 = _fit(
        flavour, tmp_path, "run2", model2, [cb2], max_epochs=4, ckpt_path=last, permute_data=True
    )
    assert trainer2.global_step == 4 * BATCHES_PER_EPOCH

    # same probes after resume
    p2 = probes_from_state(cb2.state_dict())
    assert torch.equal(p2[0], probes[0]) and torch.equal(p2[1], probes[1])

    # the report history goes on from the first run
    steps1 = [h["step"] for h in cb1.history]
    steps2 = [h["step"] for h in cb2.history]
    assert steps1 == [0, 5, 10]
    assert steps2[: len(steps1)] == steps1, "history lost on resume"
    assert steps2[-2:] == [15, 20]

    # independent recomputation: K0 from the initial weights, K_t from the resumed run's weights
    px, py = probes
    K0 = reference_kernel(model1.net, init_state, px, py)
    K_resume = reference_kernel(model1.net, snaps1.states[10], px, py)
    series = {key: tb2.series(key) for key in SCALAR_KEYS}
    logged_steps = [s for s, _ in series["ntk/relative_change"]]
    assert 15 in logged_steps and 20 in logged_steps, logged_steps
    for i, step in enumerate(logged_steps):
        K = reference_kernel(model2.net, snaps2.states[step], px, py)
        K_align = reference_kernel(model2.net, snaps2.states[step], px, py, mode="trace")  # alignments' kernel
        ref = metrics(K, py.numpy(), K0, K_align=K_align)
        got = {key[4:]: series[key][i][1] for key in SCALAR_KEYS}
        assert_close(got["relative_change"], ref["relative_change"], rel=1e-3, what=f"relative_change @ {step}")
        assert_close(got["kernel_distance"], ref["kernel_distance"], rel=1e-3, abs_=1e-6, what=f"kernel_distance @ {step}")
        assert_close(got["lambda_max"], ref["lambda_max"], rel=1e-3, what=f"lambda_max @ {step}")
        assert_close(got["kta"], ref["kta"], rel=1e-3, what=f"kta @ {step}")
        # the check discriminates: drift against the kernel at resume time is far off
        wrong = metrics(K, py.numpy(), K_resume)["relative_change"]
        assert abs(wrong - ref["relative_change"]) > 10 * 1e-3 * ref["relative_change"]
    # the initial-weights kernel is the same as the one the first run reported
    assert_close(tb1.series("ntk/lambda_max")[0][1], metrics(K0, py.numpy())["lambda_max"], what="K0 lambda_max")


def test_two_instances_coexist_and_resume_separately(flavour: Flavour, tmp_path: Any) -> None:
    """Two callbacks with different settings: distinct ``state_key``s, both checkpointed,
    each restored into its own fresh instance."""
    from ntk_callback import NTKReportCallback

    def pair(seed_a: int, seed_b: int) -> Tuple[Any, Any]:
        a = NTKReportCallback(num_probes=12, every_n_epochs=1, seed=seed_a)
        b = NTKReportCallback(num_probes=8, every_n_epochs=2, mode="trace", seed=seed_b)
        return a, b

    a1, b1 = pair(1, 2)
    assert a1.state_key != b1.state_key
    model1 = make_model(flavour, "BNCNN", seed=0)
    _fit(flavour, tmp_path, "run1", model1, [a1, b1], max_epochs=2)
    last = os.path.join(str(tmp_path / "ckpt"), "last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert a1.state_key in ckpt["callbacks"] and b1.state_key in ckpt["callbacks"]
    pa, pb = probes_from_state(a1.state_dict()), probes_from_state(b1.state_dict())
    assert len(pa[0]) == 12 and len(pb[0]) == 8
    assert [h["step"] for h in a1.history] == [0, 5, 10]
    assert [h["step"] for h in b1.history] == [0, 10]

    a2, b2 = pair(1, 2)
    model2 = make_model(flavour, "BNCNN", seed=1)
    _fit(flavour, tmp_path, "run2", model2, [a2, b2], max_epochs=4, ckpt_path=last, permute_data=True)
    for before, after in ((a1, a2), (b1, b2)):
        p0, p1 = probes_from_state(before.state_dict()), probes_from_state(after.state_dict())
        assert torch.equal(p0[0], p1[0]) and torch.equal(p0[1], p1[1])
    assert [h["step"] for h in a2.history] == [0, 5, 10, 15, 20]
    assert [h["step"] for h in b2.history] == [0, 10, 20]
    # trace mode and target mode give different kernels on the same weights
    assert a2.history[0]["metrics"]["lambda_max"] != b2.history[0]["metrics"]["lambda_max"]
