"""
jobs.py: the experiments' train.py runs, one at a time in this process or N at once in their own processes
(mup_sweep.py and ablation.py --jobs=N), each into its own out_dir, with a record of the runs that finished so a
rerun of the same command continues where it stopped.
"""

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

import torch

from cli import ErrorExit, UserError
from safeio import make_dir, write_json

ROOT = os.path.dirname(os.path.abspath(__file__))

# train.py runs: one at a time in this process, or N at once, each in its own (--jobs; ablation.py's too)

Job = namedtuple("Job", "key argv out_dir after")  # after: the key of the job that must finish first, or None


class JobError(UserError):
    """A train.py run that failed (its own line) or was stopped by a signal."""


def train_result(argv, log=None):
    """train.main(argv) in this process, what it prints appended to the file log (or dropped): {"val_loss": its
    final val loss}, or {"diverged": True} when its loss went non-finite (checkpoint.Diverged: a data point, not a
    crash). Any other error passes on as train.py's one line (a cli.ErrorExit)."""
    import train  # here, so the coordinate check (and its test) needs only model.py
    from checkpoint import Diverged
    with open(log or os.devnull, "a") as f, contextlib.redirect_stdout(f):
        try:
            return {"val_loss": train.main(argv)["val_loss"]}
        except ErrorExit as e:
            if not isinstance(e.error, Diverged):
                raise
            return {"diverged": True}


def train_entry(result, log, argv):
    """A job's process (start_job): train_result on one thread, written to the file result for the parent. An
    error ends the process as train.py's would: its line on stderr, exit status 1 (or 128 + a signal's number)."""
    torch.set_num_threads(1)
    write_json(result, train_result(argv, log))


def job_argv(job):
    return [*job.argv, f"--out_dir={job.out_dir}"]


def start_job(job):
    """train_entry(job) in a new python process, in this directory, on one thread: (process, its scratch dir)."""
    scratch = tempfile.mkdtemp(prefix="train-job-")
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import jobs; jobs.train_entry(*sys.argv[1:3], " \
           "sys.argv[3:])"
    with open(os.path.join(scratch, "stderr"), "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, os.path.join(scratch, "result.json"),
                                 os.path.join(job.out_dir, "train.out"), *job_argv(job)],
                                env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    return proc, scratch


def job_result(job, proc, scratch):
    """What a finished job's process left: train_result's dict, or a JobError with the run's own line."""
    try:
        if proc.returncode == 0:
            with open(os.path.join(scratch, "result.json")) as f:
                return json.load(f)
        if proc.returncode > 128 or proc.returncode < 0:
            raise stopped(job)
        with open(os.path.join(scratch, "stderr")) as f:
            lines = [line.strip() for line in f if line.strip()]
        raise JobError(f"a run failed ({lines[-1] if lines else f'exit status {proc.returncode}'}): python train.py "
                       + " ".join(map(shlex.quote, job_argv(job))))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stopped(job):
    return JobError(f"a train.py run was stopped by a signal ({job.out_dir}); the same command continues: finished "
                    "runs are kept, unfinished ones run again")


def run_jobs(jobs, n, done):
    """Run every job's train.py into its out_dir (what it prints: out_dir/train.out), n at a time, calling
    done(job, result) here as each one finishes (result: train_result's dict and the run's seconds). n == 1: one
    after another in this process, in the order given (a job after the one it waits for); n > 1: n python
    processes at once, each on one thread, a job starting once the one it waits for is done. Either way the same
    runs, so the same numbers (tests/test_mup_sweep.py). A run that fails stops the others and ends all with its
    line."""
    if n == 1:
        for job in jobs:
            t0 = time.time()
            try:
                result = train_result(job_argv(job), os.path.join(job.out_dir, "train.out"))
            except SystemExit as e:
                if isinstance(e.code, int) and e.code > 128:  # train.py stopped at a signal, its checkpoint saved
                    raise stopped(job) from None
                raise
            done(job, dict(result, seconds=round(time.time() - t0, 1)))
        return
    waiting, running, finished, keys = list(jobs), [], set(), {j.key for j in jobs}
    try:
        while waiting or running:
            for job in [j for j in waiting if j.after not in keys or j.after in finished][:n - len(running)]:
                waiting.remove(job)
                running.append((job, *start_job(job), time.time()))
            time.sleep(0.05)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                job, proc, scratch, t0 = item
                result = job_result(job, proc, scratch)
                finished.add(job.key)
                done(job, dict(result, seconds=round(time.time() - t0, 1)))
    finally:  # a failed run or a Ctrl-C: the runs still going stop too (train.py on SIGTERM: after this step)
        for job, proc, scratch, _ in running:
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
            shutil.rmtree(scratch, ignore_errors=True)


def claim_run_dir(out_dir, record, owner, what, error=JobError):
    """Make out_dir ready for a run of this script's: refused if it holds files the script did not make (the
    run's train.py --overwrite would replace someone's run); its record of a finished run (mark_finished's)
    removed: not finished until it says so again."""
    held = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    if held and not {record, "train.out"} & set(held):
        raise error(f"{out_dir} holds files {owner} did not make; move it away or choose another {what}")
    make_dir(out_dir, what)
    with contextlib.suppress(FileNotFoundError, TypeError):  # (TypeError: no record)
        os.remove(os.path.join(out_dir, record))


def mark_finished(out_dir, record, argv, val_loss):
    """Record in out_dir that the run of these flags finished: it trained and ran its final evaluation."""
    write_json(os.path.join(out_dir, record), {"argv": argv, "val_loss": val_loss})


def is_finished(out_dir, record, argv):
    """Whether out_dir holds a finished run of exactly these flags (mark_finished's record names them). The
    dashboard flags (--logger, --logger_dir, --run_name) change no number, so they may differ."""
    numbers = lambda flags: [a for a in flags if not a.startswith(("--logger", "--run_name"))]
    try:
        with open(os.path.join(out_dir, record)) as f:
            done = json.load(f)
        return numbers(done["argv"]) == numbers(argv) and done["val_loss"] is not None
    except (OSError, ValueError, KeyError, TypeError):
        return False
