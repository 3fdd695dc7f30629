"""
bench.py: how fast nanoXmodel trains, measured side by side with the alternatives in one run.

    python bench.py --report         # GPU, ~8 min: pytest -m gpu, every section, a short real --fp8 --muon_at_decay
                                     # run; writes bench_report/report.json and the table docs/speed.md shows
    python bench.py                  # GPU: every section at the whole 1.3B model (48 layers) and at 12 of them
    python bench.py --layers=12 --only=train,hf                 # some sections, one shape
    python bench.py --preset=nano --only=train --batch_size=16  # the 20M proxy
    python bench.py --quick          # CPU, about a minute: the cpu preset in fp32, eager (tests/ run it)
    python bench.py --profile        # + the kernels with the most device time in the AdamW steps
    python bench.py --only=fp8       # one section: FP8 vs bf16 on the recipe's four block linears
    python bench.py --only=ns --tune # Newton-Schulz and a Muon step, + the Triton kernel's tile configurations (GPU)

Sections; each prints its rows and its ratios. A time is the median of --steps steps after --warmup, device
synchronised; memory is the step's peak (torch.cuda.max_memory_allocated):
  train  a whole training step (forward, backward, optimizer) in tokens/s, MFU and peak memory: bf16 and --fp8,
         AdamW and Muon; torchao's Float8Linear (tensorwise) at the same shape; Muon's optimizer step alone
  hf     transformers' LlamaForCausalLM at the same shape, batch, dtype and compilation: what a user would
         otherwise train
  head   the loss head at the model's vocabulary: plain logits + F.cross_entropy, head.chunked_cross_entropy
         and Liger's fused linear cross-entropy alone; the whole step's peak memory with the plain and the
         chunked head, and the larger micro-batch the freed memory allows
  fp8    the recipe's four block linears, forward and backward: bf16, ours (weight cast once per step, or per
         micro-batch), torchao's; their times, back to back too (device time), and how many kernels each launches
  ns     Newton-Schulz, the Triton kernel vs plain torch, at the recipe's shapes (muon.py); one Muon step over all
         the matrices, torch vs Triton vs torch.optim.Muon; with --tune, the kernel's tile configurations
  data   batches/s from the memory-mapped shards, against the batches/s a training step consumes
  eval   scoring throughput: evaluate.py's built-in scorer vs lm-eval's own Hugging Face path (HFLM), same requests
Compilation: "blocks" compiles each transformer block on its own (regional compilation: the kernels of whole-model
compilation up to the block boundaries, for a fraction of its compile time, which at 48 layers does not fit a
short GPU lease); "model" compiles the whole model, as train.py does. The 12-layer shape runs both.
Optional packages, each needed only by its rows: transformers (hf, eval), torchao (train, fp8), liger-kernel
(head), lm-eval (eval).
"""
import gc
import importlib.util
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime, timezone

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import evaluate
import fp8
import hf
import muon
import prepare_data
from cli import Parser, Range, flag, run_main, setup_device
from config import TRAIN_PRESETS
from head import chunked_cross_entropy
from model import GPT, GPTConfig, PRESETS
from safeio import WriteError, atomic_write, check_output, head, json_with, make_dir, read_jsonl, write_json

SECTIONS = ("train", "hf", "head", "fp8", "ns", "data", "eval")


def block_linears(preset):
    """(in, out) of one transformer block's linears at a model preset: fused QKV, attention out, fused gate+up, down."""
    with torch.device("meta"):  # shapes only
        block = GPT(GPTConfig.from_preset(preset, n_layer=1)).blocks[0]
    return [(m.in_features, m.out_features) for m in block.modules() if isinstance(m, nn.Linear)]


# the 1.3B model's block linears (RECIPE.md section 1), read off the model: (1536, 2560), (1536, 1536),
# (1536, 7680), (3840, 1536)
RECIPE_LINEARS = block_linears("xmodel-2.5")
# shape defaults per device: a GPU gets the real width, the whole model and 12 of its layers
GPU_DEFAULTS = dict(preset="xmodel-2.5", layers="48,12", batch_size=4, seq_len=3712, steps=10, warmup=3)
CPU_DEFAULTS = dict(preset="cpu", layers="", batch_size=8, seq_len=256, steps=3, warmup=1)
REPORT_BUDGET_S = 480  # --report: what one GPU session's check may take (the lease is 15 minutes in all)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, steps, warmup, queued=False):
    """Median wall time of fn() in ms, after warm-up (compilation, autotuning, allocator growth). queued: the steps
    run back to back with one synchronisation around them all, so the host queues ahead and the mean is the device's
    time, without the launch overhead a synchronised step shows."""
    for _ in range(warmup):
        fn()
    if queued:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        return 1000 * (time.perf_counter() - t0) / steps
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()


def fresh(device):
    """Between rows: drop compiled code and cached memory, restart the peak-memory count."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def make_batch(vocab, B, T, device):
    g = torch.Generator().manual_seed(0)  # random tokens: the speed of a step does not depend on the text
    idx = torch.randint(0, vocab, (B, T + 1), generator=g)
    return idx[:, :-1].to(device), idx[:, 1:].to(device)


def compiled(model, how, blocks):
    """model compiled as a whole ("model"), block by block ("blocks", in place), or not (None)."""
    if how == "model":
        return torch.compile(model)
    if how == "blocks":
        for block in blocks:
            block.compile()
    return model


def optimizer(model, kind, device):
    if kind == "adamw":
        params = model.param_groups(weight_decay=0.1) if isinstance(model, GPT) else model.parameters()
        return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    return muon.Muon(model.param_groups(weight_decay=0.1), lr=1e-4, weight_decay=0.1)  # as train.py builds it


def torchao_convert(model):
    """torchao's Float8Linear (tensorwise, dynamic scaling: its default) on the same block linears as ours."""
    from torchao.float8 import convert_to_float8_training
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn.startswith("blocks.") and isinstance(
        m, nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0)


