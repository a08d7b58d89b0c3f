"""Everything a user can change between two calls of a step reaches the next step: the repeat-call
paths (step_cache.py: train_step; loss_cache.py: loss(optimizer=).backward(); update_cache.py:
FusedSGD.step()) against the full path, bitwise, with each change made between repeated calls.

Two models start equal; one may take the repeat paths, the other never does. Both get the same
batches and the same change at the same step; the losses, parameters and momentum buffers must
stay identical (or both calls raise the same error), and the repeat path must have been taken
before the change (else the test would prove nothing)."""

import copy

import pytest
import torch
from conftest import DEVICE
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD, backend, loss_cache, step_cache, update_cache


@pytest.fixture
def repeat_switch(monkeypatch):
    """Which model may take the repeat paths (the reference never does), and how often one did."""
    state = {"off": False, "hits": 0}
    for module, name, miss in ((step_cache, "try_step", None), (loss_cache, "try_loss", None),
                               (update_cache, "try_updates", False)):
        real = getattr(module, name)

        def maybe(*args, _real=real, _miss=miss):
            if state["off"]:
                return _miss
            out = _real(*args)
            state["hits"] += out is not _miss
            return out

        monkeypatch.setattr(module, name, maybe)
    return state


def _pair(sgd: dict, lr=0.05, bias=True):
    torch.manual_seed(0)
    a = FusedLinearRegressor(4, 3, bias=bias, backend="triton").to(DEVICE)
    b = copy.deepcopy(a)
    lrs = [lr, lr] if not isinstance(lr, torch.Tensor) else [lr.clone(), lr.clone()]
    return [(a, FusedSGD(a.parameters(), lr=lrs[0], **sgd)), (b, FusedSGD(b.parameters(), lr=lrs[1], **sgd))]


def _call(path, model, opt, x, t, grads):
    if path == "train_step":
        return model.train_step(x, t, opt)
    if path == "loss":
        loss = model.loss(x, t, optimizer=opt)
        loss.backward()
        return loss.detach()
    for p, g in zip(model.parameters(), grads):  # FusedSGD.step() on gradients the test sets
        p.grad = g.clone()
    opt.step()
    return torch.zeros(())


def _same(pairs):
    (a, opt_a), (b, opt_b) = pairs
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        sa, sb = opt_a.state.get(p, {}).get("momentum_buffer"), opt_b.state.get(q, {}).get("momentum_buffer")
        assert (sa is None) == (sb is None) and (sa is None or torch.equal(sa, sb)), name


def _run(pairs, switch, path, change=None, steps=5, at=3, x_of=None):
    """``steps`` calls on both models; ``change(model, opt)`` applied to both before call ``at``."""
    g = torch.Generator().manual_seed(2)
    hits_before = None
    for i in range(steps):
        x = torch.randn(9, 4, generator=g).to(DEVICE)
        t = torch.randn(9, 3, generator=g).to(DEVICE)
        grads = [torch.randn(p.shape, generator=g).to(DEVICE) for p in pairs[0][0].parameters()]
        if i == at:
            hits_before = switch["hits"]
            if change is not None:
                for model, opt in pairs:
                    change(model, opt)
        if x_of is not None and i >= at:
            x = x_of(x)
        results = []
        for (model, opt), off in zip(pairs, (False, True)):
            switch["off"] = off
            try:
                results.append(_call(path, model, opt, x, t, grads))
            except Exception as e:  # both paths must raise the same error
                results.append((type(e), str(e)))
        switch["off"] = False
        if isinstance(results[0], tuple):
            assert results[0] == results[1]
            return hits_before
        assert torch.equal(results[0], results[1]), f"step {i}"
        _same(pairs)
    assert hits_before, "the repeat path was never taken before the change"
    return hits_before


def _group(opt):
    return opt.param_groups[0]


def _set(key, value):
    return lambda model, opt: _group(opt).__setitem__(key, value)


def _new_buffer(model, opt):
    buf = opt.state[model.weight]["momentum_buffer"]
    opt.state[model.weight]["momentum_buffer"] = buf * 0.5


def _loaded_state(model, opt):
    state = copy.deepcopy(opt.state_dict())
    for s in state["state"].values():
        s["momentum_buffer"].mul_(-1.0)
    state["param_groups"][0]["lr"] = 0.02
    opt.load_state_dict(state)


