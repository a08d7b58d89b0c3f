"""FusedSGD under PyTorch's own optimizer test matrix for SGD.

The configurations come from SGD's OptimizerInfo in
torch.testing._internal.common_optimizers (installed with torch): every
``optim_inputs_func`` configuration, its error inputs, its schedulers and
its implementation flags (foreach / fused / differentiable). The checks are
those of PyTorch's test/test_optim.py (TestOptimRenewed), written here for
FusedSGD on both backends, with one change: where PyTorch compares an
implementation against another one, FusedSGD is compared with
torch.optim.SGD run in float64 on the same starting values and gradients.

Cost: 230 tests, about 17 s of CPU time in all (importing PyTorch's test
helpers is about 6 s of it; most of the rest is the Triton interpreter's
launches, one per parameter and step), measured with torch 2.13.0 (CPU) and
Triton 3.9 on a shared 2-core machine.
"""

import copy
import io
import pickle
import warnings

import pytest
import torch
from conftest import DEVICE
from torch import nn

# PyTorch's test helpers import expecttest, which torch does not install (the test extra does).
pytest.importorskip("expecttest", reason="PyTorch's optimizer test matrix (torch.testing._internal) needs "
                                         "expecttest: pip install -e '.[test]'")

# Importing PyTorch's test helpers freezes torch.backends flags for the whole process
# (common_utils calls torch.backends.disable_global_flags()); put the flag back after.
_flags_were_frozen = torch.backends.flags_frozen()
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

if not _flags_were_frozen:  # the flag lives in torch/backends/__init__.py's globals (the module is wrapped)
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

from linreg_fused import FusedSGD  # noqa: E402

SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
CONFIG_IDS = [c.desc for c in SGD_INFO.optim_inputs_func(device=DEVICE)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
REFERENCE_DTYPE = {torch.complex64: torch.complex128}  # every other dtype: float64
STEPS = 4
# SGD's configurations use lr = 1e-3: gradients of this size make a step move the
# parameters by several ulps even in bfloat16, so that the half-precision rows test something.
GRAD_SCALE = 32.0


def sgd_config(index: int) -> dict:
    """Fresh kwargs of configuration ``index`` (a tensor lr is a new tensor each call)."""
    return SGD_INFO.optim_inputs_func(device=DEVICE)[index].kwargs


def tolerance(dtype: torch.dtype, steps: int = STEPS) -> float:
    """Relative bound on the drift from float64 SGD after ``steps`` steps: each
    step rounds the parameter and its momentum buffer once to ``dtype``; the
    buffer's rounding reaches the parameter scaled by lr. One rounding is
    ≤ eps/2 on a GPU, but Triton's interpreter truncates float32 → bfloat16
    (toward zero, up to one ulp, ≤ eps), hence eps per step."""
    return steps * torch.finfo(dtype).eps


def assert_tracks(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """actual (in dtype) against the float64 trajectory, relative to the tensor's largest value."""
    tol = tolerance(dtype)
    expected = expected.detach()
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().to(expected.dtype), expected, rtol=tol, atol=tol * max(scale, 1.0),
                               msg=lambda m: f"{what}: {m}")


def assert_same_groups(fused_groups: list[dict], torch_groups: list[dict]) -> None:
    """param_groups of two state_dicts: the same keys and the same values (tensor lr included)."""
    assert len(fused_groups) == len(torch_groups)
    for f, t in zip(fused_groups, torch_groups):
        assert f.keys() == t.keys(), f"param group keys {sorted(f)} != {sorted(t)}"
        for key in f:
            a, b = f[key], t[key]
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b and type(a) is type(b)
            assert same, f"param group {key!r}: {a!r} != {b!r}"


def make_params(dtype: torch.dtype, seed: int) -> list[nn.Parameter]:
    """A (4, 3) weight and a non-contiguous (4,) bias in ``dtype``, fresh random values."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        weight = torch.complex(weight, torch.randn(4, 3, generator=g, dtype=torch.float64))
        bias = torch.complex(bias, torch.randn(4, generator=g, dtype=torch.float64))
    strided = torch.zeros(4, 2, dtype=dtype, device=DEVICE)[:, 0]
    strided.copy_(bias)
    return [nn.Parameter(weight.to(dtype).to(DEVICE)), nn.Parameter(strided)]


def copy_params(params: list[nn.Parameter], dtype: torch.dtype) -> list[nn.Parameter]:
    """The same values in ``dtype``, with the same layouts."""
    out = []
    for p in params:
        q = torch.zeros(p.shape[0], 2, dtype=dtype, device=DEVICE)[:, 0] if not p.is_contiguous() else None
        out.append(nn.Parameter(q.copy_(p.detach()) if q is not None else p.detach().to(dtype).clone()))
    return out


def record_hooks(optimizer: torch.optim.Optimizer, calls: list) -> None:
    def pre(opt, args, kwargs):
        calls.append(("pre", opt is optimizer, len(args), sorted(kwargs)))

    def post(opt, args, kwargs):
        calls.append(("post", opt is optimizer, len(args), sorted(kwargs)))

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)


def test_importing_the_helpers_left_backend_flags_as_they_were():
    assert torch.backends.flags_frozen() == _flags_were_frozen


# ---------------------------------------------------------------- the trajectory matrix
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
@pytest.mark.parametrize("config", range(len(CONFIG_IDS)), ids=CONFIG_IDS)
def test_steps_match_sgd(config, dtype, backend):
    """Each step: parameters and momentum buffers against float64 SGD;
    state_dict against torch.optim.SGD in the same dtype (same groups, keys,
    dtypes); step hooks called alike. Weight and bias sit in two groups (the
    second overriding weight_decay); one step has no grad for the bias, one
    passes a closure."""
    ref_dtype = REFERENCE_DTYPE.get(dtype, torch.float64)
    params = make_params(dtype, seed=config)
    runs = {}
    for name, group_params in (("fused", params), ("torch", copy_params(params, dtype)),
                               ("reference", copy_params(params, ref_dtype))):
        groups = [{"params": [group_params[0]]}, {"params": [group_params[1]], "weight_decay": 0.0}]
        cls = FusedSGD if name == "fused" else torch.optim.SGD
        opt = cls(groups, **sgd_config(config), **({"backend": backend} if name == "fused" else {}))
        runs[name] = (group_params, opt, [])
        record_hooks(opt, runs[name][2])

    gen = torch.Generator().manual_seed(100 + config)
    for step in range(STEPS):
        grads = [(GRAD_SCALE * torch.randn(p.shape, generator=gen,
                                           dtype=torch.complex128 if dtype.is_complex else torch.float64)).to(dtype)
                 for p in params]
        if step == 2:
            grads[1] = None  # the bias has no gradient: SGD leaves it and its buffer alone
        for name, (ps, opt, _) in runs.items():
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g.to(device=DEVICE, dtype=p.dtype)
            if step == 1:
                marker = torch.tensor(float(step))
                assert opt.step(lambda: marker) is marker  # step returns the closure's value
            else:
                assert opt.step() is None

        fused_params, fused_opt, fused_calls = runs["fused"]
        ref_params, ref_opt, _ = runs["reference"]
        torch_params, torch_opt, torch_calls = runs["torch"]
        for what, p, r in zip(("weight", "bias"), fused_params, ref_params):
            assert_tracks(p, r, dtype, f"step {step + 1} {what}")
        fused_state, torch_state = fused_opt.state_dict(), torch_opt.state_dict()
        assert_same_groups(fused_state["param_groups"], torch_state["param_groups"])
        assert fused_state["state"].keys() == torch_state["state"].keys()
        for index, p in enumerate(fused_params):
            if index not in fused_state["state"]:
                continue
            ours, theirs = fused_state["state"][index], torch_state["state"][index]
            assert ours.keys() == theirs.keys() == {"momentum_buffer"}
            buf = ours["momentum_buffer"]
            assert buf.dtype == theirs["momentum_buffer"].dtype and buf.shape == theirs["momentum_buffer"].shape
            assert_tracks(buf, ref_opt.state[ref_params[index]]["momentum_buffer"], dtype,
                          f"step {step + 1} momentum buffer {index}")
        assert fused_calls == torch_calls and len(fused_calls) == 2 * (step + 1)
        assert all(p.grad is None or p.grad.dtype == dtype for p in fused_params)


# ---------------------------------------------------------------- implementation flags
def _flag_outcome(flags: dict, backend: str) -> type[Exception] | None:
    """What FusedSGD does with torch.optim.SGD's implementation flags."""
    if flags.get("differentiable"):
        return ValueError  # refused: the update is an in-place kernel
    if flags.get("fused") and flags.get("foreach"):
        return RuntimeError  # as torch.optim.SGD
    if flags.get("fused") and backend == "torch":
        return RuntimeError  # fused=True asks for the kernels
    return None


def _all_flag_inputs():
    """SGD's configurations with each implementation flag (torch's own helper), and
    foreach, which it leaves out on the CPU, in all its values."""
    inputs = _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, torch.float32, SGD_INFO)
    extra = [dict(foreach=None), dict(foreach=False), dict(foreach=True), dict(foreach=True, fused=True),
             dict(fused=None), dict(fused=False), dict(differentiable=False)]
    return [i.kwargs for i in inputs] + [dict(sgd_config(0), **flags) for flags in extra]


