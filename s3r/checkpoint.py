"""Reading fairseq, Hugging Face and s3r checkpoints into `Wav2Vec2ForCTC`, and writing s3r's own.

fairseq stores `{"cfg" | "args", "model": state_dict}`; the names it uses come from
`fairseq/models/wav2vec/wav2vec2.py` (pretraining), `wav2vec2_asr.py` (CTC finetuning: `w2v_encoder.w2v_model.*`
plus `w2v_encoder.proj`), `examples/data2vec/models/data2vec_audio.py` and `models/hubert/hubert.py`. Hugging Face
stores `config.json` + `model.safetensors` (or `pytorch_model.bin`) under the names our modules already use, behind
a `wav2vec2.` / `data2vec_audio.` / `hubert.` prefix. Every key is mapped by the small tables below; a key that no
rule knows is an error that names it, and pretraining-only heads are dropped by an explicit list.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import pickle
import re
import tempfile
import types
import zipfile
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

from .classify import new_model, with_head
from .config import RouteConfig, Wav2Vec2Config
from .errors import ConfigError, S3RError
from .model import Routable, Wav2Vec2ForCTC
from .route_format import ROUTE_FORMAT, check_route, describe, install_route
from .text import Vocabulary


class CheckpointError(S3RError):
    """A checkpoint that cannot be read: unreadable file, unknown format, key, class or architecture."""


# ----------------------------------------------------------------------------------------------------------------
# Safe unpickling


def _allowed_globals() -> list:
    """The harmless classes fairseq checkpoints pickle besides tensors and plain containers."""
    allowed = [argparse.Namespace, np.dtype, type(np.dtype("float64")), type(np.dtype("int64")),
               type(np.dtype("float32"))]
    return allowed + [np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar]


class _Stub:
    """Stands in for a pickled class whose module is not installed (fairseq's Dictionary, say)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    """An unpickler that stubs out classes whose module is missing instead of failing (trusted files only)."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": module})


_lenient_pickle = types.SimpleNamespace(Unpickler=_LenientUnpickler, load=pickle.load, __name__="pickle")


def _intact_zip(path: Path) -> bool:
    """A complete zip archive whose every member passes its CRC check (torch.save's format)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def unreadable(path: Path, kind: str = "PyTorch") -> str:
    """What is wrong with a file that torch.load (or safetensors) could not read, in a few words."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or kind != "PyTorch":
        # torch.save's zip archive, torch's legacy pickle format, or a safetensors header: cut short or damaged
        return f"truncated or corrupt ({size:,} bytes)"
    text = head.split(b"\n")[0].decode("utf-8", "replace")
    if head.isascii() and text.isprintable():
        return f"not a {kind} file but text ({size:,} bytes, beginning {text[:40]!r})"
    return f"not a {kind} file ({size:,} bytes, beginning {head[:8]!r})"


def torch_load(path: str | Path, trust_checkpoint: bool = False) -> object:
    """torch.load with weights_only=True and an allow-list; `trust_checkpoint` lifts it (arbitrary code can run).

    A file torch cannot read is a one-line CheckpointError saying what it is (text, empty, truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" if not path.is_dir() else
                              f"{path} is a directory without config.json, not a checkpoint file")
    try:
        if trust_checkpoint:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises anything from KeyError to RuntimeError on a damaged file
        if isinstance(e, pickle.UnpicklingError) and not trust_checkpoint and _intact_zip(path):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the weights_only allow-list refused a class
            what = f"class {found.group(1)}" if found else "an object"
            raise CheckpointError(f"{path} pickles {what} that s3r does not unpickle by default; pass "
                                  f"--trust-checkpoint (trust_checkpoint=True) if you trust this file") from None
        raise CheckpointError(f"cannot read {path}: {unreadable(path)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Config names

# Every Wav2Vec2Config field (config.py says what each does) -> (its fairseq name, its Hugging Face name); None where
# that side has no such field. config_from_fairseq and config_from_hf below read them.
CONFIG_NAMES: dict[str, tuple[str | None, str | None]] = {
    "conv_dim": ("conv_feature_layers[i][0]", "conv_dim"),
    "conv_kernel": ("conv_feature_layers[i][1]", "conv_kernel"),
    "conv_stride": ("conv_feature_layers[i][2]", "conv_stride"),
    "conv_bias": ("conv_bias", "conv_bias"),
    "feat_extract_norm": ("extractor_mode (default | layer_norm)", "feat_extract_norm (group | layer)"),
    "hidden_size": ("encoder_embed_dim", "hidden_size"),
    "num_hidden_layers": ("encoder_layers", "num_hidden_layers"),
    "num_attention_heads": ("encoder_attention_heads", "num_attention_heads"),
    "intermediate_size": ("encoder_ffn_embed_dim", "intermediate_size"),
    "hidden_act": ("activation_fn", "hidden_act"),
    "layer_norm_first": ("layer_norm_first", "do_stable_layer_norm"),
    "layer_norm_eps": (None, "layer_norm_eps"),  # fairseq: torch's default, 1e-5
    "feat_proj_layer_norm": (None, "HubertConfig.feat_proj_layer_norm"),  # fairseq wav2vec 2.0: always on
    "conv_pos_kernel": ("conv_pos (data2vec: max(3, conv_pos // pos_conv_depth))",
                        "num_conv_pos_embeddings (data2vec: conv_pos_kernel_size)"),
    "conv_pos_groups": ("conv_pos_groups", "num_conv_pos_embedding_groups"),
    "conv_pos_depth": ("pos_conv_depth", "data2vec: num_conv_pos_embeddings"),
    "vocab_size": ("the CTC head's output size", "vocab_size"),
    "normalize": ("task.normalize", "do_normalize (feature extractor)"),
    "blank_weight": ("Wav2Vec2CtcConfig.blank_weight", None),
    "blank_mode": ("Wav2Vec2CtcConfig.blank_mode", None),
    "hidden_dropout": ("dropout", "hidden_dropout"),
    "attention_dropout": ("attention_dropout", "attention_dropout"),
    "activation_dropout": ("activation_dropout", "activation_dropout"),
    "feat_proj_dropout": ("dropout_input", "feat_proj_dropout"),
    "final_dropout": ("final_dropout", "final_dropout"),
    "layerdrop": ("layerdrop (pretraining: encoder_layerdrop)", "layerdrop"),
    "apply_spec_augment": ("apply_mask", "apply_spec_augment"),
    "mask_time_prob": ("mask_prob", "mask_time_prob"),
    "mask_time_length": ("mask_length", "mask_time_length"),
    "mask_feature_prob": ("mask_channel_prob", "mask_feature_prob"),
    "mask_feature_length": ("mask_channel_length", "mask_feature_length"),
    "gradient_checkpointing": ("checkpoint_activations", "model.gradient_checkpointing_enable()"),
    "intermediate_sizes": (None, None),  # s3r/compact.py's per-layer sizes
    "num_heads_per_layer": (None, None),
    "labels": (None, "id2label"),  # utterance classification (s3r/classify.py)
    "classifier_proj_size": (None, "classifier_proj_size"),
    "use_weighted_layer_sum": (None, "use_weighted_layer_sum"),
}


# ----------------------------------------------------------------------------------------------------------------
# fairseq


_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
              feat_extract_norm="layer", conv_bias=True, layer_norm_first=True, normalize=True)
ARCHITECTURES = {"base": {}, "hubert-base": {}, "large": _LARGE, "xlsr": _LARGE,  # xlsr: 300M, large's shape
                 "data2vec-base": dict(feat_extract_norm="layer", conv_pos_kernel=19, conv_pos_depth=5, normalize=True)}


def architecture(name: str, **overrides) -> Wav2Vec2Config:
    """The config of a published architecture: base, large (lv60), xlsr, data2vec-base, hubert-base."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    return Wav2Vec2Config(**{**ARCHITECTURES[name], **overrides})


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's `conv_feature_layers` string ("[(512,10,5)] + [(512,3,2)] * 4 ...") without `eval`."""

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise CheckpointError(f"unsupported conv_feature_layers expression: {spec!r}")

    try:
        layers = value(ast.parse(spec, mode="eval").body)
    except SyntaxError:
        raise CheckpointError(f"unparsable conv_feature_layers: {spec!r}") from None
    if not (isinstance(layers, list) and all(isinstance(t, tuple) and len(t) == 3 for t in layers)):
        raise CheckpointError(f"conv_feature_layers must be a list of (dim, kernel, stride): {spec!r}")
    return layers


FAIRSEQ_DEFAULT_CONV = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"


def config_from_fairseq(model_cfg: dict, task_cfg: dict | None = None, head_cfg: dict | None = None,
                        source: str = "fairseq config") -> Wav2Vec2Config:
    """Our config from a fairseq encoder config (`cfg.model`, or `cfg.model.w2v_args.model` for CTC checkpoints)
    and, for CTC checkpoints, the finetuning config `head_cfg` (`cfg.model`: regularisation, blank_weight/mode)."""
    m = dict(model_cfg)
    get = m.get
    layer_type = get("layer_type") or "transformer"
    if layer_type != "transformer":  # conformer, or trf_adp: MMS's transformer layers with adapters
        mms = " (an MMS adapter model)" if layer_type == "trf_adp" else ""
        raise CheckpointError(f"{source}: unsupported fairseq option layer_type={layer_type!r}{mms}; s3r reads "
                              f"'transformer'")
    conv = parse_conv_layers(get("conv_feature_layers") or FAIRSEQ_DEFAULT_CONV)
    depth = int(get("pos_conv_depth", 1) or 1)
    conv_pos = int(get("conv_pos", 128))
    head = dict(head_cfg or {})  # the CTC finetuning config overrides the encoder's regularisation

    def pick(key: str, default: object) -> object:
        return head[key] if head.get(key) is not None else get(key, default)

    return Wav2Vec2Config(
        conv_dim=tuple(t[0] for t in conv), conv_kernel=tuple(t[1] for t in conv),
        conv_stride=tuple(t[2] for t in conv),
        conv_bias=bool(get("conv_bias", False)),
        feat_extract_norm="layer" if get("extractor_mode", "default") == "layer_norm" else "group",
        hidden_size=int(get("encoder_embed_dim", 768)), num_hidden_layers=int(get("encoder_layers", 12)),
        num_attention_heads=int(get("encoder_attention_heads", 12)),
        intermediate_size=int(get("encoder_ffn_embed_dim", 3072)),
        hidden_act=str(get("activation_fn", "gelu")), layer_norm_first=bool(get("layer_norm_first", False)),
        conv_pos_kernel=conv_pos if depth == 1 else max(3, conv_pos // depth),
        conv_pos_groups=int(get("conv_pos_groups", 16)), conv_pos_depth=depth,
        normalize=bool((task_cfg or {}).get("normalize", False)),
        hidden_dropout=float(pick("dropout", 0.1)), attention_dropout=float(pick("attention_dropout", 0.1)),
        activation_dropout=float(pick("activation_dropout", 0.0)),
        feat_proj_dropout=float(pick("dropout_input", 0.0)),
        final_dropout=float(head.get("final_dropout", 0.0) or 0.0),
        layerdrop=float(head.get("layerdrop", get("encoder_layerdrop", 0.0)) or 0.0),
        mask_time_prob=float(pick("mask_prob", 0.0)), mask_time_length=int(pick("mask_length", 10)),
        mask_feature_prob=float(pick("mask_channel_prob", 0.0)),
        mask_feature_length=int(pick("mask_channel_length", 64)),
        # Wav2Vec2CtcConfig: fairseq's CTC decoding adds blank_weight to the blank logit ("add") or sets it ("set")
        blank_weight=float(head.get("blank_weight", 0.0) or 0.0), blank_mode=str(head.get("blank_mode") or "add"),
    )


# (pattern, replacement) applied with re.fullmatch, first match wins.
FAIRSEQ_KEYS = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias|scores)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias|scores)", r"feature_projection.projection.\1"),
    (r"mask_emb", r"masked_spec_embed"),
    (r"encoder\.pos_conv\.0\.(weight_g|weight_v|bias|scores)", r"encoder.pos_conv_embed.conv.\1"),
    (r"encoder\.pos_conv\.0\.parametrizations\.weight\.original0", r"encoder.pos_conv_embed.conv.weight_g"),
    (r"encoder\.pos_conv\.0\.parametrizations\.weight\.original1", r"encoder.pos_conv_embed.conv.weight_v"),
    (r"encoder\.pos_conv\.(\d+)\.0\.(weight|bias|scores)", r"encoder.pos_conv_embed.layers.\1.conv.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(\w+_proj)\.(weight|bias|scores)", r"encoder.layers.\1.attention.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias|scores)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias|scores)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"proj\.(weight|bias)", r"lm_head.\1"),  # w2v_encoder.proj, once the w2v_encoder. prefix is gone
]
# Pretraining-only parts (quantizer, contrastive/regression heads, the data2vec EMA teacher) that finetuning drops.
FAIRSEQ_DROPPED = re.compile(r"(quantizer\.|project_q\.|final_proj\.|label_embs_concat|target_glu\.|ema\.|_ema|"
                             r"project_inp\.|decoder\.|encoder\.version)")


