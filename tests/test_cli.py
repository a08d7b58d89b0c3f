"""The command line: the seeded tutorial run, train/predict end to end on files (one of
10⁶ rows), plots, and errors that print one line and exit 2."""

import importlib.util
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import DEVICE

from linreg_fused import FusedLinearRegressor
from linreg_fused.cli import main
from linreg_fused.io import read_columns
from linreg_fused.serialization import read_info

HAS_ARROW = importlib.util.find_spec("pyarrow") is not None
CROP_CSV = os.path.join(os.path.dirname(__file__), "..", "linreg_fused", "data", "crop_yields.csv")


# A user's shell: without the TRITON_INTERPRET=1 that conftest sets for in-process tests, so on a
# machine without CUDA "auto" runs the PyTorch reference, as it does for someone who just installed.
USER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run(args) -> subprocess.CompletedProcess:
    """linreg-fused in a fresh interpreter (python -m linreg_fused), as a user runs it."""
    return subprocess.run([sys.executable, "-m", "linreg_fused", *args], capture_output=True, text=True,
                          env=USER_ENV)


def predicted(model: FusedLinearRegressor, x) -> np.ndarray:
    """What ``predict`` computes for ``x``: the model's float32 outputs on the device the CLI
    picks by default (CUDA when there is one, as conftest's DEVICE), all rows in one call. The
    same matmul on the same device gives the same bits; a CPU and a CUDA one can differ in the last."""
    with torch.no_grad():
        return model.to(DEVICE)(torch.as_tensor(x, dtype=torch.float32, device=DEVICE)).cpu().numpy()


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def linear_data(n, d, o, noise, rng):
    """x (n, d) with varied means and scales, y = x·wᵀ + b + noise, and the true w, b."""
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 20, d) + rng.uniform(-50, 50, d)
    w, b = rng.uniform(-3, 3, (o, d)), rng.uniform(-10, 10, o)
    y = x @ w.T + b + noise * rng.standard_normal((n, o))
    return x, y, w, b


def write_csv(path, names, values, fmt="%.17g"):
    """A CSV of ``values`` whose cells read back exactly (pyarrow writes faster when present)."""
    if HAS_ARROW:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        with open(path, "w") as f:
            f.write(",".join(names) + "\n")
        with open(path, "ab") as f:
            pacsv.write_csv(pa.table({n: values[:, i] for i, n in enumerate(names)}), f,
                            pacsv.WriteOptions(include_header=False))
        return
    with open(path, "w") as f:
        f.write(",".join(names) + "\n")
        np.savetxt(f, values, fmt="%.9g" if values.dtype == np.float32 else fmt, delimiter=",")


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
    table = _metrics_rows(train.stdout)
    assert set(table) == {"y0", "y1"}
    for train_mse, train_r2, val_mse, val_r2 in table.values():
        assert train_r2 > 0.999 and val_r2 > 0.999  # noise 0.1 against targets of spread ~100
        assert val_mse < 0.1 and train_mse < 0.1  # near the noise floor 0.01 after 2 epochs
    info = read_info(model_path)
    assert info.feature_names == ["f0", "f1", "f2", "f3"] and info.target_names == ["y0", "y1"]
    np.testing.assert_allclose(info.input_scale, x.std(0), rtol=0.01)
    model = FusedLinearRegressor.load(model_path, backend="torch")  # applies to raw features
    np.testing.assert_allclose(model.weight.detach().double().numpy(), w, atol=0.02)
    np.testing.assert_allclose(model.bias.detach().double().numpy(), b, atol=0.5)
    assert _png_size(plot_path) == (1000, 400)

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


def _metrics_rows(stdout: str) -> dict[str, list[float]]:
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("target"))
    rows = {}
    for line in lines[head + 1:]:
        parts = line.split()
        if len(parts) < 3 or not re.fullmatch(r"[-+.\deE]+|nan|n/a", parts[1]):
            break
        rows[parts[0]] = [float(p) if p != "n/a" else float("nan") for p in parts[1:]]
    return rows


