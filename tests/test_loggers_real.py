"""W&B and MLflow with the real packages (optional test dependencies, skipped when absent).

A real ``Trainer.fit`` with the callback and a real ``WandbLogger`` (offline mode, its
run directory in ``tmp_path``) or ``MLFlowLogger`` (a local file store in ``tmp_path``);
what reached the backend is read back the backend's own way and compared with what the
callback measured:

* scalars: every ``ntk/`` key of ``callback.history`` at every report step (W&B: the
  offline run's ``.wandb`` records, read with wandb's own record reader; MLflow:
  ``MlflowClient.get_metric_history``);
* pictures: the PNG files the backend stored, decoded with Pillow, are the exact pixels
  of the heatmap that :class:`ntk_callback.loggers.ReportMedia` renders for that report
  (so nothing was resized, re-encoded lossily, transposed or dropped), plus the history
  pictures and, for MLflow, the eigenvalue JSON.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np
import pytest
import torch
from lightning_models import load_flavour, loaders, make_model, quiet_trainer_kwargs

PL = "pytorch_lightning"
KEYS = ("lambda_max", "trace", "kta", "cka", "effective_rank", "relative_change", "kernel_distance")


def _png(path: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _fit(logger: Any) -> Any:
    """Two epochs of the BatchNorm CNN, reports at steps 0, 5, 10 (12 labelled probes)."""
    from ntk_callback import NTKReportCallback

    fl = load_flavour(PL)
    model = make_model(fl, "BNCNN", seed=0, lr=0.05)
    train, val = loaders("BNCNN")
    cb = NTKReportCallback(num_probes=12, every_n_epochs=1, log_console=False)
    trainer = fl.Trainer(max_epochs=2, callbacks=[cb], **quiet_trainer_kwargs(logger=logger))
    trainer.fit(model, train, val)
    assert [h["step"] for h in cb.history] == [0, 5, 10]
    return cb


def _expected_heatmap(cb: Any, record: dict[str, Any], kernel: torch.Tensor) -> np.ndarray:
    """The heatmap the callback renders for ``record`` (HWC), rebuilt from the callback's probes."""
    from ntk_callback.loggers import ReportMedia

    media = ReportMedia(
        step=record["step"],
        kernel=kernel.double().numpy(),
        labels=cb.probes[1].numpy(),
        eigenvalues=np.asarray(record["eigenvalues"]),
        history=cb.history,
        pictures=("kernel",),
        epoch=record["epoch"],
        tag=record["tag"],
        inputs=cb.probes[0],
    )
    return media.image("kernel").transpose(1, 2, 0)


def _check_scalars(cb: Any, series: dict[str, list[tuple]]) -> None:
    for key in KEYS:
        got = series.get(f"ntk/{key}")
        assert got, (
            f"ntk/{key} missing; logged: {sorted(k for k in series if k.startswith('ntk/'))}"
        )
        want = [(h["step"], h["metrics"][key]) for h in cb.history]
        assert [s for s, _ in got] == [s for s, _ in want], (key, got)
        np.testing.assert_allclose(
            [v for _, v in got], [v for _, v in want], rtol=1e-6, err_msg=key
        )


# ------------------------------------------------------------------------------ W&B


def _wandb_records(path: str) -> list[bytes]:
    """The records of a ``.wandb`` file: W&B's LevelDB-style log (a 7-byte ``:W&B`` header,
    then 32 KiB blocks of records, each with a 7-byte header: CRC-32 of type + data, length,
    type FULL / FIRST / MIDDLE / LAST). Written out here because wandb >= 0.19 writes the
    file from its Go core and no longer ships a Python reader; every checksum is verified."""
    import struct
    import zlib

    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b":W&B", data[:7]
    block, pos, out, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the tail of a block too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, (
            f"bad checksum at byte {pos}"
        )
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind in (2, 3):
            parts += chunk
        elif kind == 4:
            out.append(parts + chunk)
            parts = b""
    return out


