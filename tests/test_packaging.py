"""The install puts the kernels under linreg_fused, never a top-level `kernels`."""

import importlib.metadata
import subprocess
import sys

import linreg_fused.kernels


def test_kernels_live_in_the_linreg_fused_namespace():
    assert linreg_fused.kernels.__name__ == "linreg_fused.kernels"
    top_level = importlib.metadata.distribution("linreg-fused").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["linreg_fused"]


def test_no_top_level_kernels_module(tmp_path):
    # From a neutral folder, so the repository root is not on sys.path.
    code = "import importlib.util as u; print(u.find_spec('kernels') is None, u.find_spec('linreg_fused.kernels') is not None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "linreg_fused", "--epochs", "10", "--seed", "0", "--backend", "torch"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "Epoch [10/10], Loss:" in out.stdout and "new region" in out.stdout


def test_import_is_lazy_and_the_ops_register_on_first_use(tmp_path):
    """`import linreg_fused` imports no torch (the command line's --help needs none); a name
    imports what defines it, and linreg_fused.ops registers the torch operators that a saved
    torch.export program refers to."""
    code = """
import sys
import linreg_fused
print("torch" in sys.modules, linreg_fused.__version__)
import torch
print(hasattr(torch.ops.linreg_fused, "linear"))
import linreg_fused.ops
print(hasattr(torch.ops.linreg_fused, "linear"), linreg_fused.FusedLinearRegressor.__module__)
print(sorted(n for n in linreg_fused.__all__ if not hasattr(linreg_fused, n)), linreg_fused.serialization.__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:4] == [f"False {importlib.metadata.version('linreg-fused')}", "False",
                                          "True linreg_fused.module", "[] linreg_fused.serialization"]
