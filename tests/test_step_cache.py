"""The repeat-call path of the fused step (linreg_fused/step_cache.py, kernels/step.py,
kernels/sgd_step.py): the same numbers as the full path, bitwise, and the full
path again whenever something it depended on changed.

On the CPU the kernels run in Triton's interpreter; the cheap launches
themselves (kernels/launch.py) are checked against Triton's own launch path
in tests/test_fast_launch.py.
"""

import copy
import warnings

import pytest
import torch
from conftest import DEVICE
from oracle import random_problem

from linreg_fused import FusedLinearRegressor, FusedSGD, backend, fused_sgd_step, step_cache, update_cache
from linreg_fused.kernels import linear_mse_grad, reduce_update, sgd_step
from linreg_fused.kernels import step as kernel_step

OPTIONS = [dict(), dict(momentum=0.9), dict(momentum=0.8, dampening=0.3, nesterov=False, weight_decay=0.01),
           dict(momentum=0.9, nesterov=True, weight_decay=0.05), dict(maximize=True, weight_decay=0.01)]
OPTION_IDS = ["plain", "momentum", "dampening-wd", "nesterov-wd", "maximize"]


def _pair(d=4, o=3, bias=True, dtype=torch.float32, **sgd):
    torch.manual_seed(0)
    a = FusedLinearRegressor(d, o, bias=bias, backend="triton", dtype=dtype).to(DEVICE)
    b = copy.deepcopy(a)
    return (a, FusedSGD(a.parameters(), lr=0.05, **sgd)), (b, FusedSGD(b.parameters(), lr=0.05, **sgd))


@pytest.fixture
def full_path_only(monkeypatch):
    """Run a block with the repeat path switched off (every step through the ops)."""
    real = step_cache.try_step

    class Switch:
        off = False

    def maybe(*args):
        return None if Switch.off else real(*args)

    monkeypatch.setattr(step_cache, "try_step", maybe)
    return Switch


def _run(model, opt, batches, switch=None, off=False):
    if switch is not None:
        switch.off = off
    return [model.train_step(x, t, opt) for x, t in batches]


def _assert_same(a, b, opt_a, opt_b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        sa, sb = opt_a.state[p].get("momentum_buffer"), opt_b.state[q].get("momentum_buffer")
        assert (sa is None) == (sb is None) and (sa is None or torch.equal(sa, sb)), name


@pytest.mark.parametrize("launches", ["auto", 1, 2])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_repeat_path_is_the_full_path_bitwise(options, launches, full_path_only, monkeypatch):
    monkeypatch.setattr(backend, "STEP_LAUNCHES", launches)
    (a, opt_a), (b, opt_b) = _pair(**options)
    batches = [tuple(v.to(DEVICE) for v in random_problem(11, 4, 3)[::3]) for _ in range(5)]
    plans = kernel_step.plans_made
    losses_a = _run(a, opt_a, batches, full_path_only, off=False)
    losses_b = _run(b, opt_b, batches, full_path_only, off=True)
    assert kernel_step.plans_made > plans, "the repeat path was never planned"
    for la, lb in zip(losses_a, losses_b):
        assert torch.equal(la, lb)
    _assert_same(a, b, opt_a, opt_b)


@pytest.mark.parametrize("launches", [1, 2])
def test_several_programs_bitwise(launches, full_path_only, monkeypatch):
    """64 rows: four programs under the interpreter, so the one-launch step's ticket picks a last
    program that sums the others' rows (and resets the ticket for the next step), in the fixed order
    of the two-launch path: the full path's bits, step after step."""
    monkeypatch.setattr(backend, "STEP_LAUNCHES", launches)
    (a, opt_a), (b, opt_b) = _pair(momentum=0.9, nesterov=True, weight_decay=0.01)
    batches = [tuple(v.to(DEVICE) for v in random_problem(64, 4, 3)[::3]) for _ in range(4)]
    plans = kernel_step.plans_made
    for la, lb in zip(_run(a, opt_a, batches, full_path_only, off=False),
                      _run(b, opt_b, batches, full_path_only, off=True)):
        assert torch.equal(la, lb)
    _assert_same(a, b, opt_a, opt_b)
    planned = opt_a._linreg_repeat_steps[0].launches
    assert kernel_step.plans_made > plans
    assert planned.partials.shape[0] > 1 and planned.one_launch == (launches == 1)


def test_the_repeat_path_plans_nothing(monkeypatch):
    """After the first call, a loop of steps builds no launch plan and no step plan."""
    model = FusedLinearRegressor(4, 3, backend="triton").to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.01, momentum=0.9)
    x, _, _, t = random_problem(9, 4, 3, device=DEVICE)
    model.train_step(x, t, opt)  # creates the momentum buffers (full path)
    model.train_step(x, t, opt)  # plans the repeat path with them
    counts = {"plans": 0}

    def counted(fn):
        def wrapper(*args, **kwargs):
            counts["plans"] += 1
            return fn(*args, **kwargs)
        return wrapper

    for module, name in ((linear_mse_grad, "plan_linear_mse_partials"), (reduce_update, "plan_reduce_update"),
                         (sgd_step, "plan_linear_mse_step"), (kernel_step, "plan_grad_partials"),
                         (kernel_step, "plan_reduce_update")):
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    before = kernel_step.plans_made
    for _ in range(3):
        model.train_step(torch.randn_like(x), torch.randn_like(t), opt)
    assert counts["plans"] == 0 and kernel_step.plans_made == before


