"""The command line end to end: the seeded tutorial run, train/predict on files (one of
10⁶ rows), the data formats, plots, --dtype, and the metrics predict prints. The model
the CLI shows and its defaults: test_cli_model.py; errors and start-up: test_cli_errors.py."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import DEVICE

from cli_helpers import (CROP_CSV, HAS_ARROW, USER_ENV, cli, cli_json, coefficient_rows, expected_metrics, least_squares,
                         linear_data, metrics_rows, png_size, write_csv)

from linreg_fused import FusedLinearRegressor
from linreg_fused.io import read_columns
from linreg_fused.serialization import read_info


def predicted(model: FusedLinearRegressor, x, dtype=torch.float32) -> np.ndarray:
    """What ``predict`` computes for ``x``: the model's outputs on the device the CLI picks by
    default (CUDA when there is one, as conftest's DEVICE), all rows in one call. The same
    matmul on the same device gives the same bits; a CPU and a CUDA one can differ in the last."""
    with torch.no_grad():
        return model.to(DEVICE, dtype)(torch.as_tensor(x, dtype=dtype, device=DEVICE)).cpu().numpy()


# ---------------------------------------------------------------- the tutorial run

def test_no_arguments_is_the_seeded_tutorial_run_every_time():
    # Twice in one fresh interpreter, as a user's shell runs it: an unseeded run would draw
    # other initial weights and batches the second time.
    code = "from linreg_fused.cli import main; main([]); print('@@'); main([])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=USER_ENV)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split("@@\n")
    assert first == second  # seeded by default: the same lines every run
    assert "100 epochs, batch 5, lr 1e-05, seed 0" in first
    assert "Epoch [100/100], Loss:" in first and "new region (temp 75" in first


def test_the_seed_option_changes_the_run(capsys):
    runs = [cli(capsys, "--seed", seed, "--epochs", "10", "--backend", "torch")[1] for seed in ("0", "0", "1")]
    assert runs[0] == runs[1] and runs[0] != runs[2] and "seed 1" in runs[2]


def test_tutorial_quiet_and_log_every_zero(capsys):
    code, out, _ = cli(capsys, "--epochs", "20", "--log-every", "0", "--backend", "torch")
    assert code == 0 and "Epoch [" not in out and "training FusedLinearRegressor" in out
    code, out, _ = cli(capsys, "--epochs", "20", "--quiet", "--backend", "torch")
    assert code == 0 and "Epoch [" not in out and "training" not in out and "new region" in out


# ---------------------------------------------------------------- train / predict

def test_train_on_a_million_row_csv_then_predict(tmp_path):
    """The CLI end to end on a generated CSV of 10⁶ rows × (4 features + 2 targets), about
    60 MB: train with --standardize, 10 % validation, --save and --plot (2 epochs of batch
    50000 on the PyTorch reference backend, so the interpreter is not what is timed), then
    predict every row to a CSV.

    Measured on the 2-core development machine (AMD EPYC; torch 2.13.0 CPU, numpy 2.4.6,
    pyarrow 26.0.1, Python 3.11) while other jobs kept its load average at 6-8: train
    31-43 s wall, 11-12 s CPU, peak RSS 0.62-0.64 GiB; predict 10-15 s wall, 3-4 s CPU,
    peak RSS 0.40-0.41 GiB; this test alone under pytest 48-80 s wall, 22.5 s CPU
    (user + sys, children included). Printed with pytest -s; not asserted: timings on a
    shared machine are noise.
    """
    rng = np.random.default_rng()
    x, y, w, b = linear_data(1_000_000, 4, 2, noise=0.1, rng=rng)
    data = tmp_path / "big.csv"
    write_csv(data, ["f0", "f1", "f2", "f3", "y0", "y1"], np.column_stack([x, y]).astype(np.float32))
    model_path, plot_path, out_path = tmp_path / "m.safetensors", tmp_path / "loss.png", tmp_path / "pred.csv"

    train = _timed(["train", str(data), "--target", "y0,y1", "--standardize", "--val-fraction", "0.1",
                    "--epochs", "2", "--batch-size", "50000", "--lr", "0.5", "--backend", "torch",
                    "--save", str(model_path), "--plot", str(plot_path)], tmp_path)
    assert train.returncode == 0, train.stderr
    assert "on 900000 rows (100000 more held out for validation)" in train.stdout
    table = metrics_rows(train.stdout)
    assert set(table) == {"y0", "y1"}
    for train_mse, train_rmse, train_r2, val_mse, val_rmse, val_r2 in table.values():
        assert train_r2 > 0.999 and val_r2 > 0.999  # noise 0.1 against targets of spread ~100
        assert val_mse < 0.1 and train_mse < 0.1  # near the noise floor 0.01 after 2 epochs
        assert np.isclose(train_rmse, np.sqrt(train_mse), rtol=1e-5) and np.isclose(val_rmse, np.sqrt(val_mse), rtol=1e-5)
    info = read_info(model_path)
    assert info.feature_names == ["f0", "f1", "f2", "f3"] and info.target_names == ["y0", "y1"]
    np.testing.assert_allclose(info.input_scale, x.std(0), rtol=0.01)
    model = FusedLinearRegressor.load(model_path, backend="torch")  # applies to raw features
    np.testing.assert_allclose(model.weight.detach().double().numpy(), w, atol=0.02)
    np.testing.assert_allclose(model.bias.detach().double().numpy(), b, atol=0.5)
    shown = coefficient_rows(train.stdout)  # the table shows the saved (raw-feature) weights
    np.testing.assert_allclose([shown[f"f{j}"] for j in range(4)], model.weight.detach().double().numpy().T, rtol=1e-5)
    assert png_size(plot_path) == (1000, 400)

    predict = _timed(["predict", str(model_path), str(data), "-o", str(out_path), "--backend", "torch"], tmp_path)
    assert predict.returncode == 0, predict.stderr
    with open(out_path) as f:
        assert f.readline() == "y0,y1\n"
    written = read_columns(out_path)
    assert written.shape == (1_000_000, 2)
    rows = rng.choice(1_000_000, 1000, replace=False)
    expected = predicted(model, read_columns(data, ["f0", "f1", "f2", "f3"]))[rows]
    # the written predictions read back as the float32 values the model computed
    np.testing.assert_array_equal(written[rows].astype(np.float32), expected)
    # the data hold y0 and y1, so predict scores them (on stdout, as the CSV went to -o)
    scored = metrics_rows(predict.stdout)
    want = expected_metrics(written, read_columns(data, ["y0", "y1"]))
    np.testing.assert_allclose([scored["y0"], scored["y1"]], np.stack([want["mse"], want["rmse"], want["r2"]]).T,
                               rtol=1e-5)


def _timed(args, tmp_path) -> subprocess.CompletedProcess:
    """run(), printing its wall and CPU time and peak RSS (shown with pytest -s)."""
    out, err = tmp_path / f"{args[0]}.out", tmp_path / f"{args[0]}.err"
    start = time.perf_counter()
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "linreg_fused", *args], stdout=o, stderr=e, env=USER_ENV)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    print(f"linreg-fused {args[0]}: {time.perf_counter() - start:.1f} s wall, "
          f"{usage.ru_utime + usage.ru_stime:.1f} s CPU, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB")
    return subprocess.CompletedProcess(args, proc.returncode, out.read_text(), err.read_text())


def test_train_crop_csv_like_the_tutorial_and_predict_to_stdout(tmp_path, capsys):
    model_path = tmp_path / "crop.safetensors"
    code, out, err = cli(capsys, "train", CROP_CSV, "--target", "apples,oranges", "--batch-size", "5", "--lr", "1e-5",
                         "--no-standardize", "--backend", "torch", "--save", model_path)
    assert code == 0, err
    assert "training FusedLinearRegressor(in_features=3, out_features=2" in out
    assert "on 15 rows: 100 epochs, batch 5, lr 1e-05, seed 0" in out
    assert sum(line.startswith("Epoch [") for line in out.splitlines()) == 10
    assert set(metrics_rows(out)) == {"apples", "oranges"}
    code, out, err = cli(capsys, "predict", model_path, CROP_CSV, "--backend", "torch")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "apples,oranges" and len(lines) == 16
    model = FusedLinearRegressor.load(model_path, backend="torch")
    x = read_columns(CROP_CSV, ["temp", "rainfall", "humidity"])
    got = np.array([[float(v) for v in line.split(",")] for line in lines[1:]], dtype=np.float32)
    np.testing.assert_array_equal(got, predicted(model, x))
    # The data hold the targets: the metrics go to stderr, beside the CSV on stdout.
    scored = metrics_rows(err)
    want = expected_metrics(got, read_columns(CROP_CSV, ["apples", "oranges"]))
    np.testing.assert_allclose([scored["apples"], scored["oranges"]],
                               np.stack([want["mse"], want["rmse"], want["r2"]]).T, rtol=1e-5)
    code, out, err = cli(capsys, "predict", model_path, CROP_CSV, "--backend", "torch", "-o", tmp_path / "p.csv",
                         "--json")
    assert code == 0 and err == "", err
    payload = json.loads(out)
    assert payload["targets"] == ["apples", "oranges"] and payload["rows"] == 15
    for key in ("mse", "rmse", "r2"):
        np.testing.assert_allclose(payload["metrics"][key], want[key], rtol=1e-6)


def test_predict_without_target_columns_prints_no_metrics(tmp_path, capsys):
    model_path = tmp_path / "m.safetensors"
    FusedLinearRegressor(2, 1).save(model_path, feature_names=["a", "b"], target_names=["y"])
    np.savez(tmp_path / "x.npz", a=np.arange(4.0), b=np.ones(4))
    code, out, err = cli(capsys, "predict", model_path, tmp_path / "x.npz", "-o", tmp_path / "p.csv", "--json",
                         "--backend", "torch")
    unscored = json.loads(out)
    assert code == 0 and unscored["metrics"] is None and unscored["dtype"] == "float32" and unscored["rows"] == 4
    np.savez(tmp_path / "xy.npz", a=np.arange(4.0), b=np.ones(4), y=np.arange(4.0))
    code, out, err = cli(capsys, "predict", model_path, tmp_path / "xy.npz", "-o", tmp_path / "p.csv", "--json",
                         "--backend", "torch")
    assert code == 0 and list(json.loads(out)) == list(unscored)  # the same keys, scored or not
    code, out, err = cli(capsys, "predict", model_path, tmp_path / "x.npz", "--backend", "torch")
    assert code == 0 and err == "" and out.splitlines()[0] == "y" and len(out.splitlines()) == 5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_is_the_models_and_the_datas(tmp_path, capsys, dtype):
    """--dtype sets the model's precision (saved in the file) and the data's on the device;
    predict follows the file unless told otherwise. The features sit near 1e4, where float32
    holds them to ~5e-4: the exact solver's statistics take the file's float64 values (not the
    data rounded to --dtype, which moved the intercept by 4e-5 relative), so the coefficients are
    float64 least squares rounded to the model's dtype."""
    rng = np.random.default_rng()
    x, y, _, _ = linear_data(40, 3, 1, noise=1e-3, rng=rng)
    x += 1e4
    write_csv(tmp_path / "d.csv", ["a", "b", "c", "y"], np.column_stack([x, y]))
    payload, _ = cli_json(capsys, "train", tmp_path / "d.csv", "--target", "y", "--dtype", dtype,
                          "--backend", "torch", "--save", tmp_path / "m.safetensors")
    torch_dtype = getattr(torch, dtype)
    assert payload["dtype"] == dtype and read_info(tmp_path / "m.safetensors").dtype == torch_dtype
    model = FusedLinearRegressor.load(tmp_path / "m.safetensors", backend="torch")
    assert model.weight.dtype == torch_dtype
    coef, intercept = least_squares(x, y)
    # the solve is float64 either way; the weights are then rounded to the model's dtype
    np.testing.assert_array_equal(payload["coef"], model.weight.detach().double().numpy())
    rtol = {"float32": 2e-7, "float64": 1e-9}[dtype]  # float32: its rounding (2⁻²⁴ relative) and a margin
    np.testing.assert_allclose(payload["coef"], coef, rtol=rtol)
    np.testing.assert_allclose(payload["intercept"], intercept, rtol=rtol)
    code, out, err = cli(capsys, "predict", tmp_path / "m.safetensors", tmp_path / "d.csv", "--backend", "torch")
    assert code == 0, err
    values = np.array(out.splitlines()[1:], dtype=dtype)  # written to read back as the computed values
    np.testing.assert_array_equal(values, predicted(model, x, torch_dtype)[:, 0])
    code, out, err = cli(capsys, "predict", tmp_path / "m.safetensors", tmp_path / "d.csv", "--backend", "torch",
                         "--dtype", "float32")
    values32 = np.array(out.splitlines()[1:], dtype=np.float32)
    np.testing.assert_array_equal(values32, predicted(model, x, torch.float32)[:, 0])
    if dtype == "float64":  # float32 predictions of a float64 model are rounded: they differ
        assert not np.array_equal(values, values32)


def test_train_features_option_npz_and_log_options(tmp_path, capsys):
    rng = np.random.default_rng()
    x, y, _, _ = linear_data(300, 3, 1, noise=0.01, rng=rng)
    np.savez(tmp_path / "d.npz", X=x, unused=rng.standard_normal(300), y=y[:, 0])
    code, out, err = cli(capsys, "train", tmp_path / "d.npz", "--target", "y", "--features", "X[0],X[1],X[2]",
                         "--epochs", "30", "--batch-size", "16", "--backend", "torch",
                         "--log-every", "0", "--save", tmp_path / "m.safetensors")
    assert code == 0, err
    assert "Epoch [" not in out and "(derived from the data), standardized features" in out
    assert metrics_rows(out)["y"][2] > 0.999
    assert read_info(tmp_path / "m.safetensors").feature_names == ["X[0]", "X[1]", "X[2]"]
    code, out, err = cli(capsys, "train", tmp_path / "d.npz", "--target", "y", "--epochs", "3",
                         "--backend", "torch", "--quiet")
    assert code == 0, err
    lines = out.splitlines()  # the model (a header, 4 features and the intercept), a blank, the metrics
    assert lines[0].startswith("feature") and lines[7].startswith("target") and len(lines) == 9


def test_train_momentum_weight_decay_and_validation_log(capsys):
    code, out, err = cli(capsys, "train", CROP_CSV, "--target", "apples", "--features", "temp,rainfall",
                         "--momentum", "0.5", "--weight-decay", "0.01", "--val-fraction", "0.2",
                         "--epochs", "20", "--batch-size", "4", "--backend", "torch")
    assert code == 0, err
    assert "momentum 0.5, weight decay 0.01" in out and "(3 more held out for validation)" in out
    logged = [line for line in out.splitlines() if line.startswith("Epoch [")]
    assert len(logged) == 2 and all(", Validation MSE: " in line for line in logged)
    assert len(metrics_rows(out)["apples"]) == 6  # train MSE, RMSE, R², val MSE, RMSE, R²


@pytest.mark.skipif(not HAS_ARROW, reason="needs pyarrow")
def test_train_on_parquet(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y, _, _ = linear_data(200, 2, 2, noise=0.01, rng=np.random.default_rng())
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "name": ["r"] * 200, "t1": y[:, 0], "t2": y[:, 1]}),
                   tmp_path / "d.parquet")
    code, out, err = cli(capsys, "train", tmp_path / "d.parquet", "--target", "t1,t2", "--features", "a,b",
                         "--epochs", "40", "--batch-size", "10", "--backend", "torch")
    assert code == 0, err
    assert all(row[2] > 0.999 for row in metrics_rows(out).values())