def _buffer_data_replaced(model, opt):
    buf = opt.state[model.weight]["momentum_buffer"]
    buf.data = buf.data.t().contiguous().t()  # the same object, now column-major: the full path copies it


def _pre_hook_lr(model, opt):
    opt.register_step_pre_hook(lambda o, args, kwargs: _group(o).__setitem__("lr", _group(o)["lr"] * 0.5))


def _weight_replaced(model, opt):
    with torch.no_grad():
        model.weight = nn.Parameter(model.weight * 2.0)  # the optimizer still holds the old one


def _weight_data_strided(model, opt):
    model.weight.data = model.weight.data.t().contiguous().t()


def _weight_data_new(model, opt):
    model.weight.data = model.weight.data * 1.5


def _weight_data_double(model, opt):
    model.weight.data = model.weight.data.double()


def _bias_frozen(model, opt):
    model.bias.requires_grad_(False)


def _bias_removed(model, opt):
    params = _group(opt)["params"]
    del params[next(i for i, p in enumerate(params) if p is model.bias)]  # in place: the same list object


def _param_appended(model, opt):
    extra = nn.Parameter(torch.ones(2, device=DEVICE))
    extra.grad = torch.ones(2, device=DEVICE)
    model.register_parameter("extra", extra)
    _group(opt)["params"].append(extra)  # in place: the same list object, now longer


def _group_added(model, opt):
    extra = nn.Parameter(torch.ones(2, device=DEVICE))
    model.register_parameter("extra", extra)
    opt.add_param_group({"params": [extra], "lr": 0.3})


def _state_cleared(model, opt):
    opt.state.clear()


def _precision(model, opt):
    model.input_precision = "tf32x3"


def _backend_torch(model, opt):
    model.backend = "torch"


SGD = dict(momentum=0.9)
# name -> (initial FusedSGD settings, the change, paths it applies to)
CHANGES = {
    "lr": (SGD, _set("lr", 0.02), "tls"),
    "momentum-value": (SGD, _set("momentum", 0.5), "tls"),
    "momentum-on": ({}, _set("momentum", 0.9), "tls"),
    "momentum-off": (SGD, _set("momentum", 0.0), "tls"),
    "dampening": (SGD, _set("dampening", 0.3), "tls"),
    "nesterov": (SGD, _set("nesterov", True), "tls"),
    "weight-decay-on": (SGD, _set("weight_decay", 0.1), "tls"),
    "maximize": (SGD, _set("maximize", True), "tls"),
    "differentiable": (SGD, _set("differentiable", True), "tls"),
    "buffer-replaced": (SGD, _new_buffer, "tls"),
    "buffer-data-strided": (SGD, _buffer_data_replaced, "tls"),
    "state-dict-loaded": (SGD, _loaded_state, "tls"),
    "state-cleared": (SGD, _state_cleared, "tls"),
    "pre-hook-changes-lr": (SGD, _pre_hook_lr, "tls"),
    "weight-replaced": (SGD, _weight_replaced, "tl"),
    "weight-data-new": (SGD, _weight_data_new, "tls"),
    "weight-data-strided": (SGD, _weight_data_strided, "tls"),
    "weight-data-double": (SGD, _weight_data_double, "tls"),
    "bias-frozen": (SGD, _bias_frozen, "tl"),
    "bias-removed-from-group": (SGD, _bias_removed, "tls"),
    "param-appended-to-group": ({}, _param_appended, "s"),
    "group-added": ({}, _group_added, "tl"),
    "input-precision": ({}, _precision, "tl"),
    "backend": ({}, _backend_torch, "tl"),
}
PATHS = {"t": "train_step", "l": "loss", "s": "step"}


@pytest.mark.parametrize("path, name", [(PATHS[p], n) for n, (_, _, ps) in CHANGES.items() for p in ps])
def test_a_change_between_calls_reaches_the_next_step(repeat_switch, path, name):
    sgd, change, _ = CHANGES[name]
    _run(_pair(sgd), repeat_switch, path, change)


