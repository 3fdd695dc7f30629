"""
train.py: train a nanoXmodel with the Xmodel-2.5 recipe: muP, Warmup-Stable-Decay, the AdamW -> Muon switch, FP8.

One script for every scale: a laptop CPU, one GPU, or torchrun over many GPUs and nodes.

    python train.py                                    # CPU: small model on the embedded corpus, ~2 min
    python train.py --dry_run                          # print the resolved config and the LR schedule, train nothing
    python train.py --preset=nano --data_dir=data/X    # the 20M muP proxy on one GPU
    python train.py --resume=out/ckpt_0000360.pt --out_dir=out-long --long_context=512:80   # the long-context phase
    torchrun --standalone --nproc_per_node=8 train.py --preset=xmodel-2.5 --data_dir=data/X
    # two nodes: on each, torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \\
    #     --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --preset=xmodel-2.5 --data_dir=data/X --batch_size=2

Read top to bottom: the presets, the schedule as pure functions of (step, args), the optimizers, the set-up,
then loop(), where each idea of the recipe is one named line; the flags are at the bottom (--help shows their
ranges). --preset picks the model and a matching schedule; any flag overrides it. checkpoint.py keeps a run
continuable: --resume continues it exactly; Ctrl-C or SIGTERM saves a checkpoint and says how to go on.
"""

import argparse
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from datetime import timedelta

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import fp8
import muon
import prepare_data
from checkpoint import Run, evaluated, list_ckpts, load_optimizer_state, saved_model_config
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
DECAY_SHAPES = {  # coeff(t), 1 at the decay's start (t = 0) -> its end (t = 1)
    "exponential": lambda t: 2 * 0.5 ** t - 1,  # the released decay scripts: 1 -> 0
    "minicpm": lambda t: 0.5 ** t,              # MiniCPM's original WSD: 1 -> 0.5
    "linear": lambda t: 1 - t,
    "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
    "1-sqrt": lambda t: 1 - math.sqrt(t),
}
# the long-context phase as released (RECIPE.md section 3): a fresh optimizer and schedule, a warmup from 1e-6
# (--lr-warmup-init) to where the decay ended, then linear to 1e-5 (--min-lr, --decoupled-min-lr) for every group;
# each stage's global batch in sequences and micro-batch, per sequence length (train_decay_fp8_1117/1118.sh)
LONG_CONTEXT_LR_INIT, LONG_CONTEXT_MIN_LR = 1e-6, 1e-5
LONG_CONTEXT_WARMUP = 500 / 10_000  # the release's warmup, as a fraction of its 10k-step phase
RELEASE_LONG_CONTEXT_BATCH = {8192: (960, 2), 16384: (240, 1)}

# -----------------------------------------------------------------------------
# the Warmup-Stable-Decay schedule, the batch and the switch: pure functions of (step, args). Step s trains with
# the LR Megatron's iteration s does (its scheduler starts at step(0) and steps after each optimizer step).


def decay_start(args):
    return args.max_iters - args.decay_iters  # the decay window is the main run's last decay_iters steps


def total_iters(args):
    return args.max_iters + sum(steps for _, steps, _, _ in args.long_context)  # the long-context phase: after


def lr_mult(step, args):
    """The LR at `step` (0-based, before the long-context phase) as a fraction of the peak: linear warmup from 0,
    constant, then the decay from the peak towards min_lr_ratio; with --switch_warmup, a linear re-warmup after the
    switch to Muon."""
    if step < args.warmup_iters:
        return step / args.warmup_iters  # 0 on the first step, as Megatron's warmup
    if step < decay_start(args):
        return 1.0
    t = (step - decay_start(args)) / args.decay_iters  # 0 on the decay's first step, (T-1)/T on its last
    mult = args.min_lr_ratio + DECAY_SHAPES[args.decay_shape](t) * (1 - args.min_lr_ratio)
    since_switch = step - decay_start(args)
    if args.muon_at_decay and since_switch < args.switch_warmup:
        mult *= (since_switch + 1) / (args.switch_warmup + 1)
    return mult


def group_lr(step, args, group_mult=1.0):
    """The LR a param group with muP multiplier group_mult (1 for the embedding, 1/m for hidden matrices) trains
    with at `step`. In the long-context phase, a fresh schedule: warmup from --long_context_lr_init to the decay's
    end (peak x group_mult x min_lr_ratio), then linear to --long_context_min_lr, the same floor for every group."""
    if step < args.max_iters:
        return args.lr * lr_mult(step, args) * group_mult
    j, n, warmup = step - args.max_iters, total_iters(args) - args.max_iters, args.long_context_warmup
    top, floor = args.lr * group_mult * args.min_lr_ratio, args.long_context_min_lr
    if 0 < warmup and j <= warmup:
        return args.long_context_lr_init + (top - args.long_context_lr_init) * j / warmup
    return floor + (1 - (j - warmup) / (n - warmup)) * (top - floor)


