"""linreg_fused.backend: which implementation runs. A Triton older than the kernels need (or none)
is refused with a reason and "auto" falls back to the reference; what cannot change within a
process is looked up once; TRITON_INTERPRET's consistency rules still hold per call."""

import sys

import pytest
import torch
from conftest import DEVICE

from linreg_fused import FusedLinearRegressor, FusedSGD, backend
from linreg_fused.reference import TORCH_OPS


@pytest.fixture
def installed(monkeypatch):
    """Pretend the installed Triton is another version (None: not installed), for this test only."""
    def use(version):
        monkeypatch.setattr(backend, "triton_version", lambda: version)
        backend._installation_problem.cache_clear()

    yield use
    backend._installation_problem.cache_clear()


@pytest.mark.parametrize("version, refused", [("3.5.1", True), ("3.2.0+git4a2f9", True), ("2.3.1", True),
                                              ("3.6.0", False), ("3.7.0rc1", False), ("4.0.0", False)])
def test_an_older_triton_is_refused_and_auto_falls_back(installed, version, refused):
    installed(version)
    reason = backend.triton_unavailable_reason(torch.device("cuda"))
    if not refused:
        assert reason is None
        return
    assert f"Triton {version} is installed" in reason and ">= 3.6" in reason
    assert backend.select_ops("auto", DEVICE) is TORCH_OPS
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run here: Triton .* >= 3\.6"):
        backend.select_ops("triton", DEVICE)
    with pytest.raises(RuntimeError, match="fused=True"):
        FusedSGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, fused=True)
    # What runs then is the reference, and it trains.
    model = FusedLinearRegressor(3, 2).to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1)
    x, t = torch.randn(7, 3, device=DEVICE), torch.randn(7, 2, device=DEVICE)
    first = model.train_step(x, t, opt)
    assert model.train_step(x, t, opt) < first


def test_no_triton_is_refused(installed):
    installed(None)
    assert "Triton is not installed" in backend.triton_unavailable_reason(torch.device("cuda"))
    assert backend.select_ops("auto", DEVICE) is TORCH_OPS


def test_the_installation_is_looked_up_once(installed, monkeypatch):
    """select_ops at every op must not search sys.path (find_spec) again: one look-up per process."""
    calls = []
    real = backend.triton_version
    monkeypatch.setattr(backend, "triton_version", lambda: calls.append(1) or real())
    backend._installation_problem.cache_clear()
    for _ in range(20):
        backend.select_ops("auto", DEVICE)
        backend.triton_unavailable_reason(torch.device("cuda"))
    assert len(calls) == 1


def test_the_version_is_read_without_importing_triton(tmp_path, monkeypatch):
    """An installed Triton's version comes from its __init__.py's text (importing Triton would decide
    whether its interpreter is on, which TRITON_INTERPRET must decide first)."""
    package = tmp_path / "triton"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('imported')\n__version__ = '3.5.2'\n")
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert backend.triton_version() == "3.5.2"
    monkeypatch.setattr(sys, "path", [str(tmp_path / "nowhere")])
    assert backend.triton_version() is None


def test_interpreter_rules_are_read_per_call(monkeypatch):
    """The interpreter's setting is read at every call (the environment may change) while the probe
    behind it runs once: off -> the reference on the CPU, whatever was decided before."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "interpreter is off" in backend.triton_unavailable_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if sys.modules.get("triton.language") is not None and not backend._interpreter_consistent():
        assert "set after Triton was imported" in backend.triton_unavailable_reason(torch.device("cpu"))
    else:
        assert backend.triton_unavailable_reason(torch.device("cpu")) == backend._cpu_problem(True, True)
