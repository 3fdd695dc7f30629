"""
train.py: train a nanoXmodel with the Xmodel-2.5 recipe: muP, Warmup-Stable-Decay, the AdamW -> Muon switch, FP8.

One script for every scale: a laptop CPU, one GPU, or torchrun over many GPUs and nodes.

    python train.py                                    # CPU: small model on the embedded corpus, ~2 min
    python train.py --dry_run                          # print the resolved config and the LR schedule, train nothing
    python train.py --preset=nano --data_dir=data/X    # the 20M muP proxy on one GPU
    python train.py --resume=out/ckpt_0000360.pt --out_dir=out-long --long_context=512:80   # the long-context phase
    torchrun --standalone --nproc_per_node=8 train.py --preset=xmodel-2.5 --data_dir=data/X
    # two nodes: on each, torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \\
    #     --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --preset=xmodel-2.5 --data_dir=data/X

Read top to bottom: the presets, the schedule as pure functions of (step, args), the optimizers, the set-up,
then loop(), where each idea of the recipe is one named line; the flags are at the bottom (--help shows their
ranges). --preset picks the model and a matching schedule; any flag overrides it. checkpoint.py keeps a run
continuable: --resume continues it exactly; Ctrl-C or SIGTERM saves a checkpoint and says how to go on.
"""

import argparse
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from datetime import timedelta

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import fp8
import muon
import prepare_data
from checkpoint import Run, list_ckpts, load_optimizer_state
from cli import Parser, Range, UserError, all_mean, fail, finish, flag, launch, run_main, str2bool
from model import GPT, GPTConfig, PRESETS

PROG = "train.py"


class ConfigError(UserError):
    """Flags that cannot make a run together (a schedule that does not fit, a batch that does not divide)."""


def refuse(message):
    """A ConfigError as the script's end. (The schedule's functions and parse_args are also called outside
    run_main, by tests and the experiment drivers: they end the script in the same one line.)"""
    return fail(PROG, ConfigError(message))

# -----------------------------------------------------------------------------
# presets


TRAIN_PRESETS = {
    "cpu": dict(max_iters=360, warmup_iters=30, decay_iters=80, total_batch_size=16 * 256, batch_size=16,
                batch_double_step=0, eval_interval=60, eval_iters=20, ckpt_interval=120, log_interval=10,
                sample_len=200),
    "nano": dict(max_iters=5000, warmup_iters=200, decay_iters=1000, total_batch_size=32 * 3712, batch_size=16,
                 batch_double_step=0, eval_interval=250, eval_iters=20, ckpt_interval=1000, log_interval=1,
                 sample_len=0),
    "xmodel-2.5": dict(max_iters=550_000, warmup_iters=2000, decay_iters=20_000, total_batch_size=480 * 3712,
                       batch_size=4, batch_double_step=270_000, eval_interval=2000, eval_iters=50,
                       ckpt_interval=2000, log_interval=1, sample_len=0),
}
MODEL_FIELDS = [f.name for f in fields(GPTConfig)]
# the recipe's long-context phase (RECIPE.md section 3): after the decay, 8k then 16k context, LR linear from
# 1.04e-4 (where the decay ended: the 1.3B hidden peak 1.667e-3 / 16) to 1e-5
LONG_CONTEXT_LR_DROP = 1e-5 / 1.04e-4
DECAY_SHAPES = {
    "exponential": lambda t: 2 * 0.5 ** t - 1,  # the released decay scripts: 1 -> 0
    "minicpm": lambda t: 0.5 ** t,              # MiniCPM's original WSD: 1 -> 0.5
    "linear": lambda t: 1 - t,
    "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
    "1-sqrt": lambda t: 1 - math.sqrt(t),
}


# -----------------------------------------------------------------------------
# the Warmup-Stable-Decay schedule, the batch and the switch: pure functions of (step, args)


def decay_start(args):
    return args.max_iters - args.decay_iters  # the decay window is the main run's last decay_iters steps


