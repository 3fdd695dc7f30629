"""muon.py: Newton-Schulz, the Triton kernel and the optimizer, against slow references and torch.optim."""
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import muon
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUINTIC = (3.4445, -4.7750, 2.0315)  # RECIPE.md section 4, written out again
TINY = dict(n_layer=1, n_embd=64, n_head=2, n_kv_head=1, mlp_hidden=160, vocab_size=64, block_size=16)


def with_spectrum(rows, cols, s, seed):
    """U diag(s) V^T with random orthonormal U (rows x k) and V (cols x k), k = min(rows, cols)."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))[0]
    return U, V, (U * s) @ V.T


def scalar_ns(s, coeffs):
    """What Newton-Schulz does to each singular value: normalise by ||s||_2 (= ||G||_F), then the polynomials."""
    s = s / s.norm()
    for a, b, c in coeffs:
        s = a * s + b * s**3 + c * s**5
    return s


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw}))


def loss_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, TINY["vocab_size"], (4, TINY["block_size"] + 1), generator=g)
    model.zero_grad(set_to_none=True)
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def set_lrs(opt, eta):
    for group in opt.param_groups:  # what train.py does every step
        group["lr"] = eta * group["lr_mult"]

# -----------------------------------------------------------------------------
# Newton-Schulz


@pytest.mark.parametrize("shape", [(64, 64), (64, 96), (96, 64)])
def test_newton_schulz_applies_the_quintic_to_each_singular_value(shape):
    # a reference that iterates on numbers, not matrices: U and V must stay, and each s go to p(p(...p(s)))
    k = min(shape)
    s = 3.0 * torch.logspace(0, -2, k, dtype=torch.float64)  # condition number 100, any overall scale
    U, V, G = with_spectrum(*shape, s, seed=k)
    O = muon.zeropower_via_newtonschulz(G.float())
    assert O.shape == G.shape and O.dtype == torch.float32
    want = (U * scalar_ns(s, [QUINTIC] * 5)) @ V.T
    torch.testing.assert_close(O.double(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (128, 200), (64, 64)])
def test_quintic_singular_values_lie_in_its_band(shape):
    # the quintic maps every singular value above ~1e-2 of ||G||_F into about [0.68, 1.13] (its band, computed
    # by iterating the polynomial) and deliberately does not converge to 1
    if shape[0] == shape[1]:  # a square Gaussian has singular values near 0 that five steps cannot lift
        G = with_spectrum(*shape, torch.logspace(0, -1.5, shape[0], dtype=torch.float64), seed=1)[2].float()
    else:
        G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(muon.zeropower_via_newtonschulz(G))
    assert sv.min() > 0.65 and sv.max() < 1.15, (sv.min(), sv.max())
    assert sv.max() - sv.min() > 0.2  # an SVD or a converging polynomial would give all ones


def test_newton_schulz_batched_equals_per_matrix():
    G = torch.randn(3, 96, 64, generator=torch.Generator().manual_seed(0))  # tall: each transposed
    for coeffs in ("quintic", "polar_express"):
        O = muon.zeropower_via_newtonschulz(G, coeffs=coeffs)
        for i in range(3):
            torch.testing.assert_close(O[i], muon.zeropower_via_newtonschulz(G[i], coeffs=coeffs), atol=1e-5, rtol=0)


def test_polar_express_lands_closer_to_one():
    G = torch.randn(128, 200, generator=torch.Generator().manual_seed(0))
    pe = torch.linalg.svdvals(muon.zeropower_via_newtonschulz(G, coeffs="polar_express"))
    q = torch.linalg.svdvals(muon.zeropower_via_newtonschulz(G, coeffs="quintic"))
    assert (pe - 1).abs().max() < 0.15, (pe.min(), pe.max())  # its 5-step band is about [0.87, 1.12]
    assert (pe - 1).abs().max() < 0.6 * (q - 1).abs().max()
    # and it is the published sequence, steps past the list repeating the last (converging) polynomial
    k = min(G.shape)
    s = torch.logspace(0, -2, k, dtype=torch.float64)
    U, V, H = with_spectrum(*G.shape, s, seed=3)
    for steps in (5, 9):
        want = (U * scalar_ns(s, muon.ns_coefficients("polar_express", steps))) @ V.T
        torch.testing.assert_close(muon.zeropower_via_newtonschulz(H.float(), steps, "polar_express").double(),
                                   want, atol=2e-5, rtol=0)
    assert muon.ns_coefficients("polar_express", 9)[-1] == (1.875, -1.25, 0.375)

# -----------------------------------------------------------------------------
# Triton kernel under the interpreter (a subprocess: TRITON_INTERPRET must be set before triton loads)

TRITON_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {repo!r})
import muon
muon.TRITON_BLOCKS = (32, 32)  # small tiles: several per matrix, ragged edges, mirrored stores
calls = []
for name in ("sym_matmul", "sym_poly"):
    def counted(*args, _f=getattr(muon, name), _n=name, **kw):
        calls.append(_n)
        return _f(*args, **kw)
    setattr(muon, name, counted)
err = lambda x, y: ((x - y).norm() / y.norm()).item()
torch.manual_seed(0)
out = {{}}
for shape in [(64, 96), (2, 50, 70), (40, 40)]:
    X = torch.randn(*shape)
    out[f"xxt {{shape}}"] = err(muon.sym_matmul(X), X @ X.mT)
    S = X @ X.mT / shape[-1]
    out[f"poly {{shape}}"] = err(muon.sym_poly(S, -4.775, 2.0315), -4.775 * S + 2.0315 * S @ S)
calls.clear()
for shape in [(64, 96), (2, 100, 60)]:
    G = torch.randn(*shape)
    out[f"ns {{shape}}"] = err(muon.zeropower_via_newtonschulz(G, use_triton=True),
                              muon.zeropower_via_newtonschulz(G, use_triton=False))
out["calls"] = calls
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT.format(repo=REPO)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_triton_sym_matmul_matches_torch(interpreted):
    for shape in ["(64, 96)", "(2, 50, 70)", "(40, 40)"]:
        assert interpreted[f"xxt {shape}"] < 1e-6, interpreted


def test_triton_sym_poly_matches_torch(interpreted):
    for shape in ["(64, 96)", "(2, 50, 70)", "(40, 40)"]:
        assert interpreted[f"poly {shape}"] < 1e-6, interpreted


def test_triton_newton_schulz_matches_torch(interpreted):
    assert interpreted["ns (64, 96)"] < 1e-5 and interpreted["ns (2, 100, 60)"] < 1e-5, interpreted
    assert interpreted["calls"] == ["sym_matmul", "sym_poly"] * 10  # both products ran in Triton, 5 steps x 2

# -----------------------------------------------------------------------------
# the optimizer


def reference_muon_step(W, g, buf, lr, wd, mu=0.95, steps=5):
    """The recipe's Muon for one matrix, in float64: classic Nesterov momentum, the quintic written out, the
    Frobenius normalisation, decay with the plain lr, then the Moonlight scale 0.2 sqrt(max(rows, cols))."""
    buf.mul_(mu).add_(g)
    u = g + mu * buf
    X = u.T if u.size(0) > u.size(1) else u
    X = X / X.norm()
    for _ in range(steps):
        a, b, c = QUINTIC
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    O = X.T if u.size(0) > u.size(1) else X
    W.mul_(1 - lr * wd)
    W.sub_(lr * 0.2 * math.sqrt(max(W.shape)) * O)


def test_muon_steps_match_reference_and_adamw():
    model, twin = tiny_gpt(), tiny_gpt()
    opt = muon.Muon(model.param_groups(weight_decay=0.1), lr=0.0)
    # the reference: the hidden matrices by hand in float64, embedding and norms by torch.optim.AdamW
    groups = twin.param_groups(weight_decay=0.1)
    adamw = torch.optim.AdamW([g for g in groups if g["name"] != "hidden"], betas=(0.9, 0.95), eps=1e-8)
    hidden = {n: p.detach().double().clone() for n, p in twin.named_parameters() if p.dim() == 2 and n != "wte.weight"}
    bufs = {n: torch.zeros_like(W) for n, W in hidden.items()}
    params = dict(model.named_parameters())
    eta = 0.01
    for step in range(3):
        set_lrs(opt, eta)
        set_lrs(adamw, eta)
        grads = loss_grads(model, step)
        opt.step()
        for n, p in twin.named_parameters():
            p.grad = grads[n]
        adamw.step()
        lr = eta * groups[1]["lr_mult"]
        for n, W in hidden.items():
            reference_muon_step(W, grads[n].double(), bufs[n], lr, 0.1)
        for n, W in hidden.items():
            torch.testing.assert_close(params[n].double(), W, atol=2e-6, rtol=0, msg=f"{n} at step {step}")
        for n, p in twin.named_parameters():
            if n not in hidden:
                torch.testing.assert_close(params[n], p, atol=1e-7, rtol=0, msg=f"{n} at step {step}")
    # the state torch's optimizers keep, under their names (momentum in torch.optim.Muon's form)
    assert set(opt.state[params["blocks.0.attn.qkv.weight"]]) == {"momentum_buffer"}
    assert set(opt.state[params["wte.weight"]]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(opt.state[params["blocks.0.mlp.down.weight"]]["momentum_buffer"].double(),
                               0.05 * bufs["blocks.0.mlp.down.weight"], atol=1e-9, rtol=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("scale,adjust", [("spectral", "original"), ("moonlight", "match_rms_adamw")])
def test_matches_torch_optim_muon(scale, adjust, monkeypatch):
    model, twin = tiny_gpt(), tiny_gpt()
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and n != "wte.weight"]
    mats, twins = [model.get_parameter(n) for n in names], [twin.get_parameter(n) for n in names]
    ours = muon.Muon([dict(name="hidden", params=mats)], lr=0.02, weight_decay=0.1, muon_scale=scale)
    theirs = torch.optim.Muon(twins, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    for step in range(4):
        start = [p.detach().clone() for p in mats]
        grads = loss_grads(model, step)
        for n, q in zip(names, twins):
            q.grad = grads[n]
        if step == 2:  # from now on torch.optim.Muon runs our fp32 iteration instead of its bf16 one
            monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz",
                                lambda G, coeffs, steps, eps: muon.zeropower_via_newtonschulz(G, steps, coeffs))
        ours.step()
        theirs.step()
        with torch.no_grad():
            for p, q, p0 in zip(mats, twins, start):
                torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"],
                                           atol=0, rtol=0)
                if step < 2:  # bf16 moves the small singular values; the step's size and direction agree
                    ours_d, theirs_d = (p - p0).flatten(), (q - p0).flatten()
                    assert abs(ours_d.norm() / theirs_d.norm() - 1) < 0.01
                    assert F.cosine_similarity(ours_d, theirs_d, dim=0) > 0.99
                    q.copy_(p)
                else:  # same iteration: momentum, decay and lr scale agree to rounding
                    torch.testing.assert_close(p, q, atol=1e-7, rtol=0)


def test_effective_lrs_at_1p3b_match_the_recipe():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("xmodel-2.5"))
    opt = muon.Muon(model.param_groups(weight_decay=0.1), lr=0.0)
    set_lrs(opt, 0.01)  # eta = 0.01, m = 6
    (hidden,) = [g for g in opt.param_groups if g["muon"]]
    assert {g["name"] for g in opt.param_groups if not g["muon"]} == {"embedding", "norm"}
    assert round(hidden["lr"], 6) == 1.667e-3
    names = {id(p): n.split(".", 2)[2] for n, p in model.named_parameters() if n.startswith("blocks.")}
    seen = {}
    for p in hidden["params"]:
        seen.setdefault(names[id(p)], set()).add(round(muon.adjusted_lr(hidden["lr"], p.shape, hidden["muon_scale"]), 4))
    # RECIPE.md section 4, at peak on 1.3B
    assert seen == {"attn.qkv.weight": {0.0169}, "attn.proj.weight": {0.0131},
                    "mlp.gate_up.weight": {0.0292}, "mlp.down.weight": {0.0207}}


# -----------------------------------------------------------------------------
# the width rules (muon.MUON_SCALES): the LR each gives, and how its step grows with width


def test_moonlight_step_is_the_recipe_bit_for_bit():
    # the default rule keeps the group's lr untouched (lr_mult**0 == 1.0): the step, written out, equals it exactly
    model = tiny_gpt()  # n_embd 64: m = 1/4, so a rule that rescaled the lr would show
    opt = muon.Muon(model.param_groups(weight_decay=0.1), lr=0.0)
    set_lrs(opt, 0.01)
    (hidden,) = [g for g in opt.param_groups if g["muon"]]
    start = {p: p.detach().clone() for p in hidden["params"]}
    loss_grads(model, 0)
    opt.step()
    lr = 0.01 * hidden["lr_mult"]
    for p in hidden["params"]:
        buf = torch.zeros_like(p).lerp_(p.grad, 1 - 0.95)
        want = start[p].mul(1 - lr * 0.1)
        want.add_(muon.zeropower_via_newtonschulz(p.grad.lerp(buf, 0.95)), alpha=-(lr * 0.2 * math.sqrt(max(p.shape))))
        assert torch.equal(p, want)


def test_each_rule_steps_the_hidden_matrices_at_eta_over_m_to_its_power():
    # n_embd 512 over base 256: m = 2. Only the Muon matrices' LR changes with the rule, to eta/m**e; the
    # AdamW-managed groups (embedding, norms) step the same under every rule
    # each rule's LR and step size on a (rows x cols) matrix, written out from RECIPE.md section 4 and issue 21
    want = {"moonlight": (1.0, lambda r, c: 0.2 * math.sqrt(max(r, c))),
            "moonlight_sqrt_m": (0.5, lambda r, c: 0.2 * math.sqrt(max(r, c))),
            "unit_rms_norm": (0.0, lambda r, c: math.sqrt(r / c)),
            "spectral": (1.0, lambda r, c: math.sqrt(max(1, r / c)))}
    steps = {}
    for rule, (e, scale) in want.items():
        model = tiny_gpt(n_embd=512, n_head=8, n_kv_head=2, mlp_hidden=1280)
        opt = muon.Muon(model.param_groups(weight_decay=0.1), lr=0.0, muon_scale=rule)
        set_lrs(opt, 0.01)
        (hidden,) = [g for g in opt.param_groups if g["muon"]]
        assert hidden["lr_mult"] == 1 / 2 and muon.muon_lr(hidden) == pytest.approx(0.01 / 2**e, rel=1e-12)
        loss_grads(model, 0)
        with torch.no_grad():
            for p in hidden["params"]:
                p.zero_()  # zero stays zero under decay: afterwards p is minus the orthogonalized step
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        steps[rule] = {n: start[n] - p.detach() for n, p in model.named_parameters()}
        for n, d in steps[rule].items():
            if n == "wte.weight" or d.dim() == 1:
                assert torch.equal(d, steps["moonlight"][n]), (rule, n)
            else:  # the recipe's step times the rule's step size over the recipe's
                ratio = 0.01 / 2**e * scale(*d.shape) / (0.01 / 2 * 0.2 * math.sqrt(max(d.shape)))
                torch.testing.assert_close(d, ratio * steps["moonlight"][n], atol=1e-9, rtol=1e-5, msg=f"{rule} {n}")


def test_rules_are_named_for_help():
    assert list(muon.MUON_SCALES)[0] == "moonlight"  # the recipe's comes first (train.py's default)
    assert {"moonlight", "moonlight_sqrt_m", "unit_rms_norm", "spectral"} <= set(muon.MUON_SCALES)
    for name, rule in muon.MUON_SCALES.items():
        assert rule.help and "\n" not in rule.help and rule.lr_exp in (0.0, 0.5, 1.0), name


WIDTHS = (64, 128, 256, 512, 1024)
ETA = 0.01
# d log ||dW||_2 / d log width: the step's LR (eta / m**e) times its scale, U V^T's singular values ~1 (muon.py)
WIDTH_SLOPES = {"moonlight": -0.5, "moonlight_sqrt_m": 0.0, "unit_rms_norm": 0.0, "spectral": -1.0}


def top_right_singular_vector(D):
    D = D.double()
    if D.size(0) < D.size(1):  # from the smaller Gram matrix
        v = D.T @ torch.linalg.eigh(D @ D.T)[1][:, -1]
        return v / v.norm()
    return torch.linalg.eigh(D.T @ D)[1][:, -1]


@pytest.fixture(scope="module")
def width_sweep():
    """One Muon step from a fixed random gradient per width, under each rule at the LR it gives from ETA, on the
    square hidden (n, n) and the MLP's (2.5n, n) and (n, 2.5n). Per (rule, shape): a list over WIDTHS of
    (||dW||_2, RMS(dW x) / RMS(x) for x along the step's top right singular vector), and the steps at base width."""
    out, at_base = {}, {}
    with pytest.MonkeyPatch.context() as mp:  # every rule orthogonalizes the same momentum: Newton-Schulz once each
        mp.setattr(muon, "zeropower_via_newtonschulz", reuse_last(muon.zeropower_via_newtonschulz))
        for n in WIDTHS:
            with torch.device("meta"):  # the muP groups at this width, without the weights
                model = GPT(GPTConfig(n_layer=1, n_embd=n, n_head=max(1, n // 64), n_kv_head=1,
                                      mlp_hidden=5 * n // 2, vocab_size=64, block_size=16))
            (hidden,) = [g for g in model.param_groups(weight_decay=0.1) if g["name"] == "hidden"]
            for kind, shape in {"square": (n, n), "up": (5 * n // 2, n), "down": (n, 5 * n // 2)}.items():
                grad = torch.randn(shape, generator=torch.Generator().manual_seed(n + len(kind)))
                steps = {}
                for rule in muon.MUON_SCALES:
                    W = torch.zeros(shape)  # decay keeps zero at zero: afterwards W is minus the step
                    opt = muon.Muon([dict(hidden, params=[W])], muon_scale=rule)
                    set_lrs(opt, ETA)
                    W.grad = grad
                    opt.step()
                    steps[rule] = -W.detach().double()
                v = top_right_singular_vector(steps["moonlight"])  # every rule's too: the steps differ by a scalar
                for rule, D in steps.items():
                    y = D @ (v * math.sqrt(shape[1]))  # an input of RMS 1
                    out.setdefault((rule, kind), []).append(((D @ v).norm().item(), y.pow(2).mean().sqrt().item()))
                if model.config.width_mult == 1:
                    at_base[kind] = steps
    return out, at_base


def reuse_last(f):
    last = {}

    def cached(G, *args, **kw):
        if not (last and torch.equal(last["G"], G) and last["args"] == (args, kw)):
            last.update(G=G.clone(), args=(args, kw), out=f(G, *args, **kw))
        return last["out"].clone()
    return cached


def loglog_slope(ys):
    x = [math.log(n) for n in WIDTHS]
    y = [math.log(v) for v in ys]
    xm, ym = sum(x) / len(x), sum(y) / len(y)
    return sum((a - xm) * (b - ym) for a, b in zip(x, y)) / sum((a - xm) ** 2 for a in x)


@pytest.mark.parametrize("rule", list(WIDTH_SLOPES))
def test_step_spectral_norm_against_width(width_sweep, rule):
    # RECIPE.md section 4: the recipe's step shrinks as width^-1/2 (a proxy-tuned LR steps less at 1.3B), the
    # release's sweep rule and Megatron-LM's width-invariant one stay flat, Keller Jordan's at eta/m falls as 1/width
    out, _ = width_sweep
    for kind in ("square", "up", "down"):
        norms, rms = zip(*out[rule, kind])
        assert loglog_slope(norms) == pytest.approx(WIDTH_SLOPES[rule], abs=0.02), (kind, norms)
        assert loglog_slope(rms) == pytest.approx(WIDTH_SLOPES[rule], abs=0.02), (kind, rms)


def test_width_invariant_rule_moves_outputs_by_eta(width_sweep):
    # unit_rms_norm: an input of RMS 1 along the step moves the output's RMS by eta times U V^T's top singular
    # value, at every width and for every shape: 1 to 1.21 (the quintic's largest output, p(0.5545) = 1.2025)
    out, _ = width_sweep
    for kind in ("square", "up", "down"):
        for n, (_, rms) in zip(WIDTHS, out["unit_rms_norm", kind]):
            assert ETA < rms < 1.21 * ETA, (kind, n, rms)


def test_rules_agree_at_base_width(width_sweep):
    # at m = 1 the release's sweep rule is the recipe's: eta/sqrt(m) = eta/m
    _, at_base = width_sweep
    for kind, steps in at_base.items():
        assert torch.equal(steps["moonlight_sqrt_m"], steps["moonlight"]), kind


def test_groups_are_checked():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="not a matrix"):
        muon.Muon([dict(name="hidden", params=[model.norm.weight])])
    with pytest.raises(ValueError, match="muon_scale"):
        muon.Muon(model.param_groups(weight_decay=0.1), muon_scale="rms")
    opt = muon.Muon([dict(params=[model.wte.weight]), dict(params=[model.blocks[0].mlp.down.weight], muon=True)])
    assert [g["muon"] for g in opt.param_groups] == [False, True]


def test_split_fused_orthogonalizes_each_block():
    model = tiny_gpt()
    qkv, gate_up = model.blocks[0].attn.qkv.weight, model.blocks[0].mlp.gate_up.weight
    grads = {}
    for p in (qkv, gate_up):
        assert sum(p.fused_rows) == p.size(0)
        grads[p] = torch.cat([with_spectrum(r, p.size(1), torch.logspace(0, -1, min(r, p.size(1)), dtype=torch.float64),
                                            seed=i)[2].float() for i, r in enumerate(p.fused_rows)])
    deltas = {}
    for split in (False, True):
        start = {p: p.detach().clone() for p in grads}
        opt = muon.Muon([dict(name="hidden", params=list(grads))], lr=0.01, momentum=0.0, split_fused=split)
        for p, g in grads.items():
            p.grad = g
        opt.step()
        deltas[split] = {p: start[p] - p.detach() for p in grads}
        with torch.no_grad():
            for p in grads:
                p.copy_(start[p])
    for p in grads:
        r0 = 0
        for rows in p.fused_rows:
            block = deltas[True][p][r0:r0 + rows] / muon.adjusted_lr(0.01, (rows, p.size(1)))
            whole = deltas[False][p][r0:r0 + rows] / muon.adjusted_lr(0.01, p.shape)
            torch.testing.assert_close(block, muon.zeropower_via_newtonschulz(grads[p][r0:r0 + rows]), atol=1e-5, rtol=0)
            sv = torch.linalg.svdvals(block)
            assert sv.min() > 0.65 and sv.max() < 1.15
            assert (block - whole).norm() > 0.1 * whole.norm()  # orthogonalizing the whole is something else
            r0 += rows


def test_state_dict_round_trip():
    model = tiny_gpt()
    opt = muon.Muon(model.param_groups(weight_decay=0.1), lr=0.0, ns_coeffs="polar_express", muon_scale="spectral")
    for step in range(3):
        set_lrs(opt, 0.01)
        loss_grads(model, step)
        opt.step()
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)
    twin = tiny_gpt(seed=1)
    twin.load_state_dict(model.state_dict())
    resumed = muon.Muon(twin.param_groups(weight_decay=0.0), lr=0.5)  # the checkpoint's settings must win
    blob.seek(0)
    resumed.load_state_dict(torch.load(blob))
    for g, h in zip(opt.param_groups, resumed.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}
    for step in range(3, 5):
        for o, m in ((opt, model), (resumed, twin)):
            set_lrs(o, 0.01)
            loss_grads(m, step)
            o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n

# -----------------------------------------------------------------------------
# distributed: each rank orthogonalizes a share, the results are all-gathered

DIST_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import muon
from model import GPT, GPTConfig
ddp = "RANK" in os.environ
if ddp:
    dist.init_process_group("gloo")
ns, counted = muon.zeropower_via_newtonschulz, [0]
def counting(G, *args, **kw):
    counted[0] += int((G.flatten(1).abs().sum(1) > 0).sum())  # real matrices, not the zero padding
    return ns(G, *args, **kw)
muon.zeropower_via_newtonschulz = counting
torch.manual_seed(0)
model = GPT(GPTConfig(**{tiny!r}))
opt = muon.Muon(model.param_groups(weight_decay=0.1), lr=0.01)
for step in range(3):
    g = torch.Generator().manual_seed(step)  # the same (as if all-reduced) gradients on every rank
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
rank = dist.get_rank() if ddp else 0
torch.save(dict(params=model.state_dict(), counted=counted[0], state=opt.state_dict()["state"]),
           os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
if ddp:
    dist.destroy_process_group()
"""


def test_distributed_share_and_all_gather(tmp_path):
    script = tmp_path / "muon_ddp.py"
    script.write_text(DIST_SCRIPT.format(repo=REPO, tiny={**TINY, "n_layer": 3}))  # 3 per shape: one rank pads
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"single": [sys.executable, str(script)],
            "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]}
    procs = {}
    for name, cmd in runs.items():
        (tmp_path / name).mkdir()
        procs[name] = subprocess.Popen(cmd + [str(tmp_path / name)], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        out = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, out[-3000:]
    single = torch.load(tmp_path / "single" / "rank0.pt")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        for n, p in single["params"].items():
            torch.testing.assert_close(r["params"][n], p, atol=1e-6, rtol=0, msg=n)
        for i, s in single["state"].items():  # momentum and moments complete on every rank
            for k, v in s.items():
                torch.testing.assert_close(r["state"][i][k], v, atol=1e-6, rtol=0)
    # 4 matrix shapes x 3 layers x 3 steps orthogonalized once in all: 2 per shape per step on rank 0, 1 on rank 1
    assert single["counted"] == 36
    assert [r["counted"] for r in ranks] == [24, 12]


def test_single_process_group_does_no_communication(tmp_path, monkeypatch):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "all_gather", lambda *a, **k: pytest.fail("all_gather with one process"))
        model = tiny_gpt()
        opt = muon.Muon(model.param_groups(weight_decay=0.1), lr=0.01)
        loss_grads(model, 0)
        opt.step()
    finally:
        dist.destroy_process_group()
