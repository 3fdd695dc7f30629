"""
fp8.py: FP8 matmuls for the transformer-block linears, with per-tensor scaling, in one file.

The recipe (../shared/RECIPE.md section 5) trains with Transformer Engine's "hybrid" FP8: the GEMMs of the
block linears run in 8-bit floats on the H100's FP8 tensor cores, which do twice the bf16 FLOPs. This file
does the same with torch._scaled_mm and no other dependency.

Two 8-bit formats. Both are "a sign, some exponent bits, some mantissa bits", traded differently:

    E4M3 (float8_e4m3fn)  3 mantissa bits: rounding error <= 2^-4   largest 448     smallest 2^-9
    E5M2 (float8_e5m2)    2 mantissa bits: rounding error <= 2^-3   largest 57344   smallest 2^-16

The hybrid recipe uses E4M3 (more precision) for what the forward pass multiplies, activations and weights,
and E5M2 (more range) for the gradients of the backward pass, whose magnitudes spread over many more octaves.
A GEMM always has at least one E4M3 operand: grad_input = grad_output(E5M2) @ W(E4M3) and
grad_W = grad_output(E5M2)^T @ x(E4M3); E5M2 x E5M2 is not supported by the hardware and would lose too much.

Per-tensor scaling. E4M3 covers only ~18 octaves (bf16 covers ~260), so values must be moved into its window
first: much of a weight of std 0.02 would sit among the subnormals (E4M3's normals start at 2^-6 = 0.016), a
gradient of 1e-6 would flush to zero. Each tensor gets one fp32 scale s = amax / fp8_max; it is stored as
x8 = x / s (its largest value lands on 448 or 57344) and multiplied back inside the GEMM: y = (x8 @ w8) * s_x * s_w,
which _scaled_mm does in its epilogue. s is a *dequantisation* scale, the form _scaled_mm takes. The casts saturate
(clamp to +-fp8_max first): a plain cast turns an out-of-range value into NaN (E4M3 on CUDA) or inf (E5M2). An
all-zero tensor gets s = 1.

Where amax comes from, two recipes (convert_to_fp8(recipe=...)), for the activations and the gradients:
  current  this step's amax of the tensor itself: always in range, but a full reduction that must finish
           before the cast can start: two passes over the tensor.
  delayed  the recipe's (Transformer Engine's default): the max of the last 128 steps' amaxes, kept per tensor
           (input, grad_output) in a rolling buffer. This step's amax only enters the history, so the scale is
           known before the tensor is and, under torch.compile, the amax, the cast and the transposed copy below
           share one pass, fused into the kernel that produced the tensor (the norm, the SwiGLU product); the
           price: a sudden outlier saturates for one step. A step is one training-mode forward (backward), i.e. one
           micro-batch, as in Transformer Engine; eval mode only reads. An empty history (the first step) takes the
           current amax; whether one is filled is decided between steps, in Python (refresh): no compiled branch.
The weights are different: they change only at optimizer.step(), so each is cast once per step (refresh: its
current amax, no history needed, then E4M3 row-major and transposed) and that cast is reused by every
gradient-accumulation micro-batch of the step, off the critical path of all but the first. Any optimizer step
marks the casts stale (a global hook); eager code also sees in-place edits through the weight's version counter.
The histories and casts are non-persistent buffers, so model.state_dict() is the same with and without FP8
(checkpoints stay interchangeable); fp8_state_dict / load_fp8_state_dict carry the histories for exact resume.

Layout. On Hopper, cuBLASLt's FP8 GEMM takes only the "TN" layout, both operands K-contiguous: in PyTorch terms
_scaled_mm's first operand is row-major (M, K), its second column-major (K, N); inner and output dims are multiples
of 16. The forward gets both for free (x is row-major, W.t() of the row-major (N, K) weight column-major); the two
backward GEMMs need a K-major copy of each operand: the weight's comes with its cast once per step, the
activation's (x8_t) is written by the forward next to x8 and the gradient's by the backward next to g8, one byte
per element, in the same pass under torch.compile. CPU _scaled_mm (torch >= 2.8) checks none of this, so
check_scaled_mm enforces the CUDA rules on every device: a CPU test catches what would only fail on the GPU. A token
count that is not a multiple of 16 (it is the inner dim of grad_W) is padded.

What stays in high precision, as in the recipe: the embedding (a lookup, no GEMM), the tied output head (its
logits feed the softmax and the loss directly), attention (softmax(QK^T)V in the bf16 flash kernel), norms,
the SwiGLU product, residuals, the fp32 master weights and the optimizer. Outputs come back in the autocast
dtype (bf16 on GPU), weight gradients in the weight's dtype (fp32), so DDP and the optimizer are unchanged.

The claim: about +30% training throughput at 1.3B with no measurable quality loss. The block GEMMs run up to
2x faster; attention, the head, the casts and everything else do not, hence ~1.3x end to end at 48 layers, where
the block linears hold ~71% of the FLOPs (at 12 layers the 129k-vocabulary head holds a third: ~1.1x at best).
That needs an H100 and torch.compile (eager, the extra amax and cast kernels eat the gain); bench.py measures it.

    python train.py --fp8                           # delayed scaling (the recipe's)
    python train.py --fp8 --fp8_recipe=current      # current scaling
    python bench.py --only=fp8                      # FP8 vs bf16 on the recipe's linears (--only=train: the step)
    fp8.refresh(model)                              # once per optimizer step, before its first forward
    with fp8.disabled(model): ...                   # run the converted linears in high precision (evaluation)
"""

