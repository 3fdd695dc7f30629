"""
bench.py: how fast nanoXmodel trains, measured side by side with the alternatives in one run.

    python bench.py                  # GPU: the 1536-wide Xmodel-2.5 shape (12 of its 48 layers), all sections
    python bench.py --preset=nano    # the ~20M proxy: what a quick muP run costs per token
    python bench.py --quick          # CPU, < 1 minute: the cpu preset in fp32, eager (what tests/ runs)
    python bench.py --only=train,hf  # some sections: train, hf, ns, fp8, data

Sections (each prints its own ratios; every time is the median of --steps after --warmup, device synced):
  train  one training step (forward, backward, optimizer) in tokens/s and MFU: bf16 vs --fp8, AdamW vs
         Muon, torch.compile vs eager; and the Muon optimizer step alone as a share of the training step
  hf     the same shape as Hugging Face transformers' LlamaForCausalLM (same batch, sequence, dtype and
         compile setting): what a user would otherwise train; transformers is optional, needed here only
  ns     Newton-Schulz, the Triton kernel vs plain torch, at the recipe's shapes (muon.py)
  fp8    the recipe's four block linears, FP8 vs bf16 (fp8.py)
  data   batches/s from the memory-mapped shards, against the batches/s the training step consumes
"""
import argparse
import statistics
import time
from contextlib import nullcontext

import torch

import fp8
import hf
import muon
import prepare_data
from model import GPT, GPTConfig, PRESETS
from train import TRAIN_PRESETS

SECTIONS = ("train", "hf", "ns", "fp8", "data")
# the 1.3B model's block linears (RECIPE.md section 1): fused QKV, attention out, fused gate+up, down
RECIPE_LINEARS = [(1536, 2560), (1536, 1536), (1536, 7680), (3840, 1536)]
# shape defaults per device: a GPU gets the real width (layers cut so compiles and memory fit a short lease)
GPU_DEFAULTS = dict(preset="xmodel-2.5", n_layer=12, batch_size=4, seq_len=3712, steps=10, warmup=3)
CPU_DEFAULTS = dict(preset="cpu", n_layer=None, batch_size=8, seq_len=256, steps=3, warmup=1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, steps, warmup):
    """Median wall time of fn() in ms, after warm-up (compilation, autotuning, allocator growth)."""
    for _ in range(warmup):
        fn()
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


def make_batch(config, args, device):
    g = torch.Generator().manual_seed(0)  # random tokens: the speed of a step does not depend on the text
    idx = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
    return idx[:, :-1].to(device), idx[:, 1:].to(device)


def optimizer(model, kind, device):
    groups = model.param_groups(weight_decay=0.1)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    return muon.Muon(groups, lr=1e-4, weight_decay=0.1)  # as train.py builds it (Muon + AdamW for the rest)


