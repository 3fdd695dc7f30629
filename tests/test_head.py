"""The chunked loss head (head.chunked_cross_entropy): the same loss and gradients as the plain tied head +
F.cross_entropy, without ever holding the (tokens x vocab) logits."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import LargestTensor  # noqa: E402
import head as head_py  # noqa: E402
from head import chunk_rows, chunked_cross_entropy  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def problem(N=300, d=48, V=1000, dtype=torch.float64, seed=0, ignore_every=7):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(V, d, dtype=dtype, generator=g).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::ignore_every] = -1  # ignore_index rows
    return h, w, t


def plain(h, w, t):
    return F.cross_entropy((h @ w.t()).double(), t, ignore_index=-1)


# vocab 1000 is not a multiple of any chunk; 300 tokens make a ragged last chunk; 2000 is one chunk for all
@pytest.mark.parametrize("chunk", [16, 64, 112, 2000])
def test_loss_and_gradients_equal_the_plain_head_fp64(chunk):
    h, w, t = problem()
    ref = plain(h, w, t)
    gh, gw = torch.autograd.grad(ref, (h, w))
    loss = chunked_cross_entropy(h, w, t, chunk=chunk)
    a, b = torch.autograd.grad(2.5 * loss, (h, w))  # an upstream gradient other than 1 is applied
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, 2.5 * gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b, 2.5 * gw, rtol=1e-10, atol=1e-12)


def test_fp32_within_tolerance_and_without_grad():
    h, w, t = problem(dtype=torch.float32, seed=1)
    ref = plain(h.double(), w.double(), t)
    loss = chunked_cross_entropy(h, w, t, chunk=48)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    with torch.no_grad():
        assert torch.equal(chunked_cross_entropy(h, w, t, chunk=48), loss.detach())


def test_every_target_ignored_gives_nan_as_the_plain_loss():
    h, w, t = problem(N=32)
    t[:] = -1
    assert torch.isnan(chunked_cross_entropy(h, w, t, chunk=16)) and torch.isnan(plain(h, w, t))


@pytest.mark.parametrize("chunked", [True, False])
def test_never_holds_the_full_logits(chunked):
    N, V, chunk = 512, 3000, 64
    h, w, t = problem(N=N, d=32, V=V, dtype=torch.float32)
    with LargestTensor() as m:
        loss = chunked_cross_entropy(h, w, t, chunk=chunk) if chunked else \
            F.cross_entropy(h @ w.t(), t, ignore_index=-1)
        loss.backward()
    if chunked:
        assert m.largest <= chunk * V * 4  # one chunk's fp32 logits at a time, forward and backward
    else:
        assert m.largest >= N * V * 4  # (the check sees what the plain head holds)


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    # n_embd 64: muP width multiplier 1/4, so the logit multiplier output_scale / m = 4 is exercised
    return GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, mlp_hidden=160, vocab_size=320,
                         block_size=32, **kw))


@pytest.mark.parametrize("mup", [True, False])
def test_model_loss_and_gradients_chunked_equal_plain(mup, monkeypatch):
    monkeypatch.setattr(head_py, "CE_CHUNK_BYTES", 4 * 320 * 48)  # 48-token chunks: 128 tokens make 3, ragged
    assert chunk_rows(320) == 48
    model = small_model(mup=mup)
    assert model.config.logit_mult == (4.0 if mup else 1.0)
    idx = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    results = []
    for chunked in (False, True):
        model.chunked_loss = chunked
        model.zero_grad()
        logits, loss = model(idx, targets)
        assert (logits is None) == chunked
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_autocast_matches_the_plain_head_to_bf16_rounding():
    h, w, t = problem(dtype=torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, w, t, chunk=64)
        ref = F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-1)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-3 * ref.item()
    for a, b in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        assert a.dtype == torch.float32 and ((a - b).norm() / b.norm()).item() < 1e-2


def test_one_chunk_is_the_plain_head():
    h, w, t = problem(N=64)
    assert torch.equal(chunked_cross_entropy(h, w, t, chunk=64), F.cross_entropy(F.linear(h, w), t, ignore_index=-1))


def test_chunk_rows_fits_the_budget():
    assert chunk_rows(129_280) * 129_280 * 4 <= 2**30 and chunk_rows(129_280) % 16 == 0
    assert chunk_rows(320) * 320 * 4 <= 2**30 and chunk_rows(10**9) == 16  # never under one GEMM tile
