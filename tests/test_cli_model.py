"""The model `linreg-fused train` gives by default and what it shows: the auto solver, SGD's
standardisation and derived learning rate, the coefficient and metrics tables and their
JSON, checked against the saved weights, least squares and metrics computed here; and a
run's weights against fit's under the same options and seed."""

import numpy as np
import pytest
import torch
from cli_helpers import (CROP_CSV, cli, cli_json, coefficient_rows, expected_metrics, least_squares, linear_data,
                         metrics_rows, write_csv)

from linreg_fused import FusedLinearRegressor, FusedSGD
from linreg_fused.cli.report import coefficient_table
from linreg_fused.io import read_columns


@pytest.fixture
def data_csv(tmp_path):
    """Odd-sized random data: 57 rows, 3 features, 2 targets, written to a CSV."""
    x, y, _, _ = linear_data(57, 3, 2, noise=0.5, rng=np.random.default_rng())
    path = tmp_path / "d.csv"
    write_csv(path, ["a", "b", "c", "y0", "y1"], np.column_stack([x, y]))
    return path, x, y


def test_auto_solver_is_exact_and_the_tables_show_the_saved_model(data_csv, tmp_path, capsys):
    path, x, y = data_csv
    model_path = tmp_path / "m.safetensors"
    code, out, err = cli(capsys, "train", path, "--target", "y0,y1", "--backend", "torch", "--save", model_path)
    assert code == 0 and err == "", err
    assert "exactly (least squares) on 57 rows" in out and "Epoch" not in out
    model = FusedLinearRegressor.load(model_path, backend="torch")
    weight, bias = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    coef, intercept = least_squares(x.astype(np.float32), y.astype(np.float32))
    np.testing.assert_allclose(weight, coef, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias, intercept, rtol=1e-4, atol=1e-4)
    # The table: a row per feature and the intercept, a column per target, 6 significant digits.
    rows = coefficient_rows(out)
    assert list(rows) == ["a", "b", "c", "intercept"]
    # Each target shows coef, std err and t (the exact solver's summary): the coefficients are every third.
    np.testing.assert_allclose([rows[n][0::3] for n in "abc"], weight.T, rtol=1e-5)
    np.testing.assert_allclose(rows["intercept"][0::3], bias, rtol=1e-5)
    # The metrics: of the saved model's predictions on the training rows, computed here in float64.
    want = expected_metrics(x @ weight.T + bias, y)
    shown = metrics_rows(out)
    np.testing.assert_allclose([shown["y0"], shown["y1"]], np.stack([want["mse"], want["rmse"], want["r2"]]).T,
                               rtol=1e-4)
    # --json: the same model and metrics, every digit.
    payload, err = cli_json(capsys, "train", path, "--target", "y0,y1", "--backend", "torch")
    assert payload["solver"] == "exact" and payload["features"] == ["a", "b", "c"]
    assert payload["targets"] == ["y0", "y1"] and payload["rows"] == {"train": 57, "val": 0}
    np.testing.assert_array_equal(payload["coef"], weight)
    np.testing.assert_array_equal(payload["intercept"], bias)
    for key in ("mse", "rmse", "r2"):
        np.testing.assert_allclose(payload["metrics"]["train"][key], want[key], rtol=1e-4)


def test_sgd_options_switch_to_sgd_which_standardizes_by_default(data_csv, capsys):
    path = data_csv[0]
    for options, solver in ((["--epochs", "2"], "sgd"), (["--momentum", "0.5"], "sgd"), (["--solver", "sgd"], "sgd"),
                            (["--alpha", "1"], "exact"), ([], "exact")):
        payload, _ = cli_json(capsys, "train", path, "--target", "y0", "--backend", "torch", *options)
        assert payload["solver"] == solver, options
        assert payload["standardize"] == (solver == "sgd"), options
    payload, _ = cli_json(capsys, "train", path, "--target", "y0", "--backend", "torch", "--epochs", "2",
                          "--no-standardize")
    assert not payload["standardize"] and payload["sgd"]["lr_derived"]
    payload, _ = cli_json(capsys, "train", path, "--target", "y0", "--backend", "torch", "--standardize")
    assert payload["solver"] == "exact" and payload["standardize"]
    code, out, _ = cli(capsys, "train", path, "--target", "y0", "--backend", "torch", "--epochs", "2")
    assert "standardized features" in out and "(derived from the data)" in out