import contextlib
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
HISTORY_LEN = 128  # amax history of delayed scaling (RECIPE.md section 5)
# a GEMM under 128 wide is not compute-bound: its amaxes and casts cost more than FP8 saves (1.3B: >= 1536; cpu: 128)
MIN_FEATURES = 128
RECIPES = ("delayed", "current")
# the tensors delayed scaling keeps an amax history for; the weight is cast once per step at its current amax
TENSORS = ("input", "grad_output")

# -----------------------------------------------------------------------------
# scales, casts and the checked scaled matmul


def dequant_scale(amax, dtype):
    # fp32 dequantisation scale: x ~= x_fp8 * scale. torch.where, not `if`: no data-dependent Python under compile
    amax = amax.float()
    return torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))


def to_fp8(x, scale, dtype):
    # saturating cast: under delayed scaling this step's values may exceed the history's amax
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype)


@torch.no_grad()
def push(history, amax):
    # roll the window: the oldest amax leaves at the front, this step's enters at the end (in place: a buffer)
    history.copy_(torch.cat([history[1:], amax.detach().float().view(1)]))


def check_device(device):
    """Raise ValueError on a GPU without FP8 tensor cores (a CPU runs _scaled_mm in software: tests, not speed)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"--fp8 needs FP8 tensor cores (compute capability 8.9+, e.g. H100); "
                         f"{torch.cuda.get_device_name(device)} has none; drop --fp8")


def check_scaled_mm(a, b, scale_a, scale_b):
    """Raise ValueError unless a @ b meets the CUDA rules of torch._scaled_mm (RECIPE.md section 5)."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"_scaled_mm takes 2-D operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in (E4M3, E5M2) or b.dtype not in (E4M3, E5M2):
        raise ValueError(f"_scaled_mm takes fp8 operands, got {a.dtype} and {b.dtype}")
    if a.dtype == b.dtype == E5M2:
        raise ValueError("_scaled_mm does not support E5M2 x E5M2: quantize one operand to E4M3")
    if a.stride(1) != 1:
        raise ValueError(f"first operand must be row-major (stride(1) == 1), got stride {a.stride()}")
    if b.stride(0) != 1:
        raise ValueError(f"second operand must be column-major (stride(0) == 1), got stride {b.stride()}: "
                         f"pass w.t() of a row-major w, or x.t().contiguous().t()")
    if a.size(1) % 16 or b.size(1) % 16:
        raise ValueError(f"inner and output dims must be multiples of 16, got ({a.size(0)}, {a.size(1)}) x "
                         f"({b.size(0)}, {b.size(1)})")
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(f"{name} must be one fp32 value (a tensorwise dequantisation scale), got "
                             f"{s.dtype} of shape {tuple(s.shape)}")


def scaled_mm(a, b, scale_a, scale_b, out_dtype, fast_accum):
    check_scaled_mm(a, b, scale_a, scale_b)
    # outside autocast: CPU's _scaled_mm otherwise loses accuracy (its inner matmul gets autocast to bf16)
    with torch.autocast(a.device.type, enabled=False):
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)


