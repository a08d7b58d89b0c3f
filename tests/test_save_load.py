"""Model files: safetensors round trip with metadata, nn.Linear interop, standardisation
folding, atomic writes, and clear errors for files that are not models."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from linreg_fused import FusedLinearRegressor, serialization
from linreg_fused.serialization import ModelFileError, fold_standardization, read_info


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_is_bitwise_with_metadata(tmp_path, dtype, bias):
    model = FusedLinearRegressor(5, 3, bias, dtype=dtype, backend="torch")
    path = tmp_path / "m.safetensors"
    mean, scale = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    model.save(path, feature_names=list("abcde"), target_names=["y0", "y1", "y2"], input_mean=mean,
               input_scale=scale)
    loaded = FusedLinearRegressor.load(path, backend="torch")
    assert loaded.weight.dtype == dtype and torch.equal(loaded.weight, model.weight)
    assert (loaded.bias is None) == (not bias)
    if bias:
        assert torch.equal(loaded.bias, model.bias)
    info = read_info(path)
    assert (info.in_features, info.out_features, info.bias, info.dtype) == (5, 3, bias, dtype)
    assert info.feature_names == list("abcde") and info.target_names == ["y0", "y1", "y2"]
    assert info.input_mean == mean.tolist() and info.input_scale == scale.tolist()  # exact floats
    assert info.library_version == __import__("linreg_fused").__version__


def test_file_is_safetensors_not_pickle(tmp_path):
    path = tmp_path / "m.safetensors"
    FusedLinearRegressor(3, 2).save(path)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # a JSON header, then raw tensor bytes
    assert set(header) == {"__metadata__", "weight", "bias"}
    assert header["__metadata__"]["format"] == "linreg-fused"


def test_plain_nn_linear_loads_the_file_and_predicts_the_same(tmp_path):
    model = FusedLinearRegressor(4, 2, backend="torch")
    path = tmp_path / "m.safetensors"
    model.save(path, target_names=["apples", "oranges"])
    linear = nn.Linear(4, 2)
    linear.load_state_dict(load_file(path))  # the README's recipe
    x = torch.randn(9, 4)
    assert torch.equal(linear(x), model(x))


def test_loads_a_state_dict_saved_by_other_code(tmp_path):
    linear = nn.Linear(6, 1, dtype=torch.float64)
    save_file(linear.state_dict(), tmp_path / "plain.safetensors")
    model = FusedLinearRegressor.load(tmp_path / "plain.safetensors", backend="torch")
    assert torch.equal(model.weight, linear.weight) and torch.equal(model.bias, linear.bias)
    info = read_info(tmp_path / "plain.safetensors")
    assert info.feature_names is None and info.library_version is None


def test_load_to_a_device_and_backend(tmp_path, device):
    model = FusedLinearRegressor(3, 2)
    model.save(tmp_path / "m.safetensors")
    loaded = FusedLinearRegressor.load(tmp_path / "m.safetensors", device=device, backend="torch")
    assert loaded.weight.device.type == device.type and loaded.backend == "torch"
    assert torch.equal(loaded.weight.cpu(), model.weight)


def test_fold_standardization_matches_the_standardised_model():
    x = torch.randn(50, 4, dtype=torch.float64) * 100 + 1e3
    mean, scale = x.mean(0), x.std(0)
    weight, bias = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    expected = ((x - mean) / scale) @ weight.T + bias
    w_raw, b_raw = fold_standardization(weight, bias, mean, scale)
    torch.testing.assert_close(x @ w_raw.T + b_raw, expected, rtol=1e-12, atol=1e-9)
    w_raw, b_raw = fold_standardization(weight, None, mean, scale)
    torch.testing.assert_close(x @ w_raw.T + b_raw, expected - bias, rtol=1e-12, atol=1e-9)


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    old = FusedLinearRegressor(3, 2)
    old.save(path)
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        FusedLinearRegressor(3, 2).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


def test_saved_file_has_a_normal_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    FusedLinearRegressor(3, 2).save(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_checks_metadata_sizes(tmp_path):
    model = FusedLinearRegressor(3, 2)
    with pytest.raises(ValueError, match="feature_names has 2 names for 3 features"):
        model.save(tmp_path / "m.safetensors", feature_names=["a", "b"])
    with pytest.raises(ValueError, match="target_names has 1 names for 2 targets"):
        model.save(tmp_path / "m.safetensors", target_names=["a"])
    with pytest.raises(ValueError, match="both input_mean and input_scale"):
        model.save(tmp_path / "m.safetensors", input_mean=[0, 0, 0])
    with pytest.raises(ValueError, match="input_scale must be positive"):
        model.save(tmp_path / "m.safetensors", input_mean=[0, 0, 0], input_scale=[1, 0, 1])
    assert not list(tmp_path.iterdir())


def test_files_that_are_not_models(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        FusedLinearRegressor.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04 not a model at all")
    with pytest.raises(ModelFileError, match="not a safetensors model file"):
        FusedLinearRegressor.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelFileError, match=r"expected the tensors 'weight' and 'bias'.*found \['w'\]"):
        FusedLinearRegressor.load(tmp_path / "other.safetensors")
    save_file({"weight": torch.zeros(2, 3), "bias": torch.zeros(3)}, tmp_path / "shape.safetensors")
    with pytest.raises(ModelFileError, match="weight must be \\(out, in\\) and bias \\(out,\\)"):
        FusedLinearRegressor.load(tmp_path / "shape.safetensors")
    save_file({"weight": torch.zeros(2, 3)}, tmp_path / "future.safetensors",
              metadata={"format": "linreg-fused", "format_version": "99", "library_version": "9.0"})
    with pytest.raises(ModelFileError, match="saved in model format 99 by linreg-fused 9.0.*upgrade"):
        FusedLinearRegressor.load(tmp_path / "future.safetensors")
    save_file({"weight": torch.zeros(2, 3)}, tmp_path / "names.safetensors",
              metadata={"format": "linreg-fused", "feature_names": '["a"]'})
    with pytest.raises(ModelFileError, match="feature_names must list 3 values"):
        serialization.read_info(tmp_path / "names.safetensors")