def _png_size(path) -> tuple[int, int]:
    raw = open(path, "rb").read(24)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def test_train_crop_csv_like_the_tutorial_and_predict_to_stdout(tmp_path, capsys):
    model_path = tmp_path / "crop.safetensors"
    code, out, err = cli(capsys, "train", CROP_CSV, "--target", "apples,oranges", "--batch-size", "5",
                         "--backend", "torch", "--save", str(model_path))
    assert code == 0, err
    assert "training FusedLinearRegressor(in_features=3, out_features=2" in out
    assert "on 15 rows: 100 epochs, batch 5, lr 1e-05, seed 0" in out
    assert sum(line.startswith("Epoch [") for line in out.splitlines()) == 10
    assert set(_metrics_rows(out)) == {"apples", "oranges"}
    code, out, err = cli(capsys, "predict", str(model_path), CROP_CSV, "--backend", "torch")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "apples,oranges" and len(lines) == 16
    model = FusedLinearRegressor.load(model_path, backend="torch")
    expected = predicted(model, read_columns(CROP_CSV, ["temp", "rainfall", "humidity"]))
    got = np.array([[float(v) for v in line.split(",")] for line in lines[1:]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)


def test_train_features_option_npz_and_log_options(tmp_path, capsys):
    rng = np.random.default_rng()
    x, y, _, _ = linear_data(300, 3, 1, noise=0.01, rng=rng)
    np.savez(tmp_path / "d.npz", X=x, unused=rng.standard_normal(300), y=y[:, 0])
    code, out, err = cli(capsys, "train", str(tmp_path / "d.npz"), "--target", "y", "--features", "X[0],X[1],X[2]",
                         "--standardize", "--epochs", "30", "--batch-size", "16", "--backend", "torch",
                         "--log-every", "0", "--save", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    assert "Epoch [" not in out and "lr 0.01, standardized features" in out
    assert _metrics_rows(out)["y"][1] > 0.999
    assert read_info(tmp_path / "m.safetensors").feature_names == ["X[0]", "X[1]", "X[2]"]
    code, out, err = cli(capsys, "train", str(tmp_path / "d.npz"), "--target", "y", "--epochs", "3",
                         "--backend", "torch", "--quiet")
    assert code == 0 and out.splitlines()[0].startswith("target") and len(out.splitlines()) == 2


def test_train_momentum_weight_decay_and_validation_log(capsys):
    code, out, err = cli(capsys, "train", CROP_CSV, "--target", "apples", "--features", "temp,rainfall",
                         "--momentum", "0.5", "--weight-decay", "0.01", "--val-fraction", "0.2",
                         "--epochs", "20", "--batch-size", "4", "--backend", "torch")
    assert code == 0, err
    assert "momentum 0.5, weight decay 0.01" in out and "(3 more held out for validation)" in out
    logged = [line for line in out.splitlines() if line.startswith("Epoch [")]
    assert len(logged) == 2 and all(", Validation MSE: " in line for line in logged)
    assert len(_metrics_rows(out)["apples"]) == 4  # train MSE, R², val MSE, R²


@pytest.mark.skipif(not HAS_ARROW, reason="needs pyarrow")
def test_train_on_parquet(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y, _, _ = linear_data(200, 2, 2, noise=0.01, rng=np.random.default_rng())
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "name": ["r"] * 200, "t1": y[:, 0], "t2": y[:, 1]}),
                   tmp_path / "d.parquet")
    code, out, err = cli(capsys, "train", str(tmp_path / "d.parquet"), "--target", "t1,t2", "--features", "a,b",
                         "--standardize", "--epochs", "40", "--batch-size", "10", "--backend", "torch")
    assert code == 0, err
    assert all(row[1] > 0.999 for row in _metrics_rows(out).values())