def _diabetes_csv(tmp_path):
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    data = sklearn_datasets.load_diabetes(scaled=False)  # shipped with scikit-learn: no download
    path = tmp_path / "diabetes.csv"
    write_csv(path, [*data.feature_names, "y"], np.column_stack([data.data, data.target]))
    return path, data.data, data.target[:, None]


def test_derived_learning_rate_converges_on_diabetes(tmp_path, capsys):
    """The defaults give a useful model: SGD at the derived learning rate on standardised
    features reaches R² within 0.02 of least squares' 0.518 in 100 epochs of batch 32, full
    batch within 0.01 and its loss never rises; the tutorial's lr 1e-5 on raw features ends
    below the intercept-only model's R² of 0, and a one-line warning says so and what to try."""
    path, x, y = _diabetes_csv(tmp_path)
    coef, intercept = least_squares(x, y)
    best = expected_metrics(x @ coef.T + intercept, y)["r2"][0]

    payload, err = cli_json(capsys, "train", path, "--target", "y", "--epochs", "100", "--backend", "torch")
    assert payload["sgd"]["batch_size"] == 32 and payload["sgd"]["lr_derived"] and err == ""
    assert best - 0.02 < payload["metrics"]["train"]["r2"][0] <= best + 1e-9

    # The rule, from the standardised rows z = (x, 1): B / (max‖z‖² + (B − 1)·λmax(E[z zᵀ])) · O/2.
    z = np.column_stack([(x - x.mean(0)) / x.std(0), np.ones(len(x))])
    lam, beta = np.linalg.eigvalsh(z.T @ z / len(z))[-1], (z * z).sum(1).max()
    for batch in (32, len(x)):
        assert np.isclose(_lr(capsys, path, batch), batch / (beta + (batch - 1) * lam) / 2, rtol=1e-5)

    payload, _ = cli_json(capsys, "train", path, "--target", "y", "--batch-size", str(len(x)), "--backend", "torch")
    history = payload["loss_history"]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:]))  # gradient descent below 2/L
    assert best - 0.01 < payload["metrics"]["train"]["r2"][0]

    code, out, err = cli(capsys, "train", path, "--target", "y", "--lr", "1e-5", "--no-standardize",
                         "--epochs", "5", "--backend", "torch", "--quiet")
    assert code == 0 and metrics_rows(out)["y"][2] < 0
    assert err.count("\n") == 1 and err.startswith("linreg-fused: warning: training R² of 'y' is -")
    assert "leaving --no-standardize out" in err and "--solver exact" in err


def _lr(capsys, path, batch: int) -> float:
    payload, _ = cli_json(capsys, "train", path, "--target", "y", "--batch-size", str(batch), "--epochs", "1",
                          "--backend", "torch")
    return payload["sgd"]["lr"]


