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


@pytest.mark.parametrize("seeds", ["1,2", "1,2,3"])
def test_statistics_are_those_of_the_runs(monkeypatch, tmp_path, seeds):
    monkeypatch.setattr(mup_sweep, "run", lambda width, lr, mup, seed, train_args, head_dim:
                        fake_loss("muP" if mup else "SP", width, lr, seed))
    out = str(tmp_path / "fake.json")
    printed = capture(lambda: mup_sweep.main(["--widths=64,128,256", "--lrs=0.0025,0.005,0.01,0.02,0.04",
                                              f"--seeds={seeds}", f"--out={out}"]))
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


def test_run_passes_its_width_lr_seed_and_parameterization(monkeypatch):
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
    assert mup_sweep.run(128, 0.01, True, 7, "--n_layer=2", 32) == 2.5
    assert {"--n_layer=2", "--n_embd=128", "--n_head=4", "--n_kv_head=4", "--mlp_hidden=320", "--lr=0.01",
            "--mup=1", "--seed=7"} <= set(seen[-1])
    mup_sweep.run(64, 0.02, False, 1, "", 32)
    assert {"--n_embd=64", "--n_head=2", "--lr=0.02", "--mup=0", "--seed=1"} <= set(seen[-1])
    assert math.isnan(mup_sweep.run(64, 0.5, False, 1, "", 32))  # a diverged run is a NaN data point
    with pytest.raises(SystemExit, match="something else"):  # any other error still stops the sweep
        mup_sweep.run(64, 0.25, False, 1, "", 32)


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

    def fake_run(width, lr, mup, seed, train_args, head_dim):
        calls.append((width, lr, mup, seed))
        return fake_loss("muP" if mup else "SP", width, lr, seed)

    monkeypatch.setattr(mup_sweep, "run", fake_run)
    out = str(tmp_path / "r.json")
    capture(lambda: mup_sweep.main(["--widths=64,128", "--lrs=0.005,0.01", "--seeds=1", f"--out={out}"]))
    assert len(calls) == 8
    capture(lambda: mup_sweep.main(["--widths=64", "--lrs=0.005,0.01", "--seeds=1,2", f"--out={out}", "--resume"]))
    assert calls[8:] == [(64, lr, mup, 2) for mup in (True, False) for lr in (0.005, 0.01)]  # only what was missing
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
    monkeypatch.setattr(mup_sweep, "run", lambda *a: pytest.fail("a run started"))
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
