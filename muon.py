"""
muon.py: the Muon optimizer that Xmodel-2.5 switches to for its decay phase, and its Triton kernel.

Muon (Keller Jordan 2024, "MomentUm Orthogonalized by Newton-schulz") steps a weight matrix along its
orthogonalized momentum: keep the Nesterov momentum M of the gradient as SGD would, then replace
M = U S V^T by U V^T, every singular value set to one. Gradients of transformer matrices are nearly low
rank; the orthogonalized step moves the weights as much along the rare directions as along the dominant
ones (it is steepest descent under the spectral norm, Bernstein & Newhouse 2024).

An SVD is slow on a GPU; Newton-Schulz gets U V^T from matmuls alone. Scale X = M / ||M||_F (the
singular values then lie in [0, 1]) and repeat X <- a X + b (X X^T) X + c (X X^T)^2 X: each step applies
the odd polynomial p(s) = a s + b s^3 + c s^5 to every singular value and leaves U and V alone. The
quintic (3.4445, -4.7750, 2.0315) is tuned for the steepest slope at zero (a), so small singular values grow
fast; five steps leave every singular value in roughly [0.68, 1.13], not exactly 1, which costs nothing in
training and saves steps. Polar Express (Amsel, Persson, Musco & Gower 2025) uses a different minimax-
optimal polynomial at every step and lands closer to 1 in the same five steps (`ns_coeffs="polar_express"`).

The recipe (../shared/RECIPE.md section 4): the decay phase swaps AdamW for this optimizer, and that swap
alone gave +4.58 points on the 13-task average.
  - at the switch the AdamW moments are dropped and Muon momentum starts at zero; only weights carry over
  - Muon takes every 2-D hidden matrix (fused QKV, attention out, fused gate+up, down), each whole; the
    tied embedding (lr eta) and the norm gains (eta/m) stay on AdamW inside the same optimizer
  - momentum 0.95, Nesterov, 5 quintic Newton-Schulz steps in bf16
  - update scale lr * 0.2 * sqrt(max(rows, cols)) (Moonlight, "Muon is Scalable for LLM Training"): U V^T
    has RMS 1/sqrt(max(rows, cols)), so the step gets AdamW's typical RMS of 0.2 and Muon reuses AdamW's
    lr and weight decay. At the 1.3B peak, eta/m = 0.01/6 = 1.667e-3, the effective Muon LRs are
        QKV 2560x1536: 0.0169   attn out 1536x1536: 0.0131   gate+up 7680x1536: 0.0292   down 1536x3840: 0.0207
    Whether that LR transfers across width is open (RECIPE.md section 4); muon_scale picks another rule
    (MUON_SCALES below).

On CUDA the two Gram-matrix products of each step run as a Triton kernel that computes only the upper-
triangle tiles of the symmetric result and mirrors them: a quarter to a third fewer FLOPs per step. Under
torchrun each rank orthogonalizes a share of the matrices and all-gathers the results.

    opt = Muon(model.param_groups(weight_decay=0.1), lr=eta)  # fresh at the switch: no AdamW moments
    ...  # every step: group["lr"] = eta_t * group["lr_mult"]; loss.backward(); opt.step()
    python bench.py --only=ns [--tune]  # Newton-Schulz and a Muon step, Triton vs torch (--tune: its tiles, GPU)
"""
from __future__ import annotations  # the kernel's tl.constexpr annotations stay unevaluated until triton loads

import importlib.util
import math
import os
from functools import lru_cache
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

# Keller Jordan's quintic, the recipe's (RECIPE.md section 4)
QUINTIC = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025): one polynomial per step, for singular values down to l = 1e-3. Checked
# by rerunning the paper's construction (minimax on [max(l, 0.02407 u), u] per step, recentred), which
# gives the same numbers to 1e-14. Later steps repeat the last, (15, -10, 3)/8, which converges to 1.
POLAR_EXPRESS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
TRITON_BLOCKS = (128, 64)  # output tile and k step of the Triton kernel (tests shrink them)
TRITON_LAUNCH = dict(num_warps=8, num_stages=3)  # for 128-wide tiles; `bench.py --tune` times others


