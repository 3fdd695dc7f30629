"""
loggers.py: watch a run in a dashboard (TensorBoard, Weights & Biases, trackio) beside log.jsonl.

log.jsonl stays the run's record (plot.py reads it, --resume trims it). With --logger, rank 0 also sends every entry
to the dashboards named, the step as the x axis, the resolved config (flags + model) as the run's hyperparameters:

    python train.py --logger=tensorboard       # then: tensorboard --logdir=out/tensorboard
    WANDB_MODE=offline python train.py --logger=wandb,tensorboard   # later: wandb sync out/wandb/offline-run-*
    python train.py --logger=trackio           # then: trackio show --project=nanoXmodel

Each backend is an optional package, imported only when named; a missing one stops the run at start-up in one
line that says what to pip install. After that a dashboard is never worth a run: one that cannot open or write
(a full disk, the network) is reported once on stderr and dropped, and training and log.jsonl go on.
Strings are not plotted: the optimizer is the scalar optimizer_is_muon (the switch is its step from 0 to 1), the
phase is phase_index (PHASES), and TensorBoard adds a text event where either changes. How each backend continues
a resumed run: its class. docs/dashboards.md has the set-up.
"""

import importlib
import os
import sys
from collections import namedtuple

from cli import UserError
from safeio import atomic_write, make_dir

PROJECT = "nanoXmodel"  # the wandb project (unless WANDB_PROJECT says) and the trackio one
# train.phase's names in the order a run passes them: the dashboard's phase_index
PHASES = ("warmup", "stable", "stable2", "decay", "long_context")


class LoggerError(UserError):
    """--logger names a dashboard that is unknown, or whose package is not installed."""


# what a backend is told when it opens: the run's name, its out_dir (wandb keeps its run id there), the
# --logger_dir, the step it starts at, whether it continues this out_dir's run (--resume, not a branch), the config
RunInfo = namedtuple("RunInfo", "name out_dir log_dir step resumed config")


class TensorBoard:
    """Event files in LOGGER_DIR/tensorboard/RUN_NAME. Opened at step k (a resume), it writes a purge marker that
    makes TensorBoard drop the points at steps >= k it had (those a killed run logged after its checkpoint),
    as --resume trims log.jsonl."""
    package = "tensorboard"

    def __init__(self, info):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        self.writer = SummaryWriter(os.path.join(info.log_dir, "tensorboard", info.name), purge_step=info.step)
        # the HPARAMS tab: numbers and strings only (None is left out, a list goes as its text)
        config = {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in info.config.items()
                  if v is not None}
        for summary in hparams(config, {"loss": 0, "val_loss": 0}):
            self.writer.file_writer.add_summary(summary, info.step)

    def write(self, step, scalars, events):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        for text in events:
            self.writer.add_text("events", text, step)

    def close(self, failed):
        self.writer.close()


class WandB:
    """A W&B run named RUN_NAME in $WANDB_PROJECT (default nanoXmodel), its files under $WANDB_DIR (default
    LOGGER_DIR); WANDB_MODE=offline and the rest of wandb's environment apply. Its id is kept in OUT_DIR/wandb_id
    and --resume continues that run (resume="allow"). W&B cannot rewrite a run's history: it skips points below
    the last step it has, so a killed run's steps after its checkpoint keep their first values (the same losses,
    a resume being exact) and none is doubled. Offline, each leg is a directory of its own, under the same id."""
    package = "wandb"

    def __init__(self, info):
        import wandb
        where = None if os.environ.get("WANDB_DIR") else info.log_dir
        if where:
            make_dir(where, "--logger_dir")
        id_path = os.path.join(info.out_dir, "wandb_id")
        run_id = None
        if info.resumed and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        self.run = wandb.init(id=run_id, resume="allow", name=info.name, config=info.config, allow_val_change=True,
                              project=None if os.environ.get("WANDB_PROJECT") else PROJECT, dir=where)
        if self.run.id != run_id:
            with atomic_write(id_path, "w") as f:
                f.write(self.run.id + "\n")

    def write(self, step, scalars, events):
        self.run.log(scalars, step=step)  # (the events are train.py's console lines, which W&B keeps)

    def close(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


class Trackio:
    """A trackio run named RUN_NAME in project nanoXmodel, in trackio's local store ($TRACKIO_DIR, default
    ~/.cache/huggingface/trackio), every run of the project together for `trackio show`. --resume continues the
    run of that name (resume="allow"); trackio cannot delete points, so the steps a killed run logged after its
    checkpoint appear twice, with the same losses."""
    package = "trackio"

    def __init__(self, info):
        import trackio
        self.trackio = trackio
        self.run = trackio.init(project=PROJECT, name=info.name, config=info.config, embed=False,
                                resume="allow" if info.resumed else "never")

    def write(self, step, scalars, events):
        self.run.log(scalars, step=step)

    def close(self, failed):
        self.trackio.finish()  # (the module's: it also forgets the run, which its exit hook would finish again)


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}