def time_steps(forward, opt, x, y, args, device, dtype):
    """Median ms of a whole training step, and the loss it ended on (a sanity check that it trains)."""
    losses = []

    def step():
        with autocast(device, dtype):
            loss = forward(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    ms = median_ms(step, device, args.steps, args.warmup)
    return ms, losses[-1].item()


def bench_train(config, args, device, dtype):
    """nanoXmodel steps: bf16 vs fp8, AdamW vs Muon, compiled vs eager. Returns {label: ms}."""
    tokens = args.batch_size * args.seq_len
    variants = [("eager", False, "adamw")] + ([("compiled", True, o) for o in ("adamw", "muon")] if args.compile
                                               else [("eager", False, "muon")])
    precisions = ["bf16", "fp8"] if args.fp8 else ["bf16" if dtype == torch.bfloat16 else "fp32"]
    results = {}
    print(f"\n== train: {tokens:,} tokens/step ({args.batch_size} x {args.seq_len}), {dtype_name(dtype)}, "
          f"median of {args.steps} after {args.warmup} warm-up ==")
    for prec in precisions:
        torch.manual_seed(0)
        with device:  # built in place: no CPU init of a large model
            model = GPT(config)
        if prec == "fp8":
            fp8.convert_to_fp8(model)
        x, y = make_batch(config, args, device)
        compiled = torch.compile(model) if args.compile else None
        for mode, use_compile, kind in variants:
            if prec == "fp8" and not use_compile and args.compile:
                continue  # eager FP8 is known slow (unfused casts); the recipe runs it compiled
            opt = optimizer(model, kind, device)
            fwd = (compiled if use_compile else model)
            ms, loss = time_steps(lambda a, b: fwd(a, b)[1], opt, x, y, args, device, dtype)
            label = f"{prec} {kind} {mode}"
            results[label] = ms
            report(label, ms, tokens, model, args, device, f"loss {loss:.3f}")
            if args.profile and kind == "adamw" and use_compile == args.compile:
                profile(lambda: time_steps(lambda a, b: fwd(a, b)[1], opt, x, y, args, device, dtype),
                        label, device)
            if kind == "muon":  # the optimizer step alone, on the gradients of one more backward
                with autocast(device, dtype):
                    fwd(x, y)[1].backward()
                opt_ms = median_ms(opt.step, device, args.steps, 1)
                results[f"{prec} muon optimizer step"] = opt_ms
                print(f"  {'Muon optimizer step alone':28s} {opt_ms:9.2f} ms = {100 * opt_ms / ms:.1f}% of the "
                      f"training step at this batch")
                if device.type == "cuda":
                    # the recipe's decay phase: 8 GPUs share its batch (train.py's xmodel-2.5 preset); the step
                    # grows with the tokens per GPU, Muon's cost does not (and sharded over the ranks it shrinks)
                    p = TRAIN_PRESETS["xmodel-2.5"]
                    doubled = p["batch_double_step"] < p["max_iters"] - p["decay_iters"]
                    per_gpu = p["total_batch_size"] * (2 if doubled else 1) / 8
                    print(f"  {'':28s} at the recipe's decay batch ({per_gpu:,.0f} tokens per GPU on 8 GPUs): "
                          f"{100 * opt_ms / (ms * per_gpu / tokens):.1f}% unsharded")
            del opt
        del model, compiled
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next(k for k in results if k.endswith("adamw compiled") or k.endswith("adamw eager"))
    for k in results:
        if k != base and not k.endswith("optimizer step"):
            print(f"  {k:28s} {results[base] / results[k]:6.2f}x the speed of {base}")
    return results


def profile(fn, label, device):
    """Where a step's time goes: the kernels with the most device time (torch.profiler)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type ==
                                                     "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"  -- profile of {label} (all timed steps) --")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))


def meta_model(config):
    with torch.device("meta"):  # shapes only: parameter and FLOP counts without allocating
        return GPT(config)


def dtype_name(dtype):
    return "bf16 autocast, fp32 master weights" if dtype == torch.bfloat16 else "fp32"


def report(label, ms, tokens, model, args, device, extra=""):
    tps = tokens / ms * 1000
    mfu = model.estimate_mfu(tps, args.seq_len, device)
    mfu_s = f"  MFU {100 * mfu:5.1f}%" if mfu is not None else ""
    print(f"  {label:28s} {ms:9.2f} ms  {tps:12,.0f} tok/s{mfu_s}  {extra}")


def bench_hf(config, args, device, dtype, ours):
    """transformers' LlamaForCausalLM at the same shape (tied embeddings, GQA, SwiGLU, same batch)."""
    try:
        import transformers
    except ImportError:
        print("\n== hf: skipped: transformers is not installed (pip install transformers) ==")
        return {}
    print(f"\n== hf: transformers {transformers.__version__} LlamaForCausalLM, same shape and batch ==")
    # hf.py's export config, with the head tied as in nanoXmodel: the same parameters, the same FLOPs
    hf_config = transformers.LlamaConfig(**hf.llama_config(config) | dict(tie_word_embeddings=True))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa").to(device)
    model.train()
    ref = meta_model(config)  # for the FLOP count of the same shape
    x, y = make_batch(config, args, device)
    # the same loss as ours: next-token cross entropy over all positions (labels pre-shifted, so pass logits)
    loss_fn = torch.nn.functional.cross_entropy

    def forward(a, b):
        logits = model(input_ids=a).logits
        return loss_fn(logits.float().view(-1, logits.size(-1)), b.reshape(-1))

    results = {}
    modes = [("compiled", True), ("eager", False)] if args.compile else [("eager", False)]
    for mode, use_compile in modes:
        fwd = torch.compile(forward) if use_compile else forward
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        ms, loss = time_steps(fwd, opt, x, y, args, device, dtype)
        label = f"transformers adamw {mode}"
        results[label] = ms
        report(label, ms, x.numel(), ref, args, device, f"loss {loss:.3f}")
        prec = "bf16" if dtype == torch.bfloat16 else "fp32"
        mine = ours.get(f"{prec} adamw {mode}")
        if mine:
            print(f"  nanoXmodel / transformers ({mode}): {ms / mine:.2f}x the tokens/s")
    del model
    return results


def bench_ns(args, device):
    cuda = device.type == "cuda"
    div = 1 if cuda else 8  # CPU: an eighth of each side, one matrix per shape
    layers = args.n_layer_ns or (48 if cuda else 1)
    paths = {"torch": False, "triton": True} if cuda else {"torch": False}
    print(f"\n== ns: Newton-Schulz (5 steps) at the recipe's shapes{' / 8' if div > 1 else ''}, {layers} "
          f"matrices each ==")
    for rows, cols in RECIPE_LINEARS:
        G = torch.randn(layers, cols // div, rows // div, device=device)  # weights are (out, in)
        ms = {k: median_ms(lambda: muon.zeropower_via_newtonschulz(G, use_triton=v), device, args.steps, 2)
              for k, v in paths.items()}
        ratio = f"  triton {ms['torch'] / ms['triton']:.2f}x torch" if "triton" in ms else ""
        print(f"  {str(tuple(G.shape[1:])):16s}" + "".join(f"  {k} {t:8.2f} ms" for k, t in ms.items()) + ratio)
    if not cuda:
        print("  (CPU: the Triton kernel needs a GPU; tests run it in the interpreter)")


def bench_fp8(args, device):
    print("\n== fp8: the recipe's block linears, forward + backward ==")
    if device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
        fp8.benchmark(RECIPE_LINEARS, args.batch_size * args.seq_len, device, iters=args.steps * 5,
                      warmup=args.warmup + 2)
    else:
        print("  (no FP8 GPU: a tiny functional run; CPU timings of emulated FP8 mean nothing)")
        fp8.benchmark([(k // 16, n // 16) for k, n in RECIPE_LINEARS], 256, device, iters=2, warmup=1,
                      compile=False)


def bench_data(args, device, step_ms):
    data_dir = args.data_dir or prepare_data.prepare_embedded()
    loader = prepare_data.TokenLoader(data_dir, "train")
    B, T = args.batch_size, args.seq_len
    loader.check_fits(B, T)

    def fetch():
        x, y = loader.next_batch(B, T)
        x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    ms = median_ms(fetch, device, max(args.steps, 20), 2)
    print(f"\n== data: {data_dir}, {B} x {T} tokens per batch ==")
    line = f"  {1000 / ms:,.0f} batches/s ({ms:.3f} ms each, memmap -> int64 -> {device.type})"
    if step_ms:
        line += f": {step_ms / ms:,.0f}x what the fastest training step above consumes"
    print(line)


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--quick", action="store_true", help="CPU, the cpu preset, fp32, eager: under a minute")
    ap.add_argument("--preset", choices=list(PRESETS))
    ap.add_argument("--n_layer", type=int, help="layers (default: 12 of the 1.3B's 48 on a GPU)")
    ap.add_argument("--batch_size", type=int)
    ap.add_argument("--seq_len", type=int)
    ap.add_argument("--steps", type=int, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (compilation, autotuning)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n_layer_ns", type=int, help="matrices per shape in the ns section (default 48 on GPU)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of the AdamW steps")
    ap.add_argument("--data_dir", help="shards for the data section (default: the embedded corpus)")
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.device == "auto":
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 matmuls crawl on a CPU
    args.compile, args.fp8 = cuda, cuda and torch.cuda.get_device_capability() >= (8, 9)
    overrides = dict(block_size=args.seq_len) | ({"n_layer": args.n_layer} if args.n_layer else {})
    config = GPTConfig.from_preset(args.preset, **overrides)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench.py on {name}, torch {torch.__version__}: {args.preset} shape, {config.n_layer} layers x "
          f"{config.n_embd} wide, vocab {config.vocab_size:,}, {meta_model(config).num_params() / 1e6:.1f}M params")
    sections = args.only.split(",")
    ours = bench_train(config, args, device, dtype) if "train" in sections else {}
    if "hf" in sections:
        bench_hf(config, args, device, dtype, ours)
    if "ns" in sections:
        bench_ns(args, device)
    if "fp8" in sections:
        bench_fp8(args, device)
    if "data" in sections:
        steps = [v for k, v in ours.items() if not k.endswith("optimizer step")]
        bench_data(args, device, min(steps) if steps else None)


if __name__ == "__main__":
    main()
