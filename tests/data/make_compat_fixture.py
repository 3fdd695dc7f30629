"""Make tests/data/compat/: checkpoints saved by the code before the restructure of issue 17, for
tests/test_compat.py (a checkpoint saved before the change resumes after it, bit-exact). Run by a developer, never
by the tests; the tests need neither git history nor this script.

    python tests/data/make_compat_fixture.py                # a temporary `git worktree` of COMMIT, removed after
    python tests/data/make_compat_fixture.py --old=PATH     # or an existing checkout of COMMIT

It runs COMMIT's own code, in that checkout, with this Python (one thread, offline), exactly:

    cd OLD && python -c "import prepare_data as pd; pd.prepare(['embedded'], 'byte', DATA, max_tokens=16000)"
    cd OLD && python train.py FLAGS --data_dir=DATA --out_dir=RUN

FLAGS (below): test_train.py's TINY shape at half the width and with two layers (so the two checkpoints fit in
~0.7 MB: the 64-wide TINY's are 0.8 and 0.6 MB), its REF schedule (12 steps: warmup 0-1, stable 2-7, decay 8-11)
with the recipe's switch (--muon_at_decay: AdamW to step 7, Muon from step 8), a checkpoint after every step. The
run is one uninterrupted process. What is kept, in tests/data/compat/:

    dataset/            the prepared data (meta.json and the two shards, 32 KB). Shipped, not rebuilt by the
                        tests: the embedded corpus is the running Python's stdlib docstrings and help topics, so it
                        differs between Python versions, and the losses with it. (Not "data/": .gitignore's
                        data/ would hide it; tests/data itself needs `git add -f` or a "!/tests/data/" line there)
    ckpt_0000006.pt     after step 5: stable phase, AdamW moments (optimizer_name "adamw"), before the switch
    ckpt_0000009.pt     after step 8: the first Muon step (optimizer_name "muon"), Muon momenta + AdamW moments
    after_resume.pt     the run's checkpoints after steps 6 and 9 (one step after each fixture) without their
                        weights and optimizer tensors: every other field as saved, and the weights' and
                        optimizer state's structure (names, shapes, dtypes): what a resumed run must save
    old_run.json        the commit, the flags, the machine (torch, CPU) that ran it, the shards' sha256, and the
                        run's whole log.jsonl (the losses, LRs and gradient norms a resume must reproduce)
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import torch

COMMIT = "89ca434"  # the last code before the restructure (issue 17)
FLAGS = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--mlp_hidden=64", "--block_size=32",
         "--batch_size=4", "--total_batch_size=256", "--eval_iters=2", "--sample_len=0", "--log_interval=1000",
         "--max_iters=12", "--warmup_iters=2", "--decay_iters=4", "--eval_interval=3", "--ckpt_interval=1",
         "--keep_ckpts=0", "--muon_at_decay"]
MAX_TOKENS = 16_000  # 5,731 train tokens (the run reads 3,072) and 10,269 val tokens
FIXTURES = (6, 9)  # resumed by the tests; (7, 10): what the run saved one step later


def machine():
    """What decides the last bits of a CPU fp32 run (with one thread); tests/test_compat.py computes the same."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    features = " ".join(sorted((info.get("flags") or info.get("Features") or "").split()))
    return {"torch": torch.__version__, "cpu": info.get("model name") or platform.processor(),
            "cpu_features": hashlib.sha256(features.encode()).hexdigest()[:16],
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "arch": platform.machine()}


def skeleton(obj):
    """Tensors replaced by their dtype and shape (nested dicts / lists / tuples kept)."""
    if isinstance(obj, torch.Tensor):
        return {"dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, dict):
        return {k: skeleton(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(skeleton(v) for v in obj)
    return obj


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make(old, out):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONHASHSEED="0")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=old, capture_output=True, text=True).stdout.strip()
    if not head.startswith(COMMIT):
        sys.exit(f"{old} is at {head or 'no git commit'}, not {COMMIT}")
    with tempfile.TemporaryDirectory() as tmp:
        data, run = os.path.join(tmp, "data"), os.path.join(tmp, "run")
        subprocess.run([sys.executable, "-c", f"import prepare_data as pd; "
                        f"pd.prepare(['embedded'], 'byte', {data!r}, max_tokens={MAX_TOKENS})"],
                       cwd=old, env=env, check=True)
        subprocess.run([sys.executable, "train.py", *FLAGS, f"--data_dir={data}", f"--out_dir={run}"],
                       cwd=old, env=env, check=True)

        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        shutil.copytree(data, os.path.join(out, "dataset"))
        after = {}
        for step in FIXTURES:
            shutil.copy2(os.path.join(run, f"ckpt_{step:07d}.pt"), out)
            ck = torch.load(os.path.join(run, f"ckpt_{step + 1:07d}.pt"), map_location="cpu", weights_only=False)
            after[step + 1] = {k: skeleton(v) if k in ("model", "optimizer") else v for k, v in ck.items()}
        torch.save(after, os.path.join(out, "after_resume.pt"))
        with open(os.path.join(run, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        meta = json.load(open(os.path.join(data, "meta.json")))
        shards = {n: sha256(os.path.join(data, n)) for split in ("train", "val") for n in meta["splits"][split]}
        record = {"commit": head, "flags": FLAGS, "max_tokens": MAX_TOKENS, "python": platform.python_version(),
                  "machine": machine(), "threads": 1, "fixtures": list(FIXTURES), "shards_sha256": shards,
                  "log": log}
        with open(os.path.join(out, "old_run.json"), "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    for root, _, files in sorted(os.walk(out)):
        for name in sorted(files):
            print(f"{os.path.getsize(os.path.join(root, name)):>9,}  {os.path.join(root, name)}")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", help=f"a checkout of {COMMIT} (default: a temporary git worktree of it)")
    p.add_argument("--out", default=os.path.join(here, "compat"))
    args = p.parse_args()
    if args.old:
        return make(os.path.abspath(args.old), args.out)
    repo = os.path.dirname(os.path.dirname(here))
    old = tempfile.mkdtemp(prefix="nanoxmodel-old-")
    os.rmdir(old)
    subprocess.run(["git", "worktree", "add", "--detach", old, COMMIT], cwd=repo, check=True)
    try:
        make(old, args.out)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", old], cwd=repo, check=True)


if __name__ == "__main__":
    main()
