"""ablation.py --quick: the paper's design (one stable phase per seed, each arm's decay branched from its
checkpoint), statistics computed from the runs themselves, the outputs written."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ablation  # noqa: E402


HAVE_MPL = importlib.util.find_spec("matplotlib") is not None  # optional: the pictures need it


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    import prepare_data
    data = str(out / "data")
    prepare_data.prepare(["embedded"], "byte", data, max_tokens=100_000)
    train_args = ablation.QUICK_TRAIN_ARGS + f" --data_dir={data}"
    results, summary = ablation.main(["--quick", f"--out={out}", f"--train_args={train_args}", "--arms=adamw,muon",
                                      "--seeds=3,4,5"])
    return out, results, summary


def log(d):
    with open(os.path.join(d, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_outputs_exist(quick):
    out, _, _ = quick
    assert os.path.getsize(out / "results.json") > 0
    if not HAVE_MPL:  # test_without_matplotlib_the_numbers_still_come checks what is said instead
        pytest.skip("the pictures need matplotlib")
    for f in ("decay.png", "differences.png"):
        assert open(out / f, "rb").read(8) == b"\x89PNG\r\n\x1a\n", f


def test_without_matplotlib_the_numbers_still_come(quick, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    _, results, summary = quick
    ablation.pictures(results, summary, ["adamw", "muon"], "adamw", None, None)
    assert capsys.readouterr().out == "ablation.py: the pictures need matplotlib: pip install matplotlib\n"


def test_each_arm_branches_from_its_own_seeds_stable_phase(quick):
    out, results, _ = quick
    decay_at = json.load(open(out / "results.json"))["decay_start"]
    for seed in (3, 4, 5):
        arms = {a: log(out / f"seed{seed}" / a) for a in ("adamw", "muon")}
        for arm, entries in arms.items():
            cfg = json.load(open(out / f"seed{seed}" / arm / "config.json"))["args"]
            assert cfg["resume"] == str(out / f"seed{seed}" / "base" / f"ckpt_{decay_at:07d}.pt")
            steps = [e for e in entries if "loss" in e]
            assert steps[0]["step"] == decay_at  # the arm is the decay only
            assert {e["optimizer"] for e in steps} == {"muon" if arm == "muon" else "adamw"}  # not swapped
        # the same weights and the same batch at the branch: the first decay step's loss is identical
        first = [next(e["loss"] for e in arms[a] if "loss" in e) for a in ("adamw", "muon")]
        assert first[0] == first[1]
    # and different seeds really differ
    firsts = {s: next(e["loss"] for e in log(out / f"seed{s}" / "adamw") if "loss" in e) for s in (3, 4, 5)}
    assert len(set(firsts.values())) == 3


def test_statistics_are_computed_from_the_runs(quick):
    out, results, summary = quick
    diffs = []
    for seed in (3, 4, 5):
        final = {a: [e["val_loss"] for e in log(out / f"seed{seed}" / a) if "val_loss" in e][-1]
                 for a in ("adamw", "muon")}
        bpb = {a: json.load(open(out / f"seed{seed}" / a / "eval.json"))["results"]["val"]["metrics"]["bits_per_byte"]
               for a in ("adamw", "muon")}
        assert results[seed]["muon"]["val_loss"] == final["muon"] and results[seed]["adamw"]["bits_per_byte"] == \
            bpb["adamw"]
        diffs.append(final["muon"] - final["adamw"])  # arm - control, seed by seed
    p = summary["muon"]["paired"]["val_loss"]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert p["mean"] == pytest.approx(mean) and p["std"] == pytest.approx(std)
    assert p["ci95"] == pytest.approx([mean - 4.303 * std / math.sqrt(3), mean + 4.303 * std / math.sqrt(3)], rel=1e-3)
    saved = json.load(open(out / "results.json"))
    assert saved["summary"]["muon"]["paired"]["val_loss"]["mean"] == pytest.approx(mean)
    assert "paired" not in summary["adamw"]  # the control is not compared with itself


def test_paired_statistics():
    p = ablation.paired([1.0, 2.0, 3.0])
    assert (p["mean"], p["std"]) == (2.0, 1.0) and p["ci95"] == pytest.approx([2 - 2.4844, 2 + 2.4844], abs=1e-4)
    assert p["excludes_zero"] is False
    assert ablation.paired([-0.10, -0.12, -0.11, -0.09, -0.13])["excludes_zero"] is True
    assert ablation.paired([0.5])["ci95"] is None  # one seed: no interval


def test_an_unknown_arm_is_one_line():
    r = subprocess.run([sys.executable, "ablation.py", "--arms=adamw,sgd"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown arm(s) sgd" in r.stderr and "Traceback" not in r.stderr


def test_finished_runs_are_reused_only_for_the_same_flags(quick, tmp_path):
    out, results, _ = quick
    data = json.load(open(out / "seed3" / "adamw" / "config.json"))["args"]["data_dir"]
    argv = ["--quick", f"--out={out}", "--arms=adamw,muon", "--seeds=3"]
    mtime = os.path.getmtime(out / "seed3" / "muon" / "log.jsonl")
    again, _ = ablation.main([*argv, f"--train_args={ablation.QUICK_TRAIN_ARGS} --data_dir={data}"])
    assert again[3] == results[3] and os.path.getmtime(out / "seed3" / "muon" / "log.jsonl") == mtime  # reused
    # other flags: the stable phase and both arms run again, and the results are theirs; a run killed before it
    # finished (no DONE record) runs again too
    (out / "seed3" / "muon" / ablation.DONE).unlink()
    assert not ablation.finished(str(out / "seed3" / "muon"), [])
    other, _ = ablation.main([*argv[:-1], "--seeds=4", f"--train_args={ablation.QUICK_TRAIN_ARGS} --data_dir={data} "
                              "--lr=0.002"])
    for arm in ("adamw", "muon"):
        assert json.load(open(out / "seed4" / arm / "config.json"))["args"]["lr"] == 0.002
        assert other[4][arm]["val_loss"] != results[4][arm]["val_loss"]


@pytest.mark.parametrize("flags, says", [
    (["--arms=adamw,bad", "--arm=bad:--nope"], "unknown flag --nope"),
    (["--arm=x:--lr='1", "--arms=x"], "--arm=x:--lr='1: No closing quotation"),
    (["--train_args=--lr='0.1"], "--train_args: No closing quotation"),
])
def test_bad_arm_flags_fail_before_any_training(tmp_path, flags, says):
    r = subprocess.run([sys.executable, "ablation.py", "--quick", f"--out={tmp_path}/abl", *flags], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "abl")


# -----------------------------------------------------------------------------
# round 2 (issue 19): counts, names and the arms' contracts checked before any training; --out held and owned


@pytest.mark.parametrize("flags, says", [
    (["--arms=adamw,adamw"], "--arms=adamw,adamw: adamw is given twice; name each once"),
    (["--seeds=1,1"], "--seeds=1,1: 1 is given twice; name each once"),
    (["--arm=../../x:--lr=0.01", "--arms=adamw,../../x"], "'../../x' is not a plain name"),
    (["--arm=base:--lr=0.01", "--arms=adamw,base"], "'base' is not a plain name"),
    (["--arm=short:--stop_after=4", "--arms=adamw,short"], "arm short (--stop_after=4) would train nothing: with "
                                                            "--train_args it ends at step 4, at or before its branch "
                                                            "point, step 16"),
    (["--arm=plan:--dry_run", "--arms=adamw,plan"], "arm plan (--dry_run) would train nothing"),
])
def test_counts_names_and_arm_contracts_fail_before_any_training(tmp_path, flags, says):
    r = subprocess.run([sys.executable, "ablation.py", "--quick", f"--out={tmp_path}/a/abl", *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_a_second_ablation_into_one_out_and_outputs_it_did_not_make_are_refused(tmp_path):
    from safeio import FileLock
    out = tmp_path / "abl"
    out.mkdir()
    cmd = [sys.executable, "ablation.py", "--quick", f"--out={out}", "--seeds=1", "--arms=adamw"]
    with FileLock(str(out / ".lock"), "ablation.py run"):  # as a first ablation holds it
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "is in use by another ablation.py run (pid" in r.stderr, r.stderr
    (out / "results.json").write_text('{"mine": 1}')
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"--out={out}/results.json is not a results file" in r.stderr, r.stderr
    assert sorted(os.listdir(out)) == [".lock", "results.json"]  # nothing trained


def test_a_run_that_trained_nothing_or_diverged_is_never_marked_finished(tmp_path, monkeypatch):
    from mup_sweep import Job
    import checkpoint
    import cli
    monkeypatch.setattr(ablation.train, "main", lambda argv: {"val_loss": None})  # e.g. resumed past its end
    arm = str(tmp_path / "arm")
    with pytest.raises(ablation.AblationError, match="trained nothing in .*arm; it is not marked finished"):
        ablation.train_runs([Job("arm", ["--max_iters=4"], arm, None)], 1)
    assert not ablation.finished(arm, ["--max_iters=4"]) and not os.path.exists(os.path.join(arm, ablation.DONE))

    def diverge(argv):
        raise cli.fail("train.py", checkpoint.Diverged("loss nan at step 3"))
    monkeypatch.setattr(ablation.train, "main", diverge)
    with pytest.raises(ablation.AblationError, match="diverged .* in .*arm"):
        ablation.train_runs([Job("arm", ["--max_iters=4"], arm, None)], 1)
    assert not os.path.exists(os.path.join(arm, ablation.DONE))
    theirs = tmp_path / "theirs"  # a train.py run ablation.py did not make: its --overwrite would replace it
    theirs.mkdir()
    (theirs / "ckpt_0000004.pt").write_bytes(b"a checkpoint")
    with pytest.raises(ablation.AblationError, match="holds files ablation.py did not make"):
        ablation.train_runs([Job("theirs", ["--max_iters=4"], str(theirs), None)], 1)
    assert os.listdir(theirs) == ["ckpt_0000004.pt"]


# -----------------------------------------------------------------------------
# issue 21: the switch across widths, --jobs, the runs named for a dashboard


def config(d):
    return json.load(open(os.path.join(d, "config.json")))


@pytest.fixture(scope="module")
def widths(quick, tmp_path_factory, one_thread):
    """The quick ablation at widths 32 and 64, one run at a time on one thread (as --jobs' processes run): (out,
    the data dir)."""
    out = tmp_path_factory.mktemp("widths")
    data = config(quick[0] / "seed3" / "adamw")["args"]["data_dir"]
    ablation.main(["--quick", f"--out={out}", f"--train_args={ablation.QUICK_TRAIN_ARGS} --data_dir={data}",
                   "--arms=adamw,muon", "--seeds=1,2", "--widths=32,64"])
    return out, data


def test_each_width_runs_its_own_ablation_with_the_arms_not_swapped(widths):
    out, _ = widths
    gains = json.load(open(out / "widths.json"))
    assert gains["widths"] == [32, 64] and gains["control"] == "adamw" and list(gains["gains"]) == ["muon"]
    for i, w in enumerate((32, 64)):
        res = json.load(open(out / f"w{w}" / "results.json"))
        decay_at = res["decay_start"]
        for seed in (1, 2):
            base = config(out / f"w{w}" / f"seed{seed}" / "base")
            assert base["model"]["n_embd"] == w and base["model"]["n_head"] == w // 32  # the quick model's head dim
            assert base["model"]["mlp_hidden"] == int(2.5 * w) and base["args"]["run_name"] == f"w{w}-s{seed}-stable"
            for arm in ("adamw", "muon"):
                c = config(out / f"w{w}" / f"seed{seed}" / arm)
                assert c["model"]["n_embd"] == w and c["args"]["run_name"] == f"w{w}-s{seed}-{arm}"
                assert c["args"]["muon_at_decay"] == (arm == "muon")  # the switch in the muon arm only
                assert c["args"]["resume"] == str(out / f"w{w}" / f"seed{seed}" / "base" / f"ckpt_{decay_at:07d}.pt")
                steps = [e for e in log(out / f"w{w}" / f"seed{seed}" / arm) if "loss" in e]
                assert {e["optimizer"] for e in steps} == {arm}
        # the gain at this width: the width's own paired differences, muon - adamw, seed by seed
        diffs = [res["results"][str(s)]["muon"]["val_loss"] - res["results"][str(s)]["adamw"]["val_loss"]
                 for s in (1, 2)]
        g = gains["gains"]["muon"][i]
        assert g["width"] == w and g["paired"]["val_loss"]["mean"] == pytest.approx(sum(diffs) / 2)
        assert g["paired"]["val_loss"] == res["summary"]["muon"]["paired"]["val_loss"]
    if HAVE_MPL:
        assert open(out / "gain.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        for w in (32, 64):
            assert open(out / f"w{w}" / "differences.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_jobs_give_the_same_results_as_one_at_a_time(widths, tmp_path, one_thread):
    out, data = widths
    again = tmp_path / "jobs"
    ablation.main(["--quick", f"--out={again}", f"--train_args={ablation.QUICK_TRAIN_ARGS} --data_dir={data}",
                   "--arms=adamw,muon", "--seeds=1,2", "--widths=32,64", "--jobs=2"])
    for w in (32, 64):
        one, two = (json.load(open(d / f"w{w}" / "results.json"))["results"] for d in (out, again))
        assert one == two  # every metric of every arm and seed, to the bit
    first, second = (json.load(open(d / "widths.json"))["gains"] for d in (out, again))
    assert first == second


def test_single_width_runs_are_named_and_older_records_still_count(quick):
    out, _, _ = quick
    assert config(out / "seed5" / "muon")["args"]["run_name"] == "s5-muon"
    assert not os.path.exists(out / "widths.json")
    argv = json.load(open(out / "seed5" / "muon" / ablation.DONE))["argv"]
    assert ablation.finished(str(out / "seed5" / "muon"), [a for a in argv if not a.startswith("--run_name")])
    assert ablation.finished(str(out / "seed5" / "muon"), argv[:-1] + ["--run_name=other", "--logger=tensorboard"])
    assert not ablation.finished(str(out / "seed5" / "muon"), argv + ["--lr=0.5"])


def test_widths_must_fit_the_head_dim(tmp_path):
    r = subprocess.run([sys.executable, "ablation.py", "--quick", f"--out={tmp_path}/w", "--widths=48,64"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--widths: 48 is not a multiple of the head dim, 32" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "w")