def phase(step, args):
    if step < args.warmup_iters:
        return "warmup"
    if step >= args.max_iters:
        return "long_context"
    if step >= decay_start(args):
        return "decay"
    return "stable2" if 0 < args.batch_double_step <= step else "stable"


def stage(step, args):
    """The long-context stage (seq, steps, batch, micro) `step` is in, or None before the long-context phase."""
    end = args.max_iters
    for st in args.long_context:
        end += st[1]
        if args.max_iters <= step < end:
            return st
    return None


def long_context_starts(args):
    """The first step of each long-context stage."""
    starts = [args.max_iters]
    for _, steps, _, _ in args.long_context:
        starts.append(starts[-1] + steps)
    return starts[:-1]


def seq_len(step, args):
    """Tokens a sequence at `step`: --block_size, or in the long-context phase its stage's."""
    return stage(step, args)[0] if stage(step, args) else args.block_size


def micro_batch(step, args):
    """Sequences per micro-step per process: --batch_size, or the long-context stage's."""
    return stage(step, args)[3] if stage(step, args) else args.batch_size


def step_sequences(step, args):
    """Sequences per optimizer step, all processes together: the batch doubles at --batch_double_step."""
    if stage(step, args):
        return stage(step, args)[2]
    return args.total_batch_size * (2 if 0 < args.batch_double_step <= step else 1) // args.block_size


def grad_accum_steps(step, args, world_size):
    """Micro-steps per optimizer step: the step's sequences over (micro-batch x processes), a whole number."""
    per_micro = micro_batch(step, args) * world_size
    if step_sequences(step, args) % per_micro:
        if stage(step, args):
            raise refuse(f"a long-context step of {step_sequences(step, args)} sequences is not a whole number of "
                         f"micro-batches of {micro_batch(step, args)}*{world_size} processes (--long_context="
                         f"SEQ:STEPS:BATCH:MICRO)")
        tokens, per_micro = step_sequences(step, args) * args.block_size, per_micro * args.block_size
        raise refuse(f"a step of {tokens} tokens is not a whole number of micro-batches of batch_size*block_size*"
                     f"world_size = {args.batch_size}*{args.block_size}*{world_size} = {per_micro} tokens; make "
                     f"--total_batch_size a multiple of {per_micro}")
    return step_sequences(step, args) // per_micro


def step_tokens(step, args, world_size):
    return step_sequences(step, args) * seq_len(step, args)


def optimizer_kind(step, args):
    if args.optimizer == "muon" or (args.muon_at_decay and step >= decay_start(args)):
        return "muon"
    return "adamw"


def fresh_optimizer(step, args, kind):
    """Whether `step` starts a fresh optimizer (only the weights carry over): the switch to Muon (RECIPE.md section
    4) and the long-context phase's start (the release's --no-load-optim)."""
    return optimizer_kind(step, args) != kind or (step == args.max_iters and bool(args.long_context))


def milestones(step, args):
    """What the schedule changes at `step`, in words for the log."""
    said = []
    if step == args.batch_double_step and step > 0:
        said.append(f"batch doubles to {2 * args.total_batch_size:,} tokens (stable 2, RECIPE.md section 3)")
    if step == decay_start(args):
        said.append(f"decay phase begins ({args.decay_shape}, {args.decay_iters} steps)")
    if step in long_context_starts(args):
        said.append(f"long-context phase: {seq_len(step, args)} tokens a sequence, {step_sequences(step, args)} "
                    f"sequences a step, {micro_batch(step, args)} a micro-step (RECIPE.md section 3)")
    return said


