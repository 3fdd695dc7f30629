"""
evaluate.py: score a nanoXmodel the way the paper does (RECIPE.md section 6: lm-evaluation-harness settings).

    python evaluate.py --ckpt=out --tasks=arc_easy,hellaswag --limit=200   # the newest ckpt_*.pt of a run
    python evaluate.py --ckpt=out --tasks=paper          # the paper's tasks the built-in scorer has, paper beside
    python evaluate.py --ckpt=out --val                  # loss, perplexity, bits per byte on the val shards
    python evaluate.py --ckpt=out --tasks=arc_easy --data_dir=evals     # offline, from local jsonl files
    python evaluate.py --init_from=path/to/Xmodel-2.5 --tasks=paper     # a Hugging Face checkpoint (hf.py)
    python evaluate.py --ckpt=out --harness --tasks=paper  # the real harness (pip install lm-eval), all 13 tasks
    python evaluate.py --ckpt=out --prompt="The meaning of" --max_new_tokens=50
    torchrun --standalone --nproc_per_node=8 evaluate.py --ckpt=out --tasks=paper   # each rank scores a share

The built-in scorer does what lm-eval 0.4.13's task yamls do, so its numbers compare with published ones:
  - multiple choice: a choice is the continuation " " + choice of the context, scored by the sum of its tokens'
    log-probabilities (acc: the argmax); acc_norm divides by the choice's length in characters. WinoGrande is
    "partial": the sentence up to the blank, filled with each option, is the context, the rest the continuation.
  - tokens: context + continuation are encoded together and the continuation is what follows len(encode(context));
    trailing spaces of the context move into the continuation. A context starts with the end-of-text token, which
    precedes every training document (the harness's HF path starts with BOS). A row longer than block_size + 1
    loses tokens on the left, never from the continuation.
  - few-shot: one random.Random(1234) per task draws each item's examples, item by item, from the few-shot split;
    where the harness does (and where the pool is the evaluated file) shots + 1 are drawn and the item dropped
    (lambada from the hub too, where the harness keeps it). --limit cuts the evaluated items, never the pool.
    MMLU shows the first 5 dev rows of the item's subject. Examples are "context choice", joined by blank lines.
  - GSM8K: greedy until "Question:" or end-of-text, 256 new tokens at most (half the block_size of a smaller model;
    --max_gen_toks: below block_size, as the harness requires; a prompt keeps its last block_size - max_gen_toks
    tokens, and a cut is reported);
    flexible-extract takes the last number, strict-match the one after "####"; exact match ignores case, commas,
    "$" and a final ".".

Data: the hub via `datasets` (the harness's dataset, config and splits; offline, one line says what to do), or
--data_dir=DIR holding <task>.jsonl (the evaluated split, rows with the hub dataset's fields) and optionally
<task>.fewshot.jsonl (the few-shot pool; without it examples come from <task>.jsonl, never the item itself):
    arc_easy, arc_challenge  {"question": "Which gas do plants take in?", "choices": {"text": ["oxygen",
                "carbon dioxide"], "label": ["A", "B"]}, "answerKey": "B"}         [allenai/ai2_arc test; train]
    piqa        {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0}
                                                                                 [baber/piqa validation; train]
    hellaswag   {"activity_label": "Baking", "ctx_a": "A woman mixes flour.", "ctx_b": "she",
                "endings": ["bakes a cake.", "swims away."], "label": "0"}   [Rowan/hellaswag validation; train]
    winogrande  {"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
                "option2": "the table", "answer": "2"}      [allenai/winogrande winogrande_xl validation; train]
    mmlu        {"question": "2 + 2 =", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
                "answer": 1}                                                          [cais/mmlu all test; dev]
    boolq       {"passage": "Water boils at 100 C at sea level.", "question": "does water boil at 100 c",
                "label": 1}                                          [aps/super_glue boolq validation; train]
    openbookqa  {"question_stem": "Sunlight is", "choices": {"text": ["light", "sound"], "label": ["A", "B"]},
                "answerKey": "A"}                                              [allenai/openbookqa main test; train]
    sciq        {"support": "Plants make sugar.", "question": "What do plants make?", "distractor1": "salt",
                "distractor2": "iron", "distractor3": "oil", "correct_answer": "sugar"}    [allenai/sciq test; train]
    lambada_openai  {"text": "He opened the door and saw his old friend"}       [EleutherAI/lambada_openai test]
    gsm8k       {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\\n#### 5"}
                                                                                    [openai/gsm8k main test; train]
--val reads the token shards of --data_dir when it holds them (meta.json), else (saying so) the val split of the
checkpoint's training data, so one --data_dir of task files serves --tasks=val,arc_easy; a --data_dir that does not
exist is refused.
"""

import argparse
import difflib
import importlib
import json
import math
import os
import random
import re
import sys
import time
from collections import namedtuple
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fp8
import hf
import prepare_data
import cli
from cli import Parser, Range, UserError, flag, run_main, str2bool
from safeio import WriteError, check_output, json_with, write_json


class EvalError(UserError):
    """An evaluation that cannot run as asked (a task file, a checkpoint, a flag that does not fit the model), in one
    line that says what to do."""

# -----------------------------------------------------------------------------
# tasks: one small function per task turns a dataset row into a Doc, as lm-eval 0.4.13's yaml does

# prompts: the context(s); answers: the continuation(s) without their leading " "; an item has
# len(prompts) * len(answers) options and gold indexes them; desc comes before the few-shot examples
Doc = namedtuple("Doc", "prompts answers gold row desc group", defaults=("", None))


def arc(r):
    return Doc([f"Question: {r['question']}\nAnswer:"], r["choices"]["text"],
               r["choices"]["label"].index(r["answerKey"]), r)