class _Float8Matmul(torch.autograd.Function):
    """y = x @ w.T in E4M3 x E4M3; backward in E5M2 (grad) x E4M3 (saved operand), outputs in high precision.
    w8 (N, K) and w8_t (K, N) are the weight's casts of this optimizer step (weight_casts); x8_t and the backward's
    g8.t() are the K-major copies, made next to their casts (one pass under torch.compile)."""

    @staticmethod
    def forward(ctx, x, w, x_scale, w8, w8_t, w_scale, g_history, g_ready, out_dtype, update):
        x8 = to_fp8(x, x_scale, E4M3)
        x8_t = x8.t().contiguous()  # grad_w's second operand, column-major: x8_t.t()
        ctx.save_for_backward(x8_t, w8_t, x_scale, w_scale)  # fp8 activations: half the memory of bf16
        # a history is mutated in backward, so it rides on ctx, outside save_for_backward's version check
        ctx.g_history, ctx.g_ready, ctx.update, ctx.x_dtype, ctx.w_dtype = g_history, g_ready, update, x.dtype, \
            w.dtype
        # fast accumulation only here: the backward GEMMs sum over more terms and keep full accumulation
        return scaled_mm(x8, w8.t(), x_scale, w_scale, out_dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, g):
        x8_t, w8_t, x_scale, w_scale = ctx.saved_tensors
        g = g.contiguous()
        g_amax = g.detach().abs().amax().float()
        # delayed: the scale from the history alone, so the cast need not wait for this gradient's amax
        g_scale = dequant_scale(ctx.g_history.max() if ctx.g_ready else g_amax, E5M2)
        if ctx.g_history is not None and ctx.update:
            push(ctx.g_history, g_amax)
        g8 = to_fp8(g, g_scale, E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K): the weight's K-major cast, w8_t (K, N), as column-major
            grad_x = scaled_mm(g8, w8_t.t(), g_scale, w_scale, ctx.x_dtype, fast_accum=False)
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K)
            grad_w = scaled_mm(g8.t().contiguous(), x8_t.t(), g_scale, x_scale, ctx.w_dtype, fast_accum=False)
        return grad_x, grad_w, None, None, None, None, None, None, None, None


# -----------------------------------------------------------------------------
# the module and the conversion


_CACHES = weakref.WeakSet()  # every Float8Linear: an optimizer step anywhere makes their weight casts stale


def _weights_changed(optimizer, args, kwargs):
    for m in _CACHES:
        m.cached = False


