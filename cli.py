"""
cli.py: the command line every nanoXmodel script shares.

One parser for train.py, prepare_data.py, evaluate.py, hf.py and bench.py, so a mistake reads the same
everywhere: one line that says what is wrong and what to do, never a usage dump or a traceback.

    p = Parser(prog="train.py", description="...")
    flag(p, "batch_size", type=int, default=16, range=Range(1))           # help shows "(allowed: >= 1)"
    flag(p, "beta1", type=float, default=0.9, range=Range(0, 1, hi_open=True))
    args = p.parse_args()          # an unknown flag, a bad type or a value outside its range: one line, exit 2

Every numeric flag carries its allowed range, checked in one place (Parser.parse_args) right after parsing:
a value that parses but makes no sense (a batch of 0, a NaN learning rate) stops here, before any work.
"""

import argparse
import difflib
import math
import os
import re
import shlex
import sys
from collections import namedtuple
from datetime import timedelta


def str2bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0/true/false, got {s!r}")


class Range:
    """The allowed values of a numeric flag: Range(1) is >= 1, Range(0, 1) is [0, 1], Range(0, lo_open=True) is
    > 0. NaN and infinity are never allowed."""

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def __contains__(self, x):
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self):
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def refusal(self, x):
        """Why x is not allowed, for the parser's line; None if it is. A NaN or an infinity is never allowed, and
        the line says so (the bounds alone would read oddly for --lr=inf)."""
        if x in self:
            return None
        finite = "" if not isinstance(x, float) or math.isfinite(x) else ", and the value must be finite"
        return f"is out of range: allowed {self}{finite}"


def flag(group, name, range=None, **kw):
    """group.add_argument(--name, ...) with an optional Range, shown in --help and checked by Parser.parse_args."""
    if range is not None:
        kw["help"] = (kw.get("help", "") + f" (allowed: {range})").strip()
    action = group.add_argument(f"--{name}", **kw)
    action.range = range
    return action


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, the closest real flag for a typo, and Range checks after parsing."""

    def error(self, message):
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            given = m.group(1).split("=")[0]
            close = difflib.get_close_matches(given, [o for a in self._actions for o in a.option_strings], n=1)
            message = f"unknown flag {given}" + (f" (did you mean {close[0]}?)" if close else "")
        # a value's refusal that starts with "=" names the value (comma_list's): "--seeds=1,1: 1 is given twice"
        message = re.sub(r"^argument (--\w+): =", r"\1=", message)
        self.exit(2, f"{self.prog}: error: {message}; see python {self.prog} --help\n")

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        for a in self._actions:
            value = getattr(ns, a.dest, None)
            why = a.range.refusal(value) if getattr(a, "range", None) is not None and value is not None else None
            if why:
                self.error(f"{a.option_strings[0]}={value} {why}")
        return ns


def comma_list(kind, check=None, what=None):
    """An argparse type: comma-separated values, each parsed by kind (int, float, str) and allowed by check (a
    predicate or a Range), each given once: a seed given twice would count one run as two, an arm given twice would be
    compared with itself. A bad, repeated or missing value is the parser's one line, "--seeds=1,1: 1 is given
    twice; name each once".

        flag(p, "seeds", type=comma_list(int, Range(0), "integers >= 0"), default=[1])"""
    what = what or f"{kind.__name__} values"
    allowed = (lambda v: v in check) if isinstance(check, Range) else check

    def parse(text):
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            values = None
        if values is None or (allowed and not all(map(allowed, values))):
            raise argparse.ArgumentTypeError(f"={text}: expected comma-separated {what}")
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if not values or twice:
            raise argparse.ArgumentTypeError(f"={text}: " + (f"{twice[0]} is given twice; name each once" if twice
                                                             else "name at least one"))
        return values
    parse.__name__ = "comma_list"  # (argparse names the type in some of its own messages)
    return parse


def split_words(parser, text, what):
    """A flag that holds other flags (--train_args="--lr=0.01 --seed=2"), split as a shell would; an unbalanced
    quote is the parser's one-line error."""
    try:
        return shlex.split(text)
    except ValueError as e:
        parser.error(f"{what}: {e}")


class UserError(Exception):
    """Something the user must fix (a bad flag combination, bad data, a full disk, a diverged run), in one line that
    says what to do. Raised where the knowledge lives, as a subclass that names the kind (safeio.WriteError,
    prepare_data.DataError, checkpoint.Diverged, ...), and printed once, by run_main. Other code tells the kinds
    apart by type, never by the message's text."""


class ErrorExit(SystemExit):
    """How a script ends on a UserError: SystemExit whose message is "PROG: error: ..." (Python prints it to stderr,
    once, and exits with status 1). .error is the UserError, so a caller that ran the script in-process (an
    experiment driver) tells a diverged run from a bad flag by type."""

    def __init__(self, prog, error):
        super().__init__(f"{prog}: error: {error}")
        self.error = error


def fail(prog, e):
    """The ErrorExit that ends `prog` on the UserError e."""
    return ErrorExit(prog, e)


def run_main(prog, main, *args, on_interrupt=None):
    """Run a script's main(*args) under the one top-level handler every script uses: a UserError becomes one line
    and exit status 1, Ctrl-C one line and exit status 130 (on_interrupt() may add what was kept), never a
    traceback. (What the script had written stays whole: it writes through safeio.)"""
    try:
        return main(*args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f"; {on_interrupt()}" if on_interrupt else ""), file=sys.stderr)
        raise SystemExit(130) from None
    except UserError as e:
        raise fail(prog, e) from None

# -----------------------------------------------------------------------------
# launch: torchrun's environment -> this process's device and process group (train.py, evaluate.py, bench.py)

Launch = namedtuple("Launch", "ddp rank local_rank world_size device")
Launch.master = property(lambda self: self.rank == 0)  # the process that writes files and prints


def distributed():
    """(ddp, rank, local_rank, world_size): torchrun sets RANK and the rest; otherwise one process."""
    if "RANK" not in os.environ:
        return False, 0, 0, 1
    return (True, *(int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")))


def setup_device(flag, local_rank=None):
    """--device (auto, cpu, cuda, cuda:N) as a torch.device; under torchrun each rank takes cuda:local_rank.
    A CUDA device is made current, with TF32 matmuls. UserError for a device this machine does not have."""
    import torch
    flag = ("cuda" if torch.cuda.is_available() else "cpu") if flag == "auto" else flag
    try:
        device = torch.device(f"cuda:{local_rank}" if flag.startswith("cuda") and local_rank is not None else flag)
    except RuntimeError:
        raise UserError(f"--device={flag} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device={flag}: no such CUDA device here ({torch.cuda.device_count()} found); "
                            "use --device=cpu")
        # set_device wants an index; plain "cuda" means the current device
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={flag}: this machine or torch build has no MPS device; use --device=cpu")
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"--device={flag}: nanoXmodel runs on cpu, cuda or mps, not {device.type}")
    return device


def launch(device_flag, timeout=timedelta(minutes=10)):
    """This process's Launch: its rank and device, with the process group started under torchrun (NCCL on CUDA,
    gloo on CPU). A rank that waits longer than `timeout` in a collective fails."""
    import torch.distributed as dist
    ddp, rank, local_rank, world_size = distributed()
    device = setup_device(device_flag, local_rank if ddp else None)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Launch(ddp, rank, local_rank, world_size, device)


def all_mean(x):
    """Collective: x averaged over the ranks, in place (as it is in one process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.AVG)
    return x


def finish(launch):
    """End a launched run: every rank finishes its last collective, then the process group goes."""
    import torch.distributed as dist
    if launch.ddp and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