def _wandb_rows(run_dir: str) -> list[dict[str, Any]]:
    """History rows of an offline run (key -> decoded JSON value) from its ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    rows = []
    for raw in _wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in rec.history.item:
            path = (
                [item.key] if item.key else list(item.nested_key)
            )  # media come as {key: {field: value}}
            node = row
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def test_wandb_offline_run_has_the_scalars_and_pictures(tmp_path: Any, monkeypatch: Any) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("matplotlib")
    for k, v in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(k, v)
    fl = load_flavour(PL)
    logger = fl.loggers.WandbLogger(
        project="ntk-callback-test", save_dir=str(tmp_path), offline=True
    )
    try:
        cb = _fit(logger)
    finally:
        logger.experiment.finish()
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*"))
    rows = _wandb_rows(run_dir)
    # Lightning's WandbLogger logs the step as the metric trainer/global_step
    series: dict[str, list[tuple]] = {}
    images: dict[str, dict[int, str]] = {}
    for row in rows:
        step = row.get("trainer/global_step")
        for key, value in row.items():
            if not key.startswith("ntk/"):
                continue
            if isinstance(value, (int, float)):
                series.setdefault(key, []).append((step, float(value)))
            elif isinstance(value, dict) and value.get("_type") in (
                "images/separated",
                "image-file",
            ):
                files = value.get("filenames") or [value.get("path")]
                images.setdefault(key, {})[step] = os.path.join(run_dir, "files", files[0])
    _check_scalars(cb, series)
    assert sorted(images["ntk/kernel"]) == [0, 5, 10], images.get("ntk/kernel")
    assert {"ntk/spectrum", "ntk/drift"} <= set(images), sorted(images)
    last = cb.history[-1]
    np.testing.assert_array_equal(
        _png(images["ntk/kernel"][10]), _expected_heatmap(cb, last, cb.last_kernel)
    )
    np.testing.assert_array_equal(
        _png(images["ntk/kernel"][0]), _expected_heatmap(cb, cb.history[0], cb.init_kernel)
    )
    for name in ("spectrum", "drift"):
        assert _png(images[f"ntk/{name}"][max(images[f"ntk/{name}"])]).std() > 5
    # the histogram of log10 eigenvalues went through wandb.Histogram
    hists = [row["ntk/eigenvalues"] for row in rows if isinstance(row.get("ntk/eigenvalues"), dict)]
    assert len(hists) == 3 and all(h.get("_type") == "histogram" for h in hists)
    assert sum(hists[-1]["values"]) == 12


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_file_store_has_the_scalars_and_pictures(tmp_path: Any, monkeypatch: Any) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("matplotlib")
    # MLflow >= 3.7 refuses the file store unless opted in (a database backend needs sqlalchemy,
    # which mlflow-skinny leaves out); the file store is what a laptop user points MLFlowLogger at
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    fl = load_flavour(PL)
    uri = "file:" + str(tmp_path / "mlruns")
    logger = fl.loggers.MLFlowLogger(experiment_name="ntk-callback-test", tracking_uri=uri)
    cb = _fit(logger)
    client = MlflowClient(tracking_uri=uri)
    run_id = logger.run_id
    series = {
        f"ntk/{key}": [
            (m.step, m.value)
            for m in sorted(client.get_metric_history(run_id, f"ntk/{key}"), key=lambda m: m.step)
        ]
        for key in KEYS
    }
    _check_scalars(cb, series)
    kernel_files = sorted(a.path for a in client.list_artifacts(run_id, "ntk/kernel"))
    assert kernel_files == [f"ntk/kernel/step_{s:07d}.png" for s in (0, 5, 10)], kernel_files
    out = str(tmp_path / "download")
    last = client.download_artifacts(run_id, "ntk/kernel/step_0000010.png", out)
    np.testing.assert_array_equal(_png(last), _expected_heatmap(cb, cb.history[-1], cb.last_kernel))
    for name in ("spectrum", "drift"):
        files = [a.path for a in client.list_artifacts(run_id, f"ntk/{name}")]
        assert files, f"no ntk/{name} picture"
        assert _png(client.download_artifacts(run_id, sorted(files)[-1], out)).std() > 5
    eig = [a.path for a in client.list_artifacts(run_id, "ntk/eigenvalues")]
    assert len(eig) == 3
    with open(client.download_artifacts(run_id, "ntk/eigenvalues/step_0000010.json", out)) as fh:
        logged = json.load(fh)
    assert logged["step"] == 10
    np.testing.assert_allclose(logged["eigenvalues"], cb.history[-1]["eigenvalues"], rtol=1e-12)


# ------------------------------------------------------------- heatmap colour scale


def test_heatmap_scale_initial_fixes_the_colours_to_k0(tmp_path: Any) -> None:
    """``heatmap_scale="initial"`` through a real fit (CSVLogger's PNG files): every heatmap
    uses K0's colour range; the default keeps each report's own range. Bad values: a clear
    error naming the choices."""
    pytest.importorskip("matplotlib")
    from ntk_callback import NTKReportCallback
    from ntk_callback.callback import NTKCallbackConfigError
    from ntk_callback.loggers import ReportMedia

    with pytest.raises(NTKCallbackConfigError, match="heatmap_scale='K0'.*per_report.*initial"):
        NTKReportCallback(heatmap_scale="K0")
    fl = load_flavour(PL)
    model = make_model(fl, "Regressor", seed=0, lr=0.05)
    train, _ = loaders("Regressor")
    cb = NTKReportCallback(
        num_probes=10,
        every_n_epochs=1,
        log_console=False,
        heatmap_scale="initial",
        log_figures=False,
    )
    logger = fl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = fl.Trainer(max_epochs=2, callbacks=[cb], **quiet_trainer_kwargs(logger=logger))
    trainer.fit(model, train)
    last = cb.history[-1]
    logged = _png(os.path.join(logger.log_dir, "ntk", f"kernel_step_{last['step']:07d}.png"))
    common = dict(
        step=last["step"],
        kernel=cb.last_kernel.double().numpy(),
        labels=cb.probes[1].numpy(),
        eigenvalues=np.asarray(last["eigenvalues"]),
        history=cb.history,
        pictures=("kernel",),
        epoch=last["epoch"],
        tag=last["tag"],
        inputs=cb.probes[0],
    )
    fixed = ReportMedia(
        **common, heatmap_scale="initial", init_kernel=cb.init_kernel.double().numpy()
    )
    own = ReportMedia(**common)
    assert fixed.heatmap_range()[0] is not None
    np.testing.assert_array_equal(logged, fixed.image("kernel").transpose(1, 2, 0))
    assert not np.array_equal(logged, own.image("kernel").transpose(1, 2, 0))