@pytest.mark.parametrize("where", ["constructor", "param_group", "add_param_group"])
def test_implementation_flags(where, backend):
    """Every flag value torch.optim.SGD accepts is accepted, or refused with a
    clear error, alike in the constructor, a param-group dict and
    add_param_group; a refused group is not added."""
    for kwargs in _all_flag_inputs():
        flags = {k: v for k, v in kwargs.items() if k in ("foreach", "fused", "differentiable")}
        hyper = {k: v for k, v in kwargs.items() if k not in flags}
        expected = _flag_outcome(flags, backend)
        p, q = nn.Parameter(torch.randn(3, device=DEVICE)), nn.Parameter(torch.randn(2, device=DEVICE))

        def build():
            if where == "constructor":
                return FusedSGD([p], backend=backend, **kwargs)
            if where == "param_group":
                return FusedSGD([dict(params=[p], **flags)], backend=backend, **hyper)
            opt = FusedSGD([q], backend=backend, **hyper)
            try:
                opt.add_param_group(dict(params=[p], **flags))
            finally:
                assert len(opt.param_groups) == (1 if expected else 2)
            return opt

        if expected is None:
            opt = build()
            group = opt.param_groups[-1]
            assert all(group[k] == v for k, v in flags.items())
            assert "backend" not in group and opt.defaults["backend"] == backend
        else:
            with pytest.raises(expected, match="differentiable|fused"):
                build()


@pytest.mark.parametrize("config", range(len(CONFIG_IDS)), ids=CONFIG_IDS)
def test_fused_and_foreach_do_not_change_the_update(config):
    """fused=True (where the kernels run) and foreach=True/False give the same bits as the default."""
    kwargs = sgd_config(config)
    results = []
    for flags in (dict(), dict(fused=True), dict(foreach=False), dict(foreach=True)):
        p = make_params(torch.float32, seed=config)[0]
        opt = FusedSGD([p], backend="triton", **kwargs, **flags)
        for step in range(2):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step), device="cpu").to(DEVICE)
            opt.step()
        results.append(p.detach().clone())
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_loaded_flags_are_checked_at_step(backend):
    """A state_dict can carry flags (differentiable=True, fused=True) that this
    FusedSGD cannot honour: the next step refuses them."""
    p = nn.Parameter(torch.randn(3, device=DEVICE))
    p.grad = torch.randn(3, device=DEVICE)
    opt = FusedSGD([p], lr=0.1, backend=backend)
    cases = [(dict(differentiable=True), ValueError), (dict(fused=True, foreach=True), RuntimeError)]
    if backend == "torch":
        cases.append((dict(fused=True), RuntimeError))
    for flags, error in cases:
        state = opt.state_dict()
        state["param_groups"][0].update(dict(foreach=None, fused=None, differentiable=False), **flags)
        opt.load_state_dict(state)
        before = p.detach().clone()
        with pytest.raises(error, match="differentiable|fused"):
            opt.step()
        assert torch.equal(p, before)