def print_plan(args, groups, world_size):
    """--dry_run: the phases, then the schedule at its milestones, at this world size."""
    bounds = [0, args.warmup_iters, decay_start(args), args.max_iters, total_iters(args)]
    if args.batch_double_step:
        bounds.insert(2, args.batch_double_step)
    print(f"{world_size} process(es); phases: " + ", ".join(f"{phase(a, args)} {b - a:,} steps" for a, b in
                                                         zip(bounds, bounds[1:]) if b > a and a < bounds[-1]))
    start, end = decay_start(args), total_iters(args)
    marks = {0, args.warmup_iters - 1, start - 1, start, args.max_iters - 1, end - 1}
    marks |= {start + round(f * args.decay_iters) - 1 for f in (0.25, 0.5, 0.75)}
    for first in [args.batch_double_step or 1, *long_context_starts(args)]:  # where the batch or context
        marks |= {first - 1, first}                                            # changes, and the step before
    if args.long_context:  # the long-context warmup's end
        marks.add(args.max_iters + args.long_context_warmup)
    print(f"{'step':>9} {'phase':>12} {'lr/peak':>8} " + " ".join(f"{'lr ' + g['name']:>14}" for g in groups)
          + f" {'tokens/step':>12} {'accum':>6} {'optimizer':>9} {'seq':>6} {'seqs/step':>9} {'micro':>5}")
    for s in sorted(m for m in marks if 0 <= m < end):
        print(f"{s:>9} {phase(s, args):>12} {group_lr(s, args) / args.lr:>8.4f} "
              + " ".join(f"{group_lr(s, args, g['lr_mult']):>14.3e}" for g in groups)
              + f" {step_tokens(s, args, world_size):>12,} {grad_accum_steps(s, args, world_size):>6}"
              + f" {optimizer_kind(s, args):>9} {seq_len(s, args):>6} {step_sequences(s, args):>9,}"
              + f" {micro_batch(s, args):>5}")


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