def _rename(state: dict, rules: list[tuple[str, str]], dropped: re.Pattern, model: Wav2Vec2ForCTC,
            source: str) -> dict:
    """Apply rename rules; refuse any key that maps to nothing in `model` (all keys of `model` may stay absent)."""
    ours = set(model.state_dict()) | {f"{n}.scores" for n, m in model.named_modules() if isinstance(m, Routable)}
    out = {}
    for key, tensor in state.items():
        if dropped.match(key):
            continue
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                new = re.sub(f"^{pattern}$", repl, key)
                break
        else:
            new = key
        if new not in ours:
            raise CheckpointError(f"{source}: unknown checkpoint key {key!r}")
        out[new] = tensor
    return out


def _as_dict(obj: object) -> dict:
    if obj is None:
        return {}
    return vars(obj) if isinstance(obj, argparse.Namespace) else dict(obj)


def _fairseq_configs(ckpt: dict, path: Path) -> tuple[dict, dict, dict, dict]:
    """(encoder model cfg, task cfg, CTC/head model cfg or {}, router cfg) from the `cfg` or old `args` style."""
    if ckpt.get("cfg") is not None:
        cfg = _as_dict(ckpt["cfg"])
        model, task = _as_dict(cfg.get("model")), _as_dict(cfg.get("task"))
    elif ckpt.get("args") is not None:
        model = task = _as_dict(ckpt["args"])  # the old argparse style keeps everything in one flat namespace
    else:
        raise CheckpointError(f"{path}: fairseq checkpoint without 'cfg' or 'args'")
    if "w2v_args" in model or model.get("_name", model.get("arch", "")).startswith("wav2vec_ctc"):
        w2v = model.get("w2v_args")
        if w2v is None:
            raise CheckpointError(f"{path}: CTC checkpoint without w2v_args (it points to {model.get('w2v_path')!r}); "
                                  f"load that pretrained checkpoint instead")
        w2v = _as_dict(w2v)
        enc, enc_task = (_as_dict(w2v["model"]), _as_dict(w2v.get("task"))) if "model" in w2v else (w2v, w2v)
        task = {"normalize": task.get("normalize", enc_task.get("normalize", False))}
        return enc, task, model, model
    return model, task, {}, {}