@pytest.mark.parametrize("case", ["frozen-bias", "no-bias", "fp64", "bf16-x", "strided-x", "row-index"])
def test_repeat_path_variants_bitwise(case, full_path_only):
    dtype = torch.float64 if case == "fp64" else torch.float32
    (a, opt_a), (b, opt_b) = _pair(bias=case != "no-bias", dtype=dtype, momentum=0.9)
    if case == "frozen-bias":
        a.bias.requires_grad_(False), b.bias.requires_grad_(False)
    results = []
    for model, opt, off in ((a, opt_a, False), (b, opt_b, True)):
        full_path_only.off = off
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(4):
            x = torch.randn(13, 8 if case == "strided-x" else 4, generator=g, dtype=dtype).to(DEVICE)
            t = torch.randn(13, 3, generator=g, dtype=dtype).to(DEVICE)
            if case == "strided-x":
                x = x[:, ::2]
            if case == "bf16-x":
                x, t = x.bfloat16(), t.bfloat16()
            if case == "row-index":
                rows = torch.randperm(13, generator=g)[:6].to(DEVICE)
                losses.append(fused_sgd_step(x, model.weight, model.bias, t, opt, row_index=rows, validate=False,
                                             backend="triton"))
            else:
                losses.append(model.train_step(x, t, opt))
        results.append(losses)
    for la, lb in zip(*results):
        assert torch.equal(la, lb)
    _assert_same(a, b, opt_a, opt_b)


def _hits(monkeypatch):
    """Counts the calls the repeat path took."""
    real, hits = step_cache.try_step, []

    def spy(*args):
        out = real(*args)
        hits.append(out is not None)
        return out

    monkeypatch.setattr(step_cache, "try_step", spy)
    return hits


def test_changes_take_the_full_path(monkeypatch, full_path_only):
    """Each change below must reach the step: the repeat path must not keep the old setting.
    The reference model takes the full path at every call."""
    (model, opt), (ref, ref_opt) = _pair()
    x, _, _, t = random_problem(9, 4, 3, device=DEVICE)
    hits = _hits(monkeypatch)

    def both(check=True):
        full_path_only.off = False
        la = model.train_step(x, t, opt)
        full_path_only.off = True
        lb = ref.train_step(x, t, ref_opt)
        if check:
            assert torch.equal(la, lb)
            _assert_same(model, ref, opt, ref_opt)

    both(), both()
    assert sum(hits) == 1  # the model's second call ran the repeat path (the reference's never does)
    for change in (lambda o: o.param_groups[0].update(lr=0.2),          # read every call: no new plan needed
                   lambda o: o.param_groups[0].update(momentum=0.9),    # a new flag: full path, new plan
                   lambda o: o.param_groups[0].update(nesterov=True),
                   lambda o: o.param_groups[0].update(weight_decay=0.1),
                   lambda o: o.load_state_dict(copy.deepcopy(o.state_dict())),  # new groups and buffers
                   lambda o: o.param_groups[0].update(lr=0.03),  # in the new group, not the stale one
                   _new_group_dict,
                   _strided_buffer):  # the full path makes a buffer contiguous before a kernel writes it
        change(opt), change(ref_opt)
        both(), both(), both()
    model.bias.requires_grad_(False), ref.bias.requires_grad_(False)
    before = model.bias.clone()
    both(), both()
    assert torch.equal(model.bias, before), "a frozen bias was updated"
    model.weight.data = model.weight.data.double()  # same Parameter, new dtype: the checks must run again
    with pytest.raises(TypeError, match="float32"):
        model.train_step(x, t, opt)


def _new_group_dict(opt):
    """The same parameters and buffers in a new group dict, then a new lr in it."""
    opt.param_groups[0] = dict(opt.param_groups[0], lr=0.07)