def _hellaswag_clean(text):  # the harness's preprocess: WikiHow's "[title]" markers out, double spaces closed
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def hellaswag(r):
    ctx = r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return Doc([_hellaswag_clean(ctx)], [_hellaswag_clean(e) for e in r["endings"]], int(r["label"]), r)


def winogrande(r):  # partial scoring: the options change the context, the rest of the sentence is scored
    i = r["sentence"].index("_")
    return Doc([r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]], [r["sentence"][i + 1:].strip()],
               int(r["answer"]) - 1, r)


def mmlu(r):
    desc = f"The following are multiple choice questions (with answers) about {r['subject'].replace('_', ' ')}.\n\n"
    choices = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", r["choices"], strict=True))  # 4 exactly
    return Doc([f"{r['question'].strip()}{choices}\nAnswer:"], list("ABCD"), int(r["answer"]), r, desc, r["subject"])


def lambada(r):  # (its few-shot examples, unused by the paper, get one space before the word; the harness's two)
    *words, last = r["text"].split(" ")
    return Doc([" ".join(words)], [last], 0, r)


Task = namedtuple("Task", "fmt shots metrics hub split pool sampler fields")
# hub: (dataset, config) as lm-eval loads it; split: the evaluated one; pool: the few-shot split (None: the
# evaluated one); sampler: "random" draws shots, "random+1" shots + 1 and drops the item (what the harness does
# for tasks without a test split), "first_n" the pool's first rows of the item's subject (MMLU).
# shots: RECIPE.md section 6 where it gives them, else the harness's 0.
TASKS = {
    "arc_challenge": Task(arc, 25, ("acc", "acc_norm"), ("allenai/ai2_arc", "ARC-Challenge"), "test", "train",
                          "random", "question, choices.text, choices.label, answerKey"),
    "arc_easy": Task(arc, 25, ("acc", "acc_norm"), ("allenai/ai2_arc", "ARC-Easy"), "test", "train", "random",
                     "question, choices.text, choices.label, answerKey"),
    "piqa": Task(lambda r: Doc([f"Question: {r['goal']}\nAnswer:"], [r["sol1"], r["sol2"]], int(r["label"]), r),
                 0, ("acc", "acc_norm"), ("baber/piqa", None), "validation", "train", "random+1",
                 "goal, sol1, sol2, label"),
    "hellaswag": Task(hellaswag, 10, ("acc", "acc_norm"), ("Rowan/hellaswag", None), "validation", "train",
                      "random+1", "activity_label, ctx_a, ctx_b, endings, label"),
    "winogrande": Task(winogrande, 5, ("acc",), ("allenai/winogrande", "winogrande_xl"), "validation", "train",
                       "random+1", "sentence (with one _), option1, option2, answer"),
    "mmlu": Task(mmlu, 5, ("acc",), ("cais/mmlu", "all"), "test", "dev", "first_n",
                 "question, subject, choices (4), answer"),
    "boolq": Task(lambda r: Doc([f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"], ["no", "yes"],
                                int(r["label"]), r),
                  0, ("acc",), ("aps/super_glue", "boolq"), "validation", "train", "random+1",
                  "passage, question, label"),
    "openbookqa": Task(lambda r: Doc([r["question_stem"]], r["choices"]["text"],
                                     r["choices"]["label"].index(r["answerKey"].lstrip()), r),
                       0, ("acc", "acc_norm"), ("allenai/openbookqa", "main"), "test", "train", "random",
                       "question_stem, choices.text, choices.label, answerKey"),
    "sciq": Task(lambda r: Doc([f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:"],
                               [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3, r),
                 0, ("acc", "acc_norm"), ("allenai/sciq", None), "test", "train", "random",
                 "support, question, distractor1-3, correct_answer"),
    "lambada_openai": Task(lambada, 0, ("acc", "perplexity"), ("EleutherAI/lambada_openai", "default"), "test",
                           None, "random", "text"),
    "gsm8k": Task(lambda r: Doc([f"Question: {r['question']}\nAnswer:"], [r["answer"]], 0, r),
                  5, ("exact_match,flexible-extract", "exact_match,strict-match"), ("openai/gsm8k", "main"), "test",
                  "train", "random", "question, answer (ending in #### N)"),
}
ALIASES = {"lambada": "lambada_openai", "arc_c": "arc_challenge", "arc_e": "arc_easy"}
GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]  # the harness's gsm8k.yaml
GEN_TOKS = 256  # the harness's default max_gen_toks (and gsm8k.yaml's)
# the harness's yaml of each task (under lm_eval/tasks/), to run it on local files (--harness --data_dir)
HARNESS_YAML = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                "boolq": "super_glue/boolq/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
                "sciq": "sciq/sciq.yaml", "lambada_openai": "lambada/lambada_openai.yaml", "gsm8k": "gsm8k/gsm8k.yaml"}

# Xmodel-2.5 in the paper, RECIPE.md section 6: harness task -> (shots, metric, score); 52.49 is the 13-task mean
PAPER_XMODEL_2_5 = {
    "arc_challenge": (25, "acc_norm", 48.89), "arc_easy": (25, "acc_norm", 76.94), "piqa": (0, "acc_norm", 75.95),
    "hellaswag": (10, "acc_norm", 67.24), "winogrande": (5, "acc", 64.64), "bbh": (3, "exact_match", 54.58),
    "mmlu": (5, "acc", 51.81), "gsm8k": (5, "exact_match,flexible-extract", 58.98),
    "minerva_math": (4, "math_verify", 28.94), "humaneval": (0, "pass@1", 28.66), "mbpp": (3, "pass@1", 33.00),
    "cmmlu": (5, "acc_norm", 47.16), "ceval-valid": (5, "acc_norm", 45.54),
}
PAPER_AVERAGE = 52.49


def gsm8k_flexible(text):  # flexible-extract: the last number-like string of the generation
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
    return next(g for g in found[-1] if g).strip() if found else "[invalid]"


def gsm8k_strict(text):  # strict-match: the number after "#### ", the way the training answers end
    m = re.search(r"#### (\-?[0-9\.\,]+)", text)
    return m.group(1).strip() if m else "[invalid]"


def gsm8k_normalize(s):  # the yaml's exact_match: ignore case, commas, "$", all up to "#### ", a final "."
    for pattern in (",", r"\$", r"(?s).*#### ", r"\.$"):
        s = re.sub(pattern, "", s)
    return s.lower()

# -----------------------------------------------------------------------------
# data: local jsonl files or the hub, and the prompts with their few-shot examples


class Row(dict):  # a row as a task reads it: a null field or a list of non-strings is refused where it is read
    def __getitem__(self, key):
        v = super().__getitem__(key)
        if v is None or isinstance(v, list) and not all(isinstance(s, str) for s in v):
            raise TypeError(f"field {key!r} is {'null' if v is None else 'not a list of strings'}")
        return Row(v) if isinstance(v, dict) else v


def to_doc(name, row, where):
    try:
        doc = TASKS[name].fmt(Row(row))
        if not isinstance(doc.answers, list) or not all(isinstance(s, str) for s in doc.prompts + doc.answers):
            raise TypeError("the choices or answer are not strings in a list")
        if not all(a.strip() for a in doc.answers):  # nothing to score: it would count as a free right answer
            raise ValueError("an empty choice, answer or continuation")
        if not 0 <= doc.gold < len(doc.prompts) * len(doc.answers):
            raise ValueError(f"answer {doc.gold} is not one of the {len(doc.prompts) * len(doc.answers)} options")
        return doc
    except KeyError as e:
        raise EvalError(f"{where}: no field {e} ({name} rows need {TASKS[name].fields})") from None
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        raise EvalError(f"{where}: bad {name} row ({e}); rows need {TASKS[name].fields}") from None


def read_jsonl(name, path):
    docs = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise EvalError(f"{path} line {i}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise EvalError(f"{path} line {i}: not a JSON object")
                    docs.append(to_doc(name, row, f"{path} line {i}"))
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read {path} ({prepare_data._first_line(e)}); it should be UTF-8 text, a JSON object "
                        "a line") from None
    if not docs:
        raise EvalError(f"{path} holds no rows")
    return docs


def hub_split(name, split):
    dataset, config = TASKS[name].hub
    offline = prepare_data._go_offline_if_unreachable()  # before datasets is imported: fail fast, no retries
    try:
        import datasets
        rows = datasets.load_dataset(dataset, config, split=split)
    except ImportError:
        raise EvalError("tasks from the hub need the datasets package (pip install datasets), or use "
                        "--data_dir") from None
    except Exception as e:
        if offline:
            raise EvalError(f"{name}: {dataset} is not in the local datasets cache and the Hugging Face hub cannot be "
                            f"reached; put {name}.jsonl in a dir and pass --data_dir=DIR (layout: the docstring of "
                            "evaluate.py)") from None
        raise EvalError(f"{name}: could not load {dataset} {split}: {prepare_data._first_line(e)}") from None
    return [to_doc(name, row, f"{dataset} {split} row {i}") for i, row in enumerate(rows)]


def load_docs(name, data_dir, shots):
    """The evaluated docs and the few-shot pool (None: draw from the evaluated docs themselves)."""
    task = TASKS[name]
    if not data_dir:
        return hub_split(name, task.split), hub_split(name, task.pool) if shots and task.pool else None
    path, pool = os.path.join(data_dir, f"{name}.jsonl"), os.path.join(data_dir, f"{name}.fewshot.jsonl")
    if not os.path.isfile(path):
        raise EvalError(f"no {path}; --data_dir holds <task>.jsonl files (layout: the docstring of evaluate.py)")
    return read_jsonl(name, path), read_jsonl(name, pool) if shots and os.path.isfile(pool) else None


def example(d):  # a solved item, as few-shot examples show it
    return d.prompts[d.gold if len(d.prompts) > 1 else 0] + " " + d.answers[d.gold if len(d.answers) > 1 else 0]


def fewshot_contexts(name, docs, pool, shots, limit=None, seed=1234):
    """The description + few-shot examples of each of the first `limit` docs, drawn from the whole pool (docstring)."""
    rnd, own, out = random.Random(seed), pool is None, []
    pool = docs if own else pool
    for d in docs[:limit]:
        picked = []
        if shots and TASKS[name].sampler == "first_n":
            picked = [p for p in pool if p.group == d.group and p.row != d.row][:shots]
        elif shots:
            extra = own or TASKS[name].sampler == "random+1"
            if shots + extra > len(pool):
                raise EvalError(f"{name}: {shots} few-shot examples asked, the pool has {len(pool)} rows; lower "
                                "--num_fewshot")
            picked = rnd.sample(pool, shots + extra)
            if extra:  # drop the item; if copies of it left too few, draw again from the rest (the harness's rule)
                picked = [p for p in picked if p.row != d.row][:shots]
                picked = picked if len(picked) == shots else rnd.sample([p for p in pool if p.row != d.row], shots)
        if len(picked) < shots:
            raise EvalError(f"{name}: fewer than {shots} few-shot examples for subject {d.group!r}; lower "
                            "--num_fewshot")
        out.append(d.desc + "".join(example(p) + "\n\n" for p in picked))
    return out


def requests_of(name, docs, pool, shots, limit=None):
    """The (context, continuation) strings of every option of each of the first `limit` docs."""
    return [[(pre + p, " " + a) for p in d.prompts for a in d.answers]
            for d, pre in zip(docs, fewshot_contexts(name, docs, pool, shots, limit))]

# -----------------------------------------------------------------------------
# scoring: batched log-likelihoods and KV-cache generation, each rank a share


def gather(env, part):  # {index: result} of every rank
    if env.world == 1:
        return part
    parts = [None] * env.world
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def progress(total, desc, env):
    """(update(n), close()) of a progress bar on rank 0; nothing elsewhere or for a single step."""
    if env.rank != 0 or total < 2:
        return (lambda n: None), (lambda: None)
    bar = prepare_data.progress(total, desc, leave=False)
    return bar.update, bar.close


# PyTorch's default attention kernel on an H100 (cuDNN's, which plans per shape) cost 63 ms a decode step against
# 10 ms for these (nano, batch 8, torch 2.11): evaluation's shapes change with every batch and every new token
ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


Env = namedtuple("Env", "rank world device autocast batch_size model forward tok")


def make_env(model, tok, device, autocast, batch_size, compile=False, rank=0, world=1):
    """What the scorers need: the model (and its compiled forward), tokenizer, device, autocast, batch, rank."""
    return Env(rank, world, device, autocast, batch_size, model,
               torch.compile(model, dynamic=True) if compile else model, tok)


@contextmanager
def inference(env):  # autocast, FP8-converted linears in high precision, attention kernels without plans
    with env.autocast, fp8.disabled(env.model), sdpa_kernel(ATTENTION):
        yield


def encode_pair(tok, context, continuation):
    """(context, continuation) tokens the harness's way: trailing spaces of the context move to the continuation,
    both are encoded together, and the continuation is what follows len(encode(context))."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    if len(whole) <= len(ctx):  # the continuation merged into the context's last token: score from there
        ctx = ctx[:next((i for i, (a, b) in enumerate(zip(ctx, whole)) if a != b), len(whole) - 1)]
    return [tok.eot] + ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(env, pairs, shard=True, desc="scoring"):
    """[(sum of the continuation's log-probs, whether greedy decoding gives it)] of (context, continuation) token
    pairs. A pair is one row, cut on the left to block_size + 1 tokens. Rows run longest first (little padding,
    an out-of-memory shows at once), right-padded, batch_size per forward; pairs with the same row (one-token
    answers like MMLU's " A".." D") share it. shard: this rank runs every world_size-th row."""
    T = env.model.config.block_size
    rows = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not 0 < len(cont) <= T:
            raise EvalError(f"a continuation of {len(cont)} tokens does not fit block_size={T}")
        rows.setdefault(tuple((ctx + cont)[-(T + 1):-1]), []).append(i)
    order = sorted(rows, key=len, reverse=True)
    order = order[env.rank::env.world] if shard else order
    out, (tick, done) = {}, progress(len(order), desc, env)
    for b in range(0, len(order), env.batch_size):
        batch = order[b:b + env.batch_size]
        x = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        which, pos, target, reqs = [], [], [], []  # per scored token: row, position, token; the pairs in order
        for r, row in enumerate(batch):
            x[r, :len(row)] = torch.tensor(row)
            for i in rows[row]:
                cont = pairs[i][1]
                which += [r] * len(cont)
                pos += range(len(row) - len(cont), len(row))  # position p predicts token p + 1
                target += cont
                reqs.append(i)
        with inference(env):
            logits = env.forward(x.to(env.device))[0]
        logp = logits[torch.tensor(which), torch.tensor(pos)].float().log_softmax(-1)  # scored positions only
        target = torch.tensor(target, device=env.device)
        seg = torch.tensor([k for k, i in enumerate(reqs) for _ in pairs[i][1]], device=env.device)
        sums = torch.zeros(len(reqs), dtype=torch.float64, device=env.device).index_add_(
            0, seg, logp.gather(-1, target[:, None])[:, 0].double())
        misses = torch.zeros(len(reqs), device=env.device).index_add_(0, seg, (logp.argmax(-1) != target).float())
        out.update((i, (s, m == 0)) for i, s, m in zip(reqs, sums.tolist(), misses.tolist()))
        tick(len(batch))
    done()
    out = gather(env, out) if shard else out
    return [out[i] for i in range(len(pairs))]


def finish(tok, ids, until):
    """The text of generated ids up to end-of-text or the first stop string, and whether one came."""
    done = tok.eot in ids
    text = tok.decode([t for t in (ids[:ids.index(tok.eot)] if done else ids) if t < tok.vocab_size])
    for s in until:
        done, text = done or s in text, text.split(s)[0]
    return text, done


def check_gen_toks(max_gen_toks, block_size, what="max_gen_toks"):
    """Generation keeps the last block_size - max_gen_toks tokens of a prompt: refuse a value that leaves none (the
    harness refuses it too), naming the largest that works. The refusal ends the script, already as its ErrorExit:
    generate_until is also called from outside main (lm-eval's loop, tests)."""
    if max_gen_toks >= block_size:
        raise cli.fail("evaluate.py", EvalError(
            f"{what}={max_gen_toks} leaves no room for the prompt in this model's block_size={block_size}: the largest "
            f"that works is {block_size - 1} (a prompt keeps its last block_size - max_gen_toks tokens)"))


@torch.no_grad()
def generate_until(env, prompts, until, max_gen_toks=GEN_TOKS, temperature=0.0, shard=True, desc="generating"):
    """Each prompt's continuation (greedy by default) up to the first stop string: prompts cut on the left (and
    said so) to leave max_gen_toks of block_size, longest first, left-padded, batch_size at a time, with the KV
    cache. max_gen_toks >= block_size is refused."""
    tok, T = env.tok, env.model.config.block_size
    check_gen_toks(max_gen_toks, T)
    enc = [[tok.eot] + tok.encode(p) for p in prompts]
    cut = sum(len(e) > T - max_gen_toks for e in enc)
    if cut and env.rank == 0:
        print(f"{desc}: {cut} of {len(enc)} prompts lose tokens on the left to keep {T - max_gen_toks} "
              f"(block_size={T} - max_gen_toks={max_gen_toks})")
    enc = [e[-(T - max_gen_toks):] for e in enc]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    order = order[env.rank::env.world] if shard else order
    out, (tick, done) = {}, progress(len(order), desc, env)
    stop = lambda new: torch.tensor([finish(tok, row, until)[1] for row in new.tolist()])
    for b in range(0, len(order), env.batch_size):
        batch = order[b:b + env.batch_size]
        L = len(enc[batch[0]])
        x = torch.tensor([[tok.eot] * (L - len(enc[i])) + enc[i] for i in batch], device=env.device)
        pad = torch.tensor([L - len(enc[i]) for i in batch], device=env.device)
        with inference(env):
            y = env.model.generate(x, max_gen_toks, temperature=temperature, pad=pad, stop=stop)
        out.update((i, finish(tok, row, until)[0]) for i, row in zip(batch, y[:, L:].tolist()))
        tick(len(batch))
    done()
    out = gather(env, out) if shard else out
    return [out[i] for i in range(len(prompts))]

# -----------------------------------------------------------------------------
# metrics of a task, and the validation loss


def run_task(name, env, args):
    task = TASKS[name]
    shots = task.shots if args.num_fewshot is None else args.num_fewshot
    docs, pool = load_docs(name, args.data_dir, shots)
    reqs = requests_of(name, docs, pool, shots, args.limit)  # examples from the whole file, as lm-eval's limit
    docs = docs[:args.limit]
    scores = {m: [] for m in task.metrics}
    if name == "gsm8k":
        gens = generate_until(env, [r[0][0] for r in reqs], GSM8K_UNTIL, args.max_gen_toks, desc=name)
        for g, d in zip(gens, docs):
            gold = gsm8k_normalize(d.answers[0])
            scores["exact_match,flexible-extract"].append(float(gsm8k_normalize(gsm8k_flexible(g)) == gold))
            scores["exact_match,strict-match"].append(float(gsm8k_normalize(gsm8k_strict(g)) == gold))
    else:
        flat = iter(loglikelihoods(env, [encode_pair(env.tok, c, a) for r in reqs for c, a in r], desc=name))
        for d, r in zip(docs, reqs):
            lls, greedy = zip(*[next(flat) for _ in r])
            argmax = lambda key: max(range(len(lls)), key=key)  # the first of equal scores, as numpy's argmax
            if name == "lambada_openai":  # one option: the last word
                scores["acc"].append(float(greedy[0]))
                scores["perplexity"].append(lls[0])
                continue
            scores["acc"].append(float(argmax(lambda j: lls[j]) == d.gold))
            if "acc_norm" in scores:
                scores["acc_norm"].append(float(argmax(lambda j: lls[j] / len(d.answers[j])) == d.gold))
    n = len(docs)
    mean = {m: sum(v) / n for m, v in scores.items()}
    return dict(shots=shots, n=n, metrics={m: math.exp(-v) if m == "perplexity" else v for m, v in mean.items()},
                stderr={m: math.sqrt(sum((x - mean[m]) ** 2 for x in v) / (n - 1) / n) if n > 1 else 0.0
                        for m, v in scores.items() if m != "perplexity"})  # the harness's: sample std / sqrt(n)


def text_bytes(tok, ids):
    """UTF-8 bytes of the text token ids decode to, document by document (end-of-text separates documents and is
    no text): decoding token by token would split multi-byte characters."""
    cuts = [-1] + [j for j, t in enumerate(ids) if t == tok.eot] + [len(ids)]
    return sum(len(tok.decode(ids[a + 1:b]).encode("utf-8")) for a, b in zip(cuts, cuts[1:]) if b > a + 1)


@torch.no_grad()
def validation(env, args, data_dir):
    """Loss (nats per token), perplexity and bits per byte on the first --val_tokens of the val shards: bits per
    byte = total nats / (ln 2 * UTF-8 bytes of the scored targets' text), comparable across tokenizers."""
    meta = prepare_data.read_meta(data_dir)
    if meta["tokenizer"] != env.tok.name:
        raise EvalError(f"{data_dir} is tokenized with {meta['tokenizer']}, the model with {env.tok.name}; pass "
                        "--data_dir")
    B, T = args.val_batch_size, env.model.config.block_size
    loader = prepare_data.TokenLoader(data_dir, "val", env.rank, env.world)
    loader.check_fits(B, T)
    step = B * T * env.world  # tokens a step scores, reading step + 1 of one shard
    fit = sum((len(s) - 1) // step for s in loader.shards)  # more steps would wrap around and score tokens twice
    if args.val_tokens // step > fit and env.rank == 0:
        print(f"val: the split has {meta['tokens']['val']:,} tokens, fewer than --val_tokens; scoring {fit * step:,}")
    steps = min(max(1, args.val_tokens // step), fit)
    nats, targets = torch.zeros((), dtype=torch.float64, device=env.device), []
    tick, done = progress(steps, "val", env)
    for _ in range(steps):
        x, y = loader.next_batch(B, T)
        with inference(env):
            logits = env.forward(x.to(env.device))[0]
        nats += F.cross_entropy(logits.float().flatten(0, 1), y.to(env.device).flatten(), reduction="sum").double()
        targets += y.flatten().tolist()
        tick(1)
    done()
    totals = torch.tensor([nats.item(), len(targets), text_bytes(env.tok, targets)], dtype=torch.float64,
                          device=env.device)
    if env.world > 1:
        dist.all_reduce(totals)
    nats, tokens, nbytes = totals.tolist()
    return dict(shots=0, n=int(tokens), metrics={"loss": nats / tokens, "perplexity": math.exp(nats / tokens),
                                                 "bits_per_byte": nats / (math.log(2) * nbytes)}, stderr={})

# -----------------------------------------------------------------------------
# lm-evaluation-harness itself: this model as its LM, and its own task configs on local files


def harness_model(env, max_gen_toks=GEN_TOKS):
    """nanoXmodel as an lm-evaluation-harness LM: the built-in scorer and KV-cache generation behind its three
    request types (the harness shares items out across ranks itself)."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class NanoXmodelLM(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return loglikelihoods(env, [encode_pair(env.tok, *r.args) for r in requests], shard=False)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            pairs, owner, out = [], [], [0.0] * len(requests)
            for i, r in enumerate(requests):
                windows = get_rolling_token_windows(env.tok.encode(r.args[0]), env.tok.eot,
                                                    env.model.config.block_size, 1)
                pairs += map(make_disjoint_window, windows)
                owner += [i] * (len(pairs) - len(owner))
            for i, (ll, _) in zip(owner, loglikelihoods(env, pairs, shard=False)):
                out[i] += ll
            return out

        def generate_until(self, requests, disable_tqdm=False):
            out, groups = [None] * len(requests), {}
            for i, r in enumerate(requests):  # one batched run per distinct generation setting
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
            for key, idx in groups.items():
                kw = json.loads(key)
                until = [kw["until"]] if isinstance(kw.get("until"), str) else kw.get("until") or []
                n = kw.get("max_gen_toks", max_gen_toks)  # the task's own, else --max_gen_toks
                check_gen_toks(n, env.model.config.block_size, "the task's max_gen_toks" if "max_gen_toks" in kw
                               else "--max_gen_toks")
                texts = generate_until(env, [requests[i].args[0] for i in idx], until, n,
                                       kw.get("temperature", 1.0) if kw.get("do_sample") else 0.0, shard=False)
                for i, t in zip(idx, texts):
                    out[i] = t
            return out

        def all_gather(self, tensor):
            parts = [torch.zeros_like(tensor) for _ in range(env.world)]
            dist.all_gather(parts, tensor)
            return torch.cat([p.reshape(-1) for p in parts])

        def gather_object(self, obj, dst=0):
            parts = [None] * env.world
            dist.all_gather_object(parts, obj)
            return parts

        def barrier(self):
            dist.barrier()

        @property
        def device(self):  # where the harness puts its per-rank request counts before all_gather
            return env.device

    lm = NanoXmodelLM()
    lm._rank, lm._world_size = env.rank, env.world
    return lm


def harness_task_config(name, data_dir):
    """The harness's own yaml of a task, reading DIR/<task>.jsonl (and .fewshot.jsonl) instead of the hub, with its
    split rules kept: which split the examples come from, whether the item is dropped."""
    import lm_eval.tasks
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        raise EvalError("--harness with --data_dir needs lm-eval >= 0.4.10: pip install -U lm-eval") from None
    if name not in HARNESS_YAML:
        raise EvalError(f"--harness with --data_dir runs {', '.join(HARNESS_YAML)}; {name} only from the hub")
    cfg, task = load_yaml(os.path.join(os.path.dirname(lm_eval.tasks.__file__), HARNESS_YAML[name])), TASKS[name]
    path, pool = os.path.join(data_dir, f"{name}.jsonl"), os.path.join(data_dir, f"{name}.fewshot.jsonl")
    if not os.path.isfile(path):
        raise EvalError(f"no {path}; --data_dir holds <task>.jsonl files (layout: the docstring of evaluate.py)")
    splits = {k: cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")}
    if os.path.isfile(pool):
        files = {task.split: path, task.pool or "train": pool}
        splits = {k: v if v in files else None for k, v in splits.items()}
        splits["fewshot_split"] = splits["fewshot_split"] or (None if splits["training_split"] else "train")
    else:  # examples from the task file itself: few-shot split == test split makes the harness drop the item
        files, splits = {"test": path}, dict(training_split=None, validation_split=None, test_split="test",
                                             fewshot_split="test")
    return {**cfg, "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}, **splits}


@contextmanager
def hf_evaluate_package():
    """lm-eval's code tasks (humaneval) `import evaluate`, Hugging Face's package, which this file's name shadows:
    while the harness runs, the name is theirs."""
    mine, path, here = sys.modules.pop("evaluate", None), sys.path[:], os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in path if os.path.abspath(p or os.curdir) != here]
    try:
        importlib.import_module("evaluate")  # theirs, where installed
    except ImportError:
        pass
    finally:
        sys.path[:] = path
    try:
        yield
    finally:
        sys.modules.pop("evaluate", None)
        if mine is not None:
            sys.modules["evaluate"] = mine


def run_harness(env, args, names):
    offline = not args.data_dir and prepare_data._go_offline_if_unreachable()  # before datasets is imported
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("--harness needs lm-evaluation-harness: pip install lm-eval") from None
    manager, lm, results = TaskManager(include_defaults=not args.data_dir), harness_model(env, args.max_gen_toks), {}
    for name in [] if args.data_dir else names:  # every task checked before any runs
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=1)
            raise EvalError(f"lm-eval has no task {name!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    tasks = [harness_task_config(name, args.data_dir) for name in names] if args.data_dir else names
    for name, task in zip(names, tasks):
        shots = args.num_fewshot  # else ours (RECIPE.md section 6), else the paper's, else the task's own
        if shots is None:
            shots = TASKS[name].shots if name in TASKS else PAPER_XMODEL_2_5.get(name, (None,))[0]
        try:
            with hf_evaluate_package():
                out = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, limit=args.limit,
                                              task_manager=manager,
                                              confirm_run_unsafe_code=args.confirm_run_unsafe_code)
        except OSError as e:  # datasets' ConnectionError and DatasetNotFoundError are OSErrors
            raise EvalError(f"--harness {name}: " + (
                "not in the local datasets cache, and the hub cannot be reached; put "
                f"{name}.jsonl in a dir and pass --data_dir=DIR" if offline else prepare_data._first_line(e))) from None
        if env.rank == 0:
            res = {k.replace(",none", ""): v for k, v in out["results"][name].items()
                   if "," in k and isinstance(v, (int, float))}
            results[name] = dict(shots=shots, n=out.get("n-samples", {}).get(name, {}).get("effective"),
                                 metrics={k: v for k, v in res.items() if "_stderr" not in k},
                                 stderr={k.replace("_stderr", ""): v for k, v in res.items() if "_stderr" in k},
                                 harness=f"lm-eval {lm_eval.__version__}")
    return results

# -----------------------------------------------------------------------------
# the model, the results table, the command line


def load_model(args, device):
    """(model, tokenizer, where): a train.py run dir or checkpoint, or a Hugging Face checkpoint via hf.py."""
    if args.init_from:
        try:
            model, spec = hf.load_pretrained(args.init_from, device="cpu", dtype=None)
        except (ImportError, OSError, ValueError) as e:  # OSError covers ConnectionError and FileNotFoundError
            raise EvalError(f"--init_from={args.init_from}: {e}") from None
        name, where = args.tokenizer or spec, args.init_from
        if not name:
            raise EvalError(f"{args.init_from} has no tokenizer.json; name one with --tokenizer=")
    else:
        where = args.ckpt or "out"
        if not os.path.exists(where):
            raise EvalError(f"no checkpoint at {where}; pass --ckpt=OUT_DIR or --ckpt=PATH/ckpt_N.pt, or "
                            "--init_from=HF_DIR")
        try:
            model, name, run_args = hf.load_checkpoint(where)
        except (OSError, ValueError) as e:
            raise EvalError(f"{e}; train one with train.py, or pass --ckpt=PATH/ckpt_N.pt") from None
        name, args.ckpt_data_dir = args.tokenizer or name, run_args.get("data_dir")
    if not all(p.isfinite().all() for p in model.parameters()):  # every score would be NaN
        raise EvalError(f"{where} holds weights that are not finite (NaN or inf); evaluate an earlier checkpoint "
                        f"(--ckpt=PATH/ckpt_N.pt)")
    tok = prepare_data.get_tokenizer(name)
    if tok.vocab_size > model.config.vocab_size:  # its ids would index past the embedding
        raise EvalError(f"tokenizer {tok.name} has {tok.vocab_size:,} tokens, more than the model's "
                        f"{model.config.vocab_size:,}: not the model's tokenizer; drop --tokenizer or pass the one it "
                        "was trained with")
    return model.to(device).eval(), tok, where


def print_results(results):
    print(f"{'task':<16} {'shots':>5}  {'metric':<29} {'score':>8} {'stderr':>7} {'n':>8} {'paper':>7}")
    for name, r in results.items():
        paper = PAPER_XMODEL_2_5.get(name, (None, "-", None))
        for metric, value in r["metrics"].items():
            pct = metric not in ("loss", "perplexity", "bits_per_byte")
            beside = paper[2] if paper[0] == r["shots"] and (metric + ",").startswith(paper[1] + ",") else None
            se = r["stderr"].get(metric)
            print(f"{name:<16} {r['shots'] if name != 'val' else '':>5}  {metric:<29} "
                  f"{value * 100 if pct else value:>8.{2 if pct else 4}f} {f'{se * 100:.2f}' if pct and se else '':>7} "
                  f"{r['n'] or '':>8} {f'{beside:.2f}' if beside is not None else '':>7}")
    if any(name in PAPER_XMODEL_2_5 for name in results):
        print(f"paper: Xmodel-2.5's score where shots and metric match (RECIPE.md section 6; {PAPER_AVERAGE} is its "
              f"mean over 13 tasks); scores in %")


def resolve_tasks(args):
    names, out = [t.strip() for t in (args.tasks or ("" if args.val else "paper")).split(",") if t.strip()], []
    for n in map(lambda t: ALIASES.get(t, t), names):
        if n == "paper":
            out += [t for t in PAPER_XMODEL_2_5 if args.harness or t in TASKS]
        elif n == "all":
            out += list(TASKS)
        elif n in TASKS or n == "val" or args.harness:
            out.append(n)
        else:
            close = difflib.get_close_matches(n, list(TASKS) + list(ALIASES) + ["val", "paper", "all"], n=1)
            raise EvalError(f"unknown task {n!r}" + (f" (did you mean {close[0]}?)" if close else "")
                            + f"; tasks: {', '.join(TASKS)}, val, paper, all")
    return list(dict.fromkeys((["val"] if args.val else []) + out))


def get_parser():
    p = Parser(prog="evaluate.py", description=__doc__.split("\n")[1], epilog="Conventions and the local data "
               "layout: the docstring of evaluate.py.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    switch = dict(type=str2bool, nargs="?", const=True, default=False)
    g = p.add_argument_group("model")
    flag(g, "ckpt", default=None, help="a train.py --out_dir (its newest checkpoint) or a ckpt_*.pt; default out")
    flag(g, "init_from", default=None, help="a Hugging Face checkpoint dir or hub id instead (hf.py)")
    flag(g, "tokenizer", default=None, help="override the checkpoint's tokenizer (a prepare_data.py name)")
    g = p.add_argument_group("tasks")
    flag(g, "tasks", default=None, help=f"comma-separated, of {', '.join(TASKS)}, val, paper (the paper's), all; "
         "with --harness any lm-eval task; default paper")
    flag(g, "val", **switch, help="validation loss, perplexity and bits per byte")
    flag(g, "num_fewshot", type=int, default=None, range=Range(0),
         help="shots for every task; default per task (RECIPE.md 6)")
    flag(g, "limit", type=int, default=None, range=Range(1), help="the first N items of each task (MMLU: of all "
         "subjects)")
    flag(g, "data_dir", default=None, help="<task>.jsonl files instead of the hub; for --val its token shards if it "
         "has them (meta.json), else the checkpoint's training data")
    flag(g, "val_tokens", type=int, default=1 << 20, range=Range(1), help="tokens of the val split to score")
    flag(g, "val_batch_size", type=int, default=4, range=Range(1), help="rows of block_size tokens per forward for "
         "--val")
    flag(g, "max_gen_toks", type=int, default=None, range=Range(1), help="new tokens at most per generation "
         "(GSM8K; --harness: tasks that set none); below block_size, whose rest holds the prompt; default 256, or "
         "half the block_size of a model with fewer than 512 positions")
    flag(g, "harness", **switch, help="run lm-evaluation-harness itself on this model (pip install lm-eval)")
    flag(g, "confirm_run_unsafe_code", **switch, help="--harness: let lm-eval run model-written code (humaneval, mbpp)")
    g = p.add_argument_group("system")
    flag(g, "device", default="auto", help="auto, cpu, cuda, cuda:N")
    flag(g, "dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto: bf16 autocast on GPU")
    flag(g, "batch_size", type=int, default=16, range=Range(1),
         help="rows per forward when scoring, prompts per generation batch")
    flag(g, "compile", **switch, help="torch.compile the scorer's forward (generation stays eager)")
    flag(g, "out", default=None, help="results JSON; default <checkpoint>_eval.json or ./results.json")
    g = p.add_argument_group("sampling (--prompt)")
    flag(g, "prompt", default=None, help="print a continuation of this text instead of evaluating")
    flag(g, "max_new_tokens", type=int, default=200, range=Range(1))
    flag(g, "temperature", type=float, default=0.8, range=Range(0), help="0 = greedy")
    flag(g, "top_k", type=int, default=50, range=Range(1))
    flag(g, "seed", type=int, default=1337)
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)  # flags out of their range: one line here
    return run_main("evaluate.py", evaluate, args)


def evaluate(args):
    names = resolve_tasks(args)
    if args.data_dir and not os.path.isdir(args.data_dir):  # else --val would score other data without a word
        raise EvalError(f"--data_dir={args.data_dir}: no such directory (it holds <task>.jsonl files or "
                        "prepare_data.py's token shards)")
    run = cli.launch(args.device)  # under torchrun: this rank's device, and the process group
    device, rank, world = run.device, run.rank, run.world_size
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    args.ckpt_data_dir = None
    model, tok, where = load_model(args, device)
    env = make_env(model, tok, device, autocast, args.batch_size, args.compile, rank, world)
    if rank == 0:
        print(f"model: {where}, {model.num_params() / 1e6:.1f}M params, tokenizer {tok.name}, {device}, "
              f"{'bf16 autocast' if bf16 else 'fp32'}")
    if args.prompt is not None:
        torch.manual_seed(args.seed)
        idx = torch.tensor([[tok.eot] + tok.encode(args.prompt)], device=device)
        with inference(env):
            out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k)[0, idx.size(1):].tolist()
        print(args.prompt + finish(tok, out, [])[0])
        return cli.finish(run)
    T = model.config.block_size
    if args.max_gen_toks is None:  # the harness's 256, unless that would crowd out the prompt of a small model
        args.max_gen_toks = min(GEN_TOKS, T // 2)
        if args.max_gen_toks < GEN_TOKS and "gsm8k" in names and rank == 0:
            print(f"gsm8k: {args.max_gen_toks} new tokens at most (half of block_size={T}; --max_gen_toks to set)")
    if "gsm8k" in names or args.harness and any(n not in TASKS for n in names):  # generation: before any scoring
        check_gen_toks(args.max_gen_toks, T, "--max_gen_toks")
    out = args.out or (os.path.splitext(where)[0] + "_eval.json" if where.endswith(".pt") else "results.json")
    # before evaluating, so that a bad --out costs no run; it replaces an earlier results file (its keys), nothing else
    check_output(out, "--out", "results", json_with("model", "tokenizer", "results"), "results.json")
    results = {}
    if "val" in names:  # --data_dir's shards where it has them, else the checkpoint's training data (docstring)
        own = args.data_dir and os.path.isfile(os.path.join(args.data_dir, "meta.json"))
        shards = args.data_dir if own else args.ckpt_data_dir or prepare_data.DEFAULT_DATA_DIR
        if not os.path.isfile(os.path.join(shards, "meta.json")):  # e.g. a relative training path, run elsewhere
            tried = " or ".join(dict.fromkeys(filter(None, (args.data_dir, shards))))
            raise EvalError(f"--val: no token shards (meta.json) in {tried}; "
                            "pass --data_dir=<the dir prepare_data.py wrote>")
        if args.data_dir and not own and rank == 0:
            print(f"val: {args.data_dir} has no token shards (meta.json); scoring the val split of the checkpoint's "
                  f"training data, {shards}")
        results["val"] = validation(env, args, shards)
    names = [n for n in names if n != "val"]
    results.update(run_harness(env, args, names) if args.harness else {})
    for name in [] if args.harness else names:
        t0 = time.time()
        results[name] = {**run_task(name, env, args), "seconds": round(time.time() - t0, 1)}
    if rank == 0:
        print_results(results)
        paper = {k: dict(zip(("shots", "metric", "score"), v)) for k, v in PAPER_XMODEL_2_5.items() if k in results}
        try:
            write_json(out, dict(model=where, tokenizer=tok.name, results=results, paper_xmodel_2_5=paper,
                                 args=vars(args)), indent=1)
        except WriteError as e:
            raise WriteError(f"{e}; the scores are in the table above") from None
        print(f"wrote {out}")
    cli.finish(run)
    return results


if __name__ == "__main__":
    main()
