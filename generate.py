"""
generate.py: text from a trained GPT: the sampling loop (greedy, temperature, top-k) and the KV cache that runs it
one new token a step. GPT.generate calls generate(); GPT.forward(idx, cache=c) reads and extends a KVCache.

Not part of the recipe: train.py's sample at the end and evaluate.py's generative tasks use it.
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, pad=None, stop=None):
    """Append max_new_tokens tokens to idx (B, T) and return it; temperature=0 is greedy. use_cache=True runs
    the prompt once, then each new token against the KV cache. use_cache=False is the reference: every step
    re-runs the whole context, cropped to block_size (a cached run does the same once it outgrows block_size).
    pad (B,): left-padding tokens per row, to batch prompts of different lengths (cache only).
    stop(new_tokens (B, t)) -> (B,) bool: stop early once it holds for every row."""
    B, T = idx.shape
    block_size = model.config.block_size
    if pad is not None and (not use_cache or T + max_new_tokens > block_size):
        raise ValueError("pad needs use_cache=True and prompt + max_new_tokens <= block_size")
    cache = KVCache(model.config, B, min(T + max_new_tokens, block_size), pad) if use_cache and T < block_size \
        else None
    fresh = idx  # the tokens the cache has not seen yet
    for _ in range(max_new_tokens):
        if cache is not None and cache.pos + fresh.size(1) <= cache.max_len:
            logits, _ = model(fresh, cache=cache)
        else:  # plain generation: re-run the whole (cropped) context for every token
            logits, _ = model(idx[:, -block_size:])
        logits = logits[:, -1, :]
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        idx = torch.cat([idx, next_id], dim=1)
        fresh = next_id
        if stop is not None and bool(stop(idx[:, T:]).all()):
            break
    return idx


class KVCache:
    """The keys and values of the tokens seen so far, so generation runs one new token per step: per layer
    (B, n_kv_head, max_len, head_dim), in the dtype the keys first come in (bf16 under autocast).
    GPT.forward(idx, cache=c) runs idx at positions c.pos .. c.pos+T-1 (RoPE read at that offset), appends its keys
    and values and advances c.pos. pad (B,) counts left-padding tokens per row: no query attends to them, and as
    attention sees only relative positions, a left-padded row computes what it would alone."""

    def __init__(self, config, batch_size, max_len, pad=None):
        if max_len > config.block_size:
            raise ValueError(f"cache of {max_len} positions is longer than block_size={config.block_size}")
        self.shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = self.v = self.mask = None
        self.pos, self.max_len, self.pad, self.causal = 0, max_len, pad, False

    def prepare(self, T, device):
        """The attention mask for the next T tokens, set once per forward and shared by every layer."""
        if self.pos + T > self.max_len:
            raise ValueError(f"{self.pos} cached + {T} new tokens overflow the cache of {self.max_len}")
        # unpadded, two cases need no mask: a prompt from position 0 (plain causal) and one new token (sees all)
        self.causal, self.mask = self.pad is None and self.pos == 0 and T > 1, None
        if self.pad is not None or (self.pos > 0 and T > 1):
            q = torch.arange(self.pos, self.pos + T, device=device)[:, None]
            k = torch.arange(self.pos + T, device=device)
            self.mask = k <= q  # causal with the queries offset by pos: (T, pos+T)
            if self.pad is not None:  # a padding query still sees itself, so no softmax row is empty
                self.mask = (self.mask & ((k >= self.pad[:, None, None]) | (k == q)))[:, None]  # (B, 1, T, pos+T)

    def update(self, layer, k, v):
        if self.k is None:
            self.k, self.v = k.new_empty(self.shape), v.new_empty(self.shape)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