@pytest.mark.parametrize("standardize", [False, True])
def test_sgd_options_train_what_fit_trains(tmp_path, capsys, standardize):
    """A run's weights are fit's with the same --lr, --momentum, --weight-decay, --epochs,
    --batch-size and --seed (and standardisation, folded into the saved weights); a run
    without momentum or weight decay ends elsewhere, so the check sees both options."""
    rng = np.random.default_rng()
    x = rng.standard_normal((45, 3)) * [1.0, 2.0, 0.5] + [1.0, -1.0, 3.0]
    y = x @ rng.uniform(-3, 3, (3, 2)) + rng.uniform(-5, 5, 2) + rng.standard_normal((45, 2))
    write_csv(tmp_path / "d.csv", ["a", "b", "c", "y0", "y1"], np.column_stack([x, y]))
    lr = 0.05 if standardize else 0.01
    options = dict(lr=lr, momentum=0.7, weight_decay=0.3, epochs=4, batch_size=7, seed=5)

    def cli_weights(**opts):
        args = [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        payload, _ = cli_json(capsys, "train", tmp_path / "d.csv", "--target", "y0,y1", "--backend", "torch",
                              "--standardize" if standardize else "--no-standardize", *args)
        return np.array(payload["coef"]), np.array(payload["intercept"])

    z = (x - x.mean(0)) / x.std(0) if standardize else x
    torch.manual_seed(options["seed"])
    model = FusedLinearRegressor(3, 2, backend="torch")
    opt = FusedSGD(model.parameters(), lr=lr, momentum=options["momentum"], weight_decay=options["weight_decay"],
                   backend="torch")
    model.fit(torch.tensor(z, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), epochs=options["epochs"],
              batch_size=options["batch_size"], optimizer=opt, seed=options["seed"], progress=False)
    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    if standardize:  # the CLI shows weights for raw features
        w, b = w / x.std(0), b - (w / x.std(0)) @ x.mean(0)
    coef, intercept = cli_weights(**options)
    np.testing.assert_allclose(coef, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(intercept, b, rtol=1e-5, atol=1e-5)
    for dropped in ("momentum", "weight_decay"):
        other, _ = cli_weights(**{**options, dropped: 0.0})
        assert np.abs(other - coef).max() > 1e-3 * np.abs(coef).max(), dropped


def test_standard_errors_where_the_solver_gives_them(data_csv, capsys):
    """The exact solver's table adds each coefficient's standard error and t statistic
    (LinearStats.summary; checked here against the OLS formulas σ²·(ZᵀZ)⁻¹)."""
    path, x, y = data_csv
    code, out, _ = cli(capsys, "train", path, "--target", "y0,y1", "--backend", "torch", "--dtype", "float64")
    payload, _ = cli_json(capsys, "train", path, "--target", "y0,y1", "--backend", "torch", "--dtype", "float64")
    z = np.column_stack([x, np.ones(len(x))])
    coef = np.linalg.lstsq(z, y, rcond=None)[0]
    sigma2 = ((z @ coef - y) ** 2).sum(0) / (len(x) - z.shape[1])
    se = np.sqrt(np.outer(sigma2, np.diag(np.linalg.inv(z.T @ z))))  # (targets, features + 1)
    np.testing.assert_allclose(payload["std_err"], se[:, :-1], rtol=1e-6)
    np.testing.assert_allclose(payload["intercept_std_err"], se[:, -1], rtol=1e-6)
    np.testing.assert_allclose(payload["t_values"], coef[:-1].T / se[:, :-1], rtol=1e-6)
    assert "std err" in out and len(coefficient_rows(out)["a"]) == 6  # coef, std err, t per target


def test_coefficient_table_shows_only_the_columns_it_is_given():
    features, targets = ["x1", "a_long_feature_name"], ["t"]
    plain = coefficient_table(features, targets, [[1.5, -2.0]], [0.25])
    assert "std err" not in plain and plain.splitlines()[-1].split() == ["intercept", "0.25"]
    full = coefficient_table(features, targets, [[1.5, -2.0]], [0.25], std_err=[[0.1, float("nan")]],
                             t_values=[[15.0, float("nan")]], intercept_std_err=[0.05], intercept_t=[5.0])
    lines = full.splitlines()
    assert lines[1].split() == ["coef", "std", "err", "t"]
    assert lines[2].split() == ["x1", "1.5", "0.1", "15"]
    assert lines[3].split() == ["a_long_feature_name", "-2", "n/a", "n/a"]  # not determined by the data
    assert lines[4].split() == ["intercept", "0.25", "0.05", "5"]
    no_intercept_se = coefficient_table(features, targets, [[1.5, -2.0]], [0.25], std_err=[[0.1, 0.2]],
                                        t_values=[[15.0, -10.0]])
    assert no_intercept_se.splitlines()[-1].split() == ["intercept", "0.25"]  # blank, not a made-up number
    many = coefficient_table([f"f{i}" for i in range(50)], targets, [list(range(50))], None)
    assert many.splitlines()[-1] == "… 10 more features (--json lists them all)"


def test_crop_data_with_defaults_gives_the_least_squares_model(capsys):
    payload, err = cli_json(capsys, "train", CROP_CSV, "--target", "apples,oranges", "--backend", "torch")
    x = read_columns(CROP_CSV, ["temp", "rainfall", "humidity"])
    y = read_columns(CROP_CSV, ["apples", "oranges"])
    coef, intercept = least_squares(x, y)
    np.testing.assert_allclose(payload["coef"], coef, rtol=1e-4)
    assert all(r2 > 0.99 for r2 in payload["metrics"]["train"]["r2"]) and err == ""


def test_train_scores_the_files_values_as_predict_does(tmp_path, capsys):
    """Targets near 1e6 with noise 0.01: float32 holds them to 0.06. The exact solve takes the file's
    float64 values (from float32-rounded targets the coefficient of a was 2e-4 off), and train's
    metrics are those predict prints for the saved model on the same file (train scored the
    float32-rounded targets: MSE 5.2e-4 where predict said 4.4e-4)."""
    rng = np.random.default_rng()
    x = rng.standard_normal((300, 2))
    y = 1e6 + x @ np.array([3.0, -2.0]) + 0.01 * rng.standard_normal(300)
    path, model_path = tmp_path / "d.csv", tmp_path / "m.safetensors"
    write_csv(path, ["a", "b", "y"], np.column_stack([x, y]))
    payload, err = cli_json(capsys, "train", path, "--target", "y", "--backend", "torch", "--save", model_path)
    assert err == "", err
    coef, intercept = least_squares(x, y)
    np.testing.assert_allclose(payload["coef"], coef.astype(np.float32), rtol=1e-6)
    scored, _ = cli_json(capsys, "predict", model_path, path, "-o", tmp_path / "p.csv", "--backend", "torch")
    for key in ("mse", "rmse", "r2"):
        np.testing.assert_allclose(payload["metrics"]["train"][key], scored["metrics"][key], rtol=1e-12)


def test_predict_writes_unscored_predictions_when_the_targets_are_empty(tmp_path, capsys):
    """New rows to score often come with the target column present and empty: predict writes their
    predictions and says, on one line, why nothing was scored (it failed on the first empty cell)."""
    x, y, _, _ = linear_data(9, 2, 1, noise=0.1, rng=np.random.default_rng())
    path, model_path = tmp_path / "d.csv", tmp_path / "m.safetensors"
    write_csv(path, ["a", "b", "y"], np.column_stack([x, y]))
    code, _, err = cli(capsys, "train", path, "--target", "y", "--backend", "torch", "--save", model_path, "--quiet")
    assert code == 0, err
    lines = path.read_text().splitlines()
    (tmp_path / "new.csv").write_text("\n".join([lines[0]] + [line.rsplit(",", 1)[0] + "," for line in lines[1:]]))
    code, out, err = cli(capsys, "predict", model_path, tmp_path / "new.csv", "--backend", "torch")
    assert code == 0 and err.count("\n") == 1 and "not scored" in err and "'y'" in err, err
    assert cli(capsys, "predict", model_path, path, "-o", tmp_path / "p.csv", "--backend", "torch")[0] == 0
    assert out == (tmp_path / "p.csv").read_text()


def test_standardising_changes_neither_the_exact_model_nor_its_standard_errors(data_csv, capsys):
    """Least squares is invariant under standardisation: with --standardize the raw coefficients'
    standard errors (w / scale: divided by the scale) and t values are those of the plain run."""
    path, _, _ = data_csv
    plain, _ = cli_json(capsys, "train", path, "--target", "y0,y1", "--backend", "torch", "--dtype", "float64")
    scaled, _ = cli_json(capsys, "train", path, "--target", "y0,y1", "--backend", "torch", "--dtype", "float64",
                         "--standardize")
    for key in ("coef", "std_err", "t_values"):
        np.testing.assert_allclose(scaled[key], plain[key], rtol=1e-9, err_msg=key)


def test_derived_lr_takes_momentum_and_json_writes_nan_as_null(tmp_path, capsys):
    """The derived step is scaled by (1 − momentum) on mini-batches (the effective step η/(1 − μ)
    would multiply the gradient noise); a constant target's R² (NaN) is null in strict JSON; a
    constant feature, standardised, is centred and left unscaled (not divided by its zero std)."""
    x, y, _, _ = linear_data(40, 2, 1, noise=0.1, rng=np.random.default_rng())
    values = np.column_stack([x, np.full(40, 3.0), y, np.full(40, 7.0)])
    path = tmp_path / "d.csv"
    write_csv(path, ["a", "b", "const", "y", "flat"], values)
    common = ("--backend", "torch", "--epochs", "30", "--batch-size", "8")
    plain, _ = cli_json(capsys, "train", path, "--target", "y,flat", *common)
    heavy, _ = cli_json(capsys, "train", path, "--target", "y,flat", *common, "--momentum", "0.9")
    assert plain["sgd"]["lr_derived"] and heavy["sgd"]["lr_derived"]
    assert heavy["sgd"]["lr"] == pytest.approx(0.1 * plain["sgd"]["lr"], rel=1e-12)
    assert plain["metrics"]["train"]["r2"][1] is None  # the constant target
    assert plain["metrics"]["train"]["r2"][0] > 0.9 and np.isfinite(plain["coef"]).all()


def test_validation_rows_are_held_out_of_training(tmp_path, capsys):
    """--val-fraction 0.25 of 40 rows: 30 train and 10 validate, none of them in both."""
    x, y, _, _ = linear_data(40, 2, 1, noise=0.1, rng=np.random.default_rng())
    path = tmp_path / "d.csv"
    write_csv(path, ["a", "b", "y"], np.column_stack([x, y]))
    payload, _ = cli_json(capsys, "train", path, "--target", "y", "--backend", "torch", "--val-fraction", "0.25")
    assert payload["rows"] == {"train": 30, "val": 10}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_standardised_training_scores_the_model_it_saves(tmp_path, capsys, dtype):
    """Features near 1e5 with spread 0.1, standardised in training (SGD's default, or --standardize):
    the model is saved folded for raw values, and in float32 the raw values and the folded
    intercept lose digits. train scored the standardised model (R² 0.99998 where predict gave
    0.9967 for the saved model on the same file); its metrics are now predict's, and in float64
    the saved model predicts as least squares does."""
    rng = np.random.default_rng()
    x = 1e5 + 0.1 * rng.standard_normal((120, 2))
    y = (x - 1e5) @ np.array([15.0, -20.0]) + 3 + 0.01 * rng.standard_normal(120)
    path, model_path, out = tmp_path / "d.csv", tmp_path / "m.safetensors", tmp_path / "p.csv"
    write_csv(path, ["a", "b", "y"], np.column_stack([x, y]))
    coef, intercept = least_squares(x, y)
    for solver in (["--standardize"], ["--epochs", "20"]):
        trained, _ = cli_json(capsys, "train", path, "--target", "y", "--backend", "torch", "--dtype", dtype,
                              "--save", model_path, *solver)
        scored, _ = cli_json(capsys, "predict", model_path, path, "-o", out, "--backend", "torch")
        for key in ("mse", "rmse", "r2"):
            np.testing.assert_allclose(trained["metrics"]["train"][key], scored["metrics"][key], rtol=1e-12)
        if dtype == "float64" and solver == ["--standardize"]:
            pred = np.loadtxt(out, delimiter=",", skiprows=1)
            np.testing.assert_allclose(pred, x @ coef[0] + intercept[0], rtol=0, atol=1e-6 * np.abs(y).max())


def test_an_unnamed_column_is_not_a_default_feature(tmp_path, capsys):
    """pandas' DataFrame.to_csv writes the index first, under an empty name: train used the row
    numbers as a feature (and predict then depended on where a row sits in its file). The unnamed
    column is left out, with one warning line; the model is least squares on the named columns."""
    x, y, _, _ = linear_data(23, 2, 1, noise=0.5, rng=np.random.default_rng())
    path = tmp_path / "pandas.csv"
    write_csv(path, ["", "a", "b", "y"], np.column_stack([np.arange(23.0), x, y]))
    payload, err = cli_json(capsys, "train", path, "--target", "y", "--backend", "torch", "--dtype", "float64")
    assert payload["features"] == ["a", "b"] and err.count("\n") == 1 and "without a name" in err, err
    coef, intercept = least_squares(x, y)
    np.testing.assert_allclose(payload["coef"], coef, rtol=1e-9)
    np.testing.assert_allclose(payload["intercept"], intercept, rtol=1e-9)
