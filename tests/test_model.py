"""model.py: architecture and muP against slow references written from ../shared/RECIPE.md."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, peak_flops


def small_config(**kw):
    base = dict(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, mlp_hidden=320, vocab_size=96, block_size=32)
    return GPTConfig(**{**base, **kw})


def reference_forward(model, idx):
    """The muP GPT written out from RECIPE.md sections 1-2 with explicit loops, masks and a complex-number RoPE."""
    c, sd = model.config, model.state_dict()
    m = c.n_embd / c.base_width if c.mup else 1.0
    hd, T = c.n_embd // c.n_head, idx.size(1)
    rms = lambda x, w: x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * w

    def rope(x):  # x: (T, heads, hd); dim i pairs with i + hd/2 and turns by angle pos * theta^(-2i/hd)
        pos = torch.arange(T, dtype=torch.float64)[:, None]
        freq = c.rope_theta ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
        z = torch.complex(x[..., :hd // 2].double(), x[..., hd // 2:].double()) * torch.polar(
            torch.ones(T, hd // 2, dtype=torch.float64), pos * freq)[:, None, :]
        return torch.cat([z.real, z.imag], -1).float()

    x = c.scale_emb * sd["wte.weight"][idx[0]]
    r = c.scale_depth / math.sqrt(c.n_layer)
    for l in range(c.n_layer):
        p = lambda name: sd[f"blocks.{l}.{name}"]
        h = rms(x, p("attn_norm.weight")) @ p("attn.qkv.weight").T
        q = h[:, :c.n_head * hd].view(T, c.n_head, hd)
        k = h[:, c.n_head * hd:(c.n_head + c.n_kv_head) * hd].view(T, c.n_kv_head, hd)
        v = h[:, (c.n_head + c.n_kv_head) * hd:].view(T, c.n_kv_head, hd)
        q, k = rope(q), rope(k)
        heads = []
        for qh in range(c.n_head):
            kv = qh // (c.n_head // c.n_kv_head)
            att = q[:, qh] @ k[:, kv].T / (hd if c.mup else math.sqrt(hd))  # muP: q.k / d_head
            att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(att.softmax(-1) @ v[:, kv])
        x = x + r * (torch.cat(heads, -1) @ p("attn.proj.weight").T)
        gate, up = (rms(x, p("mlp_norm.weight")) @ p("mlp.gate_up.weight").T).chunk(2, -1)
        x = x + r * ((F.silu(gate) * up) @ p("mlp.down.weight").T)
    return (rms(x, sd["norm.weight"]) @ sd["wte.weight"].T) * c.output_scale / m


@pytest.mark.parametrize("mup", [True, False])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_forward_matches_reference(mup, n_kv_head):
    torch.manual_seed(0)
    model = GPT(small_config(mup=mup, n_kv_head=n_kv_head, n_embd=256 + 128 * mup))
    with torch.no_grad():  # give the norm gains non-trivial values so their use is checked too
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    idx = torch.randint(0, 96, (1, 20))
    logits, _ = model(idx)
    torch.testing.assert_close(logits[0], reference_forward(model, idx), rtol=1e-4, atol=1e-4)


def test_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    model = GPT(small_config())
    idx, targets = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    logits, loss = model(idx)[0], model(idx, targets)[1]  # (with targets, the chunked head gives no logits)
    manual = -logits.log_softmax(-1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, manual)


def test_preset_sizes_match_the_paper():
    with torch.device("meta"):
        big = GPT(GPTConfig.from_preset("xmodel-2.5"))
        nano = GPT(GPTConfig.from_preset("nano"))
    # RECIPE.md section 1: ~1.151B non-embedding + 198.6M embedding; proxy ~21.7M
    assert abs(big.num_params(embedding=False) / 1.151e9 - 1) < 0.002
    assert abs(big.wte.weight.numel() / 198.6e6 - 1) < 0.001
    assert abs(nano.num_params() / 21.7e6 - 1) < 0.02
    assert big.blocks[0].attn.qkv.weight.shape == (2560, 1536)  # fused QKV: 24 + 2 * 8 heads of 64
    assert big.blocks[0].mlp.gate_up.weight.shape == (7680, 1536)  # fused gate+up, as in the original


def test_presets_and_overrides():
    c = GPTConfig.from_preset("xmodel-2.5", n_layer=2)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.mlp_hidden) == (2, 1536, 24, 8, 3840)
    assert c.rope_theta == 500000 and c.vocab_size == 129280 and c.width_mult == 6
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig.from_preset("nano", n_head=3)


def test_mup_multipliers_at_full_width():
    c = GPTConfig.from_preset("xmodel-2.5")  # RECIPE.md section 2, "1.3B value" column
    assert c.width_mult == 6 and c.attn_scale == 1 / 64 and math.isclose(c.logit_mult, 1 / 6)
    assert math.isclose(c.residual_scale, 0.202, abs_tol=5e-4)
    assert math.isclose(c.init_std / math.sqrt(c.width_mult), 0.0408, abs_tol=5e-5)


@pytest.mark.parametrize("proj_init", ["width", "depth"])
def test_init_stds(proj_init):
    torch.manual_seed(0)
    model = GPT(small_config(n_embd=512, n_head=8, mlp_hidden=1280, n_layer=4, proj_init=proj_init))
    hidden = 0.1 / math.sqrt(512 / 256)
    out = hidden if proj_init == "width" else 0.1 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name  # norm gains start at one
            continue
        want = (0.1 if name == "wte.weight"
                else out if name.endswith(("attn.proj.weight", "mlp.down.weight")) else hidden)
        assert abs(p.mean().item()) < 0.05 * want and abs(p.std().item() / want - 1) < 0.05, name


@pytest.mark.parametrize("mup", [True, False])
def test_param_groups(mup):
    model = GPT(small_config(n_embd=512, n_head=8, mup=mup))
    groups = {g["name"]: g for g in model.param_groups(weight_decay=0.1)}
    m = 2.0 if mup else 1.0
    assert groups["embedding"]["lr_mult"] == 1 and groups["embedding"]["weight_decay"] == 0.1
    assert groups["hidden"]["lr_mult"] == 1 / m and groups["hidden"]["weight_decay"] == 0.1
    assert groups["norm"]["lr_mult"] == 1 / m and groups["norm"]["weight_decay"] == 0
    assert all(p.dim() == 2 for p in groups["hidden"]["params"])
    assert all(p.dim() == 1 for p in groups["norm"]["params"])
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once


def test_flops_per_token_matches_a_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = GPT(small_config(n_layer=3))
    B, T = 2, 32
    idx = torch.randint(0, 96, (B, T))
    # the math backend runs attention as visible matmuls, charged in full as the estimate does (PaLM's convention)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    assert counter.get_total_flops() == model.flops_per_token(T) * B * T


def test_mfu_only_for_known_gpus():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA GeForce GTX 1080") is None
    assert GPT(small_config()).estimate_mfu(1e6, 32, "cpu") is None


def test_generate_greedy_is_argmax_of_forward():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0)
    for i in range(3, 8):
        assert out[0, i] == model(out[:, :i])[0][0, -1].argmax()

# -----------------------------------------------------------------------------
# coordinate check: under muP activations keep their size as width grows; under SP they blow up.
# The measurement lives in mup_sweep.py, whose --coord draws the same numbers as a picture.


def test_coordinate_check():
    from mup_sweep import COORD_SITES, coordinate_sizes, coordinate_slopes
    widths = (64, 128, 256, 512)
    mup = coordinate_slopes(coordinate_sizes(mup=True, widths=widths, steps=5, lr=0.03, seeds=(0, 1)), widths)
    sp = coordinate_slopes(coordinate_sizes(mup=False, widths=widths, steps=5, lr=0.03, seeds=(0, 1)), widths)
    assert all(abs(mup[k]) < 0.3 for k in COORD_SITES), mup
    assert sp["logits"] > 0.4 and sp["attn"] > 0.8 and sp["mlp"] > 0.8, sp