class Dashboards:
    """The dashboards --logger names. Made on every rank, so that a missing package stops every rank before any
    work; opened, written and closed on rank 0 only (checkpoint.Run does that)."""

    def __init__(self, names):
        self.kinds = {}
        for name in (n.strip() for n in names.split(",")):
            if name and name not in BACKENDS:
                raise LoggerError(f"--logger={names}: no dashboard {name!r}; choose from {', '.join(BACKENDS)} "
                                  f"(comma-separated)")
            if name:
                self.kinds[name] = BACKENDS[name]
        for name, kind in self.kinds.items():
            try:
                importlib.import_module(kind.package)
            except ImportError as e:
                raise LoggerError(f"--logger={name} needs the {kind.package} package ({e}): pip install "
                                  f"{kind.package}") from None
        self.open_ = {}  # name -> backend, while it works
        self.last = {}  # the string fields' last values, for the change events

    def open(self, args, step, resumed, config):
        """Start a dashboard run for --out_dir at `step`: the one it had if `resumed` (--resume in the same out_dir),
        else a new one."""
        out_dir = args.out_dir
        info = RunInfo(args.run_name or os.path.basename(os.path.abspath(out_dir)), out_dir,
                       args.logger_dir or out_dir, step, resumed, config)
        for name, kind in self.kinds.items():
            try:
                self.open_[name] = kind(info)
            except Exception as e:  # (a bad --logger_dir too: it costs the dashboard, not the run)
                self.drop(name, "could not start", e)

    def log(self, entry):
        """One log.jsonl entry to every open dashboard; one that raises is dropped."""
        scalars, events = self.convert(entry)
        for name, backend in list(self.open_.items()):
            try:
                backend.write(entry["step"], scalars, events)
            except Exception as e:
                self.drop(name, f"failed at step {entry['step']}", e)

    def convert(self, entry):
        """(scalars, events): the entry's numbers (and optimizer_is_muon, phase_index for its strings); a text
        event for each string that changed."""
        scalars, events = {}, []
        if "val_loss" in entry:  # an eval's tokens and seq_len are the step's train entry's, sent with it
            entry = {k: v for k, v in entry.items() if k.startswith("val_")}
        for k, v in entry.items():
            if isinstance(v, str):
                if self.last.get(k) != v:
                    events.append(f"{k}: {self.last[k]} -> {v}" if k in self.last else f"{k}: {v}")
                    self.last[k] = v
            elif isinstance(v, (int, float)) and k != "step":
                scalars[k] = float(v)
        if "optimizer" in entry:
            scalars["optimizer_is_muon"] = float(entry["optimizer"] == "muon")
        if entry.get("phase") in PHASES:
            scalars["phase_index"] = float(PHASES.index(entry["phase"]))
        return scalars, events

    def close(self, failed=False):
        for name, backend in list(self.open_.items()):
            try:
                backend.close(failed)
            except Exception as e:
                self.drop(name, "could not finish", e)
        self.open_.clear()

    def drop(self, name, what, e):
        self.open_.pop(name, None)
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"train.py: warning: --logger={name} {what} ({type(e).__name__}: {reason}); training goes on "
              f"without it, log.jsonl keeps every entry", file=sys.stderr)