def _strided_buffer(opt):
    weight = opt.param_groups[0]["params"][0]
    buf = opt.state[weight]["momentum_buffer"]
    opt.state[weight]["momentum_buffer"] = buf.t().contiguous().t()  # the same values, column-major


def test_batch_sizes_alternate_without_replanning():
    model = FusedLinearRegressor(4, 3, backend="triton").to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.01)
    batches = [random_problem(n, 4, 3, device=DEVICE)[::3] for n in (8, 8, 3)]
    for x, t in batches * 2:  # full batches and a shorter last one: two plans
        model.train_step(x, t, opt)
    before = kernel_step.plans_made
    for x, t in batches * 2:
        model.train_step(x, t, opt)
    assert kernel_step.plans_made == before


def test_hooks_schedulers_and_autograd_see_repeat_steps():
    model = FusedLinearRegressor(4, 3, backend="triton").to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, _, _, t = random_problem(9, 4, 3, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" must not appear
        for _ in range(4):
            model.train_step(x, t, opt)
            sched.step()
    assert calls == ["pre", "post"] * 4
    saved = model.weight * 1.0  # a graph that saved the weight
    graph_loss = (model.weight * model.weight).sum()
    model.train_step(x, t, opt)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        graph_loss.backward()
    assert saved.shape == model.weight.shape


def test_a_bad_call_after_repeat_steps_still_raises():
    model = FusedLinearRegressor(4, 3, backend="triton").to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1)
    x, _, _, t = random_problem(9, 4, 3, device=DEVICE)
    for _ in range(3):
        model.train_step(x, t, opt)
    with pytest.raises(ValueError, match="target has shape"):
        model.train_step(x, t[:, :2], opt)
    with pytest.raises(TypeError, match="target must be a floating-point"):
        model.train_step(x, t.long(), opt)


def test_one_launch_rule():
    """One launch while the last program's reduction is short and the grid fits the device at once."""
    from linreg_fused.kernels.config import DeviceProfile

    h200 = DeviceProfile(gpu=True, multiprocessors=132)
    assert sgd_step.one_launch(1, 9, h200)  # the tutorial: one program
    assert sgd_step.one_launch(64, 1024, h200)
    assert not sgd_step.one_launch(64, 1025, h200)  # the reduction reads more than ONE_LAUNCH_MAX_VALUES
    assert not sgd_step.one_launch(529, 9, h200)  # more programs than 4 per SM: not all resident
    assert sgd_step.one_launch(3, 100, DeviceProfile(gpu=False))


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_fused_sgd_step_repeat_path_is_the_full_path(options, monkeypatch):
    """FusedSGD.step() on .grad: the planned updates give the full path's numbers, and a parameter
    whose gradient goes missing (or a new flag) takes the full path again."""
    real = update_cache.try_updates
    off, taken = {"on": False}, []

    def spy(opt):
        done = False if off["on"] else real(opt)
        taken.append(done)
        return done

    monkeypatch.setattr(update_cache, "try_updates", spy)
    (a, opt_a), (b, opt_b) = _pair(**options)
    g = torch.Generator().manual_seed(3)
    for i in range(6):
        grads = [torch.randn(p.shape, generator=g).to(DEVICE) for p in a.parameters()]
        for model, opt, disabled in ((a, opt_a, False), (b, opt_b, True)):
            for p, grad in zip(model.parameters(), grads):
                p.grad = None if (i == 3 and p.dim() == 1) else grad.clone()
            if i == 4:
                opt.param_groups[0]["weight_decay"] = 0.02
            off["on"] = disabled
            opt.step()
        _assert_same(a, b, opt_a, opt_b)
    assert sum(taken) >= 2, "the repeat path was never taken"


def test_plans_keep_no_batch_or_gradient_alive():
    """A plan is made from a call's tensors but must not hold them: after the repeat paths planned
    (train_step, loss(optimizer=), FusedSGD.step()), the batch and the gradients they were planned
    from are freed when the caller drops them (a large batch, zero_grad(set_to_none=True))."""
    import gc
    import weakref

    model = FusedLinearRegressor(4, 3, backend="triton").to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.01, momentum=0.9)
    x, _, _, t = random_problem(9, 4, 3, device=DEVICE)
    for _ in range(2):
        model.train_step(x, t, opt)
        model.loss(x, t, optimizer=opt).backward()
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt._linreg_repeat_steps and opt._linreg_repeat_losses and opt._linreg_repeat_updates
    held = [weakref.ref(v) for v in (x, t, *(p.grad for p in model.parameters()))]
    del x, t
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert [r() is None for r in held] == [True] * len(held)
