"""Tests for fp8.py: the FP8 linear against an fp64 reference, saturation, delayed scaling's histories, the CUDA
layout rules (checked on CPU), the conversion of a GPT, torch.compile, and short train.py runs with --fp8
(including resume and DDP on CPU). CPU only; CPU torch._scaled_mm runs FP8 GEMMs exactly, without speed."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fp8  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# Error bounds, norm-wise: ||y - y_ref|| / ||y_ref|| against an fp64 matmul of the unquantized tensors.
# Rounding to p mantissa bits has a relative error uniform in +-2^-(p+1), rms 2^-(p+1)/sqrt(3): 0.036 for E4M3
# (p=3), 0.072 for E5M2 (p=2). Per-tensor scaling keeps the values off the subnormals, so for a dot product of
# independent terms the relative error of the result is about the rms of its operands' errors combined:
# forward (E4M3 x E4M3) sqrt(2) * 0.036 = 0.051, gradients (E5M2 x E4M3) sqrt(0.072^2 + 0.036^2) = 0.081.
# The bounds are those times 1.5; measured: ~0.037 and ~0.058. The floor shows the GEMM really ran in FP8:
# bf16 would give ~0.002, fp32 ~1e-7.
FWD_BOUND, GRAD_BOUND, FP8_FLOOR = 0.077, 0.12, 0.01


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def fp8_vs_ref(x, w, g, recipe="current"):
    """Forward and both gradients of a Float8Linear and of the fp64 reference, for input x, weight w, grad g."""
    lin = nn.Linear(w.size(1), w.size(0), bias=False)
    lin.weight.data.copy_(w)
    layer = fp8.Float8Linear.from_linear(lin, recipe=recipe)
    xq = x.clone().requires_grad_()
    y = layer(xq)
    y.backward(g)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    yr = xr @ wr.T
    yr.backward(g.double())
    return (y, xq.grad, lin.weight.grad), (yr, xr.grad, wr.grad)


def random_case(x_shape, out_features, x_mag, g_mag, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen) * x_mag
    w = torch.randn(out_features, x_shape[-1], generator=gen) * 0.05
    g = torch.randn(*x_shape[:-1], out_features, generator=gen) * g_mag
    return x, w, g

# -----------------------------------------------------------------------------
# accuracy


# 2-D and 3-D inputs; (3, 5, 64) has 15 tokens, not a multiple of 16 (padded); magnitudes from 1e-3 to 1e5
# (far past E4M3's 448 before scaling) and gradients from 1e-6 (under E5M2's smallest subnormal, 1.5e-5) to 1e4
@pytest.mark.parametrize("x_shape,out_features", [((32, 64), 48), ((2, 24, 128), 256), ((3, 5, 64), 32),
                                                  ((256, 384), 128)])
@pytest.mark.parametrize("x_mag,g_mag", [(1e-3, 1e-6), (1.0, 1.0), (1e3, 1e4), (1e5, 1.0)])
@pytest.mark.parametrize("recipe", ["current", "delayed"])  # delayed's first step uses the current amax
def test_matches_fp64_reference(x_shape, out_features, x_mag, g_mag, recipe):
    (y, gx, gw), (yr, gxr, gwr) = fp8_vs_ref(*random_case(x_shape, out_features, x_mag, g_mag), recipe=recipe)
    assert y.shape == yr.shape and gx.shape == gxr.shape and gw.shape == gwr.shape
    assert y.dtype == gx.dtype == gw.dtype == torch.float32
    assert FP8_FLOOR < rel_err(y, yr) < FWD_BOUND
    assert FP8_FLOOR < rel_err(gx, gxr) < GRAD_BOUND
    assert FP8_FLOOR < rel_err(gw, gwr) < GRAD_BOUND


def test_the_bound_catches_a_wrong_scale(monkeypatch):
    case = random_case((64, 64), 48, 1.0, 1.0)
    real = fp8.scaled_mm
    # dequantising with twice the weight's scale: every output doubles
    monkeypatch.setattr(fp8, "scaled_mm", lambda a, b, sa, sb, *args, **kw: real(a, b, sa, 2 * sb, *args, **kw))
    (y, gx, _), (yr, gxr, _) = fp8_vs_ref(*case)
    assert rel_err(y, yr) > 0.5 and rel_err(gx, gxr) > 0.5
    # no per-tensor scaling at all (scale 1): 1e-4 is under half E4M3's smallest subnormal (2^-9) and flushes to 0
    monkeypatch.setattr(fp8, "scaled_mm", real)
    monkeypatch.setattr(fp8, "dequant_scale", lambda amax, dtype: torch.ones((), dtype=torch.float32))
    (y, _, _), (yr, _, _) = fp8_vs_ref(*random_case((64, 64), 48, 1e-4, 1.0))
    assert rel_err(y, yr) > 0.9


def test_zeros():
    x, w, g = random_case((32, 64), 48, 1.0, 1.0)
    x[::2] = 0  # rows of zeros inside a tensor
    (y, gx, gw), (yr, gxr, gwr) = fp8_vs_ref(x, w, g)
    assert torch.all(y[::2] == 0) and rel_err(y, yr) < FWD_BOUND and rel_err(gw, gwr) < GRAD_BOUND
    # an all-zero input: scale 1, exact zeros, no NaN from 0/0
    (y, gx, gw), (yr, gxr, gwr) = fp8_vs_ref(torch.zeros_like(x), w, g)
    assert torch.all(y == 0) and torch.all(gw == 0) and rel_err(gx, gxr) < GRAD_BOUND
    # an all-zero gradient
    (y, gx, gw), _ = fp8_vs_ref(x, w, torch.zeros_like(g))
    assert torch.all(gx == 0) and torch.all(gw == 0)


def test_dequant_scale():
    for dtype, fmax in ((fp8.E4M3, 448.0), (fp8.E5M2, 57344.0)):
        s = fp8.dequant_scale(torch.tensor(3.0), dtype)
        assert s.dtype == torch.float32 and s.item() == pytest.approx(3.0 / fmax)
        assert fp8.dequant_scale(torch.tensor(0.0), dtype).item() == 1.0


@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_huge_outliers_saturate_instead_of_overflowing(recipe, monkeypatch):
    def step(layer, x, g):
        xq = x.clone().requires_grad_()
        y = layer(xq)
        y.backward(g)
        return y, xq.grad
    x, w, g = random_case((32, 64), 48, 1.0, 1.0)
    lin = nn.Linear(64, 48, bias=False)
    lin.weight.data.copy_(w)
    layer = fp8.Float8Linear.from_linear(lin, recipe=recipe)
    step(layer, x, g)  # delayed: a history of amaxes ~4
    x2, g2 = x.clone(), g.clone()
    x2[0, 0], g2[1, 1] = 1e30, 1e30  # far past both formats' max, and past the history's scale
    y, gx = step(layer, x2, g2)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(lin.weight.grad).all()
    if recipe == "current":  # the amax itself lands on fp8's max: in range by construction
        return
    # delayed: the scale came from the history, so rows without the outlier keep full accuracy ...
    assert rel_err(y[1:], x2[1:].double() @ w.double().T) < FWD_BOUND
    # ... and the outlier is far out of range: without the clamp, E5M2's cast makes inf (CPU's E4M3 cast happens
    # to saturate by itself; CUDA's gives NaN)
    monkeypatch.setattr(fp8, "to_fp8", lambda t, scale, dtype: (t.float() / scale).to(dtype))
    layer = fp8.Float8Linear.from_linear(lin, recipe=recipe)
    step(layer, x, g)
    lin.weight.grad = None
    _, gx = step(layer, x2, g2)
    assert not torch.isfinite(gx).all()

# -----------------------------------------------------------------------------
# delayed scaling


def test_delayed_history_rolls_and_the_scale_follows_its_max(monkeypatch):
    scales = []  # every (scale, format) a cast used, in order: (weight, once,) input (forward), grad_output (backward)
    real = fp8.to_fp8
    monkeypatch.setattr(fp8, "to_fp8", lambda t, s, dtype: scales.append((s.item(), dtype)) or real(t, s, dtype))
    layer = fp8.Float8Linear.from_linear(nn.Linear(16, 16, bias=False))
    assert len(layer.amax_history_input) == fp8.HISTORY_LEN == 128
    gen = torch.Generator().manual_seed(0)
    n = 140
    amax = 1 + torch.rand(n, generator=gen)  # the input amax of each step
    amax[5] = 100.0                          # one big step: in effect for the 128 steps after it, then gone
    g_amax = 1 + torch.rand(n, generator=gen)
    for t in range(n):
        x = (2 * torch.rand(16, 16, generator=gen) - 1) * amax[t]
        x[3, 7] = amax[t]
        g = (2 * torch.rand(16, 16, generator=gen) - 1) * g_amax[t]
        g[0, 0] = -g_amax[t]
        scales.clear()
        layer(x).backward(g)
        if t == 0:  # the weight is cast once, before the first input, with its own amax: it never changes here
            (sw, fw) = scales.pop(0)
            assert fw == fp8.E4M3 and sw == pytest.approx(layer.weight.detach().abs().max().item() / 448, rel=1e-6)
        (sx, fx), (sg, fg) = scales
        assert (fx, fg) == (fp8.E4M3, fp8.E5M2)
        # the scale is the max over the previous 128 steps; the first step's, this step's own amax
        want_x = amax[max(0, t - 128):t].max() if t else amax[0]
        want_g = g_amax[max(0, t - 128):t].max() if t else g_amax[0]
        assert sx == pytest.approx(want_x.item() / 448, rel=1e-6), t
        assert sg == pytest.approx(want_g.item() / 57344, rel=1e-6), t
        if 6 <= t <= 133:
            assert sx == pytest.approx(100 / 448)
        # the history holds the last min(t+1, 128) amaxes, oldest first, zeros before them
        k = min(t + 1, 128)
        assert torch.equal(layer.amax_history_input[128 - k:], amax[t + 1 - k:t + 1])
        assert torch.equal(layer.amax_history_grad_output[128 - k:], g_amax[t + 1 - k:t + 1])
        assert torch.all(layer.amax_history_input[:128 - k] == 0)
    assert sx < 100 / 448  # the big step left the window
    assert layer.history("weight") is None  # (cast once per weight change, it takes its current amax)
    # evaluation reads the history but does not write it
    before = layer.amax_history_input.clone()
    layer.eval()
    with torch.no_grad():
        layer(x * 50)
    assert torch.equal(layer.amax_history_input, before)


def fresh_output(layer, x):
    """What a Float8Linear freshly made from layer's current weight computes for x: what a cache must give.
    (Current scaling, so no amax history differs between the two.)"""
    twin = fp8.Float8Linear.from_linear(nn.Linear(layer.in_features, layer.out_features, bias=False), "current")
    twin.weight.data.copy_(layer.weight.data)
    return twin(x)


def test_weight_cast_is_reused_within_a_step_and_redone_after_optimizer_step(monkeypatch):
    casts = []
    real = fp8.Float8Linear.weight_casts
    monkeypatch.setattr(fp8.Float8Linear, "weight_casts", lambda self: casts.append(1) or real(self))
    gen = torch.Generator().manual_seed(0)
    layer = fp8.Float8Linear.from_linear(nn.Linear(64, 48, bias=False), "current")
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for step in range(3):
        for micro in range(4):  # gradient accumulation: four forwards and backwards on one weight
            x = torch.randn(32, 64, generator=gen)
            y = layer(x)
            assert torch.equal(y, fresh_output(layer, x))  # (the twin's own cast is not counted below)
            casts_before = len(casts)
            y.square().mean().backward()
            assert len(casts) == casts_before
        opt.step()
        opt.zero_grad()
    assert len(casts) == 3 + 3 * 4  # one per optimizer step, plus the twins' (one per forward checked)
    # a cast left stale after a step would be caught: the cache was current after every step above, and ...
    x = torch.randn(32, 64, generator=gen)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(1.5)  # ... an in-place change outside any optimizer is seen by its version counter
    assert torch.equal(layer(x), fresh_output(layer, x))


def test_compiled_forward_uses_the_refreshed_cast_and_never_a_stale_one():
    gen = torch.Generator().manual_seed(1)
    layer = fp8.Float8Linear.from_linear(nn.Linear(64, 48, bias=False), "current")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for step in range(3):
        x = torch.randn(32, 64, generator=gen)
        if step != 1:  # step 1 skips the refresh: the compiled forward must then cast the weight itself
            fp8.refresh(layer)
        assert layer.cached == (step != 1)
        y = compiled(x)
        assert torch.equal(y, fresh_output(layer, x))
        y.square().mean().backward()
        opt.step()  # invalidates every cache (a global optimizer hook)
        assert not layer.cached
        opt.zero_grad()


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=128, n_head=2, n_kv_head=1, mlp_hidden=320, vocab_size=320, block_size=64)
    return GPT(GPTConfig(**{**cfg, **kw}))


def train_steps(model, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 320, (2, 64), generator=gen)
        model(idx, idx)[1].backward()
    return idx


def test_fp8_state_round_trip():
    a = tiny_gpt()
    fp8.convert_to_fp8(a)
    train_steps(a, 5, seed=1)
    state = fp8.fp8_state_dict(a)
    names = {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down")}
    assert set(state) == names
    assert all(set(h) == {"input", "grad_output"} and (v.device.type == "cpu") and (v[-5:] > 0).all()
               for h in state.values() for v in h.values())
    # what the next step gives, with the restored histories and without them
    results = []
    for load in (True, False):
        b = tiny_gpt(seed=99)
        b.load_state_dict(a.state_dict())
        fp8.convert_to_fp8(b)
        if load:
            fp8.load_fp8_state_dict(torch.compile(b, backend="eager"), state)  # a wrapper's names are unwrapped
        idx = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(7))
        loss = b(idx, idx)[1]
        loss.backward()
        results.append((loss, b.blocks[1].mlp.down.weight.grad))
    a.zero_grad()
    loss = a(idx, idx)[1]
    loss.backward()
    assert torch.equal(results[0][0], loss) and torch.equal(results[0][1], a.blocks[1].mlp.down.weight.grad)
    assert not torch.equal(results[1][1], a.blocks[1].mlp.down.weight.grad)  # the histories mattered
    with pytest.raises(ValueError, match="blocks.9.attn.qkv"):
        fp8.load_fp8_state_dict(a, {**state, "blocks.9.attn.qkv": state["blocks.0.attn.qkv"]})
    c = tiny_gpt()
    fp8.convert_to_fp8(c, recipe="current")
    assert fp8.fp8_state_dict(c) == {}
    fp8.load_fp8_state_dict(c, state)  # a delayed run resumed with current scaling: nothing to restore

# -----------------------------------------------------------------------------
# layout rules and shapes


def test_layout_check_enforces_the_cuda_rules():
    e4 = lambda *s: torch.randn(*s).to(fp8.E4M3)
    one = torch.tensor(1.0)
    a, b = e4(32, 64), e4(48, 64).t()  # row-major (32, 64) x column-major (64, 48)
    fp8.check_scaled_mm(a, b, one, one)
    fp8.check_scaled_mm(a.to(fp8.E5M2), b, one, one)  # E5M2 x E4M3 is fine
    bad = [
        ((a, b.contiguous(), one, one), "column-major"),  # a row-major second operand
        ((a.t().contiguous().t(), b, one, one), "row-major"),
        ((e4(32, 60), e4(48, 60).t(), one, one), "multiples of 16"),
        ((a, e4(40, 64).t(), one, one), "multiples of 16"),
        ((a.to(fp8.E5M2), b.to(fp8.E5M2), one, one), "E5M2 x E5M2"),
        ((a[None], b, one, one), "2-D"),
        ((a.float(), b, one, one), "fp8"),
        ((a, b, one.double(), one), "fp32"),
        ((a, b, one, torch.ones(2)), "one fp32 value"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            fp8.check_scaled_mm(*args)


def test_every_gemm_has_the_cuda_layout(monkeypatch):
    """Spy on torch._scaled_mm itself: forward + backward make exactly the three GEMMs, each valid for CUDA."""
    calls, real = [], torch._scaled_mm

    def spy(a, b, **kw):
        calls.append((a.dtype, b.dtype, kw["use_fast_accum"], kw["out_dtype"]))
        fp8.check_scaled_mm(a, b, kw["scale_a"], kw["scale_b"])
        return real(a, b, **kw)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    (y, gx, gw), _ = fp8_vs_ref(*random_case((2, 8, 64), 48, 1.0, 1.0))
    E4, E5, f32 = fp8.E4M3, fp8.E5M2, torch.float32
    assert calls == [(E4, E4, True, f32), (E5, E4, False, f32), (E5, E4, False, f32)]


def test_bad_shapes_stay_in_high_precision():
    model = tiny_gpt(mlp_hidden=100)  # gate_up 128 -> 200 and down 100 -> 128: not multiples of 16
    skipped = fp8.convert_to_fp8(model)
    for i in range(2):
        assert isinstance(model.blocks[i].attn.qkv, fp8.Float8Linear)
        assert type(model.blocks[i].mlp.gate_up) is nn.Linear and type(model.blocks[i].mlp.down) is nn.Linear
    assert [n for n, _ in skipped] == [f"blocks.{i}.mlp.{n}" for i in range(2) for n in ("gate_up", "down")]
    assert all("multiple of 16" in reason for _, reason in skipped)
    # train.py's TINY model (64 wide) is under the default min_features; a smaller min converts it
    small = tiny_gpt(n_embd=64, mlp_hidden=160)
    skipped = fp8.convert_to_fp8(small)
    assert len(skipped) == 8 and all("min_features=128" in r for _, r in skipped)
    assert not any(isinstance(m, fp8.Float8Linear) for m in small.modules())
    assert fp8.convert_to_fp8(small, min_features=16) == []
    assert sum(isinstance(m, fp8.Float8Linear) for m in small.modules()) == 8
    with pytest.raises(ValueError, match="unknown fp8 recipe"):
        fp8.convert_to_fp8(small, recipe="hybrid")

# -----------------------------------------------------------------------------
# the GPT


def test_convert_gpt_keeps_parameters_and_state_dict():
    model = tiny_gpt()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    groups = [[id(p) for p in g["params"]] for g in model.param_groups(0.1)]
    wte = model.wte
    assert fp8.convert_to_fp8(model) == []
    converted = {n for n, m in model.named_modules() if isinstance(m, fp8.Float8Linear)}
    assert converted == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.gate_up",
                                                                         "mlp.down")}
    assert model.wte is wte and type(model.wte) is nn.Embedding  # embedding and tied head untouched
    assert list(model.state_dict()) == keys  # histories are non-persistent: checkpoints are interchangeable
    assert [[id(p) for p in g["params"]] for g in model.param_groups(0.1)] == groups
    ref.load_state_dict(model.state_dict())  # and a converted model's state_dict loads into a plain one
    idx = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(0))
    (logits, _), (_, loss) = model(idx), model(idx, idx)
    (ref_logits, _), (_, ref_loss) = ref(idx), ref(idx, idx)
    # eight FP8 GEMMs of ~0.04 error each feed the residual stream: a looser bound than one GEMM's
    assert FP8_FLOOR < rel_err(logits, ref_logits) < 2 * FWD_BOUND
    assert abs(loss.item() - ref_loss.item()) < 0.03 * ref_loss.item()  # measured: 1.4%
    with fp8.disabled(model):  # high precision on demand: the plain model's output exactly
        assert torch.equal(model(idx)[0], ref_logits)
    assert all(m.enabled for m in model.modules() if isinstance(m, fp8.Float8Linear))
    assert torch.equal(model(idx)[0], logits)


def test_autocast_output_dtypes():
    layer = fp8.Float8Linear.from_linear(nn.Linear(64, 32, bias=False))
    x, w, g = random_case((2, 16, 64), 32, 1.0, 1.0)
    layer.weight.data.copy_(w)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g.bfloat16())
    # bf16 out as autocast asks; gradients in the dtypes of the input and the fp32 master weight
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert rel_err(y, x.detach().double() @ w.double().T) < FWD_BOUND


def test_compiles_without_graph_breaks_and_matches_eager():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward (with the histories'
    in-place updates) like inductor does, without a C++ build. Same losses, gradients and histories."""
    eager = tiny_gpt(n_layer=1)
    fp8.convert_to_fp8(eager)
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for s in range(3):
        idx = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(s))
        fp8.refresh(compiled)  # what train.py does before each step: weight casts, filled histories (eager)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = eager(idx, idx)[1], step(idx, idx)[1]
        a.backward()
        b.backward()
        assert torch.equal(a, b)
    for p, q in zip(eager.parameters(), compiled.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert fp8.fp8_state_dict(eager).keys() == fp8.fp8_state_dict(compiled).keys()
    for name, h in fp8.fp8_state_dict(eager).items():
        for t, v in h.items():
            assert torch.equal(v, fp8.fp8_state_dict(step)[name][t]) and (v[-3:] > 0).all()

# -----------------------------------------------------------------------------
# train.py --fp8


# 128 wide (the default min_features converts it), every dim a multiple of 16; 4 x 32 tokens, 2 micro-steps
FP8_TINY = ["--n_layer=1", "--n_embd=128", "--n_head=2", "--n_kv_head=1", "--mlp_hidden=384", "--block_size=32",
            "--batch_size=4", "--total_batch_size=256", "--eval_iters=4", "--sample_len=0", "--log_interval=1000",
            "--max_iters=30", "--warmup_iters=3", "--decay_iters=6", "--eval_interval=0", "--ckpt_interval=15"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The same 30 steps without FP8 and with each recipe: {name: (out_dir, result)}."""
    out = {}
    for name, flags in (("bf16", []), ("delayed", ["--fp8"]), ("current", ["--fp8", "--fp8_recipe=current"])):
        d = str(tmp_path_factory.mktemp(name))
        out[name] = d, train.main(FP8_TINY + [f"--data_dir={data_dir}", f"--out_dir={d}", *flags])
    return out


def losses(out_dir):
    entries = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_training_tracks_high_precision(runs, recipe):
    (base_dir, base), (d, res) = runs["bf16"], runs[recipe]
    a, b = losses(base_dir), losses(d)
    assert sorted(b) == list(range(30)) and a != b  # FP8 really changed the numbers
    assert b[29] < 0.5 * b[0]  # it learns
    tail = lambda L: sum(L[s] for s in range(20, 30)) / 10
    assert abs(tail(b) - tail(a)) < 0.05 * tail(a)
    assert abs(res["val_loss"] - base["val_loss"]) < 0.05 * base["val_loss"]
    ckpt = torch.load(os.path.join(d, "ckpt_0000030.pt"), map_location="cpu", weights_only=False)
    assert len(ckpt["fp8"]) == (4 if recipe == "delayed" else 0)
    base_ckpt = torch.load(os.path.join(base_dir, "ckpt_0000030.pt"), map_location="cpu", weights_only=False)
    assert ckpt["model"].keys() == base_ckpt["model"].keys()


def test_fp8_resume_restores_the_histories(runs, data_dir, tmp_path, monkeypatch):
    ref_dir = runs["delayed"][0]
    ckpt = os.path.join(ref_dir, "ckpt_0000015.pt")
    ref = losses(ref_dir)
    out = str(tmp_path / "resumed")
    train.main(FP8_TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--fp8", f"--resume={ckpt}"])
    assert losses(out) == {s: ref[s] for s in range(15, 30)}  # bit for bit
    # the same resume with the histories dropped is not the same run
    monkeypatch.setattr(fp8, "load_fp8_state_dict", lambda model, state: None)
    out = str(tmp_path / "no_history")
    train.main(FP8_TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--fp8", f"--resume={ckpt}"])
    assert losses(out)[15] != ref[15]


def test_train_lists_skipped_linears_once(data_dir, tmp_path, capsys):
    small = [f if not f.startswith(("--n_embd", "--mlp_hidden")) else "" for f in FP8_TINY]
    train.main([f for f in small if f] + ["--n_embd=64", "--mlp_hidden=160", f"--data_dir={data_dir}",
                                          f"--out_dir={tmp_path}", "--fp8", "--dry_run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fp8:")]
    assert len(lines) == 4 and all("min_features" in line for line in lines)


def test_ddp_on_cpu_equals_one_process(data_dir, tmp_path):
    """Two gloo processes, one micro-batch each, against one process with two: current scaling quantizes the same
    micro-batches with the same scales, and the fp32 weight gradients are averaged, so the losses agree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                     "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *FP8_TINY, "--max_iters=12", "--ckpt_interval=0", f"--data_dir={data_dir}",
                        f"--out_dir={tmp_path}", "--fp8", "--fp8_recipe=current"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one = str(tmp_path / "one")
    train.main(FP8_TINY + ["--max_iters=12", "--ckpt_interval=0", f"--data_dir={data_dir}", f"--out_dir={one}",
                           "--fp8", "--fp8_recipe=current"])
    a, b = losses(one), losses(tmp_path)
    assert sorted(b) == list(range(12))
    for s in range(12):
        assert b[s] == pytest.approx(a[s], rel=1e-5), s


# -----------------------------------------------------------------------------
# on an FP8 GPU (python -m pytest -m gpu): CUDA's _scaled_mm enforces the layout rules itself


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs an FP8 GPU (sm_89+)")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_matches_reference_under_autocast(compiled):
    x, w, g = (t.cuda() for t in random_case((4, 512, 1536), 2560, 1.0, 1.0))
    lin = nn.Linear(1536, 2560, bias=False, device="cuda")
    lin.weight.data.copy_(w)
    layer = fp8.Float8Linear.from_linear(lin)
    step = torch.compile(layer, fullgraph=True) if compiled else layer
    for _ in range(3):  # delayed scaling: the first step and two with a history
        xq = x.clone().requires_grad_()
        lin.weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = step(xq)
        y.backward(g.bfloat16())
    assert y.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.float32
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    (xr @ wr.T).backward(g.double())
    assert FP8_FLOOR < rel_err(y, x.double() @ w.double().T) < FWD_BOUND
    assert FP8_FLOOR < rel_err(xq.grad, xr.grad) < GRAD_BOUND
    assert FP8_FLOOR < rel_err(lin.weight.grad, wr.grad) < GRAD_BOUND