def total_iters(args):
    return args.max_iters + sum(steps for _, steps in args.long_context)  # the long-context phase comes after


def lr_mult(step, args):
    """LR at `step` (0-based) as a fraction of the peak: linear warmup, constant, decay to min_lr_ratio, then (long
    context) linear to long_context_lr_end; with --switch_warmup, a linear re-warmup after the switch to Muon."""
    if step < args.warmup_iters:
        return (step + 1) / args.warmup_iters
    if step < decay_start(args):
        return 1.0
    if step >= args.max_iters:  # the long-context phase
        t = (step - args.max_iters + 1) / (total_iters(args) - args.max_iters)
        return args.min_lr_ratio + t * (args.long_context_lr_end - args.min_lr_ratio)
    t = (step - decay_start(args) + 1) / args.decay_iters  # reaches 1 on the last step
    mult = args.min_lr_ratio + DECAY_SHAPES[args.decay_shape](t) * (1 - args.min_lr_ratio)
    since_switch = step - decay_start(args)
    if args.muon_at_decay and since_switch < args.switch_warmup:
        mult *= (since_switch + 1) / (args.switch_warmup + 1)
    return mult


def phase(step, args):
    if step < args.warmup_iters:
        return "warmup"
    if step >= args.max_iters:
        return "long_context"
    if step >= decay_start(args):
        return "decay"
    return "stable2" if 0 < args.batch_double_step <= step else "stable"


def long_context_starts(args):
    """The first step of each long-context sub-phase."""
    starts = [args.max_iters]
    for _, steps in args.long_context:
        starts.append(starts[-1] + steps)
    return starts[:-1]


def seq_len(step, args):
    """Tokens a sequence at `step`: --block_size, or in the long-context phase its sub-phase's."""
    end = args.max_iters
    for seq, steps in args.long_context:
        end += steps
        if args.max_iters <= step < end:
            return seq
    return args.block_size


def micro_batch(step, args):
    """Sequences per micro-step: batch_size at block_size; at a longer context, as many tokens in fewer sequences."""
    seq = seq_len(step, args)
    if (args.batch_size * args.block_size) % seq:
        raise refuse(f"a micro-batch of batch_size*block_size = {args.batch_size}*"
                         f"{args.block_size} tokens is not a whole number of {seq}-token sequences (--long_context)")
    return args.batch_size * args.block_size // seq


def grad_accum_steps(step, args, world_size):
    total = args.total_batch_size * (2 if 0 < args.batch_double_step <= step else 1)
    per_micro = args.batch_size * args.block_size * world_size  # (the same tokens at a longer context)
    if total % per_micro:
        raise refuse(f"a step of {total} tokens is not a whole number of micro-batches of "
                         f"batch_size*block_size*world_size = {args.batch_size}*{args.block_size}*{world_size} = "
                         f"{per_micro} tokens; make --total_batch_size a multiple of {per_micro}")
    return total // per_micro


def step_tokens(step, args, world_size):
    return grad_accum_steps(step, args, world_size) * args.batch_size * args.block_size * world_size


def optimizer_kind(step, args):
    if args.optimizer == "muon" or (args.muon_at_decay and step >= decay_start(args)):
        return "muon"
    return "adamw"


def milestones(step, args):
    """What the schedule changes at `step`, in words for the log."""
    said = []
    if step == args.batch_double_step and step > 0:
        said.append(f"batch doubles to {2 * args.total_batch_size:,} tokens (stable 2, RECIPE.md section 3)")
    if step == decay_start(args):
        said.append(f"decay phase begins ({args.decay_shape}, {args.decay_iters} steps)")
    if step in long_context_starts(args):
        said.append(f"long-context phase: {seq_len(step, args)} tokens a sequence, {micro_batch(step, args)} "
                    f"sequences a micro-step (RECIPE.md section 3)")
    return said