# ---------------------------------------------------------------- errors (SGD's error inputs)
def test_error_inputs_like_sgd():
    """SGD's error inputs give FusedSGD the same error (or warning) as torch.optim.SGD."""
    # PyTorch lists them for the CPU alone (for CUDA the list is empty): errors of construction,
    # which no device changes.
    error_inputs = SGD_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert error_inputs
    for error_input in error_inputs:
        optim_input = error_input.optimizer_error_input
        params = optim_input.params if optim_input.params is not None else [nn.Parameter(torch.randn(2))]
        assert error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                FusedSGD(params, **optim_input.kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                FusedSGD(params, **optim_input.kwargs)


# ---------------------------------------------------------------- state_dict
def _fwd_bwd(optimizer, weight, bias, x):
    optimizer.zero_grad()
    loss = (weight.mv(x) + bias).pow(2).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("config", range(len(CONFIG_IDS)), ids=CONFIG_IDS)
def test_state_dict_deterministic(config, backend):
    """After loading another FusedSGD's state_dict, a FusedSGD on equal (not
    identical) parameters steps to the same bits, and their state_dicts are
    equal; repeated groups have identical representations."""
    kwargs = sgd_config(config)
    weight, bias = make_params(torch.float32, seed=config)
    bias = nn.Parameter(bias.detach().clone())
    x = torch.randn(3, device=DEVICE)
    opt = FusedSGD([weight, bias], backend=backend, **kwargs)
    for _ in range(2):
        opt.step(lambda: _fwd_bwd(opt, weight, bias, x))
    weight_c, bias_c = (nn.Parameter(t.detach().clone()) for t in (weight, bias))
    opt_c = FusedSGD([weight_c, bias_c], backend=backend, **sgd_config(config))
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        opt.step(lambda: _fwd_bwd(opt, weight, bias, x))
        opt_c.step(lambda: _fwd_bwd(opt_c, weight_c, bias_c, x))
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    state, state_c = opt.state_dict(), opt_c.state_dict()
    assert_same_groups(state["param_groups"], state_c["param_groups"])
    for index in state["state"]:
        assert torch.equal(state["state"][index]["momentum_buffer"], state_c["state"][index]["momentum_buffer"])
    opt_c.param_groups.extend(opt_c.param_groups)
    assert_same_groups([opt.state_dict()["param_groups"][-1]], [opt_c.state_dict()["param_groups"][-1]])


@pytest.mark.parametrize("config", range(len(CONFIG_IDS)), ids=CONFIG_IDS)
def test_loads_torch_sgd_state_dict(config, backend):
    """A torch.optim.SGD state_dict (momentum buffers, tensor lr) loads into
    FusedSGD, which then steps as SGD does; and back."""
    kwargs = sgd_config(config)
    weight, bias = make_params(torch.float32, seed=config)
    x = torch.randn(3, device=DEVICE)
    sgd = torch.optim.SGD([weight, bias], **kwargs)
    for _ in range(2):
        sgd.step(lambda: _fwd_bwd(sgd, weight, bias, x))
    weight_c, bias_c = (nn.Parameter(t.detach().clone()) for t in (weight, bias))
    fused = FusedSGD([weight_c, bias_c], backend=backend, lr=0.5)  # hyper-parameters come from the state_dict
    fused.load_state_dict(copy.deepcopy(sgd.state_dict()))
    assert_same_groups(fused.state_dict()["param_groups"], sgd.state_dict()["param_groups"])
    for _ in range(2):
        sgd.step(lambda: _fwd_bwd(sgd, weight, bias, x))
        fused.step(lambda: _fwd_bwd(fused, weight_c, bias_c, x))
    assert_tracks(weight_c, weight.double(), torch.float32, "weight")
    assert_tracks(bias_c, bias.double(), torch.float32, "bias")
    back = torch.optim.SGD([nn.Parameter(weight_c.detach().clone()), nn.Parameter(bias_c.detach().clone())], lr=0.5)
    back.load_state_dict(fused.state_dict())
    assert_same_groups(back.state_dict()["param_groups"], fused.state_dict()["param_groups"])


@pytest.mark.parametrize("config", range(len(CONFIG_IDS)), ids=CONFIG_IDS)
def test_can_load_older_state_dict(config, backend):
    """A state_dict from before maximize/foreach/fused/differentiable existed loads and steps."""
    weight, bias = make_params(torch.float32, seed=config)
    bias = nn.Parameter(bias.detach().clone())
    x = torch.randn(3, device=DEVICE)
    opt = FusedSGD([weight, bias], backend=backend, **sgd_config(config))
    opt.step(lambda: _fwd_bwd(opt, weight, bias, x))
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in ("maximize", "foreach", "fused", "differentiable", "capturable"):
            group.pop(flag, None)
    opt.load_state_dict(old)
    assert opt.param_groups[0]["maximize"] is False and opt.param_groups[0]["fused"] is False
    before = weight.detach().clone()
    opt.step(lambda: _fwd_bwd(opt, weight, bias, x))
    assert not torch.equal(weight, before)


# ---------------------------------------------------------------- copies, pickles, printing
def _stepped_optimizer(backend: str, config: int):
    weight, bias = make_params(torch.float32, seed=config)
    opt = FusedSGD([{"params": [weight]}, {"params": [bias], "lr": 0.05}], backend=backend, **sgd_config(config))
    for step in range(2):
        for p in (weight, bias):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(DEVICE)
        opt.step()
    return opt


def _roundtrips(opt):
    yield "deepcopy", copy.deepcopy(opt)
    yield "pickle", pickle.loads(pickle.dumps(opt))
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    yield "torch.save", torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("config", [CONFIG_IDS.index("nesterov"), CONFIG_IDS.index("tensor lr")],
                         ids=["nesterov", "tensor lr"])
def test_copies_and_pickles_step(config, backend):
    """deepcopy, pickle and torch.save/load of a FusedSGD keep its backend,
    groups, state and public attributes, and step as the original does."""
    opt = _stepped_optimizer(backend, config)
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(p.shape, generator=gen).to(DEVICE) for g in opt.param_groups for p in g["params"]]

    def params(o):
        return [p for g in o.param_groups for p in g["params"]]

    def step_with_grads(o):
        for p, g in zip(params(o), grads):
            assert p.grad is None  # copying or pickling an nn.Parameter leaves its .grad behind
            p.grad = g.clone()
        o.step()

    step_with_grads(expected := copy.deepcopy(opt))
    for how, other in _roundtrips(opt):
        assert other.backend == backend, how
        assert {k for k in other.__dict__ if not k.startswith("_")} == public, how
        assert_same_groups(
            [{k: v for k, v in g.items() if k != "params"} for g in other.param_groups],
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        for p, q in zip(params(opt), params(other)):
            assert torch.equal(p, q), how
            if p in opt.state:
                assert torch.equal(opt.state[p]["momentum_buffer"], other.state[q]["momentum_buffer"]), how
        step_with_grads(other)
        for p, q, e in zip(params(opt), params(other), params(expected)):
            assert torch.equal(q, e) and not torch.equal(p, q), how


@pytest.mark.parametrize("where", ["constructor", "param_group"])
def test_printing(where, backend):
    """repr shows the backend and every group's options, with every flag input."""
    for kwargs in _all_flag_inputs():
        if _flag_outcome(kwargs, backend) is not None:
            continue
        params = [nn.Parameter(torch.randn(2, 3, device=DEVICE)) for _ in range(2)]
        opt = (FusedSGD(params, backend=backend, **kwargs) if where == "constructor"
               else FusedSGD([dict(params=params, **kwargs)], backend=backend))
        text = repr(opt)
        assert text.startswith(f"FusedSGD (backend: {backend!r}\nParameter Group 0\n")
        for key, value in opt.param_groups[0].items():
            if key != "params":
                assert f"    {key}: {value}\n" in text


# ---------------------------------------------------------------- no-op steps
@pytest.mark.parametrize("config", range(len(CONFIG_IDS)), ids=CONFIG_IDS)
def test_no_op_steps(config, backend):
    """No grad: nothing moves and no state is made. Zero grads without weight
    decay: nothing moves (a buffer of zeros appears, as in SGD). Bitwise."""
    kwargs = sgd_config(config)
    for flags in (dict(), dict(fused=True)) if backend == "triton" else (dict(),):
        frozen = [torch.randn(2, 3, device=DEVICE) for _ in range(2)]  # requires_grad=False: never a grad
        before = [p.clone() for p in frozen]
        opt = FusedSGD(frozen, backend=backend, **kwargs, **flags)
        opt.step(lambda: torch.ones(1))
        assert all(torch.equal(a, b) for a, b in zip(frozen, before)) and not opt.state
        if kwargs.get("weight_decay", 0) != 0:
            continue  # weight decay moves parameters even with zero gradients
        param = torch.randn(5, 1, device=DEVICE, requires_grad=True)
        old = param.detach().clone()
        opt = FusedSGD([param], backend=backend, **kwargs, **flags)
        param.grad = torch.zeros_like(param)
        opt.step(lambda: torch.ones(1))
        assert torch.equal(param, old)
        sgd = torch.optim.SGD([torch.zeros_like(param, requires_grad=True)], **sgd_config(config))
        sgd.param_groups[0]["params"][0].grad = torch.zeros_like(param)
        sgd.step()
        assert len(opt.state) == len(sgd.state)


# ---------------------------------------------------------------- complex parameters
@pytest.mark.parametrize("config", [CONFIG_IDS.index("nesterov"), CONFIG_IDS.index("maximize")],
                         ids=["nesterov", "maximize"])
def test_complex_is_its_real_view(config, backend):
    """Complex parameters (mixed with a real one) step exactly as FusedSGD on
    their torch.view_as_real copies; torch.optim.SGD on the complex ones agrees."""
    kwargs = sgd_config(config)
    complex_params = [torch.randn(4, 3, dtype=torch.complex64, device=DEVICE, requires_grad=True),
                      torch.randn(4, dtype=torch.complex64, device=DEVICE, requires_grad=True),
                      torch.randn(4, 3, device=DEVICE, requires_grad=True)]

    def real_copy(p):
        return (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()

    real_params = [real_copy(p) for p in complex_params]
    sgd_params = [p.detach().clone().requires_grad_() for p in complex_params]
    complex_opt = FusedSGD(complex_params, backend=backend, **kwargs)
    real_opt = FusedSGD(real_params, backend=backend, **sgd_config(config))
    sgd = torch.optim.SGD(sgd_params, **sgd_config(config))
    for _ in range(3):
        for c, r, s in zip(complex_params, real_params, sgd_params):
            r.grad = torch.randn_like(r)
            c.grad = torch.view_as_complex(r.grad.clone()) if c.is_complex() else r.grad.clone()
            s.grad = c.grad.clone()
        complex_opt.step(), real_opt.step(), sgd.step()
        for c, r, s in zip(complex_params, real_params, sgd_params):
            assert torch.equal(torch.view_as_real(c) if c.is_complex() else c, r)
            assert_tracks(c, s.to(torch.complex128 if c.is_complex() else torch.float64), torch.float32, "vs SGD")


# ---------------------------------------------------------------- sparse gradients
def _uncoalesced_grad(shape, generator):
    """A sparse gradient with a repeated index (uncoalesced), as nn.Embedding(sparse=True) gives."""
    rows = torch.tensor([[1, 3, 1]])
    values = torch.randn(3, shape[1], generator=generator)
    return torch.sparse_coo_tensor(rows, values, shape, check_invariants=True).to(DEVICE)


@pytest.mark.parametrize("config", range(len(CONFIG_IDS)), ids=CONFIG_IDS)
def test_sparse_gradients(config, backend):
    """Sparse (uncoalesced) gradients: plain SGD is torch.optim.SGD's own
    index-add, bit for bit; with momentum or weight decay (which move every
    element, and which torch.optim.SGD refuses with sparse gradients in part)
    the step is SGD's on the dense gradient. Dense and sparse steps mix."""
    kwargs = sgd_config(config)
    plain = not kwargs.get("momentum") and not kwargs.get("weight_decay")
    p = nn.Parameter(torch.randn(5, 3, device=DEVICE))
    q, r = nn.Parameter(p.detach().clone()), nn.Parameter(p.detach().clone())
    fused = FusedSGD([p], backend=backend, **kwargs)
    dense_sgd, sparse_sgd = torch.optim.SGD([q], **sgd_config(config)), torch.optim.SGD([r], **sgd_config(config))
    gen = torch.Generator().manual_seed(config)
    for step in range(3):
        grad = _uncoalesced_grad(p.shape, gen)
        if step == 1:
            grad = grad.to_dense()
        p.grad, q.grad, r.grad = grad.clone(), grad.to_dense(), grad.clone()
        fused.step(), dense_sgd.step()
        assert_tracks(p, q.double(), torch.float32, f"step {step + 1}")
        if plain:
            sparse_sgd.step()
            assert torch.equal(p, r)
    if kwargs.get("momentum"):
        assert_tracks(fused.state[p]["momentum_buffer"], dense_sgd.state[q]["momentum_buffer"].double(),
                      torch.float32, "momentum buffer")


def test_sparse_gradients_with_fused_are_refused():
    p = nn.Parameter(torch.randn(5, 3, device=DEVICE))
    opt = FusedSGD([p], lr=0.1, backend="triton", fused=True)
    p.grad = _uncoalesced_grad(p.shape, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_embedding_sparse_like_sgd(backend):
    """nn.Embedding(sparse=True) trained with FusedSGD and with torch.optim.SGD (metadata_for_sparse)."""
    kwargs, _ = SGD_INFO.metadata_for_sparse
    emb = nn.Embedding(7, 3, sparse=True).to(DEVICE)
    emb_c = copy.deepcopy(emb)
    fused, sgd = FusedSGD(emb.parameters(), backend=backend, **kwargs), torch.optim.SGD(emb_c.parameters(), **kwargs)
    idx = torch.tensor([[0, 2, 2], [6, 0, 1]], device=DEVICE)
    for model, opt in ((emb, fused), (emb_c, sgd)):
        for _ in range(3):
            opt.zero_grad()
            model(idx).pow(2).sum().backward()
            opt.step()
    assert torch.equal(emb.weight, emb_c.weight)


# ---------------------------------------------------------------- LR schedulers
@pytest.mark.parametrize("schedulers", range(len(SGD_INFO.scheduler_inputs)))
def test_schedulers_like_sgd(schedulers, backend):
    """SGD's scheduler sets drive FusedSGD's lr as they drive SGD's, without warnings."""
    makers = SGD_INFO.scheduler_inputs[schedulers]
    weight, bias = make_params(torch.float32, seed=schedulers)
    bias = nn.Parameter(bias.detach().clone())
    weight_c, bias_c = (nn.Parameter(t.detach().clone()) for t in (weight, bias))
    x = torch.randn(3, device=DEVICE)
    fused = FusedSGD([weight, bias], lr=0.01, momentum=0.5, backend=backend)
    sgd = torch.optim.SGD([weight_c, bias_c], lr=0.01, momentum=0.5)
    runs = [(fused, [m(fused) for m in makers], weight, bias), (sgd, [m(sgd) for m in makers], weight_c, bias_c)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            for opt, scheds, w, b in runs:
                loss = opt.step(lambda o=opt, w=w, b=b: _fwd_bwd(o, w, b, x))
                for s in scheds:
                    s.step(loss.detach()) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()
            assert fused.param_groups[0]["lr"] == pytest.approx(sgd.param_groups[0]["lr"], rel=1e-12)
    assert_tracks(weight, weight_c.double(), torch.float32, "weight")


# ---------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])
def test_grad_scaler_unscales_and_skips(fused):
    """With a GradScaler, FusedSGD (fused=True included, where SGD's own fused
    step does the unscaling) steps on the unscaled gradients, and a step with
    an inf gradient is skipped, as with torch.optim.SGD."""
    weight, bias = make_params(torch.float32, seed=3)
    bias = nn.Parameter(bias.detach().clone())
    weight_c, bias_c = (nn.Parameter(t.detach().clone()) for t in (weight, bias))
    x = torch.randn(3, device=DEVICE)
    fused_opt = FusedSGD([weight, bias], lr=0.01, momentum=0.9, fused=fused, backend="triton")
    sgd = torch.optim.SGD([weight_c, bias_c], lr=0.01, momentum=0.9)
    for opt, w, b in ((fused_opt, weight, bias), (sgd, weight_c, bias_c)):
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1024.0)
        for step in range(3):
            opt.zero_grad()
            scaler.scale((w.mv(x) + b).pow(2).sum() * (float("inf") if step == 1 else 1.0)).backward()
            scaler.step(opt)
            scaler.update()
    assert_tracks(weight, weight_c.double(), torch.float32, "weight")
    assert_tracks(bias, bias_c.double(), torch.float32, "bias")
