"""Checks that need a CUDA GPU (python -m pytest -m gpu): the Triton Newton-Schulz kernel compiled for real,
the bf16 model against an fp32 reference, and a short training run with --fp8, Muon and torch.compile."""
import json
import os

import pytest
import torch

import muon
import prepare_data as pd
import train
from model import GPT, GPTConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("shape", [(1536, 4608), (3, 200, 333), (1536, 1536), (129, 64)])
def test_triton_symmetric_products_match_fp64(shape):
    X = torch.randn(*shape, device="cuda").bfloat16()
    ref = X.double() @ X.double().mT
    A = muon.sym_matmul(X)
    assert A.dtype == torch.bfloat16 and A.shape == ref.shape
    assert rel_err(A, ref) < 1e-2  # bf16 output, fp32 accumulation
    S = (ref / shape[-1]).bfloat16()  # symmetric, O(1) entries
    want = -4.775 * S.double() + 2.0315 * S.double() @ S.double()
    assert rel_err(muon.sym_poly(S, -4.775, 2.0315), want) < 1e-2


@pytest.mark.parametrize("shape", [(1536, 3840), (3840, 1536), (4, 256, 640)])
def test_triton_newton_schulz_matches_torch_path(shape):
    G = torch.randn(*shape, device="cuda")
    fast = muon.zeropower_via_newtonschulz(G, use_triton=True)
    slow = muon.zeropower_via_newtonschulz(G, use_triton=False)
    assert torch.isfinite(fast).all() and rel_err(fast, slow) < 2e-2
    # both land near an orthogonal matrix: singular values in the quintic's band around 1
    s = torch.linalg.svdvals(fast.double().reshape(-1, *shape[-2:]))
    assert 0.5 < s.min() and s.max() < 1.3


def test_bf16_forward_matches_fp32():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=256, n_head=4, n_kv_head=2, mlp_hidden=640, vocab_size=512, block_size=128)
    model = GPT(cfg).cuda()
    idx = torch.randint(0, 512, (4, 128), device="cuda")
    ref, _ = model(idx)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = model(idx)
    assert rel_err(out.float(), ref) < 3e-2


@pytest.mark.parametrize("flags", [["--fp8", "--muon_at_decay", "--compile"], ["--optimizer=muon"]])
def test_short_gpu_run_learns(tmp_path, flags):
    data = str(tmp_path / "data")
    pd.prepare(["embedded"], "byte", data, max_tokens=400_000)
    out = str(tmp_path / "out")
    res = train.main(["--n_layer=2", "--n_embd=256", "--n_head=4", "--n_kv_head=1", "--mlp_hidden=640",
                      "--block_size=256", "--batch_size=16", "--total_batch_size=4096", "--max_iters=120",
                      "--warmup_iters=10", "--decay_iters=40", "--eval_interval=60", "--eval_iters=5",
                      "--ckpt_interval=0", "--sample_len=0", "--log_interval=10", "--device=cuda",
                      f"--data_dir={data}", f"--out_dir={out}", *flags])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    losses = [e["loss"] for e in log if "loss" in e]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert res["val_loss"] < 3.0 < losses[0]  # bytes: ln 256 = 5.5 at the start
    if "--muon_at_decay" in flags:  # AdamW through the stable phase, Muon from the first decay step (step 80)
        assert [e["optimizer"] for e in log if e.get("step") in (79, 80) and "loss" in e] == ["adamw", "muon"]


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_head_matches_the_plain_head_under_bf16(compiled, monkeypatch):
    import head as head_py
    monkeypatch.setattr(head_py, "CE_CHUNK_BYTES", 4 * 50_304 * 512)  # 512-token chunks: 4 of the 2048 tokens
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=256, n_head=4, n_kv_head=2, mlp_hidden=640, vocab_size=50_304, block_size=256)
    model = GPT(cfg).cuda()
    step = torch.compile(model) if compiled else model
    idx = torch.randint(0, cfg.vocab_size, (8, 256), device="cuda")
    out = {}
    for chunked in (False, True):
        model.chunked_loss = chunked
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(idx, idx.roll(-1, 1))[1]
        loss.backward()
        out[chunked] = loss.item(), [p.grad.clone() for p in model.parameters()]
    assert abs(out[True][0] - out[False][0]) < 1e-3 * out[False][0]
    assert max(rel_err(a, b) for a, b in zip(out[True][1], out[False][1])) < 2e-2  # bf16 matmuls either way


def test_fp8_compiled_with_cached_weight_casts_matches_eager():
    import copy
    import fp8
    torch.manual_seed(0)
    eager = GPT(GPTConfig(n_layer=2, n_embd=256, n_head=4, n_kv_head=2, mlp_hidden=640, vocab_size=512,
                          block_size=256)).cuda()
    fp8.convert_to_fp8(eager)
    other = copy.deepcopy(eager)
    step = torch.compile(other)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, other)]
    for s in range(4):  # across optimizer steps: the casts are refreshed, never stale
        idx = torch.randint(0, 512, (4, 256), device="cuda")
        fp8.refresh(other)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a, b = eager(idx, idx)[1], step(idx, idx)[1]
        assert abs(a.item() - b.item()) < 1e-2 * a.item(), s
        a.backward()
        b.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