def print_schedule(args, groups, world_size):
    start, end = decay_start(args), total_iters(args)
    marks = {0, args.warmup_iters - 1, start - 1, start, args.max_iters - 1, end - 1}
    marks |= {start + round(f * args.decay_iters) - 1 for f in (0.25, 0.5, 0.75)}
    if args.batch_double_step > 0:
        marks |= {args.batch_double_step - 1, args.batch_double_step}
    for first in long_context_starts(args):  # each long-context sub-phase's first step, and the one before
        marks |= {first - 1, first}
    print(f"{'step':>9} {'phase':>8} {'lr/peak':>8} " + " ".join(f"{'lr ' + g['name']:>14}" for g in groups)
          + f" {'tokens/step':>12} {'accum':>6} {'optimizer':>9} {'seq':>6}")
    for s in sorted(m for m in marks if 0 <= m < end):
        mult = lr_mult(s, args)
        accum = grad_accum_steps(s, args, world_size)
        print(f"{s:>9} {phase(s, args):>8} {mult:>8.4f} "
              + " ".join(f"{args.lr * mult * g['lr_mult']:>14.3e}" for g in groups)
              + f" {accum * args.batch_size * args.block_size * world_size:>12,} {accum:>6}"
              + f" {optimizer_kind(s, args):>9} {seq_len(s, args):>6}")


# -----------------------------------------------------------------------------
# the optimizers: muP param groups in, AdamW or Muon out


def build_optimizer(model, args, device, kind):
    groups = model.param_groups(args.weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                                 fused=device.type == "cuda")
    if kind == "muon":  # the "hidden" group gets Muon, embedding and norms AdamW, each at its muP lr
        return muon.Muon(groups, lr=args.lr, momentum=args.muon_momentum, ns_steps=args.ns_steps,
                    ns_coeffs=args.ns_coeffs, muon_scale=args.muon_scale, split_fused=args.split_fused,
                    use_triton=args.ns_triton, betas=(args.beta1, args.beta2), eps=args.eps)
    raise ValueError(f"unknown optimizer {kind}")


def set_lr(optimizer, lr):  # muP: each group at the peak's lr times its own lr_mult (model.param_groups)
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_mult"]


# -----------------------------------------------------------------------------
# set-up: data and model


def sample_tokenizer(args, meta, log):
    """The tokenizer of the end's sample, or None: found out now, not after the run."""
    if args.sample_len == 0:
        return None
    try:
        return prepare_data.get_tokenizer(meta["tokenizer"])
    except prepare_data.DataError as e:
        log(f"train.py: warning: --sample_len=0, no sample at the end: {e}")
        return None