def test_semicolon_separated_file_with_the_delimiter_option(tmp_path, capsys):
    x, y, _, _ = linear_data(30, 2, 1, noise=0.1, rng=np.random.default_rng())
    write_csv(tmp_path / "d.csv", ["a", "b", "y"], np.column_stack([x, y]), delimiter=";")
    payload, _ = cli_json(capsys, "train", tmp_path / "d.csv", "--target", "y", "--delimiter", ";",
                          "--backend", "torch")
    np.testing.assert_allclose(payload["coef"], least_squares(x, y)[0], rtol=1e-4)


def test_plot_is_a_png_of_the_expected_size(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = tmp_path / "loss.png"
    code, out, err = cli(capsys, "train", CROP_CSV, "--target", "apples,oranges", "--epochs", "15",
                         "--backend", "torch", "--plot", path)
    assert code == 0, err
    assert png_size(path) == (1000, 400)
    pixels = matplotlib.image.imread(path)  # decodes as an image, not just a header
    assert pixels.shape[:2] == (400, 1000) and pixels.std() > 0.05


def test_predict_without_feature_names_uses_every_column_in_order(tmp_path, capsys):
    model = FusedLinearRegressor(2, 1, backend="torch")
    model.save(tmp_path / "m.safetensors")
    x = np.random.default_rng().standard_normal((5, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = cli(capsys, "predict", tmp_path / "m.safetensors", tmp_path / "x.npy", "--backend", "torch")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "y0"
    np.testing.assert_array_equal(np.array(lines[1:], dtype=np.float32), predicted(model, x)[:, 0])
    np.save(tmp_path / "x3.npy", np.ones((4, 3)))
    code, _, err = cli(capsys, "predict", tmp_path / "m.safetensors", tmp_path / "x3.npy")
    assert code == 2 and "records no feature names and expects 2 features" in err


def test_predict_takes_names_and_weights_from_one_file(tmp_path, monkeypatch, capsys):
    """A retrain replaces the model file (atomically) while predict reads the data: predict read
    the names from the old file and the weights from the new one, so with the features in another
    order it paired a's weight with b's column. Both files are the same model, y = a + 2b + 0.5."""
    from linreg_fused.cli import predicting

    path = tmp_path / "m.safetensors"

    def model(names, weights):
        m = FusedLinearRegressor(2, 1, dtype=torch.float64)
        with torch.no_grad():
            m.weight.copy_(torch.tensor([weights], dtype=torch.float64))
            m.bias.fill_(0.5)
        m.save(path, feature_names=names, target_names=["y"])

    model(["a", "b"], [1.0, 2.0])
    x = np.random.default_rng().standard_normal((6, 2))
    write_csv(tmp_path / "x.csv", ["a", "b"], x)
    read_data = predicting.read_columns

    def read_while_retrained(*args, **kwargs):
        model(["b", "a"], [2.0, 1.0])
        return read_data(*args, **kwargs)

    monkeypatch.setattr(predicting, "read_columns", read_while_retrained)
    code, out, err = cli(capsys, "predict", path, tmp_path / "x.csv", "--backend", "torch")
    assert code == 0, err
    np.testing.assert_allclose(np.loadtxt(out.splitlines()[1:]), x[:, 0] + 2 * x[:, 1] + 0.5, rtol=1e-15, atol=1e-15)