def ns_coefficients(coeffs, steps):
    """The (a, b, c) of each Newton-Schulz step: "quintic", "polar_express" or one (a, b, c) for all."""
    if coeffs == "quintic":
        return [QUINTIC] * steps
    if coeffs == "polar_express":
        # p(x / 1.01), all but the last: a 1% margin for singular values that bf16 rounding pushes past the
        # design interval, as in the paper's code (recalled, not verified like the numbers above)
        safe = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in POLAR_EXPRESS[:-1]] + POLAR_EXPRESS[-1:]
        return [safe[min(i, len(safe) - 1)] for i in range(steps)]
    return [tuple(coeffs)] * steps


def zeropower_via_newtonschulz(G, steps=5, coeffs="quintic", use_triton=None):
    """About U V^T for G = U S V^T, of a matrix or a batch (leading dim); bf16 math on CUDA, fp32 elsewhere."""
    assert G.ndim in (2, 3), f"expected a matrix or a batch of matrices, got shape {tuple(G.shape)}"
    if use_triton is None:
        use_triton = G.is_cuda and importlib.util.find_spec("triton") is not None
    X = (G.bfloat16() if G.is_cuda else G.float()).reshape(-1, *G.shape[-2:])
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # then X X^T is the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # ||X||_2 <= ||X||_F = 1
    for a, b, c in ns_coefficients(coeffs, steps):
        A = sym_matmul(X) if use_triton else X @ X.mT  # A = X X^T
        B = sym_poly(A, b, c) if use_triton else torch.baddbmm(A, A, A, beta=b, alpha=c)  # B = b A + c A A
        X = torch.baddbmm(X, B, X, beta=a)  # a X + b (X X^T) X + c (X X^T)^2 X
    if tall:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)

# -----------------------------------------------------------------------------
# Triton: symmetric products, upper-triangle tiles only


