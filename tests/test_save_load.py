"""Model files: safetensors round trip with metadata, nn.Linear interop, standardisation
folding, atomic writes, and clear errors for files that are not models."""

import json
import os
import re
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


# ---------------------------------------------------------------- malformed files, checksum, file system
def _model_file(tmp_path, name="m.safetensors", **metadata):
    """A model file, and its metadata and tensors for re-saving with changes."""
    path = tmp_path / name
    FusedLinearRegressor(3, 2, backend="torch").save(path, feature_names=list("abc"), **metadata)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return path, dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("key, value, message", [
    ("format_version", "1.0", "metadata format_version must be a whole number, got '1.0'"),
    ("in_features", "x", "metadata in_features must be a whole number, got 'x'"),
    ("out_features", "-2", "metadata out_features must be a whole number"),
    ("bias", "False", "metadata says bias='False' but the file has bias"),
    ("feature_names", "a,b,c", "metadata feature_names is not JSON: 'a,b,c'"),
    ("feature_names", "[1, 2, 3]", "metadata feature_names must list names"),
    ("target_names", '{"a": 1}', "metadata target_names must list 2 values"),
    ("input_mean", "[0, 0, 0]", "has one of input_mean and input_scale"),
    ("tensor_sha256", "abc", "metadata tensor_sha256 must be 64 hexadecimal digits"),
])
def test_malformed_metadata_is_a_model_file_error(tmp_path, key, value, message):
    path, meta, tensors = _model_file(tmp_path)
    save_file(tensors, path, metadata={**meta, key: value})
    with pytest.raises(ModelFileError, match=re.escape(message)):
        FusedLinearRegressor.load(path)
    with pytest.raises(ModelFileError, match=re.escape(message)):
        read_info(path)


@pytest.mark.parametrize("mean, scale, message", [
    ("[0, 0, 0]", "[1, 0, 1]", "input_scale must be positive"),
    ("[0, 0, 0]", "[1, -1, 1]", "input_scale must be positive"),
    ('[0, "a", 0]', "[1, 1, 1]", "input_mean must hold finite numbers, got 'a'"),
    ("[0, true, 0]", "[1, 1, 1]", "input_mean must hold finite numbers, got True"),
    ("[0, NaN, 0]", "[1, 1, 1]", "input_mean must hold finite numbers, got nan"),
    ("[0, 0, 0]", "[1, Infinity, 1]", "input_scale must hold finite numbers, got inf"),
])
def test_load_checks_the_standardisation_as_save_does(tmp_path, mean, scale, message):
    path, meta, tensors = _model_file(tmp_path)
    save_file(tensors, path, metadata={**meta, "input_mean": mean, "input_scale": scale})
    with pytest.raises(ModelFileError, match=re.escape(message)):
        FusedLinearRegressor.load(path)
    values = json.loads(mean), json.loads(scale)
    with pytest.raises(ValueError, match=re.escape(message)):  # and save refuses the same values
        FusedLinearRegressor(3, 2).save(tmp_path / "other.safetensors", input_mean=values[0], input_scale=values[1])