class LargestTensor(TorchDispatchMode):
    """The most bytes any single tensor produced by an op took while this mode was on: what a head holds at its
    peak, measured the same on a CPU and a GPU."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel() * o.element_size())
        return out


def missing(module):
    try:
        __import__(module)
        return None
    except ImportError as e:
        return f"{module} is not installed ({e.name}); pip install {module.replace('_', '-')}"

# -----------------------------------------------------------------------------
# one row: whole training steps of one model


class Rows(list):
    """The rows a section measured: dicts with section, shape, label, ms, tokens_per_s, mfu, peak_gib, note."""

    def add(self, section, shape, label, ms=None, tokens=None, flops_model=None, seq_len=None, device=None,
            note="", **extra):
        tps = tokens / ms * 1000 if ms and tokens else None
        mfu = flops_model.estimate_mfu(tps, seq_len, device) if tps and flops_model is not None else None
        row = dict(section=section, shape=shape, label=label, ms=ms, tokens_per_s=tps, mfu=mfu,
                   peak_gib=peak_gib(device) if ms and device is not None else None, note=note, **extra)
        self.append(row)
        print("  " + format_row(row))
        return row


def format_row(r):
    cells = [f"{r['shape']:>14s}  {r['label']:34s}"]
    cells.append(f"{r['ms']:9.2f} ms" if r["ms"] else f"{'':12s}")
    cells.append(f"{r['tokens_per_s']:12,.0f} tok/s" if r["tokens_per_s"] else "")
    cells.append(f"MFU {100 * r['mfu']:5.1f}%" if r["mfu"] else "")
    cells.append(f"{r['peak_gib']:6.1f} GiB" if r["peak_gib"] else "")
    return "  ".join(c for c in cells if c) + (f"  {r['note']}" if r["note"] else "")


def time_steps(loss_fn, opt, x, y, args, device, dtype, before=None):
    """Median ms of a whole training step, and the loss it ended on (a sanity check that it trains)."""
    losses = []

    def step():
        if before:
            before()
        with autocast(device, dtype):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return median_ms(step, device, args.steps, args.warmup), losses[-1].item()


def out_of_memory(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def model_rows(rows, section, shape, build, variants, how, args, device, dtype, batch_size=None, flops_model=None):
    """Time one model (build() -> (model, loss_fn, blocks, before_step)), compiled as `how`, under each (label,
    optimizer) variant; an out-of-memory is a row of its own, not a crash."""
    B = batch_size or args.batch_size
    fresh(device)
    try:
        model, loss_fn, blocks, before = build()
        fwd = compiled(model, how, blocks)
        x, y = make_batch(model.config.vocab_size, B, args.seq_len, device)
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        fresh(device)
        return rows.add(section, shape, variants[0][0], note=f"out of memory building it at batch {B}")
    step_fn = lambda a, b: loss_fn(fwd, a, b)
    for label, kind in variants:
        try:
            opt = optimizer(model, kind, device)
            ms, loss = time_steps(step_fn, opt, x, y, args, device, dtype, before)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            rows.add(section, shape, label, note=f"out of memory at batch {B}")
            continue
        rows.add(section, shape, label, ms, B * args.seq_len, flops_model or model, args.seq_len, device,
                 note=f"loss {loss:.3f}", batch=B)
        if args.profile and kind == "adamw":
            profile(lambda: time_steps(step_fn, opt, x, y, args, device, dtype, before), label, device)
        if kind == "muon":  # the optimizer step alone, on the gradients of one more backward
            with autocast(device, dtype):
                step_fn(x, y).backward()
            opt_ms = median_ms(opt.step, device, args.steps, 1)
            share = 100 * opt_ms / ms
            note = f"Muon optimizer step alone {opt_ms:.2f} ms = {share:.1f}% of the training step at this batch"
            if device.type == "cuda":
                # the recipe's decay phase: 8 GPUs share its batch (train.py's xmodel-2.5 preset); the step
                # grows with the tokens per GPU, Muon's cost does not (and sharded over the ranks it shrinks)
                p = TRAIN_PRESETS["xmodel-2.5"]
                per_gpu = p["total_batch_size"] * (2 if p["batch_double_step"] < p["max_iters"] - p["decay_iters"]
                                                   else 1) / 8
                note += f"; {100 * opt_ms / (ms * per_gpu / (B * args.seq_len)):.1f}% at the recipe's decay batch "
                note += f"({per_gpu:,.0f} tokens per GPU on 8 GPUs), unsharded"
            rows.add(section, shape, f"{label}: optimizer step", opt_ms, note=note, share=share)


def ours(config, device, precision="bf16", head="chunked"):
    """A build() for model_rows: nanoXmodel at config, its block linears in bf16, ours FP8, or torchao's."""
    def build():
        torch.manual_seed(0)
        with device:  # built in place: no CPU init of a large model
            model = GPT(config)
        model.chunked_loss = head == "chunked"
        if precision == "fp8":
            fp8.convert_to_fp8(model)
        elif precision == "torchao":
            torchao_convert(model)
        before = (lambda: fp8.refresh(model)) if precision == "fp8" else None  # as train.py, once per step
        return model, lambda fwd, a, b: fwd(a, b)[1], model.blocks, before
    return build


