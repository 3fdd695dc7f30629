"""
config.py: train.py's configuration: the presets, the flags, and parse_args, which resolves them once.

    TRAIN_PRESETS     each --preset's schedule and batch (the model's own fields are model.py's PRESETS)
    DECAY_SHAPES      the decay's curve, the release's exponential by default (train.py:lr_mult applies it)
    LONG_CONTEXT_*    the long-context phase's defaults as released (RECIPE.md section 3)
    get_parser        every flag, grouped as --help shows them, each number with its allowed range
    parse_args        the flags resolved into what train.py uses: --preset's values for the flags not given,
                      block_size, --decay_frac as decay_iters, --long_context's stages, the device's defaults

Nothing here runs anything; train.py imports it (and config.py imports nothing from train.py).
"""

import argparse
import math
from dataclasses import fields

import torch

import muon
import prepare_data
from cli import Parser, Range, UserError, fail, flag, str2bool
from model import GPTConfig, PRESETS


PROG = "train.py"
DESCRIPTION = ("train.py: train a nanoXmodel with the Xmodel-2.5 recipe: muP, Warmup-Stable-Decay, the AdamW -> "
               "Muon switch, FP8.")


class ConfigError(UserError):
    """Flags that cannot make a run together (a schedule that does not fit, a batch that does not divide)."""


def refuse(message):
    """A ConfigError as the script's end. (The schedule's functions and parse_args are also called outside
    run_main, by tests and the experiment drivers: they end the script in the same one line.)"""
    return fail(PROG, ConfigError(message))

# -----------------------------------------------------------------------------
# the presets and the recipe's defaults


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
# flags


def get_parser():
    p = Parser(prog=PROG, description=DESCRIPTION,
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
    flag(g, "muon_lr", type=float, default=None, range=Range(0, lo_open=True),
         help="the eta of the matrices Muon steps, their width rule's LR taken from it (--muon_scale); default "
              "--lr. The embedding and norms keep --lr's")
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
              "(head.chunked_cross_entropy); 0: logits + F.cross_entropy, the plain reference")

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
    if not 0 <= args.warmup_iters <= args.max_iters - args.decay_iters:
        raise refuse(f"warmup ({args.warmup_iters}) + decay ({args.decay_iters}) steps do not fit in "
                     f"--max_iters={args.max_iters}")
    # the sequence length of warmup, stable and decay (--init_from keeps it too)
    args.block_size = args.block_size or GPTConfig(**PRESETS[args.preset]).block_size
    args.long_context = parse_long_context(args.long_context, args)
    long_steps = sum(steps for _, steps, _, _ in args.long_context)
    if args.long_context_warmup is None:
        args.long_context_warmup = round(LONG_CONTEXT_WARMUP * long_steps)
    if args.long_context and args.long_context_warmup >= long_steps:
        raise refuse(f"--long_context_warmup={args.long_context_warmup} steps do not fit in the long-context phase's "
                     f"{long_steps}; give a shorter one (the release: 500 of 10,000)")
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
