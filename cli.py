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
import re
import shlex
import sys


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
        self.exit(2, f"{self.prog}: error: {message}; see python {self.prog} --help\n")

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        for a in self._actions:
            value = getattr(ns, a.dest, None)
            if getattr(a, "range", None) is not None and value is not None and value not in a.range:
                self.error(f"{a.option_strings[0]}={value} is out of range: allowed {a.range}")
        return ns



def split_words(parser, text, what):
    """A flag that holds other flags (--train_args="--lr=0.01 --seed=2"), split as a shell would; an unbalanced
    quote is the parser's one-line error."""
    try:
        return shlex.split(text)
    except ValueError as e:
        parser.error(f"{what}: {e}")


def interruptible(prog, main, errors=()):
    """Run a script's main(): Ctrl-C is one line and exit code 130, not a traceback; so is each of errors (the
    script's kinds of "the user must fix this": a full disk, bad data), with exit code 1. (What the script had
    written stays whole: it writes through safeio.)"""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
