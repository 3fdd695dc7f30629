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

Read top to bottom: the schedule as pure functions of (step, args), the optimizers, the set-up, then loop(),
where each idea of the recipe is one named line. The presets and the flags are in config.py (--help shows their
ranges): --preset picks the model and a matching schedule; any flag overrides it. checkpoint.py keeps a run
continuable: --resume continues it exactly; Ctrl-C or SIGTERM saves a checkpoint and says how to go on.
"""

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from datetime import timedelta

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import fp8
import muon
import prepare_data
from checkpoint import Run, evaluated, list_ckpts, load_optimizer_state, saved_model_config
from cli import all_mean, finish, launch, run_main
from config import DECAY_SHAPES, MODEL_FIELDS, PROG, ConfigError, parse_args, refuse
from model import GPT, GPTConfig, PRESETS

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


def group_lr(step, args, group_mult=1.0, eta=None):
    """The LR a param group with muP multiplier group_mult (1 for the embedding, 1/m for hidden matrices) trains
    with at `step`. In the long-context phase, a fresh schedule: warmup from --long_context_lr_init to the decay's
    end (peak x group_mult x min_lr_ratio), then linear to --long_context_min_lr, the same floor for every group.
    eta: the group's peak, --lr unless --muon_lr gives Muon's matrices their own (group_eta)."""
    eta = args.lr if eta is None else eta
    if step < args.max_iters:
        return eta * lr_mult(step, args) * group_mult
    j, n, warmup = step - args.max_iters, total_iters(args) - args.max_iters, args.long_context_warmup
    top, floor = eta * group_mult * args.min_lr_ratio, args.long_context_min_lr
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
              + " ".join(f"{group_lr(s, args, g['lr_mult'], group_eta(args, g, optimizer_kind(s, args))):>14.3e}"
                         for g in groups)
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


def group_eta(args, group, kind):
    """The peak a param group's LR is a multiple of: --lr, or --muon_lr for the matrices Muon steps."""
    stepped_by_muon = kind == "muon" and muon.is_muon_group(group)
    return args.muon_lr if stepped_by_muon and args.muon_lr is not None else args.lr


def set_lr(optimizer, step, args, kind):
    """Every param group at its LR for `step` (muP: its own multiple of the schedule's); the peak group's LR."""
    for g in optimizer.param_groups:
        g["lr"] = group_lr(step, args, g["lr_mult"], group_eta(args, g, kind))
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
    if args.muon_lr is not None and args.optimizer == "adamw" and not args.muon_at_decay:
        log("train.py: note: --muon_lr is the eta of the matrices Muon steps, and this run is AdamW throughout")


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
        lr = set_lr(optimizer, step, args, opt_kind)  # WSD's LR for the step, muP's multiple of it for each group
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
