"""bench.py --quick runs every section on the CPU (so the benchmark cannot rot) and prints its ratios."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*flags):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "bench.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    import prepare_data
    data = str(tmp_path_factory.mktemp("data") / "embedded-byte")
    prepare_data.prepare(["embedded"], "byte", data, max_tokens=100_000)
    r = run("--quick", f"--data_dir={data}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_quick_runs_every_section(quick):
    for section in ("train", "ns", "fp8", "data"):
        assert f"== {section}:" in quick, quick
    assert "== hf:" in quick  # measured, or skipped with the reason when transformers is missing
    # each train variant reports a positive throughput and a finite loss
    rows = re.findall(r"(fp32 \w+ eager)\s+([\d.]+) ms\s+([\d,]+) tok/s\s+loss ([\d.]+)", quick)
    assert {r[0] for r in rows} == {"fp32 adamw eager", "fp32 muon eager"}, quick
    assert all(float(ms) > 0 and float(loss) < 20 for _, ms, _, loss in rows)
    assert re.search(r"Muon optimizer step alone\s+[\d.]+ ms = [\d.]+% of the training step", quick)
    assert re.search(r"[\d,]+ batches/s .*x what the fastest training step above consumes", quick)


def test_quick_compares_with_transformers(quick):
    pytest.importorskip("transformers")
    assert re.search(r"nanoXmodel / transformers \(eager\): [\d.]+x the tokens/s", quick), quick


def test_unknown_section_is_one_line():
    r = run("--quick", "--only=train,gpu")
    assert r.returncode == 2 and "unknown section(s) gpu" in r.stderr and "Traceback" not in r.stderr