@pytest.mark.parametrize("path", ["train_step", "loss", "step"])
@pytest.mark.parametrize("how", ["in-place", "new-tensor", "to-float", "from-float"])
def test_learning_rate_tensors(repeat_switch, path, how):
    """A tensor lr changed in place is read on the device; a new tensor of the same layout is used;
    a float where a tensor was (and back) changes the kernels' code: the full path plans again."""
    lr = torch.tensor(0.05, device=DEVICE) if how != "from-float" else 0.05
    changes = {"in-place": lambda m, o: _group(o)["lr"].fill_(0.01),
               "new-tensor": lambda m, o: _group(o).__setitem__("lr", torch.tensor(0.02, device=DEVICE)),
               "to-float": _set("lr", 0.03),
               "from-float": lambda m, o: _group(o).__setitem__("lr", torch.tensor(0.02, device=DEVICE))}
    _run(_pair(SGD, lr=lr), repeat_switch, path, changes[how])


@pytest.mark.parametrize("path", ["train_step", "loss"])
@pytest.mark.parametrize("how", ["misaligned", "strided"])
def test_batch_layouts(repeat_switch, path, how):
    """x one float off 16-byte alignment, or column-strided."""
    x_of = {"misaligned": lambda x: torch.cat([torch.zeros(1, device=DEVICE), x.flatten()])[1:].view(9, 4),
            "strided": lambda x: torch.cat([x, x], 1)[:, ::2]}[how]
    _run(_pair(SGD), repeat_switch, path, x_of=x_of)


def test_launch_setting_and_matmul_precision(repeat_switch, monkeypatch):
    """backend.STEP_LAUNCHES and torch's float32 matmul precision (input_precision="auto") are read per call."""
    pairs = _pair(SGD)
    _run(pairs, repeat_switch, "train_step", lambda m, o: monkeypatch.setattr(backend, "STEP_LAUNCHES", 2))
    old = torch.get_float32_matmul_precision()
    try:
        _run(pairs, repeat_switch, "train_step", lambda m, o: torch.set_float32_matmul_precision("high"))
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "dispatch-mode"])
def test_contexts(repeat_switch, context):
    """Under no_grad the repeat path still applies; inference mode and a dispatch mode see the ops'
    path (the mode sees linreg_fused's ops); the numbers are the full path's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    make = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "dispatch-mode": Seen}[context]
    pairs = _pair(SGD)
    _run(pairs, repeat_switch, "train_step")
    hits = repeat_switch["hits"]
    with make():
        _run(pairs, repeat_switch, "train_step", steps=3, at=0)
    if context == "dispatch-mode":
        assert repeat_switch["hits"] == hits and any("linreg_fused" in s for s in seen)
    elif context == "no_grad":
        assert repeat_switch["hits"] > hits


def test_compiled_after_eager_steps(repeat_switch):
    """Eager steps plan the repeat path; a compiled train_step of the same model then traces the ops
    (never the planned launches), and eager steps after it take the repeat path again."""
    import torch._dynamo

    torch._dynamo.reset()
    pairs = _pair(SGD)
    _run(pairs, repeat_switch, "train_step")
    (a, opt_a), (b, opt_b) = pairs
    compiled = torch.compile(a.train_step, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        x, t = torch.randn(9, 4, generator=g).to(DEVICE), torch.randn(9, 3, generator=g).to(DEVICE)
        repeat_switch["off"] = True
        expected = b.train_step(x, t, opt_b)
        repeat_switch["off"] = False
        assert torch.equal(compiled(x, t, opt_a), expected)
        _same(pairs)
    torch._dynamo.reset()
    hits = repeat_switch["hits"]
    _run(pairs, repeat_switch, "train_step", steps=3, at=0)
    assert repeat_switch["hits"] > hits


def test_another_cuda_stream_takes_the_full_path(monkeypatch):
    """The plan's partial buffer and ticket are ordered by one stream; a step on another stream (where
    the last one may still run) takes the full path, which allocates its own. (Faked on the CPU.)"""
    model = FusedLinearRegressor(4, 3, backend="triton").to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.05)
    x, t = torch.randn(9, 4, device=DEVICE), torch.randn(9, 3, device=DEVICE)
    model.train_step(x, t, opt)
    entry = opt._linreg_repeat_steps[0]
    args = (x, model.weight, model.bias, t, opt, "mean", None, "triton", "auto", None)
    assert step_cache.try_step(*args) is not None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(entry, "cuda", True)
    monkeypatch.setattr(entry, "stream", 7)
    monkeypatch.setattr(step_cache, "_current_stream", lambda device: 7)
    assert step_cache.try_step(*args) is not None
    monkeypatch.setattr(step_cache, "_current_stream", lambda device: 8)
    assert step_cache.try_step(*args) is None


def test_the_python_guards_see_what_tensorguards_sees():
    """Where torch has no TensorGuards the repeat paths check the same properties in Python: both
    must pass the planned layout and refuse each change."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from linreg_fused import repeat_checks

    class Sub(torch.Tensor):
        pass

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    planned = torch.randn(5, 3)
    guards = [repeat_checks.tensor_guards(planned), repeat_checks._PythonGuards(planned)]
    assert type(guards[0]).__name__ == "TensorGuards"
    same = [torch.randn(5, 3), torch.randn(6, 3)[1:]]  # (an offset view: addresses are the launcher's)
    changed = [torch.randn(5, 3).double(), torch.randn(3, 5).t(), torch.randn(5, 4), torch.randn(5, 3).as_subclass(Sub),
               nn.Parameter(torch.randn(5, 3)), torch.randn(5, 3, requires_grad=True), torch.empty(5, 3, device="meta"),
               None, 1.0]
    with torch.inference_mode():
        changed.append(torch.randn(5, 3))
    for g in guards:
        assert all(g.check(t) for t in same), type(g).__name__
        assert not any(g.check(t) for t in changed), type(g).__name__
        with Mode():
            assert not g.check(planned), type(g).__name__
        assert torch.func.vmap(lambda row: torch.tensor(g.check(row)))(torch.randn(2, 5, 3)).sum() == 0