def setup_model(args, meta, device, log):
    """--preset's model with the flags' changes (the vocabulary from the data unless given), or --init_from's;
    the RoPE tables cover the long-context phase; FP8 linears with --fp8."""
    overrides = {k: getattr(args, k) for k in MODEL_FIELDS if getattr(args, k) is not None}
    overrides.setdefault("vocab_size", -(-meta["vocab_size"] // 64) * 64)  # pad to 64 for faster matmuls
    pretrained = None
    try:
        config = GPTConfig.from_preset(args.preset, **overrides)
        if args.init_from:  # a released checkpoint: its architecture and weights
            import hf  # (Hugging Face interop: needs safetensors, and huggingface_hub for a hub id)
            config, pretrained = hf.init_from(args.init_from, config.block_size, meta["tokenizer"], args.data_dir, log)
    except (ValueError, OSError, ImportError) as e:  # (OSError: a missing --init_from, an unreachable hub)
        raise ConfigError(e) from None
    if config.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"--vocab_size={config.vocab_size} is smaller than the data's tokenizer "
                          f"({meta['tokenizer']}: {meta['vocab_size']})")
    if args.long_context:  # (the weights do not depend on block_size)
        config = replace(config, block_size=max(args.block_size, *(seq for seq, _ in args.long_context)))
    torch.manual_seed(args.seed)
    if pretrained is not None and not args.resume:  # (a resumed run's checkpoint has newer weights)
        model = hf.empty_model(config, device)  # no random init for the loaded weights to overwrite
        model.load_state_dict(pretrained)
    else:
        model = GPT(config).to(device)
    model.chunked_loss = args.chunked_loss
    if args.fp8:  # swaps the block linears in place; the weights and the param groups stay the same
        for name, reason in fp8.convert_to_fp8(model, recipe=args.fp8_recipe):
            log(f"fp8: {name} stays in {args.dtype}: {reason}")
    return model


@torch.no_grad()
def mean_loss(model, batches, autocast):
    """The mean loss over (x, y) batches, averaged over ranks: validation, and the checkpoint's sanity probe."""
    model.eval()
    with autocast:
        total = sum(model(x, y)[1].float() for x, y in batches)
    model.train()
    return all_mean(total / len(batches)).item()

# -----------------------------------------------------------------------------
# training


def train(args):
    # a long timeout: the other ranks wait in their next all-reduce while rank 0 writes a large checkpoint
    run_on = launch(args.device, timeout=timedelta(hours=1))
    log = print if run_on.master else (lambda *a, **k: None)
    try:  # what this device cannot do, said before any work
        fp8.check_device(run_on.device) if args.fp8 else None
        muon.check_triton(run_on.device) if args.ns_triton else None
    except ValueError as e:
        raise ConfigError(e) from None
    meta, train_loader, val_loader = prepare_data.loaders(args.data_dir, run_on)
    for loader in (train_loader, val_loader):  # fail now, not hours in, on a shard too small for a batch
        for step in [0, *long_context_starts(args)]:
            loader.check_fits(micro_batch(step, args), seq_len(step, args))
    tok = sample_tokenizer(args, meta, log) if run_on.master else None
    model = setup_model(args, meta, run_on.device, log)
    grad_accum_steps(0, args, run_on.world_size)  # fail early on a batch that does not divide
    log(f"model: {model.num_params() / 1e6:.2f}M params ({model.num_params(embedding=False) / 1e6:.2f}M "
        f"non-embedding), width multiplier m = {model.config.width_mult:g}, muP {'on' if model.config.mup else 'off'}")
    run_args = {k: v for k, v in vars(args).items() if k not in MODEL_FIELDS}  # the model's are in `model`
    log("config: " + json.dumps({"args": run_args, "model": asdict(model.config), "world_size": run_on.world_size}))
    if args.dry_run:
        print_schedule(args, model.param_groups(args.weight_decay), run_on.world_size)
        return {"config": model.config, "args": args}
    autocast = torch.autocast(run_on.device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    # the checkpoints at the decay's start (where ablations branch) and end (where the long-context phase does)
    # stay whatever --keep_ckpts says
    end = min(total_iters(args), args.stop_after or math.inf)
    with Run(args, run_on, log, keep_steps=(decay_start(args), args.max_iters)) as run:
        start = run.start(model, train_loader, model.config, meta["tokenizer"], end)  # step 0, or --resume's
        val_loss, best_val = loop(args, run, start, end, model, train_loader, val_loader, autocast, log)
    if tok is not None:
        sample(model, tok, args.sample_len, run_on.device, autocast, log)
    finish(run_on)
    return {"val_loss": val_loss, "best_val": best_val, "config": model.config, "args": args}


def loop(args, run, start, end, raw_model, train_loader, val_loader, autocast, log):
    """The training loop, from where run.start said (step 0 or --resume's checkpoint) to `end`."""
    run_on = run.launch
    device, world_size = run_on.device, run_on.world_size
    opt_kind = start.optimizer_name or optimizer_kind(start.step, args)
    optimizer = build_optimizer(raw_model, args, device, opt_kind)
    if start.optimizer_state is not None:
        load_optimizer_state(optimizer, start.optimizer_state)
    best_val, val_loss, tokens_seen = start.best_val, None, start.tokens_seen
    if tokens_seen is None:  # (a checkpoint from before tokens were counted)
        tokens_seen = sum(step_tokens(s, args, world_size) for s in range(start.step))
    model = wrap(raw_model, args, run_on)

    for step in range(start.step, end):
        if args.fp8:
            fp8.refresh(raw_model)  # FP8: the step's weight casts, shared by its micro-batches (and eval)
        for change in milestones(step, args):
            log(f"step {step}: {change}")
        if optimizer_kind(step, args) != opt_kind:  # the switch (RECIPE.md section 4): a fresh optimizer, so the
            log(f"step {step}: switching {opt_kind} -> {optimizer_kind(step, args)}: optimizer state dropped, "
                f"weights carried over")  # old moments go and Muon's momentum starts at zero
            opt_kind = optimizer_kind(step, args)
            optimizer = build_optimizer(raw_model, args, device, opt_kind)
        if args.eval_interval and step % args.eval_interval == 0:
            val_loss, best_val = validate(run, log, model, val_loader, step, args, autocast, tokens_seen, best_val)

        t0 = time.perf_counter()
        lr = args.lr * lr_mult(step, args)  # WSD: the peak times the schedule's multiplier
        set_lr(optimizer, lr)  # muP: every group at its own multiple of it
        accum = grad_accum_steps(step, args, world_size)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = train_loader.next_batch(micro_batch(step, args), seq_len(step, args))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = not run_on.ddp or micro == accum - 1  # all-reduce gradients once, on the last micro-step
            with (nullcontext() if sync else model.no_sync()), autocast:
                _, loss = model(x, y)
            (loss / accum).backward()  # scale so the accumulated gradient is the mean over the whole batch
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf")).item()
        loss, stopping = run.agree(loss_sum / accum)  # every rank: the same loss, the same decision to stop
        run.check_finite(step, loss, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # count the optimizer's kernels in the step time
        dt = time.perf_counter() - t0

        tokens = step_tokens(step, args, world_size)
        tokens_seen += tokens
        report(run, log, step, end, args, loss, lr, grad_norm, tokens, dt, tokens_seen, opt_kind,
               raw_model.estimate_mfu(tokens / dt / world_size, seq_len(step, args), device))
        if stopping or step + 1 in checkpoint_steps(args, end) or (
                args.ckpt_interval and (step + 1) % args.ckpt_interval == 0):
            probe = mean_loss(model, [(x, y)], autocast)  # the updated weights on the step's last batch
            run.save(step + 1, raw_model, optimizer, opt_kind, probe, best_val, tokens_seen)
        if stopping:
            run.stop(step + 1)

    if start.step < end:
        val_loss, best_val = validate(run, log, model, val_loader, end, args, autocast, tokens_seen, best_val,
                                      final=True)
    return val_loss, best_val


def checkpoint_steps(args, end):
    """The steps after which a checkpoint is always saved: the end, each phase's start (where runs branch)."""
    return (args.max_iters, decay_start(args), end, *long_context_starts(args))


def validate(run, log, model, loader, step, args, autocast, tokens_seen, best_val, final=False):
    """(val loss, best so far) before `step`, or after the run's last step (final: at that step's context), on the
    console and in log.jsonl."""
    at, device = step - 1 if final else step, run.launch.device
    loader.reset()  # the same batches every time
    batches = [loader.next_batch(micro_batch(at, args), seq_len(at, args)) for _ in range(args.eval_iters)]
    val_loss = mean_loss(model, [(x.to(device), y.to(device)) for x, y in batches], autocast)
    best_val = val_loss if best_val is None else min(best_val, val_loss)
    log(f"step {step}: val loss {val_loss:.4f}" + (f" (best {best_val:.4f})" if final else ""))
    run.log(dict(step=step, val_loss=val_loss, tokens=tokens_seen, seq_len=seq_len(at, args)))
    return val_loss, best_val


def wrap(model, args, run_on):
    """The model the loop calls: DDP under torchrun, then torch.compile (after DDP, so the compiled graph is
    split at gradient buckets and the all-reduce overlaps the backward)."""
    if run_on.ddp:  # no buffer broadcast: RoPE tables are equal everywhere, FP8 amax histories each rank's own
        model = DDP(model, device_ids=[run_on.device.index] if run_on.device.type == "cuda" else None,
                    broadcast_buffers=False)
    return torch.compile(model) if args.compile else model


def report(run, log, step, end, args, loss, lr, grad_norm, tokens, dt, tokens_seen, opt_kind, mfu):
    """One log.jsonl entry a step; a line on the console every --log_interval."""
    run.log(dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_sec=tokens / dt, mfu=mfu,
                 phase=phase(step, args), optimizer=opt_kind, tokens=tokens_seen, seq_len=seq_len(step, args)))
    if step % args.log_interval == 0 or step == end - 1:
        log(f"step {step:>6}/{end} | {phase(step, args):>7} | loss {loss:.4f} | lr {lr:.3e} | {tokens / dt:,.0f} "
            f"tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "") + f" | {1000 * dt:.0f} ms")


def sample(model, tok, n, device, autocast, log):
    model.eval()
    with autocast:
        out = model.generate(torch.tensor([[tok.eot]], device=device), n, temperature=0.8, top_k=50)
    log("sample:\n" + tok.decode([t for t in out[0, 1:].tolist() if t < tok.vocab_size]))

# -----------------------------------------------------------------------------
# flags


def get_parser():
    p = Parser(prog="train.py", description=__doc__.split("\n")[1],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    per_preset = lambda k: "per --preset: " + ", ".join(f"{n} {v[k]}" for n, v in TRAIN_PRESETS.items())
    ge0, ge1, unit = Range(0), Range(1), Range(0, 1, hi_open=True)  # the allowed values, checked by Parser

    g = p.add_argument_group("model (defaults come from --preset; see model.py for each field)")
    flag(g, "preset", default="cpu", choices=list(PRESETS))
    defaults = GPTConfig()
    for name in MODEL_FIELDS:
        kind = type(getattr(defaults, name))
        flag(g, name, default=None, type=str2bool if kind is bool else kind, metavar=kind.__name__.upper(),
             help="from the data's tokenizer, padded to 64" if name == "vocab_size" else "from --preset")

    g = p.add_argument_group("data")
    flag(g, "data_dir", default=prepare_data.DEFAULT_DATA_DIR,
         help="token shards from prepare_data.py; the default is built on first use")
    flag(g, "init_from", default=None, metavar="DIR_OR_HUB_ID",
         help="start from a Hugging Face checkpoint in the Xmodel format (hf.py), e.g. a released stable-phase "
              "one: its architecture and weights replace --preset's (only --block_size applies)")

    g = p.add_argument_group("optimization (AdamW and muP values: RECIPE.md section 2)")
    flag(g, "optimizer", default="adamw", choices=["adamw", "muon"], help="muon: Muon for the hidden matrices "
         "from step 0 (AdamW for embedding and norms inside it)")
    flag(g, "muon_at_decay", type=str2bool, nargs="?", const=True, default=False,
         help="the recipe's switch: AdamW until the decay starts, then Muon (RECIPE.md section 4)")
    flag(g, "lr", type=float, default=0.01, range=ge0,
         help="peak LR eta of the embedding; other params get eta/m (muP)")
    flag(g, "weight_decay", type=float, default=0.1, range=ge0)
    flag(g, "beta1", type=float, default=0.9, range=unit)
    flag(g, "beta2", type=float, default=0.95, range=unit)
    flag(g, "eps", type=float, default=1e-8, range=Range(0, lo_open=True))
    flag(g, "grad_clip", type=float, default=1.0, range=ge0, help="0 disables")

    g = p.add_argument_group("Muon (muon.py; values: RECIPE.md section 4)")
    flag(g, "muon_momentum", type=float, default=0.95, range=unit)
    flag(g, "muon_scale", default="moonlight", choices=["moonlight", "spectral"],
         help="moonlight: lr*0.2*sqrt(max(rows,cols)), reuses AdamW's lr; spectral: lr*sqrt(max(1,rows/cols))")
    flag(g, "ns_steps", type=int, default=5, range=ge1, help="Newton-Schulz iterations")
    flag(g, "ns_coeffs", default="quintic", choices=["quintic", "polar_express"])
    flag(g, "split_fused", type=str2bool, nargs="?", const=True, default=False,
         help="orthogonalize q/k/v and gate/up apart instead of each fused matrix whole")
    flag(g, "ns_triton", type=str2bool, default=None, help="Triton Newton-Schulz kernel; default on CUDA")

    g = p.add_argument_group("schedule and batch (Warmup-Stable-Decay: RECIPE.md section 3)")
    flag(g, "max_iters", type=int, default=None, range=ge1, help=per_preset("max_iters"))
    flag(g, "warmup_iters", type=int, default=None, range=ge0, help=per_preset("warmup_iters"))
    flag(g, "decay_iters", type=int, default=None, range=ge0,
         help="the decay window at the end; " + per_preset("decay_iters"))
    flag(g, "decay_frac", type=float, default=None, range=Range(0, 1),
         help="the decay window as a fraction of max_iters instead")
    flag(g, "decay_shape", default="exponential", choices=list(DECAY_SHAPES))
    flag(g, "min_lr_ratio", type=float, default=1 / 16, range=Range(0, 1),
         help="LR at the end of decay / peak (the scripts' peak/16)")
    flag(g, "total_batch_size", type=int, default=None, range=ge1,
         help="tokens per step; " + per_preset("total_batch_size"))
    flag(g, "batch_size", type=int, default=None, range=ge1, help="sequences per micro-step per process; "
         + per_preset("batch_size"))
    flag(g, "batch_double_step", type=int, default=None, range=ge0,
         help="step from which the batch doubles, 0 = never; " + per_preset("batch_double_step"))
    flag(g, "long_context", default="", metavar="SEQ:STEPS[,SEQ:STEPS]",
         help="the recipe's fourth phase, after --max_iters: STEPS more steps at SEQ tokens a sequence (the same "
              "tokens per micro-batch: fewer sequences), e.g. 8192:5000,16384:5000; LR linear from the decay's end "
              "to --long_context_lr_end; continues a decay checkpoint at a longer context with --resume=PATH")
    flag(g, "long_context_lr_end", type=float, default=None, range=Range(0, 1),
         help="LR at the end of the long-context phase / peak; default min_lr_ratio * 1e-5/1.04e-4 (the recipe's)")
    flag(g, "switch_warmup", type=int, default=0, range=ge0,
         help="steps of linear LR re-warmup after the AdamW -> Muon switch (Muon's momentum starts at zero), 0 = none")
    flag(g, "stop_after", type=int, default=None, range=ge1,
         help="stop (with a checkpoint) after this many steps; the schedule still follows --max_iters: e.g. at the "
              "decay start, to branch several decays from one stable phase")

    g = p.add_argument_group("FP8 (fp8.py; RECIPE.md section 5)")
    flag(g, "fp8", type=str2bool, nargs="?", const=True, default=False,
         help="FP8 matmuls in the transformer-block linears (needs an H100-class GPU to be fast)")
    flag(g, "fp8_recipe", default="delayed", choices=["delayed", "current"],
         help="delayed: scale from the max of a 128-step amax history (the recipe's); current: this step's amax")

    g = p.add_argument_group("system")
    flag(g, "device", default="auto", help="auto, cpu, cuda, cuda:N")
    flag(g, "dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto: bf16 autocast on GPU")
    flag(g, "compile", type=str2bool, nargs="?", const=True, default=None, help="torch.compile; default on GPU")
    flag(g, "seed", type=int, default=1337, range=Range(0, 2**32 - 1))
    flag(g, "chunked_loss", type=str2bool, nargs="?", const=True, default=True,
         help="the tied head and the loss a chunk of tokens at a time, never the whole (tokens x vocab) logits "
              "(model.chunked_cross_entropy); 0: logits + F.cross_entropy, the plain reference")

    g = p.add_argument_group("evaluation, logging and checkpoints")
    flag(g, "out_dir", default="out")
    flag(g, "eval_interval", type=int, default=None, range=ge0, help=per_preset("eval_interval"))
    flag(g, "eval_iters", type=int, default=None, range=ge1,
         help="validation batches per process; " + per_preset("eval_iters"))
    flag(g, "log_interval", type=int, default=None, range=ge1,
         help="steps between log lines; " + per_preset("log_interval"))
    flag(g, "ckpt_interval", type=int, default=None, range=ge0, help=per_preset("ckpt_interval"))
    flag(g, "keep_ckpts", type=int, default=3, range=ge0,
         help="newest checkpoints kept, 0 = all (the ones at the decay's start and end always stay)")
    flag(g, "resume", nargs="?", const="auto", default="", help="continue the newest checkpoint in --out_dir, "
         "or --resume=PATH for a given one")
    flag(g, "overwrite", type=str2bool, nargs="?", const=True, default=False,
         help="start fresh even if --out_dir holds checkpoints (they are replaced)")
    flag(g, "sample_len", type=int, default=None, range=ge0,
         help="tokens of text sampled at the end; " + per_preset("sample_len"))
    flag(g, "dry_run", type=str2bool, nargs="?", const=True, default=False, help="print config and schedule, then exit")
    return p


def parse_args(argv=None):
    """The flags, resolved once into what the code uses: --preset's schedule for the flags not given, the model's
    block_size, --decay_frac as decay_iters, --long_context as [(seq, steps)], the device-dependent defaults."""
    args = get_parser().parse_args(argv)
    if args.decay_frac is not None and args.decay_iters is not None:
        raise refuse("give --decay_iters or --decay_frac, not both")
    for k, v in TRAIN_PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.decay_frac is not None:
        args.decay_iters = round(args.decay_frac * args.max_iters)
    if not 0 <= args.warmup_iters <= decay_start(args):
        raise refuse(f"warmup ({args.warmup_iters}) + decay ({args.decay_iters}) steps do not fit in "
                     f"--max_iters={args.max_iters}")
    given = args.long_context
    try:
        args.long_context = [tuple(int(v) for v in p.split(":")) for p in given.split(",") if p]
        assert all(len(p) == 2 and p[0] > 0 and p[1] > 0 for p in args.long_context)
    except (ValueError, AssertionError):
        raise refuse(f"--long_context={given}: expected SEQ:STEPS[,SEQ:STEPS], positive integers, e.g. "
                     f"8192:5000,16384:5000") from None
    if args.long_context_lr_end is None:
        args.long_context_lr_end = args.min_lr_ratio * LONG_CONTEXT_LR_DROP
    given = [k for k in MODEL_FIELDS if getattr(args, k) is not None and k != "block_size"]
    if args.init_from and given:
        raise refuse(f"--init_from takes the architecture from the checkpoint; drop --{', --'.join(given)}")
    # the sequence length of warmup, stable and decay (--init_from keeps it too)
    args.block_size = args.block_size or GPTConfig(**PRESETS[args.preset]).block_size
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.compile = gpu if args.compile is None else args.compile
    args.dtype = ("bfloat16" if gpu else "float32") if args.dtype == "auto" else args.dtype
    return args


def main(argv=None):
    args = parse_args(argv)

    def kept():  # what a second Ctrl-C, or one before training started, leaves
        ckpts = list_ckpts(args.out_dir)
        return f"--resume continues from {ckpts[-1][1]}" if ckpts else "no checkpoint was written"
    return run_main(PROG, train, args, on_interrupt=kept)


if __name__ == "__main__":
    main()
