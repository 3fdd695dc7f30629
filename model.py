"""
model.py: the Xmodel-2.5 architecture with muP, in one file.

A Llama-style decoder (pre-RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases) with tied input/output
embeddings and the maximal-update parameterization (muP) exactly as Xmodel-2 / Xmodel-2.5 use it
(../shared/RECIPE.md section 2). muP is what lets the recipe tune its hyperparameters on a ~20M proxy (d_model
256) and reuse them at 1.3B (d_model 1536): with width multiplier m = d_model / base_width,

    embedding output      x = scale_emb * E[token]                    (12)
    hidden matrices init  N(0, init_std / sqrt(m))                     (0.1/sqrt(m))
    residual branches     x = x + scale_depth / sqrt(n_layer) * f(x)  (1.4/sqrt(L))
    attention logits      q.k / d_head                 (not / sqrt(d_head))
    output logits         (h @ E^T) * output_scale / m                 (tied E)
    learning rates        embedding: eta, everything else: eta / m    (param_groups)

Every multiplier is a GPTConfig field; `mup=False` freezes all width-dependent factors at their base-width value
(m = 1) and uses 1/sqrt(d_head) attention, i.e. the standard parameterization one would get by scaling the proxy
naively. Read bottom-up: the blocks, the muP config (GPTConfig, PRESETS), the model (GPT), then the supporting
pieces (the GPU peaks for MFU); the chunked loss head is head.py, generation and its KV cache generate.py.

    python -c "from model import *; print(GPT(GPTConfig.from_preset('nano')))"
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import generate
from head import chunked_cross_entropy

# -----------------------------------------------------------------------------
# building blocks, bottom-up


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_cache(seq_len, head_dim, theta):
    # rotate-half RoPE (the Hugging Face Llama layout), so exports need no permutation
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, T, heads, head_dim); cos/sin: (T, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v as one fused matrix, as in the recipe (Muon orthogonalises it whole)
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        self.qkv.weight.fused_rows = [config.n_head * self.head_dim] + [config.n_kv_head * self.head_dim] * 2
        self.scale = config.attn_scale

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is None:  # training and scoring: the sequence attends to itself, causally
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=self.n_kv_head != self.n_head)
        else:  # generation: append to the cache, attend over everything cached (same muP scale)
            k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, is_causal=cache.causal,
                                               scale=self.scale, enable_gqa=self.n_kv_head != self.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        # gate and up fused as one (2*hidden x d) matrix, as in the recipe
        self.gate_up = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=False)
        self.gate_up.weight.fused_rows = [config.mlp_hidden] * 2  # lets an optimizer treat the parts apart
        self.down = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.residual_scale = config.residual_scale

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.residual_scale * self.attn(self.attn_norm(x), cos, sin, cache, layer)
        x = x + self.residual_scale * self.mlp(self.mlp_norm(x))
        return x

# -----------------------------------------------------------------------------
# the muP config and presets


@dataclass
class GPTConfig:
    # architecture (default: a small model that trains on a laptop CPU in minutes)
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 2
    n_kv_head: int = 1
    mlp_hidden: int = 320         # SwiGLU hidden size; 2.5 x n_embd as in both presets
    vocab_size: int = 320         # train.py sets it from the data's tokenizer
    block_size: int = 256         # longest sequence (RoPE table size)
    rope_theta: float = 500000.0  # RECIPE.md section 1
    norm_eps: float = 1e-5
    # muP, tuned by Xmodel-2 on the 20M proxy and transferred (RECIPE.md section 2)
    mup: bool = True
    base_width: int = 256      # dim_model_base: width multiplier m = n_embd / base_width
    init_std: float = 0.1
    scale_emb: float = 12.0
    scale_depth: float = 1.4
    output_scale: float = 1.0
    # RECIPE.md section 2 discrepancy: the Xmodel-2 table width-scales every hidden matrix ("width");
    # the Megatron fork gives attention-out and MLP-down 0.1/sqrt(2*n_layer) instead ("depth")
    proj_init: str = "width"

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def width_mult(self):
        return self.n_embd / self.base_width if self.mup else 1.0

    @property
    def residual_scale(self):
        return self.scale_depth / math.sqrt(self.n_layer)

    @property
    def attn_scale(self):
        return 1.0 / self.head_dim if self.mup else 1.0 / math.sqrt(self.head_dim)

    @property
    def logit_mult(self):
        return self.output_scale / self.width_mult

    def validate(self):
        problems = []
        for f in fields(self):  # sizes and multipliers: positive finite numbers (a zero init_std is allowed)
            v, low = getattr(self, f.name), "init_std"
            if f.type in (int, float) and not (math.isfinite(v) and (v > 0 or (v == 0 and f.name == low))):
                problems.append(f"{f.name}={v} must be {'>= 0' if f.name == low else '> 0'}")
        if problems:
            raise ValueError("bad model config: " + "; ".join(problems))
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        elif self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.proj_init not in ("width", "depth"):
            problems.append(f"proj_init={self.proj_init!r} must be 'width' or 'depth'")
        if problems:
            raise ValueError("bad model config: " + "; ".join(problems))
        return self

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**{**PRESETS[name], **overrides}).validate()


PRESETS = {
    "cpu": {},  # the dataclass defaults
    # the ~20M proxy that muP's hyperparameters were tuned on (Xmodel-2 "nano", RECIPE.md section 1)
    "nano": dict(n_layer=8, n_embd=256, n_head=4, n_kv_head=1, mlp_hidden=640, vocab_size=65280, block_size=3712),
    # the 1.3B model (RECIPE.md section 1): ~1.151B non-embedding + 198.6M embedding
    "xmodel-2.5": dict(n_layer=48, n_embd=1536, n_head=24, n_kv_head=8, mlp_hidden=3840, vocab_size=129280,
                       block_size=3712),
}

# -----------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config.validate()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # tied: also the output head
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        cos, sin = rope_cache(config.block_size, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # with targets: the loss by chunked_cross_entropy, no logits; False: the plain reference (--chunked_loss=0)
        self.chunked_loss = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        c = self.config
        hidden_std = c.init_std / math.sqrt(c.width_mult)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # norm gains
            elif name == "wte.weight":
                nn.init.normal_(p, std=c.init_std)  # embedding std does not shrink with width
            elif c.proj_init == "depth" and name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=c.init_std / math.sqrt(2 * c.n_layer))
            else:
                nn.init.normal_(p, std=hidden_std)
        if self.rope_cos.device.type != "meta":  # buffers are not parameters: rebuild them too
            cos, sin = rope_cache(c.block_size, c.head_dim, c.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        x = self.wte(idx) * self.config.scale_emb
        pos = 0 if cache is None else cache.pos  # with a cache, idx continues the cached tokens
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        if cache is not None:
            cache.prepare(T, idx.device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos += T
            x = x[:, -1:]  # generation needs the last position's logits only
        # tied output head; the muP output_scale/m multiplies h (d wide), not the logits (V wide): same, cheaper
        x = self.norm(x) * self.config.logit_mult
        if targets is not None and self.chunked_loss:  # the loss without the logits (chunked_cross_entropy)
            return None, chunked_cross_entropy(x.flatten(0, 1), self.wte.weight, targets.flatten())
        logits = F.linear(x, self.wte.weight)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def param_groups(self, weight_decay):
        """The muP learning-rate groups: embedding at eta, hidden matrices and norm gains at eta/m. Each group
        carries lr_mult (its LR relative to eta) for the scheduler; the names let an optimizer treat the kinds
        differently (Muon takes the 2-D hidden matrices, AdamW the rest)."""
        m = self.config.width_mult
        emb, hidden, norms = [], [], []
        for name, p in self.named_parameters():
            (emb if name == "wte.weight" else norms if p.dim() == 1 else hidden).append(p)
        return [
            dict(name="embedding", params=emb, lr_mult=1.0, weight_decay=weight_decay),
            dict(name="hidden", params=hidden, lr_mult=1.0 / m, weight_decay=weight_decay),
            dict(name="norm", params=norms, lr_mult=1.0 / m, weight_decay=0.0),  # no decay on norm gains
        ]

    def num_params(self, embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n if embedding else n - self.wte.weight.numel()

    def flops_per_token(self, seq_len):
        # 6 flops per token (fwd + bwd) per matmul weight, the tied head once (the lookup is free), plus attention's
        # q.k and att.v: 6 * 2 * L * heads * head_dim * T (PaLM appendix B convention, no causal-mask discount)
        c = self.config
        matmul_params = sum(p.numel() for p in self.parameters() if p.dim() == 2)
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def estimate_mfu(self, tokens_per_sec, seq_len, device):
        """Model FLOPs utilisation against the bf16 peak of this GPU, or None where the peak is unknown."""
        if torch.device(device).type != "cuda":
            return None
        peak = peak_flops(torch.cuda.get_device_name(device))
        return None if peak is None else self.flops_per_token(seq_len) * tokens_per_sec / peak

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, pad=None, stop=None):
        """idx (B, T) with max_new_tokens sampled tokens appended: generate.generate (KV cache, greedy, top-k)."""
        return generate.generate(self, idx, max_new_tokens, temperature, top_k, use_cache, pad, stop)


# -----------------------------------------------------------------------------
# supporting pieces: the GPU peaks (MFU)


# dense bf16 tensor-core peaks (vendor data sheets), matched against torch.cuda.get_device_name;
# the more specific names come first. Unknown devices get no MFU rather than a wrong one.
PEAK_BF16_FLOPS = [("GH200", 989e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
                   ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("B200", 2250e12)]


def peak_flops(device_name):
    return next((flops for key, flops in PEAK_BF16_FLOPS if key.lower() in device_name.lower()), None)
