"""bench.py --quick runs every section on the CPU (so the benchmark cannot rot) and prints its ratios; --report
--quick writes the JSON and the markdown table a GPU session writes, through the same code."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*flags):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "bench.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import prepare_data
    data = str(tmp_path_factory.mktemp("data") / "embedded-byte")
    prepare_data.prepare(["embedded"], "byte", data, max_tokens=100_000)
    return data


@pytest.fixture(scope="module")
def quick(data):
    r = run("--quick", f"--data_dir={data}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_quick_runs_every_section(quick):
    for section in ("train", "hf", "head", "fp8", "ns", "data", "eval"):
        assert f"== {section}:" in quick, quick  # measured, or skipped with the reason
    # each train variant reports a positive throughput and a finite loss
    rows = re.findall(r"4L  (fp32 \w+ eager)\s+([\d.]+) ms\s+([\d,]+) tok/s\s+loss ([\d.]+)", quick)
    assert {r[0] for r in rows} == {"fp32 adamw eager", "fp32 muon eager"}, quick
    assert all(float(ms) > 0 and float(loss) < 20 for _, ms, _, loss in rows)
    assert re.search(r"Muon optimizer step alone [\d.]+ ms = [\d.]+% of the training step", quick)
    assert re.search(r"[\d,]+ batches/s .*x what the fastest training step above consumes", quick)


def test_quick_compares_the_heads_and_the_fp8_linears(quick):
    # the plain and the chunked head give the same loss (fp32), and the whole step runs with each
    losses = dict(re.findall(r"(plain logits \+ F.cross_entropy|ours: chunked_cross_entropy)\s+[\d.]+ ms.*loss "
                             r"([\d.]+)", quick))
    assert len(losses) == 2 and len(set(losses.values())) == 1, quick
    assert float(re.search(r"loss difference from the plain head: ours ([\d.e+-]+)", quick).group(1)) < 1e-4
    assert re.search(r"plain head, batch 8\s+[\d.]+ ms", quick) and re.search(r"chunked head, batch 16\s+[\d.]+ ms",
                                                                               quick)
    assert re.search(r"chunked / plain step speed [\d.]+x", quick)
    assert len(re.findall(r"fp8 \(weight cast once per step\)\s+[\d.]+ ms", quick)) == 5  # 4 linears + all four


def test_quick_compares_with_transformers_and_lm_eval(quick):
    pytest.importorskip("transformers")
    assert re.search(r"nanoXmodel / transformers \(eager\): [\d.]+x the tokens/s", quick), quick
    pytest.importorskip("lm_eval")
    diff = re.search(r"lm-eval HFLM .*max \|log-prob difference\| ([\d.e+-]+), greedy flags agree ([\d.]+)%", quick)
    assert diff and float(diff.group(1)) < 1e-3 and float(diff.group(2)) == 100.0, quick


def test_report_writes_json_and_the_readme_table(data, tmp_path):
    r = run("--report", "--quick", "--only=train,head", f"--report_dir={tmp_path}", f"--data_dir={data}",
            "--commit=abc1234")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rep = json.load(open(tmp_path / "report.json"))
    assert rep["info"]["commit"] == "abc1234" and rep["info"]["torch"] and rep["pytest_gpu"] == "skipped: no GPU"
    labels = {row["label"] for row in rep["rows"]}
    assert {"fp32 adamw eager", "fp32 muon eager", "plain head, batch 8", "ours: chunked_cross_entropy"} <= labels
    assert rep["real_run"]["returncode"] == 0 and rep["real_run"]["tokens_per_s_muon"] > 0  # --fp8 --muon_at_decay
    md = open(tmp_path / "report.md").read()
    assert md == r.stdout[r.stdout.index(md[:40]):][:len(md)]  # the table is also the output's end
    assert "| train | 4L | fp32 adamw eager |" in md and "commit abc1234" in md and "Real run" in md


def test_unknown_section_is_one_line():
    r = run("--quick", "--only=train,gpu")
    assert r.returncode == 2 and "unknown section(s) gpu" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags, says", [
    (["--layers=2,x"], "--layers=2,x: expected comma-separated positive layer counts"),
    (["--layers=0"], "--layers=0: expected comma-separated positive layer counts"),
    (["--device=tpu"], "--device=tpu: Expected one of cpu, cuda"),
    (["--report", "--report_dir={file}"], "--report_dir"),
])
def test_bad_flags_are_one_line_before_any_measuring(tmp_path, flags, says):
    (tmp_path / "file").write_text("a file, not a directory")
    r = run("--quick", *[f.format(file=tmp_path / "file") for f in flags])
    assert r.returncode != 0 and "Traceback" not in r.stderr and says in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "pytest -m gpu" not in r.stdout


@pytest.mark.parametrize("device, says", [
    ("meta", "--device=meta: nanoXmodel runs on cpu, cuda or mps, not meta"),
    ("mps", "--device=mps: this machine or torch build has no MPS device; use --device=cpu"),
    ("cuda:7", "--device=cuda:7: no such CUDA device here"),
])
def test_a_device_this_machine_cannot_use_is_the_one_line_train_py_says(device, says):
    """Round 2 (issue 19): --device=meta and --device=mps ended in tracebacks; bench.py now makes cli.setup_device's
    check, the one train.py and evaluate.py make."""
    import torch
    if device == "mps" and torch.backends.mps.is_available() or device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip(f"this machine has {device}")
    r = run("--quick", f"--device={device}")
    assert r.returncode == 1 and r.stderr.startswith(f"bench.py: error: {says}"), r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