register_optimizer_step_post_hook(_weights_changed)


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in FP8 (module docstring), with nn.Linear's Parameters and state_dict keys;
    `enabled = False` (or fp8.disabled(model)) runs it in high precision. Eager forwards recast a stale weight
    themselves; compiled code cannot see version counters, so call fp8.refresh(model) once per step before the
    first forward (train.py does), or a compiled forward casts the weight every micro-batch, correct but slower."""

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None, recipe="delayed",
                 history_len=HISTORY_LEN):
        super().__init__(in_features, out_features, bias, device, dtype)
        if recipe not in RECIPES:
            raise ValueError(f"unknown fp8 recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        self.recipe, self.enabled = recipe, True
        self._buffers_on(device, history_len)

    def _buffers_on(self, device, history_len):
        # non-persistent: the model's state_dict stays that of nn.Linear
        if self.recipe == "delayed":
            for t in TENSORS:
                self.register_buffer(f"amax_history_{t}", torch.zeros(history_len, device=device), persistent=False)
        self.register_buffer("w8", torch.empty(self.out_features, self.in_features, dtype=E4M3, device=device),
                             persistent=False)
        self.register_buffer("w8_t", torch.empty(self.in_features, self.out_features, dtype=E4M3, device=device),
                             persistent=False)
        self.register_buffer("w_scale", torch.ones((), device=device), persistent=False)
        # Python state, read by compiled code as constants: the casts are current; a history holds an amax
        self.cached, self.cast_version, self.ready = False, None, {t: False for t in TENSORS}

    @classmethod
    def from_linear(cls, linear, recipe="delayed", history_len=HISTORY_LEN):
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", recipe=recipe,
                  history_len=history_len)
        # the same Parameter objects: param_groups, an existing optimizer and the state_dict keys stay valid
        new.weight, new.bias = linear.weight, linear.bias
        new._buffers_on(linear.weight.device, history_len)
        return new

    def history(self, t):
        return getattr(self, f"amax_history_{t}", None)

    def weight_casts(self):
        """(w8, w8_t, w_scale): the weight in E4M3, row-major and transposed, scaled by its current amax."""
        w = self.weight.detach()
        scale = dequant_scale(w.abs().amax(), E4M3)
        w8 = to_fp8(w, scale, E4M3)
        return w8, w8.t().contiguous(), scale

    @torch.no_grad()
    def refresh(self):
        """Recast the weight if it changed since the last cast; note which amax histories hold values yet."""
        if not (self.cached and self.cast_version == self.weight._version):
            for buf, new in zip((self.w8, self.w8_t, self.w_scale), self.weight_casts()):
                buf.copy_(new)
            self.cached, self.cast_version = True, self.weight._version
            _CACHES.add(self)  # (here, not in __init__: a deepcopy's cache is watched too)
        for t in TENSORS:  # (a sync each, but only until the first amax is in: the first step or two)
            if self.history(t) is not None and not self.ready[t]:
                self.ready[t] = bool(self.history(t).max() > 0)

    def scale(self, t, x):
        amax = x.detach().abs().amax().float()
        history = self.history(t)
        if history is None:
            return dequant_scale(amax, E4M3)
        # delayed: the max of the last HISTORY_LEN steps, not this one's; only an empty history takes this amax
        scale = dequant_scale(history.max() if self.ready[t] else amax, E4M3)
        if self.training:
            push(history, amax)
        return scale

    def forward(self, x):
        if not self.enabled:
            return super().forward(x)
        if not torch.compiler.is_compiling():
            self.refresh()
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.reshape(-1, self.in_features).contiguous()  # (B, T, C) -> (B*T, C), row-major
        pad = -x2.size(0) % 16  # tokens are grad_w's inner dim: pad with zero rows, which add nothing
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        w8, w8_t, w_scale = (self.w8, self.w8_t, self.w_scale) if self.cached else self.weight_casts()
        y = _Float8Matmul.apply(x2, self.weight, self.scale("input", x2), w8, w8_t, w_scale,
                                self.history("grad_output"), self.ready.get("grad_output", False), out_dtype,
                                self.training)
        y = y[:y.size(0) - pad].view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", fp8={self.recipe}" + ("" if self.enabled else " (disabled)")


def convert_to_fp8(model, recipe="delayed", history_len=HISTORY_LEN, min_features=MIN_FEATURES):
    """Swap the nn.Linear modules inside model.blocks for Float8Linear, in place, sharing their Parameters. Call
    before torch.compile and DDP. Returns [(module name, reason)] for the block linears left in high precision (a
    dim not a multiple of 16 or under min_features); embedding, tied head and attention stay there too."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown fp8 recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    skipped = []
    for name, linear in list(model.blocks.named_modules(prefix="blocks")):
        if type(linear) is not nn.Linear:
            continue
        dims = (linear.in_features, linear.out_features)
        if any(d % 16 for d in dims):
            skipped.append((name, f"{dims[0]}->{dims[1]} is not a multiple of 16 (FP8 GEMMs need it)"))
        elif min(dims) < min_features:
            skipped.append((name, f"{dims[0]}->{dims[1]} is under min_features={min_features}: too small for "
                                  f"FP8 to gain"))
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Float8Linear.from_linear(linear, recipe, history_len))
    return skipped


@contextlib.contextmanager
def disabled(model):
    """with fp8.disabled(model): run every Float8Linear as a plain linear (e.g. a high-precision evaluation).
    Under torch.compile the first call each way compiles once more (the flag is guarded)."""
    mods = [m for m in model.modules() if isinstance(m, Float8Linear)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def refresh(model):
    """Once per optimizer step, before its first forward: cast every FP8 weight for the step's micro-batches (they
    reuse it) and read which amax histories are filled, so compiled forwards use the casts and the histories."""
    for m in fp8_modules(model).values():
        m.refresh()


def fp8_modules(model):
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):  # torch.compile and DDP wrappers
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return {name: m for name, m in model.named_modules() if isinstance(m, Float8Linear)}


def fp8_state_dict(model):
    """Delayed scaling's amax histories, {module name: {tensor: history}} on the CPU; {} for current scaling."""
    return {name: {t: m.history(t).detach().cpu().clone() for t in TENSORS}
            for name, m in fp8_modules(model).items() if m.recipe == "delayed"}


@torch.no_grad()
def load_fp8_state_dict(model, state):
    """Restore fp8_state_dict's histories. A history of another length keeps its newest entries."""
    mods = fp8_modules(model)
    unknown = sorted(set(state) - set(mods))
    if unknown:
        raise ValueError(f"fp8 state for modules this model has not converted to FP8: {', '.join(unknown)}")
    for name, histories in state.items():
        mods[name].ready = {t: False for t in TENSORS}  # (refresh() looks again)
        for t, saved in histories.items():
            h = mods[name].history(t)
            if h is not None:  # current scaling keeps no history, older checkpoints a weight's: nothing to restore
                n = min(len(h), len(saved))
                h.zero_()
                h[len(h) - n:] = saved[len(saved) - n:].to(h.device)