def load_fairseq(ckpt: dict, path: Path) -> Wav2Vec2ForCTC:
    """A fairseq checkpoint dict (pretraining, CTC or upstream S3-Router `wav2vec_ctc_st`) as our model."""
    enc_cfg, task_cfg, head_cfg, route_cfg = _fairseq_configs(ckpt, path)
    state = {k.removeprefix("w2v_encoder.").removeprefix("w2v_model."): v for k, v in ckpt["model"].items()}
    vocab_size = state["proj.weight"].shape[0] if "proj.weight" in state else 0
    config = config_from_fairseq(enc_cfg, task_cfg, head_cfg, str(path))
    config.vocab_size = vocab_size
    model = Wav2Vec2ForCTC(config)
    state = _rename(state, FAIRSEQ_KEYS, FAIRSEQ_DROPPED, model, str(path))
    if any(k.endswith(".scores") for k in state):  # an upstream S3-Router (wav2vec_ctc_st) checkpoint
        for option in ("layerwise_prune_rate", "fc_attn_prune_rate"):  # per-layer rates: not modelled by RouteConfig
            if route_cfg.get(option):
                raise CheckpointError(f"{path}: upstream option {option}={list(route_cfg[option])} is not supported")
        scored = [k for k in state if k.endswith(".scores")]
        route = RouteConfig(prune_rate=float(route_cfg.get("prune_rate", 1.0)),
                            fix_attn=bool(route_cfg.get("fix_attn")), fix_fc=bool(route_cfg.get("fix_fc")),
                            route_feature_extractor=any(k.startswith("feature_extractor.") for k in scored),
                            route_pos_conv=any(k.startswith("encoder.pos_conv_embed.") for k in scored),
                            route_feature_projection=any(k.startswith("feature_projection.") for k in scored))
        # Upstream builds q/k/v/out and fc1/fc2 as Linear_ST whatever fix_attn/fix_fc say and only switches their
        # mask off, so a fixed layer's scores are stored but never used: drop them.
        fixed = (".attention.",) * route.fix_attn + (".feed_forward.",) * route.fix_fc
        state = {k: v for k, v in state.items() if not (k.endswith(".scores") and any(f in k for f in fixed))}
        model.route(route, init_scores=False)
    _load_state(model, state, str(path))
    return model


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face