@pytest.mark.parametrize("join", ["param-group-added", "appended-to-group"])
def test_a_parameter_that_joins_the_optimizer_is_stepped(join):
    """The bias requires grad but is outside FusedSGD (left as it is, as torch.optim.SGD leaves it);
    after repeated steps it joins the optimizer: from then on it is trained, as torch.optim.SGD
    trains it (float64 reference, 1e-12 relative)."""
    torch.manual_seed(0)
    model = FusedLinearRegressor(4, 3, backend="triton", dtype=torch.float64).to(DEVICE)
    ref = nn.Linear(4, 3, dtype=torch.float64).to(DEVICE)
    ref.load_state_dict(model.state_dict())
    opt, ref_opt = FusedSGD([model.weight], lr=0.1, momentum=0.9), torch.optim.SGD([ref.weight], lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    for i in range(5):
        if i == 3:
            for o, bias in ((opt, model.bias), (ref_opt, ref.bias)):
                if join == "param-group-added":
                    o.add_param_group({"params": [bias], "lr": 0.2})
                else:
                    o.param_groups[0]["params"].append(bias)
        x = torch.randn(9, 4, generator=g, dtype=torch.float64).to(DEVICE)
        t = torch.randn(9, 3, generator=g, dtype=torch.float64).to(DEVICE)
        loss = model.train_step(x, t, opt)
        ref_opt.zero_grad()
        ref_loss = nn.functional.mse_loss(ref(x), t)
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=0)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


def test_step_sees_a_parameter_swapped_into_the_place_of_one_without_gradient():
    """FusedSGD.step() on .grad: a parameter without a gradient is replaced in its group's list (same
    object, same length) by one with a gradient; the new one is stepped, as torch.optim.SGD steps it
    (float64 reference, 1e-12 relative)."""
    g = torch.Generator().manual_seed(5)
    params = [nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)) for n in (4, 3, 3)]
    refs = [nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedSGD(params[:2], lr=0.1, momentum=0.5, backend="triton")
    ref_opt = torch.optim.SGD(refs[:2], lr=0.1, momentum=0.5)
    for i in range(5):
        if i == 3:  # params[1] never had a gradient; params[2] takes its place
            opt.param_groups[0]["params"][1], ref_opt.param_groups[0]["params"][1] = params[2], refs[2]
        for k in (0, 2) if i >= 3 else (0,):
            grad = torch.randn(params[k].shape, generator=g, dtype=torch.float64).to(DEVICE)
            params[k].grad, refs[k].grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(params, refs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
    assert update_cache.try_updates(opt)  # the repeat path is planned again for the new list