def llama(config, device):
    """transformers' LlamaForCausalLM of the same shape (tied, GQA, SwiGLU, SDPA) and its own loss, as a user runs
    it: logits, then cross-entropy over them in fp32."""
    import transformers
    hf_config = transformers.LlamaConfig(**hf.llama_config(config) | dict(tie_word_embeddings=True))

    def build():
        torch.manual_seed(0)
        with device:
            model = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa")
        model.train()

        def loss_fn(fwd, a, b):
            logits = fwd(input_ids=a).logits
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), b.reshape(-1))
        return model, loss_fn, model.model.layers, None
    return build


def meta_model(config):
    with torch.device("meta"):  # shapes only: parameter and FLOP counts without allocating
        return GPT(config)


def profile(fn, label, device):
    """Where a step's time goes: the kernels with the most device time (torch.profiler)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type ==
                                                     "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"  -- profile of {label} (all timed steps) --")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))


def ratio_notes(rows, base_label, shape, section):
    """Each row's speed over base_label's, in its note."""
    base = next((r for r in rows if r["label"] == base_label and r["shape"] == shape and r["ms"]), None)
    for r in rows:
        if base and r is not base and r["shape"] == shape and r["section"] == section and r["ms"] and \
                "optimizer step" not in r["label"]:
            r["ratio"] = base["ms"] / r["ms"]
            print(f"  {r['label']:34s} {r['ratio']:6.2f}x the speed of {base_label}")

# -----------------------------------------------------------------------------
# the sections


def shape_config(args, n_layer):
    overrides = dict(block_size=args.seq_len) | ({"n_layer": n_layer} if n_layer else {})
    return GPTConfig.from_preset(args.preset, **overrides)


def shape_name(config):
    return f"{config.n_layer}L"


def bench_train(rows, args, device, dtype, config):
    shape, cuda = shape_name(config), device.type == "cuda"
    prec = "bf16" if dtype == torch.bfloat16 else "fp32"
    how = ("blocks" if config.n_layer > 12 else "model") if cuda else None
    mode = how or "eager"
    print(f"\n== train: {shape}, {args.batch_size * args.seq_len:,} tokens/step ({args.batch_size} x {args.seq_len}), "
          f"{'bf16 autocast, fp32 master weights' if cuda else 'fp32'}, median of {args.steps} after {args.warmup} "
          f"warm-up ==")
    run = lambda build, variants, h=how: model_rows(rows, "train", shape, build, variants, h, args, device, dtype)
    run(ours(config, device), [(f"{prec} adamw {mode}", "adamw"), (f"{prec} muon {mode}", "muon")])
    if cuda and how == "model":  # the 12-layer shape: regional compilation against whole-model, and eager once
        run(ours(config, device), [(f"{prec} adamw blocks", "adamw")], "blocks")
        run(ours(config, device), [(f"{prec} adamw eager", "adamw")], None)
    if args.fp8:
        run(ours(config, device, "fp8"), [(f"fp8 adamw {mode}", "adamw"), (f"fp8 muon {mode}", "muon")])
        why = missing("torchao")
        if why:
            rows.add("train", shape, f"torchao fp8 adamw {mode}", note=f"skipped: {why}")
        else:
            run(ours(config, device, "torchao"), [(f"torchao fp8 adamw {mode}", "adamw")])
    ratio_notes(rows, f"{prec} adamw {mode}", shape, "train")


def bench_hf(rows, args, device, dtype, config):
    shape, cuda = shape_name(config), device.type == "cuda"
    why = missing("transformers")
    print(f"\n== hf: transformers' LlamaForCausalLM, {shape}, same shape, batch, dtype and compilation ==")
    if why:
        return rows.add("hf", shape, "transformers llama", note=f"skipped: {why}")
    how = ("blocks" if config.n_layer > 12 else "model") if cuda else None
    modes = [how] + ([None] if cuda and how == "model" else [])
    prec = "bf16" if dtype == torch.bfloat16 else "fp32"
    for m in modes:
        label = f"transformers {prec} adamw {m or 'eager'}"
        model_rows(rows, "hf", shape, llama(config, device), [(label, "adamw")], m, args, device, dtype,
                   flops_model=meta_model(config))
        mine = next((r for r in rows if r["label"] == f"{prec} adamw {m or 'eager'}" and r["shape"] == shape
                     and r["ms"]), None)
        theirs = rows[-1]
        if mine and theirs["ms"]:
            theirs["speedup"] = theirs["ms"] / mine["ms"]
            print(f"  nanoXmodel / transformers ({m or 'eager'}): {theirs['speedup']:.2f}x the tokens/s")


def bench_head(rows, args, device, dtype, config):
    """The head alone at tokens x n_embd x vocab, then the whole step with the plain head and a larger batch."""
    head_alone(rows, args, device, dtype, config)
    head_in_the_step(rows, args, device, dtype, config)


def head_alone(rows, args, device, dtype, config):
    shape, cuda = shape_name(config), device.type == "cuda"
    N, d, V = args.batch_size * args.seq_len, config.n_embd, config.vocab_size
    print(f"\n== head: tied head + cross-entropy alone, {N:,} tokens x {d} x {V:,} vocab, forward + backward ==")
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, d, generator=g) * config.logit_mult).to(device, dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g) * 0.1).to(device).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(device)
    heads = {"plain logits + F.cross_entropy":
             lambda: F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-1),
             "ours: chunked_cross_entropy": lambda: chunked_cross_entropy(h, w, t)}
    why = missing("liger_kernel") if cuda else "Liger's kernels need a GPU"
    if not why:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-1)
        heads["Liger fused linear cross-entropy"] = lambda: liger(w.to(h.dtype), h, t)  # (bf16 operands)
    results = {}
    for label, loss_fn in heads.items():
        fresh(device)

        def step():
            with autocast(device, dtype):
                loss = loss_fn()
            loss.backward()
            h.grad = w.grad = None
        try:
            ms = median_ms(step, device, args.steps, args.warmup)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            rows.add("head", shape, label, note="out of memory")
            continue
        with LargestTensor() as biggest:
            step()
        with autocast(device, dtype):
            results[label] = loss_fn().item()
        rows.add("head", shape, label, ms, N, device=device, largest_mib=biggest.largest / 2**20,
                 note=f"largest tensor {biggest.largest / 2**20:,.0f} MiB; loss {results[label]:.4f}")
    if why:
        rows.add("head", shape, "Liger fused linear cross-entropy", note=f"skipped: {why}")
    ref = results.get("plain logits + F.cross_entropy")
    if ref is not None and len(results) > 1:
        print("  loss difference from the plain head: " + ", ".join(
            f"{k.split(':')[0]} {abs(v - ref):.2e}" for k, v in results.items() if not k.startswith("plain")))


def head_in_the_step(rows, args, device, dtype, config):
    """The whole step with the plain head at the chunked rows' batch, then the chunked head at larger batches."""
    shape, cuda = shape_name(config), device.type == "cuda"
    prec = "bf16" if dtype == torch.bfloat16 else "fp32"
    how = ("blocks" if config.n_layer > 12 else "model") if cuda else None
    mode = how or "eager"
    print(f"== head: the whole {shape} step ({prec} adamw {mode}), plain head vs chunked (the train rows) ==")
    model_rows(rows, "head", shape, ours(config, device, head="plain"),
               [(f"plain head, batch {args.batch_size}", "adamw")], how, args, device, dtype)
    for B in (args.batch_size * 3 // 2, 2 * args.batch_size):
        model_rows(rows, "head", shape, ours(config, device), [(f"chunked head, batch {B}", "adamw")], how, args,
                   device, dtype, batch_size=B)
    chunked = next((r for r in rows if r["label"] == f"{prec} adamw {mode}" and r["shape"] == shape and r["ms"]),
                   None)
    plain = next((r for r in rows if r["label"] == f"plain head, batch {args.batch_size}" and r["ms"]), None)
    if chunked and plain:
        note = f"chunked / plain step speed {plain['ms'] / chunked['ms']:.2f}x"
        if cuda:
            note += f", peak memory {plain['peak_gib'] - chunked['peak_gib']:.1f} GiB lower"
        print("  " + note)
        rows.append(dict(section="head", shape=shape, label="chunked vs plain head, same batch", ms=None,
                         tokens_per_s=None, mfu=None, peak_gib=None, note=note))


def kernel_count(fn, device):
    """CUDA kernels one call of fn launches (torch.profiler), or None off a GPU."""
    if device.type != "cuda":
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def fp8_gpu(device):
    """A GPU with FP8 tensor cores (fp8.check_device), where the FP8 rows measure what training would see."""
    try:
        fp8.check_device(device)
    except ValueError:
        return False
    return device.type == "cuda"


def bench_fp8(rows, args, device, dtype):
    """The recipe's block linears, forward + backward under bf16 autocast: bf16, ours cached / uncached, torchao;
    each timed step by step (median) and back to back (the device's time, launch overhead hidden)."""
    gpu_fp8 = fp8_gpu(device)
    if not gpu_fp8 and device.type == "cuda":
        device = torch.device("cpu")  # FP8 GEMMs only run on the CPU then: a sanity run
    cuda = device.type == "cuda"
    div, tokens = (1, args.batch_size * args.seq_len) if gpu_fp8 else (16, 256)
    print(f"\n== fp8: the recipe's block linears{'' if gpu_fp8 else ' / 16 (no FP8 GPU: CPU timings mean nothing)'}, "
          f"{tokens:,} tokens, forward + backward, {'compiled' if cuda else 'eager'} ==")
    base = "bf16 nn.Linear" if dtype == torch.bfloat16 else "fp32 nn.Linear"
    variants = [base, "fp8 (weight cast once per step)", "fp8 (weight cast per micro-batch)"]
    why = missing("torchao") if gpu_fp8 else "needs an FP8 GPU"
    variants += [] if why else ["torchao fp8 (tensorwise)"]
    total, queued = {v: 0.0 for v in variants}, {v: 0.0 for v in variants}
    for k, n in [(k // div, n // div) for k, n in RECIPE_LINEARS]:
        fresh(device)
        linear = nn.Linear(k, n, bias=False, device=device)
        x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
        for v in variants:
            if v == base:
                layer = linear
            elif v.startswith("torchao"):
                layer = nn.Sequential(nn.Linear(k, n, bias=False, device=device))
                layer[0].weight = linear.weight
                from torchao.float8 import convert_to_float8_training
                convert_to_float8_training(layer)
            else:
                layer = fp8.Float8Linear.from_linear(linear)
                if "once" in v:
                    fp8.refresh(layer)  # the step's cast; the micro-batches reuse it
            run = torch.compile(layer) if cuda else layer

            def step():
                if "per micro-batch" in v:
                    layer.cached = False  # as if each forward came after an optimizer step
                with autocast(device, dtype):
                    run(x).float().square().mean().backward()  # a stand-in loss; its cost is the same for all
            ms = median_ms(step, device, args.steps * 5, args.warmup + 2)
            q = median_ms(step, device, args.steps * 5, 1, queued=True)
            total[v] += ms
            queued[v] += q
            rows.add("fp8", f"{k}x{n}", v, ms, kernels=kernel_count(step, device), queued_ms=q,
                     note=f"back to back {q:.3f} ms")
    for v, t in total.items():
        note = f"back to back {queued[v]:.3f} ms" + (f"; {total[base] / t:.2f}x the speed of {base}, back to back "
                                                      f"{queued[base] / queued[v]:.2f}x" if v != base else "")
        rows.add("fp8", "all four", v, t, note=note, ratio=total[base] / t, queued_ms=queued[v])
    if why:
        rows.add("fp8", "", "torchao fp8 (tensorwise)", note=f"skipped: {why}")


def triton_ok(device):
    """The Triton kernel runs here (muon.check_triton: CUDA, or the interpreter) and triton is installed."""
    try:
        muon.check_triton(device)
    except ValueError:
        return False
    return importlib.util.find_spec("triton") is not None


def bench_ns(rows, args, device):
    """Newton-Schulz alone at the recipe's shapes, then one Muon step over all the matrices, by each path; with
    --tune, the Triton kernel's tile configurations."""
    cuda = device.type == "cuda"
    div = 1 if cuda else 8  # CPU: an eighth of each side, one matrix per shape
    layers = args.n_layer_ns or (48 if cuda else 1)
    paths = {"torch": False, "triton": True} if triton_ok(device) else {"torch": False}
    print(f"\n== ns: Newton-Schulz (5 steps) at the recipe's shapes{' / 8' if div > 1 else ''}, {layers} "
          f"matrices each{'' if cuda or len(paths) == 1 else ', Triton interpreted (its times are no speed)'} ==")
    shapes = [(n // div, k // div) for k, n in RECIPE_LINEARS]  # weights are (out, in)
    for shape in shapes:
        G = torch.randn(layers, *shape, device=device)
        ms = {k: median_ms(lambda: muon.zeropower_via_newtonschulz(G, use_triton=v), device, args.steps, 2)
              for k, v in paths.items()}
        note = f"triton {ms['torch'] / ms['triton']:.2f}x torch" if "triton" in ms else \
            "(CPU: the Triton kernel needs a GPU; tests run it in the interpreter)"
        rows.add("ns", str(shape), "torch", ms["torch"], note=note)
        if "triton" in ms:
            rows.add("ns", str(shape), "triton", ms["triton"], ratio=ms["torch"] / ms["triton"])
    muon_step(rows, args, device, shapes, layers, paths)
    if args.tune:
        tune(rows, args, device, layers, div)


def muon_step(rows, args, device, shapes, layers, paths):
    """One optimizer step over `layers` matrices of each shape: our Muon by each path, and torch.optim.Muon."""
    params = [nn.Parameter(torch.randn(*s, device=device) * 0.02) for s in shapes for _ in range(layers)]
    for p in params:
        p.grad = torch.randn_like(p)
    opts = {f"Muon step ({k})": muon.Muon([dict(name="hidden", params=params)], lr=1e-3, weight_decay=0.1,
                                          use_triton=v) for k, v in paths.items()}
    if hasattr(torch.optim, "Muon"):
        opts["torch.optim.Muon step"] = torch.optim.Muon(params, lr=1e-3, weight_decay=0.1,
                                                         adjust_lr_fn="match_rms_adamw")
    print(f"  one Muon step over {len(params)} matrices:")
    ms = {k: median_ms(o.step, device, args.steps, 2) for k, o in opts.items()}
    base = ms["Muon step (torch)"]
    for k, t in ms.items():
        rows.add("ns", f"{len(params)} matrices", k, t, note=f"{base / t:.2f}x Muon step (torch)", ratio=base / t)


# --tune: (output tile, k step, warps, stages) of the Triton kernel; muon.TRITON_BLOCKS and TRITON_LAUNCH are the first
TUNE_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 4), (128, 32, 4, 4), (64, 64, 4, 3), (128, 128, 8, 3),
                (256, 64, 8, 3), (128, 64, 8, 5)]


def tune(rows, args, device, layers, div):
    """Each product of a Newton-Schulz step alone, per tile configuration, against torch (cuBLAS on a GPU): X X^T
    of X as Newton-Schulz sees it (wide), of the same X stored transposed (the tall matrices), and b A + c A A."""
    print(f"\n== ns --tune: the Triton kernel's tile configurations, {layers} matrices each, speed over torch ==")
    for m, n in sorted({(min(s) // div, max(s) // div) for s in RECIPE_LINEARS}):
        X = torch.randn(layers, m, n, device=device).bfloat16()
        A = (X @ X.mT) / n
        xt = X.mT.contiguous().mT  # the same X, stored transposed
        ref = {"xxt": median_ms(lambda: X @ X.mT, device, args.steps, 2),
               "poly": median_ms(lambda: torch.baddbmm(A, A, A, beta=-4.7, alpha=2.0), device, args.steps, 2)}
        rows.add("ns", f"{m}x{n}", "torch X X^T", ref["xxt"])
        rows.add("ns", f"{m}x{n}", "torch b A + c A A", ref["poly"])
        for bm, bk, w, st in TUNE_CONFIGS:
            kw = dict(block=bm, block_k=bk, launch=dict(num_warps=w, num_stages=st))
            label = f"tile {bm}, k {bk}, {w} warps, {st} stages"
            try:
                t_x = median_ms(lambda: muon.sym_matmul(X, **kw), device, args.steps, 2)
                t_t = median_ms(lambda: muon.sym_matmul(xt, **kw), device, args.steps, 2)
                t_p = median_ms(lambda: muon.sym_poly(A, -4.7, 2.0, **kw), device, args.steps, 2)
            except Exception as e:  # e.g. out of shared memory
                rows.add("ns", f"{m}x{n}", label, note=f"failed: {(str(e).splitlines() or [type(e).__name__])[0][:80]}")
                continue
            rows.add("ns", f"{m}x{n}", label, t_x, tile=[bm, bk, w, st], ratio=ref["xxt"] / t_x,
                     note=f"X X^T {ref['xxt'] / t_x:.2f}x, transposed X {ref['xxt'] / t_t:.2f}x, poly "
                          f"{ref['poly'] / t_p:.2f}x")


def bench_data(rows, args, device):
    data_dir = args.data_dir or prepare_data.prepare_embedded()
    loader = prepare_data.TokenLoader(data_dir, "train")
    B, T = args.batch_size, args.seq_len
    loader.check_fits(B, T)

    def fetch():
        x, y = loader.next_batch(B, T)
        x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    ms = median_ms(fetch, device, max(args.steps, 20), 2)
    print(f"\n== data: {data_dir}, {B} x {T} tokens per batch ==")
    steps = [r["ms"] for r in rows if r["section"] == "train" and r["ms"] and "optimizer step" not in r["label"]
             and r.get("batch") == B]
    note = f"{1000 / ms:,.0f} batches/s (memmap -> int64 -> {device.type})"
    if steps:
        note += f": {min(steps) / ms:,.0f}x what the fastest training step above consumes"
    rows.add("data", f"{B}x{T}", "loader", ms, note=note)


def synthetic_docs(n, seed):  # arc_easy rows of random words
    rnd = random.Random(seed)
    words = ["".join(rnd.choices("abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 8))) for _ in range(500)]
    text = lambda k: " ".join(rnd.choices(words, k=k))
    return [evaluate.arc({"question": text(rnd.randint(10, 30)) + "?", "answerKey": rnd.choice("ABCD"),
                          "choices": {"text": [text(rnd.randint(1, 6)) for _ in range(4)], "label": list("ABCD")}})
            for _ in range(n)]


def bench_eval(rows, args, device, dtype, config):
    """evaluate.py's built-in scorer vs lm-eval's HFLM on the same token requests: a random model of this shape,
    synthetic ARC rows, the same attention kernels; on a GPU the median of three alternating rounds (a busy
    machine slows both alike)."""
    cuda = device.type == "cuda"
    n, shots, batch, rounds = (200, 25, 16, 3) if cuda else (8, 1, 4, 1)
    tok = prepare_data.get_tokenizer("byte")  # (no download anywhere; the model keeps its shape's vocabulary)
    torch.manual_seed(0)
    with device:
        model = GPT(replace(config, vocab_size=max(config.vocab_size, 320))).eval()
    env = evaluate.make_env(model, tok, device, autocast(device, dtype), batch)
    docs, pool = synthetic_docs(n, 0), synthetic_docs(1000, 1)
    pairs = [evaluate.encode_pair(tok, c, a) for r in evaluate.requests_of("arc_easy", docs, pool, shots, n)
             for c, a in r]
    tokens = sum(len(c) + len(a) for c, a in pairs)
    print(f"\n== eval: ARC {shots}-shot (synthetic), {n} items, {len(pairs)} requests, {tokens:,} tokens, batch "
          f"{batch}, random {shape_name(config)} model, tokenizer {tok.name} ==")

    def timed(score):
        score(pairs[:batch])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = score(pairs)
        sync(device)
        return out, time.perf_counter() - t0

    ours_fn = lambda p: evaluate.loglikelihoods(env, p, desc="built-in")
    why = missing("lm_eval") or missing("transformers")
    if why:
        ours_out, dt = timed(ours_fn)
        rows.add("eval", shape_name(config), "built-in scorer", 1000 * dt, tokens, device=device,
                 note=f"{n / dt:.1f} examples/s")
        return rows.add("eval", shape_name(config), "lm-eval HFLM", note=f"skipped: {why}")
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(model, d, format="llama")
        # HFLM scores our token lists directly (its loglikelihood after tokenizing), so any tokenizer starts it
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<eot>": 0}, "<eot>")),
                                         eos_token="<eot>")
        lm = HFLM(pretrained=d, tokenizer=hf_tok, batch_size=batch, device=str(device),
                  dtype="bfloat16" if dtype == torch.bfloat16 else "float32", max_length=config.block_size)
        theirs_fn = lambda p: lm._loglikelihood_tokens([(None, c, a) for c, a in p], disable_tqdm=True)
        times = [[], []]
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # (a line per left-truncated request otherwise)
        with evaluate.sdpa_kernel(evaluate.ATTENTION):  # the same attention kernels as ours
            for _ in range(rounds):
                ours_out, dt = timed(ours_fn)
                theirs_out, dt_hf = timed(theirs_fn)
                times[0].append(dt)
                times[1].append(dt_hf)
    dt, dt_hf = statistics.median(times[0]), statistics.median(times[1])
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours_out, theirs_out))
    agree = 100 * sum(a[1] == b[1] for a, b in zip(ours_out, theirs_out)) / len(pairs)
    rows.add("eval", shape_name(config), "built-in scorer", 1000 * dt, tokens, device=device,
             note=f"{n / dt:.1f} examples/s; {dt_hf / dt:.2f}x HFLM", speedup=dt_hf / dt)
    rows.add("eval", shape_name(config), "lm-eval HFLM", 1000 * dt_hf, tokens, device=device,
             note=f"{n / dt_hf:.1f} examples/s; max |log-prob difference| {diff:.2e}, greedy flags agree {agree:.1f}%",
             max_diff=diff)


# -----------------------------------------------------------------------------
# --report: the one GPU check, JSON and markdown


def environment(args, device):
    """Where and when: device, driver, library versions, date, commit."""
    def version(module):
        try:
            return __import__(module).__version__
        except Exception:
            return None

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    info = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
                driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                python=sys.version.split()[0], date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=args.commit or run(["git", "rev-parse", "--short", "HEAD"]) or "unknown (pass --commit=)")
    for m in ("torch", "triton", "transformers", "torchao", "liger_kernel", "lm_eval"):
        info[m] = version(m)
    return info


def gpu_tests(device, timeout):
    """pytest -m gpu, its last line."""
    if device.type != "cuda":
        return "skipped: no GPU"
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                           capture_output=True, text=True, timeout=timeout)
        return (r.stdout.strip().splitlines() or ["no output"])[-1] + ("" if r.returncode == 0 else " (FAILED)")
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"


def real_run(args, device, out_dir, timeout):
    """A short real `train.py --fp8 --muon_at_decay` run; its throughput before and after the switch, val loss."""
    gpu = device.type == "cuda"
    flags = (["--preset=nano", "--max_iters=150", "--warmup_iters=20", "--decay_iters=50", "--eval_interval=75",
              "--batch_size=16", "--total_batch_size=59392"] if gpu else
             ["--n_layer=2", "--n_embd=128", "--max_iters=20", "--warmup_iters=2", "--decay_iters=8",
              "--eval_interval=10", "--batch_size=4", "--total_batch_size=1024", "--block_size=128"])
    flags += ["--fp8", "--muon_at_decay", "--ckpt_interval=0", "--eval_iters=5", "--sample_len=0", "--log_interval=25",
              f"--out_dir={out_dir}", "--overwrite", f"--device={device.type}"]
    if args.data_dir:
        flags.append(f"--data_dir={args.data_dir}")
    try:
        r = subprocess.run([sys.executable, "train.py", *flags], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(command=" ".join(flags), error=f"timed out after {timeout} s")
    res = dict(command="python train.py " + " ".join(f for f in flags if not f.startswith("--out_dir")),
               returncode=r.returncode)
    if r.returncode:
        return res | dict(error=(r.stderr.strip().splitlines() or ["?"])[-1])
    log, _ = read_jsonl(os.path.join(out_dir, "log.jsonl"))
    steps = [e for e in log if "loss" in e][3:]  # past compilation
    for opt in ("adamw", "muon"):
        tps = [e["tokens_per_sec"] for e in steps if e["optimizer"] == opt]
        res[f"tokens_per_s_{opt}"] = statistics.median(tps) if tps else None
    res["val_loss"] = [e["val_loss"] for e in log if "val_loss" in e][-1]
    return res


MD_HEADER = b"| section | shape | variant | ms | tokens/s | MFU | peak GiB | ratio, notes |"  # (tells report.md)


def markdown(report):
    """The table docs/speed.md shows."""
    i = report["info"]
    num = lambda v, fmt: format(v, fmt) if v else ""
    lines = [f"{i['device']}, driver {i['driver']}, torch {i['torch']}, triton {i['triton']}, transformers "
             f"{i['transformers']}, torchao {i['torchao']}, liger-kernel {i['liger_kernel']}; {i['date']}, commit "
             f"{i['commit']}. `pytest -m gpu`: {report['pytest_gpu']}.", "",
             MD_HEADER.decode(),
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ratio = next((f"{r[k]:.2f}x" for k in ("ratio", "speedup") if r.get(k)), "")
        cells = [r["section"], r["shape"], r["label"], num(r["ms"], ".2f"), num(r["tokens_per_s"], ",.0f"),
                 num(r["mfu"] and 100 * r["mfu"], ".1f"), num(r["peak_gib"], ".1f"),
                 "; ".join(x for x in (ratio, r.get("note", "")) if x)]
        lines.append("| " + " | ".join(cells) + " |")
    rr = report.get("real_run")
    if rr:
        lines += ["", f"Real run, `{rr['command']}`: " + (rr["error"] if "error" in rr else
                  f"{rr['tokens_per_s_adamw'] or 0:,.0f} tokens/s under AdamW, {rr['tokens_per_s_muon'] or 0:,.0f} "
                  f"after the switch to Muon, final val loss {rr['val_loss']:.3f}")]
    if report["skipped"]:
        lines += ["", "Not run (time budget): " + ", ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def run_sections(args, device, dtype, rows, budget_end=None, skipped=None):
    """Every section asked for, at every shape. For --report (a budget): in order, skipping what would not fit,
    and a section that fails is a row saying how, not the end of the report."""
    report_mode = budget_end is not None
    sections = args.only.split(",")
    shapes = args.layer_list or [None]
    configs = [shape_config(args, n) for n in shapes]
    plan = []  # (name, rough seconds on an H100/H200, call)
    for i, config in enumerate(configs):
        big = config.n_layer > 12 and device.type == "cuda"
        plan += [("train", 150 if big else 60, lambda c=config: bench_train(rows, args, device, dtype, c)),
                 ("hf", 60 if big else 40, lambda c=config: bench_hf(rows, args, device, dtype, c))]
        if i == 0:
            plan += [("head", 100 if big else 30, lambda c=config: bench_head(rows, args, device, dtype, c))]
    plan += [("fp8", 40, lambda: bench_fp8(rows, args, device, dtype)),
             ("ns", 30, lambda: bench_ns(rows, args, device)), ("data", 5, lambda: bench_data(rows, args, device)),
             ("eval", 60, lambda: bench_eval(rows, args, device, dtype, configs[-1]))]
    for name, seconds, call in plan:
        if name not in sections:
            continue
        if budget_end is not None and time.time() + (seconds if device.type == "cuda" else 0) > budget_end:
            skipped.append(name)
            print(f"\n== {name}: skipped, it would not fit the time budget ==")
            continue
        try:
            call()
        except Exception as e:  # one section's failure (an optional package's version, say) costs only its rows
            if not report_mode:
                raise
            where = traceback.extract_tb(e.__traceback__)[-1]
            line = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} ({where.filename}:" \
                   f"{where.lineno})"
            print(f"\n== {name}: {line} ==")
            rows.add(name, "", "error", note=line)
            fresh(device)


def report(args, device, dtype):
    t0 = time.time()
    out_dir = args.report_dir
    make_dir(out_dir, "--report_dir")  # now, not after eight minutes of measuring
    for name, is_ours in (("report.json", json_with("info", "rows")), ("report.md", lambda p: MD_HEADER in head(p))):
        check_output(os.path.join(out_dir, name), "--report_dir", "bench.py report", is_ours, name)
    rep = dict(info=environment(args, device), rows=Rows(), skipped=[])
    print("bench.py --report: " + json.dumps(rep["info"]))
    rep["pytest_gpu"] = gpu_tests(device, timeout=150)
    print(f"pytest -m gpu: {rep['pytest_gpu']}")
    run_sections(args, device, dtype, rep["rows"], budget_end=t0 + args.budget_s - 60, skipped=rep["skipped"])
    rep["real_run"] = real_run(args, device, os.path.join(out_dir, "run"), timeout=max(60, t0 + args.budget_s -
                                                                                         time.time()))
    rep["seconds"] = round(time.time() - t0)
    md = markdown(rep)
    print(f"\n{md}")  # first: a write that fails below still leaves the measurements on the screen
    try:
        write_json(os.path.join(out_dir, "report.json"), rep, indent=1)
        with atomic_write(os.path.join(out_dir, "report.md"), "w") as f:
            f.write(md)
    except WriteError as e:
        raise WriteError(f"{e}; the report's table is printed above") from None
    print(f"wrote {out_dir}/report.json and report.md in {rep['seconds']} s")
    return rep


def get_args(argv=None):
    p = Parser(prog="bench.py", description=__doc__.split("\n")[1])
    flag(p, "quick", action="store_true", help="CPU, the cpu preset, fp32, eager: about a minute")
    flag(p, "report", action="store_true", help="the GPU report: pytest -m gpu, every section within --budget_s, "
         "a short real run; JSON + markdown in --report_dir")
    flag(p, "preset", choices=list(PRESETS))
    flag(p, "layers", help="comma-separated layer counts of --preset's shape (GPU default 48,12)")
    flag(p, "batch_size", type=int, range=Range(1))
    flag(p, "seq_len", type=int, range=Range(16))
    flag(p, "steps", type=int, range=Range(1), help="timed steps per variant (median)")
    flag(p, "warmup", type=int, range=Range(0), help="untimed steps first (compilation, autotuning)")
    flag(p, "only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    flag(p, "device", default="auto")
    flag(p, "n_layer_ns", type=int, range=Range(1), help="matrices per shape in the ns section (default 48 on GPU)")
    flag(p, "tune", action="store_true", help="ns section: time the Triton kernel's tile configurations (GPU)")
    flag(p, "profile", action="store_true", help="print the top kernels of the AdamW steps")
    flag(p, "data_dir", help="shards for the data section and the real run (default: the embedded corpus)")
    flag(p, "report_dir", default="bench_report", help="where --report writes report.json and report.md")
    flag(p, "budget_s", type=int, default=REPORT_BUDGET_S, range=Range(60), help="--report: seconds in all")
    flag(p, "commit", default=None, help="--report: the commit measured (default: git rev-parse)")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    try:
        args.layer_list = [int(n) for n in (args.layers or "").split(",") if n]
        assert all(n >= 1 for n in args.layer_list)
    except (ValueError, AssertionError):
        p.error(f"--layers={args.layers}: expected comma-separated positive layer counts, e.g. 48,12")
    if args.device == "auto":
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    try:
        torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device={args.device}: {str(e).splitlines()[0]}")
    args.device = str(setup_device(args.device))  # the device check train.py and evaluate.py make: one line
    if args.tune:
        if "ns" not in args.only.split(","):
            p.error("--tune is an option of the ns section: add ns to --only")
        try:
            muon.check_triton(args.device, flag="--tune")
        except ValueError as e:
            p.error(str(e))
        if importlib.util.find_spec("triton") is None:
            p.error("--tune times the Triton kernel: triton is not installed")
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)  # (setup_device made a CUDA one current, with TF32 matmuls)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 matmuls crawl on a CPU
    args.fp8 = fp8_gpu(device)
    first = shape_config(args, args.layer_list[0] if args.layer_list else None)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench.py on {name}, torch {torch.__version__}: {args.preset} shape, layers {args.layers or first.n_layer}"
          f" x {first.n_embd} wide, vocab {first.vocab_size:,}, {meta_model(first).num_params() / 1e6:.1f}M params "
          f"at {first.n_layer} layers")
    if args.report:
        return report(args, device, dtype)
    rows = Rows()
    run_sections(args, device, dtype, rows)
    return rows


if __name__ == "__main__":
    run_main("bench.py", main)