HF_PREFIXES = ("wav2vec2.", "data2vec_audio.", "hubert.")
HF_KEYS = [
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", r"encoder.pos_conv_embed.conv.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", r"encoder.pos_conv_embed.conv.weight_v"),
]
HF_DROPPED = re.compile(r"(quantizer\.|project_q\.|project_hid\.|masked_lm_head\.)")
HF_MODEL_TYPES = ("wav2vec2", "data2vec-audio", "hubert")


def config_from_hf(hf: dict, normalize: bool | None = None, source: str = "config.json") -> Wav2Vec2Config:
    """Our config from a transformers `config.json` (wav2vec2, data2vec-audio or hubert)."""
    model_type = hf.get("model_type", "wav2vec2")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"{source}: unsupported Hugging Face model_type {model_type!r}; s3r reads "
                              f"{', '.join(HF_MODEL_TYPES)}")
    for flag in ("conv_pos_batch_norm", "add_adapter"):
        if hf.get(flag):
            raise CheckpointError(f"{source}: unsupported Hugging Face option {flag}=true")
    if hf.get("adapter_attn_dim") is not None:  # MMS: a small adapter in every layer, one set per language
        raise CheckpointError(f"{source}: unsupported Hugging Face option adapter_attn_dim={hf['adapter_attn_dim']} "
                              f"(an MMS adapter model)")
    if hf.get("feat_extract_activation", "gelu") != "gelu":  # our conv extractor always uses GELU, as fairseq does
        raise CheckpointError(f"{source}: unsupported Hugging Face option "
                              f"feat_extract_activation={hf['feat_extract_activation']!r}")
    missing = [k for k in ("conv_dim", "conv_kernel", "conv_stride", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: not a Hugging Face wav2vec2 config (no {', '.join(missing)})")
    data2vec = model_type == "data2vec-audio"
    g = hf.get
    return Wav2Vec2Config(
        conv_dim=tuple(g("conv_dim")), conv_kernel=tuple(g("conv_kernel")), conv_stride=tuple(g("conv_stride")),
        conv_bias=bool(g("conv_bias", False)),
        feat_extract_norm="layer" if data2vec else g("feat_extract_norm", "group"),  # data2vec: always layer norm
        hidden_size=g("hidden_size"), num_hidden_layers=g("num_hidden_layers"),
        num_attention_heads=g("num_attention_heads"), intermediate_size=g("intermediate_size"),
        hidden_act=g("hidden_act", "gelu"), layer_norm_first=bool(g("do_stable_layer_norm", False)) and not data2vec,
        layer_norm_eps=float(g("layer_norm_eps", 1e-5)), feat_proj_layer_norm=bool(g("feat_proj_layer_norm", True)),
        conv_pos_kernel=g("conv_pos_kernel_size") if data2vec else g("num_conv_pos_embeddings", 128),
        conv_pos_groups=g("num_conv_pos_embedding_groups", 16),
        conv_pos_depth=g("num_conv_pos_embeddings") if data2vec else 1,
        normalize=(data2vec or g("feat_extract_norm") == "layer") if normalize is None else normalize,
        hidden_dropout=g("hidden_dropout", 0.1), attention_dropout=g("attention_dropout", 0.1),
        activation_dropout=g("activation_dropout", 0.1), feat_proj_dropout=g("feat_proj_dropout", 0.0),
        final_dropout=g("final_dropout", 0.0), layerdrop=g("layerdrop", 0.1),
        mask_time_prob=g("mask_time_prob", 0.0), mask_time_length=g("mask_time_length", 10),
        mask_feature_prob=g("mask_feature_prob", 0.0), mask_feature_length=g("mask_feature_length", 64),
        apply_spec_augment=bool(g("apply_spec_augment", True)),
    )


def hf_labels(hf: dict, count: int) -> tuple[str, ...]:
    """The class names of a transformers classifier: config.json's id2label by index (LABEL_i where it has none)."""
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    return tuple(id2label.get(i, f"LABEL_{i}") for i in range(count))


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: a JSON {type(obj).__name__}, not an object")
    return obj


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file  # only Hugging Face directories need safetensors

    try:
        return load_file(str(path))
    except Exception:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
        raise CheckpointError(f"cannot read {path}: {unreadable(path, 'safetensors')}") from None


def load_hf(directory: Path) -> Wav2Vec2ForCTC:
    """A Hugging Face model directory (config.json + model.safetensors or pytorch_model.bin) as our model."""
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json (a Hugging Face model directory is expected)")
    hf = _read_json(directory / "config.json")
    pre = directory / "preprocessor_config.json"
    normalize = _read_json(pre).get("do_normalize") if pre.is_file() else None
    if (directory / "model.safetensors").is_file():
        state = _load_safetensors(directory / "model.safetensors")
    elif (directory / "pytorch_model.bin").is_file():
        state = torch_load(directory / "pytorch_model.bin")
        if not isinstance(state, dict):
            raise CheckpointError(f"{directory / 'pytorch_model.bin'}: holds {describe(state)}, not a state dict")
    else:
        sharded = sorted(p.name for p in directory.glob("*.index.json"))
        raise CheckpointError(f"{directory}: no weights (neither model.safetensors nor pytorch_model.bin" +
                              (f"; sharded checkpoints ({sharded[0]}) are not supported)" if sharded else ")"))
    prefix = next((p for p in HF_PREFIXES if any(k.startswith(p) for k in state)), "")
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    config = config_from_hf(hf, normalize, str(directory / "config.json"))
    adapter = next((k for k in state if ".adapter_layer." in k), None)
    if adapter is not None:  # MMS adapter weights without adapter_attn_dim in config.json
        raise CheckpointError(f"{directory}: MMS adapter weights ({adapter}) are not supported (Hugging Face option "
                              f"adapter_attn_dim)")
    config.vocab_size = state["lm_head.weight"].shape[0] if "lm_head.weight" in state else 0
    if "classifier.weight" in state:  # *ForSequenceClassification: projector, classifier, maybe layer_weights
        config = replace(config, labels=hf_labels(hf, state["classifier.weight"].shape[0]),
                         classifier_proj_size=state["classifier.weight"].shape[1],
                         use_weighted_layer_sum="layer_weights" in state)
    model = new_model(config)
    _load_state(model, _rename(state, HF_KEYS, HF_DROPPED, model, str(directory)), str(directory))
    if (directory / "vocab.json").is_file():
        model.vocab = Vocabulary.from_hf_vocab(directory / "vocab.json")
    return model


# ----------------------------------------------------------------------------------------------------------------
# s3r's own checkpoints

S3R_FORMAT = "s3r"


def weights_fingerprint(model: Wav2Vec2ForCTC) -> str:
    """sha256 of every dense weight a route can apply to (all Routable layers' weights), in name order.

    A route (mask file) records this so it is never applied to weights other than those it was learned on.
    """
    h = hashlib.sha256()
    for name, module in sorted(model.named_modules(), key=lambda nm: nm[0]):
        if isinstance(module, Routable):
            # The stored tensors, not dense_weight(): weight norm's g * v / ||v|| rounds differently with the number
            # of threads or on GPU, and a checkpoint trained on one machine must load on another.
            for w in (module.weight_g, module.weight_v) if hasattr(module, "weight_v") else (module.weight,):
                w = w.detach().float().contiguous().cpu()
                h.update(name.encode() + str(tuple(w.shape)).encode())
                h.update(w.numpy().tobytes())
    return h.hexdigest()


def s3r_checkpoint(model: Wav2Vec2ForCTC, vocab: Vocabulary | None = None, pretrained: str | Path | None = None,
                   **extra: object) -> dict:
    """The dict s3r saves: config, route, vocabulary and weights, so that a model rebuilds from the file alone.

    With `pretrained` (the path the frozen weights came from) a routed model stores only what it trained (scores,
    head, any unfrozen tensor) plus the path and fingerprint of the rest.
    """
    state = model.state_dict()
    ref = None
    if pretrained is not None and model.route_config is not None:
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        trained |= {k for k in state if k.endswith(".scores")}
        state = {k: v for k, v in state.items() if k in trained}
        ref = {"path": str(Path(pretrained).resolve()), "sha256": weights_fingerprint(model)}
    vocab = vocab if vocab is not None else getattr(model, "vocab", None)
    return {"format": S3R_FORMAT, "version": 1, "config": model.config.to_dict(),
            "route": asdict(model.route_config) if model.route_config is not None else None,
            "vocab": vocab.to_dict() if isinstance(vocab, Vocabulary) else None,  # a classifier's labels: config
            "pretrained": ref, "model": state, **extra}


def save_atomic(obj: object, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a half-written file.
    The file gets the mode a plain open() would give it (0666 less the umask; mkstemp's own is 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0o022)  # reading the umask means setting it; put back at once
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_s3r(ckpt: dict, path: str | Path, trust_checkpoint: bool = False) -> Wav2Vec2ForCTC:
    """An s3r checkpoint dict (written by `s3r_checkpoint`) as our model, its route and vocabulary included."""
    missing = [k for k in ("config", "model") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: s3r checkpoint without {', '.join(missing)} (truncated or hand-edited?)")
    config = Wav2Vec2Config.from_dict(ckpt["config"])
    ref = ckpt.get("pretrained")
    if ref is not None:  # frozen weights live in the pretrained checkpoint this one was trained from
        model = with_head(load_pretrained(ref["path"], trust_checkpoint=trust_checkpoint), config)
        if weights_fingerprint(model) != ref["sha256"]:
            raise CheckpointError(f"{path}: the weights at {ref['path']} are not the ones this checkpoint was "
                                  f"trained on")
        model.config = config
    else:
        model = new_model(config)
    if ckpt.get("route") is not None:
        model.route(RouteConfig(**ckpt["route"]), init_scores=False)
    _load_state(model, ckpt["model"], str(path), partial=ref is not None)
    if ckpt.get("vocab") is not None:
        model.vocab = Vocabulary.from_dict(ckpt["vocab"])
    return model


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def _load_state(model: Wav2Vec2ForCTC, state: dict, source: str, partial: bool = False) -> None:
    """Load with shape checks; every model tensor must be present except those a checkpoint may lack."""
    ours = model.state_dict()
    for key, tensor in state.items():
        if key not in ours:
            raise CheckpointError(f"{source}: unknown checkpoint key {key!r}")
        if tuple(tensor.shape) != tuple(ours[key].shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(ours[key].shape)}")
    optional = {"masked_spec_embed"}  # absent from HF checkpoints saved without SpecAugment
    missing = sorted(set(ours) - set(state) - optional)
    if missing and not partial:
        raise CheckpointError(f"{source}: missing checkpoint key {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    with torch.no_grad():
        for key, tensor in state.items():
            ours[key].copy_(tensor)


def load_pretrained(path: str | Path, prune_rate: float | None = None, init_score: str | None = None,
                    fix_attn: bool | None = None, trainable_proj: bool | None = None, *,
                    route: str | Path | None = None, vocab_size: int | None = None, trust_checkpoint: bool = False,
                    **route_options: object) -> Wav2Vec2ForCTC:
    """Load any supported checkpoint as a `Wav2Vec2ForCTC` in eval mode.

    path: a fairseq `.pt` (pretraining or CTC, `cfg` or `args` style), a Hugging Face directory (or a file in one),
    or an s3r checkpoint. `prune_rate` (fraction KEPT) switches to S3-Router mask mode with `RouteConfig` options
    (None: RouteConfig's default); weight-based `init_score`s read the weights just loaded. `vocab_size` gives the
    model a fresh CTC head of that size when it has none or another size. `route` installs a route file written by
    `python -m s3r.routes export` (learned on exactly these weights).
    """
    path = Path(path)
    if path.is_dir() or path.suffix in (".safetensors", ".json") or path.name == "pytorch_model.bin":
        model = load_hf(path if path.is_dir() else path.parent)
    else:
        ckpt = torch_load(path, trust_checkpoint)
        kind = ckpt.get("format") if isinstance(ckpt, dict) else None
        if kind == S3R_FORMAT:
            model = load_s3r(ckpt, path, trust_checkpoint)
        elif isinstance(ckpt, dict) and "model" in ckpt and ("cfg" in ckpt or "args" in ckpt):
            model = load_fairseq(ckpt, path)
        elif kind == ROUTE_FORMAT:
            raise CheckpointError(f"{path} is a route, not a checkpoint: load the pretrained checkpoint it was "
                                  f"learned on with route={str(path)!r} (eval.py --init PRETRAINED --route "
                                  f"{path})")
        else:
            raise CheckpointError(f"{path}: neither an s3r nor a fairseq checkpoint (it holds {describe(ckpt)})")
    if not hasattr(model, "vocab"):
        model.vocab = None
    model.source = str(path)
    if vocab_size is not None and vocab_size != model.config.vocab_size:
        model.set_vocab_size(vocab_size)
    if route is not None:
        model = install_route(model, check_route(torch_load(route), str(route)), weights_fingerprint(model),
                              str(route))
    if prune_rate is not None:
        unknown = sorted(set(route_options) - {f.name for f in fields(RouteConfig)})
        if unknown:
            raise TypeError(f"unknown route option(s): {', '.join(unknown)}")
        given = dict(init_score=init_score, fix_attn=fix_attn, trainable_proj=trainable_proj)
        options = {**{k: v for k, v in given.items() if v is not None}, **route_options}
        model.route(RouteConfig(prune_rate=prune_rate, **options))
    return model.eval()


def checkpoint_vocab(model: Wav2Vec2ForCTC, path: str | Path, dict_path: str | Path | None = None) -> Vocabulary | None:
    """The vocabulary a checkpoint was trained with: `dict_path`, the checkpoint's own, or dict.ltr.txt / vocab.json
    beside it (fairseq keeps the dictionary in the data folder: copy it beside the model); None if there is none."""
    if dict_path:
        dict_path = Path(dict_path)
        if not dict_path.is_file():
            raise CheckpointError(f"dictionary {dict_path}: no such file")
        if dict_path.suffix == ".json":
            return Vocabulary.from_hf_vocab(str(dict_path))
        return Vocabulary.from_fairseq_dict(str(dict_path))
    if getattr(model, "vocab", None) is not None:
        return model.vocab
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if (folder / "dict.ltr.txt").is_file():
        return Vocabulary.from_fairseq_dict(str(folder / "dict.ltr.txt"))
    if (folder / "vocab.json").is_file():
        return Vocabulary.from_hf_vocab(str(folder / "vocab.json"))
    return None
