"""
head.py: the tied output head and its cross-entropy, a chunk of tokens at a time (model.GPT.forward's loss).

At the recipe's 129,280-token vocabulary the plain head's (tokens x vocab) logits are the largest tensor of a
step; chunked_cross_entropy gives the same loss and gradients (tests/test_head.py) without ever holding them.
Not part of the recipe: a memory saving, on by default (train.py --chunked_loss=0 runs the plain head).
"""

import torch
import torch.nn.functional as F

# the loss head: tied output projection + cross-entropy, a chunk of tokens at a time. A chunk's fp32 logits may
# hold CE_CHUNK_BYTES: 1 GiB is 2,076 tokens of the recipe's 129,280-token vocabulary (the whole (tokens x vocab)
# matrix of a 4 x 3712-token micro-batch is 7.7 GB, its gradient and bf16 copy as much again)
CE_CHUNK_BYTES = 2**30


def chunk_rows(vocab_size):
    return max(16, CE_CHUNK_BYTES // (4 * vocab_size) // 16 * 16)  # a multiple of 16: GEMM-friendly


def _chunked_ce(h, w, targets, ignore_index, chunk, grads):
    """Sum of cross-entropy(h @ w.T, targets) over targets != ignore_index, the count, and with grads=True the
    gradients of that sum w.r.t. h and w. Matmuls in the autocast dtype (as F.linear would run them), softmax in
    fp32; a chunk's logits are freed before the next chunk's exist."""
    dev = h.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    hc, wc, acc = h.to(dt), w.to(dt), torch.promote_types(dt, torch.float32)  # (fp32, or fp64 in a test)
    total = torch.zeros((), device=h.device, dtype=acc)
    grad_h = torch.empty_like(hc) if grads else None
    grad_w = torch.zeros(w.shape, device=w.device, dtype=acc) if grads else None
    with torch.autocast(dev, enabled=False):
        for i in range(0, h.size(0), chunk):
            x, t = hc[i:i + chunk], targets[i:i + chunk]
            logits = (x @ wc.t()).to(acc)
            valid = t != ignore_index
            t = t.clamp(min=0)  # (ignored rows: any index, masked out below)
            lse = logits.logsumexp(-1)
            total += ((lse - logits.gather(1, t[:, None])[:, 0]) * valid).sum()
            if grads:  # d(loss)/d(logits) = softmax - onehot, in place of the logits
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(t), device=t.device), t] -= 1
                g = g.mul_(valid[:, None]).to(dt)
                grad_h[i:i + chunk] = g @ wc
                grad_w += (g.t() @ x).to(acc)
    return total, (targets != ignore_index).sum(), grad_h, grad_w


class _ChunkedCrossEntropy(torch.autograd.Function):
    # the gradients are computed in the forward, chunk by chunk, while the chunk's logits exist (the loss is a
    # scalar: backward only scales them), so no logits are kept or recomputed: 3 matmuls, as the plain head
    @staticmethod
    def forward(ctx, h, w, targets, ignore_index, chunk):
        total, n, grad_h, grad_w = _chunked_ce(h, w, targets, ignore_index, chunk, grads=True)
        ctx.save_for_backward(grad_h / n, grad_w / n)
        ctx.dtypes = h.dtype, w.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss).to(ctx.dtypes[0]), (grad_w * grad_loss).to(ctx.dtypes[1]), None, None, None


def chunked_cross_entropy(h, w, targets, ignore_index=-1, chunk=None):
    """F.cross_entropy(h @ w.T, targets, ignore_index=ignore_index) (mean over the targets kept) without ever holding
    the (tokens x vocab) logits: h (N, d), w (V, d), targets (N,). Same loss and gradients as the plain head."""
    chunk = chunk or chunk_rows(w.size(0))
    if h.size(0) <= chunk:  # one chunk saves nothing: the plain head, whose fused kernels are faster
        logits = F.linear(h, w)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                               ignore_index=ignore_index)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        return _ChunkedCrossEntropy.apply(h, w, targets, ignore_index, chunk)
    total, n, _, _ = _chunked_ce(h, w, targets, ignore_index, chunk, grads=False)
    return total / n