def test_a_name_given_twice_is_refused_by_save_and_load(tmp_path):
    """Names map a model's features to a file's columns: with one given twice, predict read that
    column for both features and printed predictions without a word."""
    model = FusedLinearRegressor(3, 2)
    for names in ({"feature_names": ["a", "b", "a"]}, {"target_names": ["y", "y"]}):
        with pytest.raises(ValueError, match="names 'a' twice|names 'y' twice"):
            model.save(tmp_path / "m.safetensors", **names)
    assert not list(tmp_path.iterdir())
    path, meta, tensors = _model_file(tmp_path)
    for key, value, name in (("feature_names", '["a", "b", "a"]', "a"), ("target_names", '["y", "y"]', "y")):
        save_file(tensors, path, metadata={**meta, key: value})
        with pytest.raises(ModelFileError, match=re.escape(f"metadata {key} names {name!r} twice")):
            FusedLinearRegressor.load(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_a_non_floating_weight_is_a_model_file_error(tmp_path, dtype):
    save_file({"weight": torch.ones(2, 3, dtype=dtype), "bias": torch.zeros(2, dtype=dtype)},
              tmp_path / "int.safetensors")
    with pytest.raises(ModelFileError, match=f"weight is {dtype}; a model's weights are floating point"):
        FusedLinearRegressor.load(tmp_path / "int.safetensors")


def test_a_bias_of_another_dtype_is_a_model_file_error(tmp_path):
    """A model has one dtype: a float64 bias beside a float32 weight is some other file."""
    save_file({"weight": torch.ones(2, 3), "bias": torch.zeros(2, dtype=torch.float64)}, tmp_path / "mixed.safetensors")
    with pytest.raises(ModelFileError, match="weight is torch.float32 but bias is torch.float64"):
        FusedLinearRegressor.load(tmp_path / "mixed.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_changed_byte_fails_the_checksum(tmp_path, dtype):
    model = FusedLinearRegressor(4, 3, dtype=dtype, backend="torch")
    path = tmp_path / "m.safetensors"
    model.save(path)
    assert read_info(path).checksum is not None
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    for offset in (8 + header_len, len(raw) - 1):  # the first and the last byte of the tensor data
        changed = bytearray(raw)
        changed[offset] ^= 0x01  # one low bit: a weight or bias changes in its last place
        path.write_bytes(changed)
        with pytest.raises(ModelFileError, match="do not match the checksum"):
            FusedLinearRegressor.load(path)
    path.write_bytes(raw)
    assert torch.equal(FusedLinearRegressor.load(path).weight, model.weight)


def test_files_without_a_checksum_still_load(tmp_path):
    """Files saved before the checksum existed (or by other code): loaded, nothing to verify."""
    path, meta, tensors = _model_file(tmp_path)
    del meta["tensor_sha256"]
    save_file(tensors, path, metadata=meta)
    loaded = FusedLinearRegressor.load(path)
    assert torch.equal(loaded.weight, tensors["weight"]) and read_info(path).checksum is None
    assert read_info(path).feature_names == list("abc")


def test_load_draws_no_random_numbers(tmp_path):
    FusedLinearRegressor(5, 2).save(tmp_path / "m.safetensors")
    state = torch.get_rng_state()
    FusedLinearRegressor.load(tmp_path / "m.safetensors")
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symlinks")
def test_saving_over_a_symlink_writes_the_file_it_points_to(tmp_path):
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "v1.safetensors"
    FusedLinearRegressor(3, 2).save(target)
    link = tmp_path / "current.safetensors"
    link.symlink_to(target)
    new = FusedLinearRegressor(3, 2, backend="torch")
    new.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert torch.equal(FusedLinearRegressor.load(target).weight, new.weight)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["v1.safetensors"]  # no temporary left


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_overwriting_keeps_the_permission_bits(tmp_path, mode):
    path = tmp_path / "m.safetensors"
    FusedLinearRegressor(3, 2).save(path)
    os.chmod(path, mode)
    FusedLinearRegressor(3, 2).save(path)
    assert path.stat().st_mode & 0o777 == mode


def test_saving_to_a_directory_is_refused_before_writing(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; give a file name"):
        FusedLinearRegressor(3, 2).save(tmp_path)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ModelFileError, match="a directory, not a model file"):
        FusedLinearRegressor.load(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_saving_over_a_device_or_fifo_is_refused_before_writing(tmp_path):
    """The atomic rename replaced the target itself: a FIFO became a regular file, and as root
    save("/dev/null") would replace the device. Refused, the FIFO left as it was."""
    import stat

    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="model.fifo is not a regular file"):
        FusedLinearRegressor(3, 2).save(fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and [p.name for p in tmp_path.iterdir()] == ["model.fifo"]


def test_serialization_does_not_import_the_module():
    """module.py owns serialization.py (module -> serialization), not the other way round."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(serialization))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
                 for alias in node.names}
    assert "module" not in imported
