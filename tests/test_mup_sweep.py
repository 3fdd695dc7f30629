"""mup_sweep.py: the sweep's statistics come from its runs (mean, spread, best LR), every run lands under its own
width, LR, seed and parameterization, diverged runs are NaN, and --quick / --coord --quick / --plot_only write
their JSON and pictures. CPU, well under a minute."""

import importlib.util
import json
import math
import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import cli  # noqa: E402
import jobs  # noqa: E402
import mup_sweep  # noqa: E402
import prepare_data as pd  # noqa: E402
import train  # noqa: E402

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None  # optional: the pictures need it


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The real --quick sweep, on 200k tokens of the embedded corpus: (its JSON data, what it printed)."""
    tmp = tmp_path_factory.mktemp("sweep")
    data_dir = pd.prepare(["embedded"], "byte", str(tmp / "data"), max_tokens=200_000)
    out = str(tmp / "quick.json")
    printed = capture(lambda: mup_sweep.main(
        ["--quick", f"--out={out}", f"--train_args={mup_sweep.QUICK['train_args']} --data_dir={data_dir}"]))
    return json.load(open(out)), printed, out


def capture(fn):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


def printed_tables(text):
    """{parameterization: {width: (bold lr or None, {lr: cell text})}} parsed back from the markdown tables."""
    tables = {}
    for name in mup_sweep.PARAMS:
        header = re.search(rf"^\| {name}, width \| (.*) \|$", text, re.M)
        lrs = [float(x) for x in header.group(1).split(" | ")]
        rows = {}
        for m in re.finditer(r"^\| (\d+) \| (.*) \|$", text[header.end():].split("\n\n")[0], re.M):
            cells = dict(zip(lrs, m.group(2).split(" | ")))
            bold = [lr for lr, s in cells.items() if s.startswith("**")]
            rows[int(m.group(1))] = (bold[0] if bold else None, cells)
        tables[name] = rows
    return tables


def test_quick_sweep_writes_every_run_and_its_figure(quick):
    data, printed, out = quick
    q = mup_sweep.QUICK
    keys = {(r["parameterization"], r["width"], r["lr"], r["seed"]) for r in data["runs"]}
    assert keys == {(n, w, lr, s) for n in ("muP", "SP") for w in q["widths"] for lr in q["lrs"] for s in q["seeds"]}
    assert all(math.isfinite(r["val_loss"]) and 2 < r["val_loss"] < 6 for r in data["runs"])
    assert data["info"]["complete"] and data["info"]["commit"] is not None
    # one seed: each cell is its run, and the bold cell of each printed row is that width's argmin
    tables = printed_tables(printed)
    for n in ("muP", "SP"):
        for w in q["widths"]:
            vals = {r["lr"]: r["val_loss"] for r in data["runs"] if (r["parameterization"], r["width"]) == (n, w)}
            assert tables[n][w][0] == min(vals, key=vals.get)
            assert {lr: float(s.strip("*")) for lr, s in tables[n][w][1].items()} == \
                pytest.approx(vals, abs=5e-4)
    png = os.path.splitext(out)[0] + ".png"
    if HAVE_MPL:
        assert os.path.getsize(png) > 10_000
    else:
        assert "pip install matplotlib" in printed


def test_plot_only_redraws_from_the_json(quick, tmp_path):
    data, _, _ = quick
    path = str(tmp_path / "again.json")
    with open(path, "w") as f:
        json.dump(data, f)
    printed = capture(lambda: mup_sweep.main([f"--plot_only={path}"]))
    assert printed_tables(printed) == printed_tables(quick[1])  # the same table from the stored runs
    assert os.path.exists(str(tmp_path / "again.png")) == HAVE_MPL


def fake_loss(name, width, lr, seed):
    """A made-up loss surface: muP's optimum sits at lr 0.005 for every width, SP's halves with each doubling
    of width; the seed adds noise big enough that seed 2 alone would pick 0.01 under muP. SP at width 128,
    lr 0.04, seed 2 diverges."""
    if (name, width, lr, seed) == ("SP", 128, 0.04, 2):
        return math.nan
    best = 0.005 if name == "muP" else 0.01 * 64 / width
    noise = {1: 0.06, 2: -0.08, 3: 0.02}[seed] * (1 if lr == 0.01 else -1)
    return 2 + 0.1 * (math.log2(lr) - math.log2(best)) ** 2 - 0.1 * math.log2(width) + noise \
        + (0.3 if name == "SP" else 0)


def flags_of(argv):
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def fake_train(loss, calls=None):
    """A stand-in for jobs.train_result: loss(name, width, lr, seed) read from the run's own train.py flags
    (name: its Muon rule, or muP/SP; lr: --muon_lr in a Muon run), a NaN loss as a diverged run."""
    def result(argv, log=None):
        f = flags_of(argv)
        muon = f.get("optimizer") == "muon" or "--muon_at_decay" in argv
        key = (f["muon_scale"] if muon else "muP" if f["mup"] == "1" else "SP", int(f["n_embd"]),
               float(f["muon_lr"] if muon else f["lr"]), int(f["seed"]))  # the eta swept: Muon's, or AdamW's
        if calls is not None:
            calls.append(key)
        v = loss(*key)
        return {"diverged": True} if math.isnan(v) else {"val_loss": v}
    return result


@pytest.mark.parametrize("seeds", ["1,2", "1,2,3"])
def test_statistics_are_those_of_the_runs(monkeypatch, tmp_path, seeds):
    monkeypatch.setattr(jobs, "train_result", fake_train(fake_loss))
    out = str(tmp_path / "fake.json")
    printed = capture(lambda: mup_sweep.main(["--widths=64,128,256", "--lrs=0.0025,0.005,0.01,0.02,0.04",
                                              f"--seeds={seeds}", f"--out={out}", f"--runs_dir={tmp_path}/runs"]))
    data = json.load(open(out))
    n = len(seeds.split(","))
    assert len(data["runs"]) == 2 * 3 * 5 * n
    for r in data["runs"]:  # each value under its own labels: a swap of widths, LRs, seeds or muP/SP shows here
        want = fake_loss(r["parameterization"], r["width"], r["lr"], r["seed"])
        assert r["val_loss"] == want or (math.isnan(want) and math.isnan(r["val_loss"]))
    tables = printed_tables(printed)
    best = {(b["parameterization"], b["width"]): b["lr"] for b in data["best_lr"]}
    for c in data["cells"]:
        cell = (c["parameterization"], c["width"], c["lr"])
        vals = np.array([r["val_loss"] for r in data["runs"] if (r["parameterization"], r["width"], r["lr"]) == cell])
        assert c["n"] == n == len(vals)
        text = tables[c["parameterization"]][c["width"]][1][c["lr"]]
        if not np.isfinite(vals).all():
            assert math.isnan(c["mean"]) and c["diverged"] == 1 and text == f"diverged (1/{n} seeds)"
            continue
        assert c["mean"] == pytest.approx(vals.mean()) and c["min"] == vals.min() and c["max"] == vals.max()
        assert c["std"] == pytest.approx(vals.std(ddof=1))
        spread = (vals.max() - vals.min()) / 2 if n == 2 else vals.std(ddof=1)
        assert text.strip("*") == f"{vals.mean():.3f} +- {spread:.3f}"
    for (name, width), lr in best.items():
        means = {c["lr"]: c["mean"] for c in data["cells"] if (c["parameterization"], c["width"]) == (name, width)
                 and math.isfinite(c["mean"])}
        assert lr == min(means, key=means.get) == tables[name][width][0]
    # the surface's true optima, which only the mean over seeds finds (seed 2 alone picks 0.01 under muP)
    assert [best[("muP", w)] for w in (64, 128, 256)] == [0.005] * 3
    seed2 = {r["lr"]: r["val_loss"] for r in data["runs"]
             if (r["parameterization"], r["width"], r["seed"]) == ("muP", 64, 2)}
    assert min(seed2, key=seed2.get) == 0.01
    assert [best[("SP", w)] for w in (64, 128, 256)] == [0.01, 0.005, 0.0025]
    assert ("half the min-max range" in printed) == (n == 2) and ("std over seeds" in printed) == (n == 3)
    assert os.path.exists(str(tmp_path / "fake.png")) == HAVE_MPL


def test_each_run_gets_its_width_lr_seed_and_parameterization_and_a_diverged_run_is_a_data_point(monkeypatch):
    seen = []

    def fake_main(argv):
        seen.append(argv)
        if "--lr=0.5" in argv:
            raise cli.fail("train.py", checkpoint.Diverged("loss nan, gradient norm nan at step 3; stopped without "
                                                           "saving; ..."))
        if "--lr=0.25" in argv:
            raise cli.fail("train.py", cli.UserError("something else"))
        return {"val_loss": 2.5}

    monkeypatch.setattr(train, "main", fake_main)
    args = mup_sweep.parse_args(["--train_args=--n_layer=2"])
    argv = mup_sweep.run_argv(args, "muP", 128, 0.01, 7)
    assert jobs.train_result(argv) == {"val_loss": 2.5}
    assert {"--n_layer=2", "--n_embd=128", "--n_head=4", "--n_kv_head=4", "--mlp_hidden=320", "--lr=0.01",
            "--mup=1", "--seed=7", "--run_name=muP-w128-lr0.01-s7"} <= set(seen[-1])
    assert not any(a.startswith(("--optimizer", "--muon")) for a in seen[-1])  # the AdamW sweep: train.py's AdamW
    assert {"--n_embd=64", "--n_head=2", "--lr=0.02", "--mup=0", "--seed=1"} <= set(mup_sweep.run_argv(
        args, "SP", 64, 0.02, 1))
    assert jobs.train_result(mup_sweep.run_argv(args, "SP", 64, 0.5, 1)) == {"diverged": True}  # a data point
    with pytest.raises(SystemExit, match="something else"):  # any other error still stops the sweep
        jobs.train_result(mup_sweep.run_argv(args, "SP", 64, 0.25, 1))
    muon = mup_sweep.parse_args(["--optimizer=muon", "--train_args=--n_layer=2"])
    assert {"--optimizer=muon", "--muon_scale=unit_rms_norm", "--mup=1", "--lr=0.005", "--muon_lr=0.04",
            "--run_name=unit_rms_norm-w64-lr0.04-s2"} <= set(mup_sweep.run_argv(muon, "unit_rms_norm", 64, 0.04, 2))


def test_without_matplotlib_the_numbers_still_come(quick, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    path = str(tmp_path / "nompl.json")
    with open(path, "w") as f:
        json.dump(quick[0], f)
    printed = capture(lambda: mup_sweep.main([f"--plot_only={path}"]))
    assert "| muP, width |" in printed and "pip install matplotlib" in printed
    assert not os.path.exists(str(tmp_path / "nompl.png"))


def test_coord_quick_writes_its_picture(tmp_path):
    out = str(tmp_path / "coord.json")
    printed = capture(lambda: mup_sweep.main(["--coord", "--quick", f"--coord_out={out}"]))
    data = json.load(open(out))
    q = mup_sweep.QUICK
    for name in ("muP", "SP"):
        assert set(data[name]) == set(mup_sweep.COORD_SITES) | {"logits_change", "change_via_init", "change_via_update"}
        assert np.asarray(data[name]["logits"]).shape == (q["coord_steps"] + 1, len(q["coord_widths"]))
        assert f"{name}: log-log slope" in printed
    for site in ("logits_change", "change_via_init", "change_via_update"):  # nothing changed before the first step
        assert np.all(np.asarray(data["muP"][site])[0] == 0) and np.all(np.asarray(data["muP"][site])[1:] > 0)
    assert os.path.exists(str(tmp_path / "coord.png")) == HAVE_MPL


def test_resume_adds_a_seed_to_some_widths_and_keeps_the_rest(monkeypatch, tmp_path):
    calls = []

    monkeypatch.setattr(jobs, "train_result", fake_train(fake_loss, calls))
    out, runs = str(tmp_path / "r.json"), f"--runs_dir={tmp_path}/runs"
    capture(lambda: mup_sweep.main(["--widths=64,128", "--lrs=0.005,0.01", "--seeds=1", f"--out={out}", runs]))
    assert len(calls) == 8
    capture(lambda: mup_sweep.main(["--widths=64", "--lrs=0.005,0.01", "--seeds=1,2", f"--out={out}", "--resume",
                                    runs]))
    assert calls[8:] == [(name, 64, lr, 2) for name in ("muP", "SP") for lr in (0.005, 0.01)]  # only what was missing
    data = json.load(open(out))
    assert len(data["runs"]) == 12 and data["widths"] == [64, 128] and data["seeds"] == [1, 2]
    assert {(c["width"], c["n"]) for c in data["cells"]} == {(64, 2), (128, 1)}
    assert data["info"]["complete"] and len(data["history"]) == 1
    with pytest.raises(SystemExit, match="other --train_args"):
        mup_sweep.main(["--widths=64", "--seeds=3", f"--out={out}", "--resume", "--train_args=--max_iters=5"])


def test_a_sweep_cut_short_still_prints_and_draws(quick, tmp_path):
    data = dict(quick[0])
    data["runs"] = [r for r in data["runs"] if not (r["parameterization"] == "SP" and r["width"] == 64)]
    cells, best = mup_sweep.summarize(data["runs"])
    data.update(cells=cells, best_lr=[dict(parameterization=n, width=w, lr=lr) for (n, w), lr in best.items()])
    path = str(tmp_path / "short.json")
    with open(path, "w") as f:
        json.dump(data, f)
    printed = capture(lambda: mup_sweep.main([f"--plot_only={path}"]))
    assert "| 64 | not run | not run |" in printed
    assert os.path.exists(str(tmp_path / "short.png")) == HAVE_MPL


def test_an_existing_sweep_is_not_replaced_and_a_foreign_json_is_one_line(tmp_path):
    out = tmp_path / "sweep.json"
    out.write_text('{"kind": "sweep"}')
    with pytest.raises(SystemExit, match=r"--out=\S+sweep.json already exists; --resume adds to a sweep, "
                                         r"--overwrite replaces it"):
        mup_sweep.main(["--widths=64", "--lrs=0.005", f"--out={out}"])
    for text in ("{garbage", "[]", "{}", '{"kind": "sweep", "runs": []}'):
        out.write_text(text)
        for argv in (["--widths=64", "--lrs=0.005", f"--out={out}", "--resume"], [f"--plot_only={out}"]):
            with pytest.raises(SystemExit, match=r"^mup_sweep.py: error: (cannot read|.*=\S+ is not a)"):
                mup_sweep.main(argv)
    assert out.read_text() == '{"kind": "sweep", "runs": []}'  # never written over


def test_an_unbalanced_quote_in_train_args_is_a_parser_error(capsys):
    with pytest.raises(SystemExit) as e:
        mup_sweep.parse_args(["--train_args=--lr='0.1"])
    assert e.value.code == 2 and "--train_args: No closing quotation" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--seeds=1,1", "--widths=64,128,64", "--lrs=0.01,0.01", "--coord_seeds=0,0"])
def test_a_value_given_twice_is_a_parser_error(capsys, flag):
    """Round 2 (issue 19): --seeds=1,1 reported one run as two."""
    with pytest.raises(SystemExit) as e:
        mup_sweep.parse_args([flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is given twice" in err and err.count("\n") == 1, err


def test_overwrite_replaces_a_sweep_never_what_mup_sweep_did_not_write(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "train_result", lambda *a: pytest.fail("a run started"))
    (tmp_path / "ckpt_0000004.pt").write_bytes(b"PK\x03\x04 a checkpoint")
    (tmp_path / "s.png").write_text("not a picture")
    (tmp_path / "s.json.bak").write_text("my notes")
    (tmp_path / "s.json").write_text(json.dumps(dict(kind="sweep", runs=[], cells=[], widths=[], lrs=[], best_lr=[])))
    for argv, says in [([f"--out={tmp_path}/ckpt_0000004.pt"], "ckpt_0000004.pt is a file of the train.py run in"),
                       ([f"--out={tmp_path}/s.png"], "s.png names the JSON; the figure goes beside it, as .png"),
                       ([f"--out={tmp_path}/s.json"], "s.png is not a PNG file"),
                       ([f"--out={tmp_path}/s.json.bak"], "s.json.bak is not a sweep JSON file"),
                       (["--coord", f"--coord_out={tmp_path}/"], "is a directory; name the coord JSON file")]:
        with pytest.raises(SystemExit, match=re.escape(says)):
            mup_sweep.main(["--widths=64", "--lrs=0.005", "--overwrite", *argv])
    assert (tmp_path / "ckpt_0000004.pt").read_bytes() == b"PK\x03\x04 a checkpoint"


# -----------------------------------------------------------------------------
# the Muon sweep (issue 21): one panel per width rule, Muon from step 0 or in the decay only; --jobs


@pytest.fixture(scope="module")
def muon_quick(tmp_path_factory):
    """The real quick Muon sweep (from step 0) of two rules, its runs kept: (JSON data, printed, its runs_dir)."""
    tmp = tmp_path_factory.mktemp("muon")
    data_dir = pd.prepare(["embedded"], "byte", str(tmp / "data"), max_tokens=200_000)
    out, runs = str(tmp / "muon.json"), str(tmp / "runs")
    printed = capture(lambda: mup_sweep.main(
        ["--quick", "--optimizer=muon", "--muon_scales=moonlight,unit_rms_norm", f"--out={out}", f"--runs_dir={runs}",
         "--keep_runs", f"--train_args={mup_sweep.QUICK['train_args']} --data_dir={data_dir}"]))
    return json.load(open(out)), printed, runs, data_dir


def by_key(data):
    return {(r["rule"], r["width"], r["lr"], r["seed"]): r["val_loss"] for r in data["runs"]}


def test_quick_muon_sweep_runs_each_rule_through_train_py(muon_quick):
    data, printed, runs, _ = muon_quick
    q = mup_sweep.QUICK
    rules = ("moonlight", "unit_rms_norm")
    assert data["kind"] == "muon_sweep" and data["muon_phase"] == "all" and data["info"]["complete"]
    assert set(by_key(data)) == {(r, w, lr, s) for r in rules for w in q["widths"] for lr in q["lrs"]
                                 for s in q["seeds"]}
    assert all(r["parameterization"] == "muP" and math.isfinite(r["val_loss"]) for r in data["runs"])
    for r in data["runs"]:  # the row's rule, width, eta and seed are what its train.py run was given
        name = f"{r['rule']}-w{r['width']}-lr{r['lr']:g}-s{r['seed']}"
        cfg = json.load(open(os.path.join(runs, name, "config.json")))
        a = cfg["args"]
        assert (a["muon_scale"], a["optimizer"], a["muon_lr"], a["lr"], a["seed"], a["mup"], a["run_name"]) == \
            (r["rule"], "muon", r["lr"], mup_sweep.ADAMW_LR, r["seed"], True, name)  # Muon's eta swept alone
        assert cfg["model"]["n_embd"] == r["width"] and cfg["model"]["n_head"] == max(1, r["width"] // 32)
        log = [json.loads(line) for line in open(os.path.join(runs, name, "log.jsonl"))]
        assert {e["optimizer"] for e in log if "loss" in e} == {"muon"}  # from step 0
        assert [e["val_loss"] for e in log if "val_loss" in e][-1] == r["val_loss"]
    # the rules really differ: the same width, eta and seed train to another loss under another rule
    k = by_key(data)
    assert all(k[("moonlight", w, lr, 1)] != k[("unit_rms_norm", w, lr, 1)] for w in q["widths"] for lr in q["lrs"])
    tables = re.findall(r"^\| (\w+), width \|", printed, re.M)
    assert tables == list(rules)


def test_jobs_give_the_same_numbers_as_one_at_a_time(muon_quick, tmp_path):
    data, _, _, data_dir = muon_quick
    out = str(tmp_path / "muon2.json")
    capture(lambda: mup_sweep.main(
        ["--quick", "--optimizer=muon", "--muon_scales=moonlight,unit_rms_norm", f"--out={out}", "--jobs=2",
         f"--train_args={mup_sweep.QUICK['train_args']} --data_dir={data_dir}"]))
    again = json.load(open(out))
    assert by_key(again) == by_key(data)  # each run to the bit, in its own process with one thread
    assert again["info"]["jobs"] == 2 and not os.path.exists(str(tmp_path / "muon2_runs"))  # runs removed once read


def test_quick_muon_decay_sweep_branches_every_eta_from_one_stable_phase(muon_quick, tmp_path):
    _, _, _, data_dir = muon_quick
    out, runs = str(tmp_path / "decay.json"), str(tmp_path / "runs")
    argv = ["--quick", "--optimizer=muon", "--muon_phase=decay", "--adamw_lr=0.004", f"--out={out}",
            f"--runs_dir={runs}", "--keep_runs", f"--train_args={mup_sweep.QUICK['train_args']} --data_dir={data_dir}"]
    capture(lambda: mup_sweep.main(argv + ["--muon_scales=moonlight"]))
    data = json.load(open(out))
    decay_at = data["decay_start"]
    assert decay_at == 8 and data["adamw_lr"] == 0.004
    assert {(s["width"], s["seed"]) for s in data["stable_runs"]} == {(32, 1), (64, 1)}
    for w in (32, 64):
        base = json.load(open(os.path.join(runs, f"stable-w{w}-s1", "config.json")))["args"]
        assert (base["optimizer"], base["muon_at_decay"], base["lr"], base["stop_after"]) == ("adamw", False, 0.004, 8)
    for r in data["runs"]:
        name = f"{r['rule']}-w{r['width']}-lr{r['lr']:g}-s{r['seed']}"
        a = json.load(open(os.path.join(runs, name, "config.json")))["args"]
        assert a["resume"] == os.path.join(runs, f"stable-w{r['width']}-s1", f"ckpt_{decay_at:07d}.pt")
        assert (a["muon_at_decay"], a["optimizer"], a["muon_scale"], a["muon_lr"], a["lr"]) == \
            (True, "adamw", r["rule"], r["lr"], 0.004)
        steps = [e for e in map(json.loads, open(os.path.join(runs, name, "log.jsonl"))) if "loss" in e]
        assert steps[0]["step"] == decay_at and {e["optimizer"] for e in steps} == {"muon"}  # the decay only
    ckpt = os.path.join(runs, "stable-w64-s1", f"ckpt_{decay_at:07d}.pt")
    mtime = os.path.getmtime(ckpt)
    capture(lambda: mup_sweep.main(argv + ["--muon_scales=spectral", "--resume"]))  # another rule: the same stable
    again = json.load(open(out))
    assert os.path.getmtime(ckpt) == mtime and len(again["runs"]) == 8
    assert {r["rule"] for r in again["runs"]} == {"moonlight", "spectral"} and len(again["history"]) == 1
    with pytest.raises(SystemExit, match="other --train_args/--head_dim/--muon_phase/--adamw_lr"):
        mup_sweep.main(argv[:3] + ["--adamw_lr=0.002"] + argv[4:] + ["--resume"])
    # two at a time, each decay waiting for its stable phase: the same numbers
    out2 = str(tmp_path / "decay2.json")
    capture(lambda: mup_sweep.main(argv[:4] + [f"--out={out2}", f"--runs_dir={tmp_path}/runs2", argv[-1],
                                               "--muon_scales=moonlight", "--jobs=2"]))
    two = json.load(open(out2))
    assert by_key(two) == {k: v for k, v in by_key(again).items() if k[0] == "moonlight"}
    stable = lambda d: {(s["width"], s["seed"], s["val_loss"]) for s in d["stable_runs"]}
    assert len(stable(two)) == 2 and stable(two) == stable(data)


def fake_muon_loss(rule, width, lr, seed):
    """A made-up Muon surface: the best eta of moonlight rises as width^1/2 from 0.005 at width 64, unit_rms_norm's
    stays at 0.02."""
    best = {"moonlight": 0.005 * math.sqrt(width / 64), "unit_rms_norm": 0.02}[rule]
    return 3 + 0.1 * (math.log2(lr) - math.log2(best)) ** 2 - 0.05 * math.log2(width) + 0.001 * seed


def test_muon_sweep_grids_per_rule_and_the_edge_warning(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(jobs, "train_result", fake_train(fake_muon_loss, calls))
    out = str(tmp_path / "m.json")
    printed = capture(lambda: mup_sweep.main(["--optimizer=muon", "--muon_scales=moonlight,unit_rms_norm",
                                              "--widths=64,256,1024", f"--out={out}", f"--runs_dir={tmp_path}/r"]))
    data = json.load(open(out))
    for rule in ("moonlight", "unit_rms_norm"):  # each rule on its own default grid
        assert sorted({lr for r, _, lr, _ in calls if r == rule}) == mup_sweep.MUON_LRS[rule]
    best = {(b["rule"], b["width"]): b["lr"] for b in data["best_lr"]}
    assert [best[("moonlight", w)] for w in (64, 256, 1024)] == [0.005, 0.01, 0.02]  # width^1/2: up 4x
    assert [best[("unit_rms_norm", w)] for w in (64, 256, 1024)] == [0.02] * 3
    assert "best LR by width: 0.005 at 64, 0.01 at 256, 0.02 at 1024; x4 from width 64 to 1024" in printed
    assert "warning" not in printed
    # a grid that stops short: the best LR on its edge is named, the others are not
    out2 = str(tmp_path / "m2.json")
    printed = capture(lambda: mup_sweep.main(["--optimizer=muon", "--muon_scales=moonlight,unit_rms_norm",
                                              "--widths=64,1024", "--lrs=0.0025,0.005,0.01", f"--out={out2}",
                                              f"--runs_dir={tmp_path}/r"]))
    warnings = [line for line in printed.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: moonlight: the best LR is at the edge of the grid at width 1024 (0.01), so the "
                        "optimum may lie outside it; run more --lrs past it (--resume keeps the runs done)",
                        "warning: unit_rms_norm: the best LR is at the edge of the grid at width 64 (0.01), 1024 "
                        "(0.01), so the optimum may lie outside it; run more --lrs past it (--resume keeps the runs "
                        "done)"]
    # the figure and the tables come back from the JSON, one panel per rule
    printed = capture(lambda: mup_sweep.main([f"--plot_only={out}"]))
    assert re.findall(r"^\| (\w+), width \|", printed, re.M) == ["moonlight", "unit_rms_norm"]
    assert os.path.exists(str(tmp_path / "m.png")) == HAVE_MPL


def test_the_default_grids_put_unit_rms_norm_higher_and_flags_check_their_sweep(tmp_path, capsys):
    lrs = mup_sweep.MUON_LRS
    for rule in ("unit_rms_norm", "spectral"):  # their step is ~3-5x smaller than moonlight's at the same eta
        assert min(lrs[rule]) > min(lrs["moonlight"]) and max(lrs[rule]) > max(lrs["moonlight"])
    assert mup_sweep.parse_args(["--optimizer=muon"]).panels == list(mup_sweep.RULES) == list(lrs)
    args = mup_sweep.parse_args(["--optimizer=muon", "--lrs=0.01,0.02"])
    assert args.lrs_of == {r: [0.01, 0.02] for r in mup_sweep.RULES}  # --lrs: one grid for every rule
    assert args.out == "figures/mup_muon_all.json" and args.runs_dir == os.path.join("runs", "mup_muon_all")
    for argv, says in [(["--muon_phase=decay"], "add --optimizer=muon"),
                       (["--optimizer=muon", "--muon_scales=moonlight,rms"], "--muon_scales=moonlight,rms: expected"),
                       (["--optimizer=muon", "--muon_scales=spectral,spectral"], "spectral is given twice")]:
        with pytest.raises(SystemExit) as e:
            mup_sweep.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and err.count("\n") == 1, err
    adamw = tmp_path / "adamw.json"  # an AdamW sweep's JSON is not a Muon sweep to resume
    adamw.write_text(json.dumps(dict(kind="sweep", runs=[], cells=[], widths=[], lrs=[], best_lr=[])))
    with pytest.raises(SystemExit, match="adamw.json is not a muon_sweep JSON file; it is not replaced"):
        mup_sweep.main(["--optimizer=muon", f"--out={adamw}", "--resume"])


def test_the_committed_adamw_sweep_still_reads(tmp_path):
    """A JSON from before the Muon sweep (rows without a rule) redraws and prints as it did."""
    committed = os.path.join(ROOT, "figures", "mup_sweep.json")
    path = tmp_path / "old.json"
    path.write_text(open(committed).read())
    printed = capture(lambda: mup_sweep.main([f"--plot_only={path}"]))
    tables = printed_tables(printed)
    data = json.load(open(committed))
    for b in data["best_lr"]:
        assert tables[b["parameterization"]][b["width"]][0] == b["lr"]


def test_a_failed_run_in_a_job_is_its_own_line_and_stops_the_rest(tmp_path):
    todo = [jobs.Job("bad", ["--lr=0.01", "--data_dir=/nonexistent/data"], str(tmp_path / "bad"), None),
            jobs.Job("after", ["--dry_run"], str(tmp_path / "after"), "bad")]
    done = []
    for d in ("bad", "after"):
        os.makedirs(tmp_path / d)
    with pytest.raises(jobs.JobError, match=r"a run failed \(train\.py: error: .*\): python train.py --lr=0.01"):
        jobs.run_jobs(todo, 2, lambda job, result: done.append(job.key))
    assert done == []  # the job that waited for it never started
