"""Tests for loggers.py through train.py --logger: each dashboard, read back with its own reader (TensorBoard's
EventAccumulator, wandb's offline run file, trackio's SQLite store), holds log.jsonl's series; a resume replaces
TensorBoard's tail and continues the same wandb run; a branch is a new dashboard run; a dashboard that fails does
not stop the run; a missing package is one line at start-up. CPU, offline; the tiny run of test_train.py."""

import errno
import glob
import json
import os
import sqlite3
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import loggers  # noqa: E402
import train  # noqa: E402
from model import GPT  # noqa: E402
from test_train import REF, TINY, read_log  # noqa: E402  (12 steps; checkpoints after 3, 6, 8, 9, 12)

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py, as data_dir)

SWITCH = [*REF, "--muon_at_decay"]  # warmup 0-1, stable 2-7, decay 8-11 with Muon from step 8


def run(data_dir, out_dir, *flags):
    return train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *flags])


def series(out_dir, key):
    """[(step, value)] of one log.jsonl field, in step order (read_log fails on a step logged twice)."""
    steps, vals = read_log(out_dir)
    return sorted(vals.items()) if key == "val_loss" else [(s, e[key]) for s, e in sorted(steps.items())]


def float32(pairs):
    """[(step, value)] as TensorBoard stores them: float32."""
    return [(s, float(np.float32(v))) for s, v in pairs]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline, its files in tmp_path/wandb-files, quiet; the directory. (wandb reads its environment once a
    process, in its setup: teardown() makes the next run read it again.)"""
    wandb = pytest.importorskip("wandb")
    where = str(tmp_path / "wandb-files")
    os.makedirs(where)
    for k, v in dict(WANDB_MODE="offline", WANDB_DIR=where, WANDB_SILENT="true", WANDB_CONSOLE="off",
                     WANDB_CACHE_DIR=where, WANDB_DATA_DIR=where, WANDB_CONFIG_DIR=where).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    wandb.teardown()
    yield where
    wandb.teardown()

# -----------------------------------------------------------------------------
# each backend holds the run's series


def test_tensorboard_holds_the_log(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    run(data_dir, out, *SWITCH, "--logger=tensorboard")
    acc = tensorboard_events(out / "tensorboard" / "out")  # --logger_dir, --run_name: out_dir, its name
    for key in ("loss", "val_loss", "lr", "grad_norm"):
        assert [(e.step, e.value) for e in acc.Scalars(key)] == float32(series(out, key)), key
    # the switch and the phases: scalars, and a text event where each changes
    assert [e.value for e in acc.Scalars("optimizer_is_muon")] == [0] * 8 + [1] * 4
    assert [e.value for e in acc.Scalars("phase_index")] == [0] * 2 + [1] * 6 + [3] * 4
    events = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("events/text_summary")]
    assert events == [(0, "phase: warmup"), (0, "optimizer: adamw"), (2, "phase: warmup -> stable"),
                      (8, "phase: stable -> decay"), (8, "optimizer: adamw -> muon")]
    assert "_hparams_/session_start_info" in acc.summary_metadata  # the config, in the HPARAMS tab


def test_wandb_offline_run_holds_the_log(data_dir, tmp_path, offline_wandb):
    out = tmp_path / "out"
    run(data_dir, out, *SWITCH, "--logger=wandb")
    [leg] = wandb_runs(offline_wandb)
    assert leg["id"] == (out / "wandb_id").read_text().strip() and leg["project"] == "nanoXmodel"
    assert leg["name"] == "out" and leg["exit_code"] == 0
    # the resolved config: the flags, the model's own fields, the world size
    assert leg["config"]["lr"] == 0.01 and leg["config"]["n_embd"] == 64 and leg["config"]["vocab_size"] == 320
    assert leg["config"]["world_size"] == 1
    for key in ("loss", "val_loss", "lr", "tokens"):
        assert [(row["_step"], row[key]) for row in leg["history"] if key in row] == series(out, key), key
    assert [row["optimizer_is_muon"] for row in leg["history"] if "loss" in row] == [0] * 8 + [1] * 4


def test_trackio_local_store_holds_the_log(data_dir, tmp_path):
    """In a process of its own: trackio reads TRACKIO_DIR once, when it is first imported."""
    pytest.importorskip("trackio")
    out, store = tmp_path / "out", tmp_path / "trackio"
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, *SWITCH, f"--data_dir={data_dir}",
                    f"--out_dir={out}", "--logger=trackio", "--run_name=tiny"], check=True, capture_output=True,
                   env={**os.environ, "TRACKIO_DIR": str(store)}, timeout=300)
    with sqlite3.connect(store / "nanoXmodel.db") as db:
        rows = [(step, json.loads(m)) for step, m in db.execute(
            "SELECT step, metrics FROM metrics WHERE run_name = 'tiny' ORDER BY id")]
        [(config,)] = db.execute("SELECT config FROM configs WHERE run_name = 'tiny'")
    for key in ("loss", "val_loss", "lr"):
        assert [(step, m[key]) for step, m in rows if key in m] == series(out, key), key
    assert json.loads(config)["lr"] == 0.01 and json.loads(config)["n_embd"] == 64

# -----------------------------------------------------------------------------
# resume and branch


def test_resume_replaces_the_tail_and_a_branch_is_a_new_run(data_dir, tmp_path, offline_wandb, monkeypatch):
    """Three legs of one run: --stop_after=7 (its final eval at step 7); --resume, killed in step 11 (after logging 9
    and 10, its last checkpoint at 9); --resume from 9. TensorBoard shows each step once, from 9 on the last leg's,
    and not the eval at 7 that log.jsonl dropped; wandb continues one run id. A branch from the step-8 checkpoint
    into another out_dir is a new run in both."""
    pytest.importorskip("tensorboard")
    out, dash = tmp_path / "out", tmp_path / "dash"
    flags = [*SWITCH, "--logger=tensorboard,wandb", f"--logger_dir={dash}", "--run_name=leg"]
    run(data_dir, out, *flags, "--stop_after=7")
    first_id = (out / "wandb_id").read_text()
    forward, calls = GPT.forward, [0]

    def dying_forward(self, idx, targets=None):
        if self.training:
            calls[0] += 1
            if calls[0] > 2 * (11 - 7):  # two micro-batches a step, from step 7
                raise RuntimeError("killed")
        return forward(self, idx, targets)

    time.sleep(1.1)  # wandb names an offline run's directory after the second it started in
    monkeypatch.setattr(GPT, "forward", dying_forward)
    with pytest.raises(RuntimeError, match="killed"):
        run(data_dir, out, *flags, "--resume")
    monkeypatch.setattr(GPT, "forward", forward)
    assert max(read_log(out)[0]) == 10
    time.sleep(1.1)
    last_leg = time.time()
    run(data_dir, out, *flags, "--resume")

    acc = tensorboard_events(dash / "tensorboard" / "leg")
    loss = acc.Scalars("loss")
    assert [(e.step, e.value) for e in loss] == float32(series(out, "loss"))
    assert all((e.wall_time > last_leg) == (e.step >= 9) for e in loss)  # the killed leg's 9 and 10 are gone
    assert [e.step for e in acc.Scalars("val_loss")] == [0, 3, 6, 9, 12]

    legs = wandb_runs(offline_wandb)
    assert (out / "wandb_id").read_text() == first_id and [leg["id"] for leg in legs] == [first_id.strip()] * 3
    assert [leg["exit_code"] for leg in legs] == [0, 1, 0]  # the killed leg is marked failed
    assert [[row["_step"] for row in leg["history"] if "loss" in row] for leg in legs] == [
        list(range(7)), list(range(7, 11)), list(range(9, 12))]
    assert [(row["_step"], row["loss"]) for row in legs[2]["history"] if "loss" in row] == series(out, "loss")[9:]

    branch = tmp_path / "branch"
    os.makedirs(branch)
    (branch / "wandb_id").write_text(first_id)  # (as if an earlier arm had been here: a branch still starts anew)
    run(data_dir, branch, *SWITCH, "--logger=tensorboard,wandb", f"--resume={out}/ckpt_0000008.pt")
    acc = tensorboard_events(branch / "tensorboard" / "branch")
    assert [e.step for e in acc.Scalars("loss")] == [8, 9, 10, 11]
    assert (branch / "wandb_id").read_text() != first_id and len(wandb_runs(offline_wandb)) == 4

# -----------------------------------------------------------------------------
# failures


@pytest.mark.parametrize("where", ["write", "__init__"])
def test_a_failing_backend_does_not_stop_the_run(data_dir, tmp_path, monkeypatch, capsys, where):
    """A full disk under TensorBoard, when it opens or on its first write: one line on stderr, no second try,
    and the run and log.jsonl go on to the end."""
    pytest.importorskip("tensorboard")
    calls = []

    def disk_full(*args, **kwargs):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loggers.TensorBoard, where, disk_full)
    result = run(data_dir, tmp_path, *REF, "--logger=tensorboard")
    said = [line for line in capsys.readouterr().err.splitlines() if "--logger=tensorboard" in line]
    assert len(said) == 1 and "No space left on device" in said[0] and len(calls) == 1
    steps, vals = read_log(tmp_path)
    assert sorted(steps) == list(range(12)) and sorted(vals) == [0, 3, 6, 9, 12]
    assert result["val_loss"] == vals[12]


@pytest.mark.parametrize("name", list(loggers.BACKENDS))
def test_a_missing_package_is_one_line_before_the_run(data_dir, tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path / "out", *REF, f"--logger={name}")
    said = str(e.value.code)
    assert said.startswith("train.py: error: ") and "\n" not in said and said.endswith(f"pip install {name}")
    assert not os.path.exists(tmp_path / "out")  # refused before the run made its out_dir


def test_an_unknown_backend_is_one_line(data_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"^train.py: error: --logger=tensorbord: no dashboard 'tensorbord'; "
                                         r"choose from tensorboard, wandb, trackio"):
        run(data_dir, tmp_path, *REF, "--logger=tensorbord")


def test_phase_index_follows_train_phases():
    """loggers.PHASES is train.phase's names in the order a run passes them (warmup, stable, stable 2, decay, long
    context)."""
    args = train.parse_args(TINY + REF + ["--batch_double_step=4", "--long_context=64:2"])
    seen = [train.phase(s, args) for s in range(train.total_iters(args))]
    assert list(dict.fromkeys(seen)) == list(loggers.PHASES)

# -----------------------------------------------------------------------------
# readers: each backend's files, read back as its own viewer would


def tensorboard_events(run_dir):
    """The run directory's events as TensorBoard's own loader sees them (a purge marker applied), none sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def wandb_runs(wandb_dir):
    """Each offline run under wandb_dir, oldest first: {id, project, name, config, history, exit_code}, read from its
    run-ID.wandb file. wandb 0.31 has no reader of its own for it: the file is a LevelDB-style log (a 7-byte header
    ':W&B', magic 0xBEE1, version; then 32 KiB blocks of chunks, each with a 7-byte header: checksum, length, type
    full/first/middle/last; a block's last < 7 bytes are padding) of wandb_internal_pb2.Record messages."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb
    wandb.teardown()  # a finished run's file may still be being written by wandb's service: wait for it to stop
    runs = []
    for path in sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        data = open(path, "rb").read()
        assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
        r = dict(config={}, history=[], exit_code=None)
        pos, record = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # padding at a block's end
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:  # zeros: the rest of the block is unused
                pos += 32768 - pos % 32768
                continue
            record = (b"" if kind in (1, 2) else record) + data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record
                rec = pb.Record()
                rec.ParseFromString(record)
                what = rec.WhichOneof("record_type")
                if what == "run":
                    r.update(id=rec.run.run_id, project=rec.run.project, name=rec.run.display_name)
                    r["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
                elif what == "config":
                    r["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
                elif what == "history":
                    r["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                         for i in rec.history.item})
                elif what == "exit":
                    r["exit_code"] = rec.exit.exit_code
        runs.append(r)
    return runs