def set_lr(optimizer, step, args):
    """Every param group at its LR for `step` (muP: its own multiple of the schedule's); the peak group's LR."""
    for g in optimizer.param_groups:
        g["lr"] = group_lr(step, args, g["lr_mult"])
    return group_lr(step, args)


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
        if args.init_from and args.resume:  # the run's own checkpoint holds the architecture and the weights
            config = replace(saved_model_config(args) or config, block_size=config.block_size)
        elif args.init_from and device.type != "meta":  # a released checkpoint: its architecture and weights
            import hf  # (Hugging Face interop: needs safetensors, and huggingface_hub for a hub id)
            config, pretrained = hf.init_from(args.init_from, config.block_size, meta["tokenizer"], args.data_dir, log)
    except (ValueError, OSError, ImportError) as e:  # (OSError: a missing --init_from, an unreachable hub)
        raise ConfigError(e) from None
    if config.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"--vocab_size={config.vocab_size} is smaller than the data's tokenizer "
                          f"({meta['tokenizer']}: {meta['vocab_size']})")
    if args.long_context:  # (the weights do not depend on block_size)
        config = replace(config, block_size=max(args.block_size, *(st[0] for st in args.long_context)))
    torch.manual_seed(args.seed)
    if pretrained is not None and not args.resume:  # (a resumed run's checkpoint has newer weights)
        model = hf.empty_model(config, device)  # no random init for the loaded weights to overwrite
        model.load_state_dict(pretrained)
    else:
        with torch.device("meta") if device.type == "meta" else nullcontext():  # (--dry_run: shapes only)
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
    if args.dry_run:
        return dry_run(args)
    # a long timeout: the other ranks wait in their next all-reduce while rank 0 writes a large checkpoint
    run_on = launch(args.device, timeout=timedelta(hours=1))
    log = print if run_on.master else (lambda *a, **k: None)
    try:  # what this machine cannot do, said before any work
        fp8.check_device(run_on.device) if args.fp8 else None
        muon.check_triton(run_on.device) if args.ns_triton else None
    except ValueError as e:
        raise ConfigError(e) from None
    if args.compile and not any(map(shutil.which, [os.environ.get("CXX", "c++"), os.environ.get("CC", "cc"), "gcc"])):
        raise ConfigError("--compile needs a C/C++ compiler (torch.compile builds its kernels with one) and none is "
                          "on PATH: install one (e.g. apt install build-essential), or pass --compile=0")
    check_batches(args, run_on.world_size)
    meta, train_loader, val_loader = prepare_data.loaders(args.data_dir, run_on)
    for loader in (train_loader, val_loader):  # fail now, not hours in, on a shard too small for a batch
        for step in [0, *long_context_starts(args)]:
            loader.check_fits(micro_batch(step, args), seq_len(step, args))
    tok = sample_tokenizer(args, meta, log) if run_on.master else None
    model = setup_model(args, meta, run_on.device, log)
    describe(model, args, run_on.world_size, log)
    autocast = torch.autocast(run_on.device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    # the checkpoints at the decay's start (where ablations branch) and end (where the long-context phase does)
    # stay whatever --keep_ckpts says
    end = min(total_iters(args), args.stop_after or math.inf)
    with Run(args, run_on, log, keep_steps=(decay_start(args), args.max_iters)) as run:
        start = run.start(model, train_loader, model.config, meta["tokenizer"], end)  # step 0, or --resume's
        val_loss, best_val = loop(args, run, start, end, model, train_loader, val_loader, autocast, log)
        if tok is not None and not run.stopping():
            sample(model, tok, args.sample_len, run_on.device, autocast, log)
        run.complete()
    finish(run_on)
    return {"val_loss": val_loss, "best_val": best_val, "config": model.config, "args": args}


def dry_run(args):
    """--dry_run: the resolved config and the plan of every phase at --world_size processes (or torchrun's), its
    batch arithmetic checked; no process group, no GPU, no data needed, the model on the meta device."""
    started = int(os.environ.get("WORLD_SIZE", 0))
    if started and args.world_size not in (None, started):
        raise ConfigError(f"--world_size={args.world_size}, but torchrun started {started} processes; drop it")
    world_size = args.world_size or started or 1
    log = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    check_batches(args, world_size)
    has_data = os.path.exists(os.path.join(args.data_dir, "meta.json"))
    meta = prepare_data.read_meta(args.data_dir) if has_data else dict(
        vocab_size=GPTConfig(**PRESETS[args.preset]).vocab_size, tokenizer=None)  # (the preset's vocabulary)
    model = setup_model(args, meta, torch.device("meta"), log)
    describe(model, args, world_size, log)
    if log is print:
        print_plan(args, model.param_groups(args.weight_decay), world_size)
    return {"config": model.config, "args": args}


def check_batches(args, world_size):
    """Every phase's batch divides into micro-batches at this world size: said now, not at step 270k."""
    for step in [0, args.batch_double_step, *long_context_starts(args)]:
        grad_accum_steps(step, args, world_size)


def describe(model, args, world_size, log):
    log(f"model: {model.num_params() / 1e6:.2f}M params ({model.num_params(embedding=False) / 1e6:.2f}M "
        f"non-embedding), width multiplier m = {model.config.width_mult:g}, muP {'on' if model.config.mup else 'off'}")
    run_args = {k: v for k, v in vars(args).items() if k not in MODEL_FIELDS}  # the model's are in `model`
    log("config: " + json.dumps({"args": run_args, "model": asdict(model.config), "world_size": world_size}))


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
        if fresh_optimizer(step, args, opt_kind):  # the switch to Muon, and the long-context phase: the old
            kind = optimizer_kind(step, args)  # moments go, and Muon's momentum starts at zero
            log(f"step {step}: " + (f"switching {opt_kind} -> {kind}" if kind != opt_kind else f"a fresh {kind}")
                + ": optimizer state dropped, weights carried over")
            opt_kind = kind
            optimizer = build_optimizer(raw_model, args, device, opt_kind)
        if args.eval_interval and step % args.eval_interval == 0:
            val_loss, best_val = validate(run, log, model, val_loader, step, args, autocast, tokens_seen, best_val)

        t0 = time.perf_counter()
        lr = set_lr(optimizer, step, args)  # WSD's LR for the step, muP's multiple of it for each group
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

    if start.final_eval:
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
    flag(g, "muon_scale", default="moonlight", choices=list(muon.MUON_SCALES),
         help="Muon's width rule (muon.MUON_SCALES): "
              + "; ".join(f"{name}: {rule.help}" for name, rule in muon.MUON_SCALES.items()))
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
    flag(g, "long_context", default="", metavar="SEQ:STEPS[:BATCH[:MICRO]],...",
         help="the recipe's fourth phase, after --max_iters, in stages: STEPS steps at SEQ tokens a sequence, BATCH "
              "sequences a step, MICRO a micro-step (default: the release's for 8192 and 16384, else the decay's "
              "tokens a step and a micro-step), e.g. 8192:3000,16384:7000; a fresh optimizer and LR schedule; "
              "continues a decay checkpoint with --resume=PATH")
    flag(g, "long_context_warmup", type=int, default=None, range=ge0,
         help="the long-context phase's LR warmup steps; default 5%% of the phase (the release's 500 of 10,000)")
    flag(g, "long_context_lr_init", type=float, default=LONG_CONTEXT_LR_INIT, range=ge0,
         help="where its warmup starts (every group)")
    flag(g, "long_context_min_lr", type=float, default=LONG_CONTEXT_MIN_LR, range=ge0,
         help="where it ends, linear from the decay's end LRs (every group)")
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
    flag(g, "dry_run", type=str2bool, nargs="?", const=True, default=False,
         help="print the config and the plan of every phase (batch arithmetic, LRs), then exit: no GPU, no data")
    flag(g, "world_size", type=int, default=None, range=ge1,
         help="--dry_run: plan for this many processes (under torchrun it must equal WORLD_SIZE)")
    flag(g, "logger", default="", metavar="tensorboard,wandb,trackio",
         help="dashboards that get every log.jsonl entry too (rank 0; optional packages; log.jsonl stays)")
    flag(g, "logger_dir", default=None,
         help="where TensorBoard's files (and wandb's, unless WANDB_DIR) go; default --out_dir")
    flag(g, "run_name", default=None, help="the run's name in a dashboard; default --out_dir's name")
    return p


def parse_args(argv=None):
    """The flags, resolved once into what the code uses: --preset's schedule for the flags not given, the model's
    block_size, --decay_frac as decay_iters, --long_context's stages, the device-dependent defaults."""
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
    # the sequence length of warmup, stable and decay (--init_from keeps it too)
    args.block_size = args.block_size or GPTConfig(**PRESETS[args.preset]).block_size
    args.long_context = parse_long_context(args.long_context, args)
    if args.long_context_warmup is None:
        args.long_context_warmup = round(LONG_CONTEXT_WARMUP * (total_iters(args) - args.max_iters))
    if args.long_context and args.long_context_warmup >= total_iters(args) - args.max_iters:
        raise refuse(f"--long_context_warmup={args.long_context_warmup} steps do not fit in the long-context phase's "
                     f"{total_iters(args) - args.max_iters}; give a shorter one (the release: 500 of 10,000)")
    if args.world_size and not args.dry_run:
        raise refuse(f"--world_size={args.world_size} plans a run (--dry_run); torchrun --nproc_per_node sets a "
                     f"real one")
    given = [k for k in MODEL_FIELDS if getattr(args, k) is not None and k != "block_size"]
    if args.init_from and given:
        raise refuse(f"--init_from takes the architecture from the checkpoint; drop --{', --'.join(given)}")
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.compile = gpu if args.compile is None else args.compile
    args.dtype = ("bfloat16" if gpu else "float32") if args.dtype == "auto" else args.dtype
    return args


def parse_long_context(text, args):
    """--long_context's stages as (seq, steps, batch, micro) tuples, the batch and micro-batch filled in."""
    stages = []
    for part in filter(None, text.split(",")):
        try:
            nums = [int(v) for v in part.split(":")]
            assert 2 <= len(nums) <= 4 and all(v > 0 for v in nums)
        except (ValueError, AssertionError):
            raise refuse(f"--long_context={text}: expected SEQ:STEPS[:BATCH[:MICRO]][,...], positive integers, e.g. "
                         f"8192:3000,16384:7000") from None
        seq, steps = nums[:2]
        if seq < args.block_size:
            raise refuse(f"--long_context={text}: a {seq}-token stage is shorter than the training context "
                         f"(--block_size={args.block_size}); the phase lengthens it")
        default = RELEASE_LONG_CONTEXT_BATCH.get(seq) if args.preset == "xmodel-2.5" else None
        if default is None and len(nums) < 4:  # the decay's tokens a step and a micro-step, in longer sequences
            micro_tokens = args.batch_size * args.block_size
            if micro_tokens % seq:
                raise refuse(f"--long_context={text}: a micro-batch of batch_size*block_size = {args.batch_size}*"
                             f"{args.block_size} tokens is not a whole number of {seq}-token sequences; give the "
                             f"stage's batch and micro-batch: {seq}:{steps}:BATCH:MICRO")
            doubled = 0 < args.batch_double_step < args.max_iters
            default = (args.total_batch_size * (2 if doubled else 1) // seq, micro_tokens // seq)
        batch, micro = (nums[2:] + list(default or ())[len(nums) - 2:])[:2]
        stages.append((seq, steps, batch, micro))
    return stages


def main(argv=None):
    args = parse_args(argv)

    def kept():  # what a second Ctrl-C, or one before training started, leaves
        ckpts, end = list_ckpts(args.out_dir), min(total_iters(args), args.stop_after or math.inf)
        if ckpts and ckpts[-1][0] == end and evaluated(args.out_dir, end):
            return "the run is complete, nothing to resume"
        return f"--resume continues from {ckpts[-1][1]}" if ckpts else "no checkpoint was written"
    return run_main(PROG, train, args, on_interrupt=kept)


if __name__ == "__main__":
    main()