def _syrk_kernel(X, Out, M, K, coef_b, coef_c, sxb, sxm, sxk, sob, som, son,
                 BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, POLY: tl.constexpr, UPCAST: tl.constexpr):
    # one tile of Out = X X^T (X: M x K), or with POLY of Out = b X + c X X^T for symmetric X, where X X^T = X X
    pm, pn = tl.program_id(0), tl.program_id(1)
    if pm > pn:
        return  # a lower tile is the mirror of an upper one
    X += tl.program_id(2).to(tl.int64) * sxb
    Out += tl.program_id(2).to(tl.int64) * sob
    rm, rn = pm * BLOCK + tl.arange(0, BLOCK), pn * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        y = tl.load(X + rn[:, None] * sxm + rk[None, :] * sxk, mask=(rn[:, None] < M) & (rk[None, :] < K), other=0.0)
        if UPCAST:  # the interpreter gets bf16 math wrong; on a GPU bf16 operands feed the tensor cores
            x, y = x.to(tl.float32), y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc)  # fp32 accumulation
    mask = (rm[:, None] < M) & (rn[None, :] < M)
    if POLY:
        a = tl.load(X + rm[:, None] * sxm + rn[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
        acc = coef_b * a + coef_c * acc
    out = acc.to(Out.dtype.element_ty)
    tl.store(Out + rm[:, None] * som + rn[None, :] * son, out, mask=mask)
    if pm != pn:
        tl.store(Out + rn[:, None] * som + rm[None, :] * son, tl.trans(out),
                 mask=(rn[:, None] < M) & (rm[None, :] < M))


@lru_cache(None)
def _kernel():
    global triton, tl  # imported on first use: muon.py runs without triton
    import triton
    import triton.language as tl
    return triton.jit(_syrk_kernel)


def check_triton(device, flag="--ns_triton=1"):
    """Raise ValueError unless the Triton kernel can run on device: CUDA, or anywhere under the interpreter."""
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{flag} needs a CUDA device (or TRITON_INTERPRET=1, the Triton interpreter: slow); drop it")


def _launch(X, poly, b=0.0, c=0.0, block=None, block_k=None, launch=None):
    block, block_k = block or TRITON_BLOCKS[0], block_k or TRITON_BLOCKS[1]
    launch = launch or (TRITON_LAUNCH if block >= 128 else dict(num_warps=4, num_stages=3))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert X.is_cuda or interpret, "the Triton path needs CUDA tensors (or TRITON_INTERPRET=1)"
    X = X.reshape(-1, *X.shape[-2:])  # any strides (a transposed X too): the kernel takes them as arguments
    kernel = _kernel()
    n, M, K = X.shape
    out = X.new_empty(n, M, M)
    tiles = triton.cdiv(M, block)
    kernel[(tiles, tiles, n)](X, out, M, K, b, c, *X.stride(), *out.stride(), BLOCK=block, BLOCK_K=block_k,
                              POLY=poly, UPCAST=interpret, **launch)
    return out


def sym_matmul(X, block=None, block_k=None, launch=None):
    """A = X X^T for X of shape (m, k) or (batch, m, k), computing the upper-triangle tiles only."""
    return _launch(X, False, block=block, block_k=block_k, launch=launch).reshape(*X.shape[:-1], X.size(-2))


def sym_poly(A, b, c, block=None, block_k=None, launch=None):
    """b A + c A A for symmetric A of shape (m, m) or (batch, m, m), upper-triangle tiles only."""
    return _launch(A, True, b, c, block, block_k, launch).reshape(A.shape)

# -----------------------------------------------------------------------------
# the width rules: how big a step Muon takes, and how its LR follows the width
#
# U V^T has singular values ~1 whatever its shape, so a step's spectral norm is its LR times its scale. With the
# width multiplier m = n_embd / base_width and rows, cols proportional to the width, that norm goes as
#   moonlight          eta/m       * 0.2 sqrt(max(rows, cols))   m^-1/2: a proxy-tuned LR steps less wider
#   moonlight_sqrt_m   eta/sqrt(m) * 0.2 sqrt(max(rows, cols))   m^0
#   unit_rms_norm      eta         * sqrt(rows / cols)           m^0, and RMS(dW x) ~ eta RMS(x) along the step,
#                                                                any shape (the spectral condition, Yang et al. 2023)
#   spectral           eta/m       * sqrt(max(1, rows / cols))   m^-1
# (Megatron-LM's "spectral" mode is sqrt(max(rows, cols)), not Keller Jordan's; its unit_rms_norm is the above.)
# rows x cols is the matrix Newton-Schulz sees: a fused qkv or gate+up whole, or each block with split_fused; for a
# Linear's (out, in) weight rows / cols = fan_out / fan_in. The hidden group carries AdamW's muP multiplier
# lr_mult = 1/m (model.param_groups), so its lr is eta_t/m; a rule whose LR is eta/m**e steps with
# lr * lr_mult**(e - 1) (muon_lr), and e = 1 is the group's lr exactly.


class MuonScale(NamedTuple):
    step: Callable  # (lr, rows, cols) -> the multiple of U V^T subtracted from a rows x cols matrix
    lr_exp: float   # Muon's LR for the hidden matrices is eta / m**lr_exp
    help: str       # for train.py's --muon_scale


MUON_SCALES = {
    "moonlight": MuonScale(lambda lr, rows, cols: lr * 0.2 * math.sqrt(max(rows, cols)), 1.0,
                           "lr*0.2*sqrt(max(rows,cols)) at eta/m: RMS-matched to AdamW (Moonlight), the recipe's"),
    "moonlight_sqrt_m": MuonScale(lambda lr, rows, cols: lr * 0.2 * math.sqrt(max(rows, cols)), 0.5,
                                  "lr*0.2*sqrt(max(rows,cols)) at eta/sqrt(m): the release's Muon width sweeps "
                                  "(hpo/muon_mup_width_transfer_v14..v16.py)"),
    "unit_rms_norm": MuonScale(lambda lr, rows, cols: lr * math.sqrt(rows / cols), 0.0,
                               "lr*sqrt(fan_out/fan_in) at eta for every width: Megatron-LM's width-invariant "
                               "muP default (PR 3715, its unit_rms_norm)"),
    "spectral": MuonScale(lambda lr, rows, cols: lr * math.sqrt(max(1, rows / cols)), 1.0,
                          "lr*sqrt(max(1,rows/cols)) at eta/m: Keller Jordan's original"),
}


def muon_scale_rule(name):
    if name not in MUON_SCALES:
        raise ValueError(f"unknown muon_scale {name!r}: use one of {', '.join(MUON_SCALES)}")
    return MUON_SCALES[name]


def muon_lr(group):
    """The LR a Muon group steps and decays with under its rule: its lr (eta_t * lr_mult, lr_mult = 1/m for the
    hidden matrices) times lr_mult**(e - 1), which makes it eta_t / m**e."""
    return group["lr"] * group.get("lr_mult", 1.0) ** (muon_scale_rule(group["muon_scale"]).lr_exp - 1)


def adjusted_lr(lr, shape, muon_scale="moonlight"):
    """The multiple of U V^T that Muon subtracts from a (rows x cols) matrix at LR lr (muon_lr's)."""
    rows, cols = shape[-2:]
    return muon_scale_rule(muon_scale).step(lr, rows, cols)


# -----------------------------------------------------------------------------
# the optimizer: Muon for the hidden matrices, AdamW for the rest


def is_muon_group(group):
    """Whether Muon steps this group when the optimizer is Muon (an AdamW's "hidden" group is one too: the caller
    knows which optimizer it has): a group marked muon=True, else model.param_groups' "hidden" matrices."""
    return group.get("muon", group.get("name") == "hidden")


class Muon(torch.optim.Optimizer):
    """Muon for the groups named "hidden" (or marked muon=True), AdamW for all others, in one optimizer.

    Each group keeps its own lr (train.py sets group["lr"] = eta * lr_mult every step) and weight_decay; the
    keywords are defaults that a group's own keys override. A Muon group steps with its width rule's LR, muon_lr
    (muon_scale: one of MUON_SCALES). Momentum has torch.optim.Muon's form,
    buf <- mu buf + (1 - mu) g and Nesterov U = (1 - mu) g + mu buf: (1 - mu) times the classic
    buf <- mu buf + g, U = g + mu buf, a scale that Newton-Schulz does not see."""

    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, ns_steps=5, ns_coeffs="quintic",
                 muon_scale="moonlight", split_fused=False, use_triton=None, betas=(0.9, 0.95), eps=1e-8,
                 weight_decay=0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_coeffs=ns_coeffs,
                        muon_scale=muon_scale, split_fused=split_fused, use_triton=use_triton, betas=betas,
                        eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def add_param_group(self, group):
        super().add_param_group(group)  # fills in the defaults
        group = self.param_groups[-1]
        group.setdefault("muon", is_muon_group(group))
        muon_scale_rule(group["muon_scale"])  # an unknown rule fails now, not at the first step
        if group["muon"] and any(p.ndim != 2 for p in group["params"]):
            raise ValueError(f"Muon group {group.get('name')!r} holds a parameter that is not a matrix")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates, targets = [], []  # matrices to orthogonalize (fused blocks when split) and where they go
        for gi, group in enumerate(self.param_groups):
            if not group["muon"]:
                self._adamw(group)
                continue
            mu, lr = group["momentum"], muon_lr(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # every rank: cheap, and keeps rank 0's state_dict complete
                u = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                p.mul_(1 - lr * group["weight_decay"])  # decoupled decay with the rule's lr, before the shape scale
                rows = getattr(p, "fused_rows", None) if group["split_fused"] else None
                r0 = 0
                for part in u.split(rows) if rows else [u]:  # q, k, v (or gate, up) apart, if asked
                    updates.append((gi, part))
                    targets.append((p, r0, group))
                    r0 += part.size(0)
        for (p, r0, group), o in zip(targets, self._orthogonalize(updates)):
            p[r0:r0 + o.size(0)].add_(o, alpha=-adjusted_lr(muon_lr(group), o.shape, group["muon_scale"]))
        return loss

    def _orthogonalize(self, updates):
        # matrices of one shape go as one batch; with world_size > 1 each rank takes a contiguous share of
        # every batch (the last padded with zeros) and all-gathers the results, so every rank has them all
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        buckets = {}
        for i, (gi, u) in enumerate(updates):
            buckets.setdefault((gi, u.shape), []).append(i)
        out = [None] * len(updates)
        for (gi, shape), idx in buckets.items():
            g = self.param_groups[gi]
            share = -(-len(idx) // world)
            mine = [updates[i][1] for i in idx[rank * share:(rank + 1) * share]]
            U = torch.stack(mine + [torch.zeros_like(updates[idx[0]][1])] * (share - len(mine)))
            O = zeropower_via_newtonschulz(U, g["ns_steps"], g["ns_coeffs"], g["use_triton"])
            if world > 1:  # on CUDA the result is bf16 exactly: send it as bf16, half the bytes
                send = O.bfloat16() if O.is_cuda else O
                parts = [torch.empty_like(send) for _ in range(world)]
                dist.all_gather(parts, send)
                O = torch.cat(parts).to(U.dtype)
            for j, i in enumerate(idx):
                out[i] = O[j]
        return out

    def _adamw(self, group):
        # torch.optim.AdamW's single-tensor math, in its order
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            p.mul_(1 - lr * group["weight_decay"])
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