def test_plot_is_a_png_of_the_expected_size(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = tmp_path / "loss.png"
    code, out, err = cli(capsys, "train", CROP_CSV, "--target", "apples,oranges", "--epochs", "15",
                         "--backend", "torch", "--plot", str(path))
    assert code == 0, err
    assert _png_size(path) == (1000, 400)
    pixels = matplotlib.image.imread(path)  # decodes as an image, not just a header
    assert pixels.shape[:2] == (400, 1000) and pixels.std() > 0.05


def test_exact_solver_matches_least_squares(tmp_path, capsys):
    rng = np.random.default_rng()
    x, y, _, _ = linear_data(500, 3, 2, noise=0.5, rng=rng)
    write_csv(tmp_path / "d.csv", ["a", "b", "c", "y0", "y1"], np.column_stack([x, y]), fmt="%.17g")
    code, out, err = cli(capsys, "train", str(tmp_path / "d.csv"), "--target", "y0,y1", "--solver", "exact",
                         "--backend", "torch", "--save", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    assert "exactly (least squares)" in out and "Epoch" not in out
    z = np.column_stack([x, np.ones(len(x))])
    coef = np.linalg.lstsq(z, y, rcond=None)[0]
    model = FusedLinearRegressor.load(tmp_path / "m.safetensors")
    np.testing.assert_allclose(model.weight.detach().double().numpy(), coef[:3].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.bias.detach().double().numpy(), coef[3], rtol=1e-4, atol=1e-3)
    code, out, err = cli(capsys, "train", str(tmp_path / "d.csv"), "--target", "y0", "--solver", "exact",
                         "--alpha", "10", "--backend", "torch")
    assert code == 0 and "ridge, alpha 10" in out


# ---------------------------------------------------------------- errors: one line, exit 2

@pytest.fixture
def bad_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b,y\n1,2,3\n4,five,6\n7,8,nan\n")
    return path


def _error_cases(tmp_path, bad_csv):
    model = tmp_path / "m.safetensors"
    FusedLinearRegressor(3, 2).save(model, feature_names=["temp", "rainfall", "humidity"])
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    return [
        (["train", CROP_CSV, "--target", "pears"], "no column 'pears' (columns: temp, rainfall, humidity"),
        (["train", str(bad_csv), "--target", "y", "--features", "a,b"], "row 2 (line 3), column 'b': 'five' is not a number"),
        (["train", str(bad_csv), "--target", "y", "--features", "a"], "row 3, column 'y': a missing value"),
        (["train", str(tmp_path / "none.csv"), "--target", "y"], "none.csv: no such file"),
        (["train", CROP_CSV], "the following arguments are required: --target"),
        (["train", CROP_CSV, "--target", "apples", "--epochs", "0"], "argument --epochs: invalid positive integer value: '0'"),
        (["train", CROP_CSV, "--target", "apples", "--lr", "-1"], "argument --lr: invalid positive number value: '-1'"),
        (["train", CROP_CSV, "--target", "apples", "--val-fraction", "1.5"], "invalid fraction in [0, 1) value"),
        (["train", CROP_CSV, "--target", "apples", "--val-fraction", "0.01"], "leaves 0 validation and 15 training rows"),
        (["train", CROP_CSV, "--target", "apples", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", CROP_CSV, "--target", "apples", "--features", "temp,apples"], "'apples' is both a feature and a target"),
        (["train", CROP_CSV, "--target", "apples", "--solver", "exact", "--epochs", "5"], "--epochs is an SGD option"),
        (["train", CROP_CSV, "--target", "apples", "--alpha", "1"], "--alpha is the ridge penalty of --solver exact"),
        (["train", CROP_CSV, "--target", "apples", "--save", str(tmp_path / "no" / "m.safetensors")], "does not exist"),
        (["train", CROP_CSV, "--target", "apples", "--device", "toaster"], "--device 'toaster' is not a device"),
        (["predict", str(tmp_path / "junk.safetensors"), CROP_CSV], "not a safetensors model file"),
        (["predict", str(model), str(bad_csv)], "no column 'temp'"),
        (["--epochs", "ten"], "argument --epochs: invalid positive integer value: 'ten'"),
    ]


def test_errors_print_one_line_and_exit_2(tmp_path, bad_csv, capsys):
    for args, message in _error_cases(tmp_path, bad_csv):
        code, out, err = cli(capsys, *args)
        assert code == 2, (args, out, err)
        assert err.count("\n") == 1 and err.startswith("linreg-fused: error: ") and message in err, (args, err)
        assert "Traceback" not in err and out == ""


def test_errors_in_a_fresh_process_have_no_traceback(tmp_path, bad_csv):
    proc = run(["train", str(bad_csv), "--target", "y", "--features", "a,b"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.endswith("column 'b': 'five' is not a number\n") and proc.stderr.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_and_triton_where_they_cannot_run(monkeypatch, capsys):
    code, out, err = cli(capsys, "--device", "cuda")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("linreg-fused: error: --device cuda: CUDA is not available")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the backend reads it when it chooses
    code, out, err = cli(capsys, "train", CROP_CSV, "--target", "apples", "--backend", "triton")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "backend='triton' cannot run here" in err and "TRITON_INTERPRET=1" in err


def test_plot_without_matplotlib_says_how_to_install_before_training(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importlib finds no matplotlib
    code, out, err = cli(capsys, "train", CROP_CSV, "--target", "apples", "--plot", "loss.png")
    assert code == 2 and out == ""
    assert err == "linreg-fused: error: plotting needs matplotlib: pip install matplotlib (the plot extra)\n"


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
def test_divergence_prints_one_line_and_exits_1(capsys):
    code, out, err = cli(capsys, "train", CROP_CSV, "--target", "apples", "--lr", "1", "--epochs", "5")
    assert code == 1 and err.count("\n") == 1 and "smaller learning rate" in err


def test_predict_without_feature_names_uses_every_column_in_order(tmp_path, capsys):
    model = FusedLinearRegressor(2, 1, backend="torch")
    model.save(tmp_path / "m.safetensors")
    x = np.random.default_rng().standard_normal((5, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = cli(capsys, "predict", str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy"),
                         "--backend", "torch")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "y0"
    np.testing.assert_array_equal(np.array(lines[1:], dtype=np.float32), predicted(model, x)[:, 0])
    np.save(tmp_path / "x3.npy", np.ones((4, 3)))
    code, _, err = cli(capsys, "predict", str(tmp_path / "m.safetensors"), str(tmp_path / "x3.npy"))
    assert code == 2 and "records no feature names and expects 2 features" in err
