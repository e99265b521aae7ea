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
from dataclasses import asdict, fields
from pathlib import Path

import torch

from . import S3RError
from .model import RouteConfig, Routable, Wav2Vec2Config, Wav2Vec2ForCTC


class CheckpointError(S3RError):
    """A checkpoint that cannot be read: unknown format, key, class or architecture."""


# ----------------------------------------------------------------------------------------------------------------
# Safe unpickling


def _allowed_globals() -> list:
    """The harmless classes fairseq checkpoints pickle besides tensors and plain containers."""
    allowed = [argparse.Namespace]
    try:
        import numpy as np
        allowed += [np.dtype, type(np.dtype("float64")), type(np.dtype("int64")), type(np.dtype("float32"))]
        allowed += [np._core.multiarray.scalar] if hasattr(np, "_core") else [np.core.multiarray.scalar]
    except ImportError:  # numpy is optional
        pass
    return allowed


class _Stub:
    """Stands in for a pickled class whose module is not installed (fairseq's Dictionary, say)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": module})


_lenient_pickle = types.SimpleNamespace(Unpickler=_LenientUnpickler, load=pickle.load, __name__="pickle")


def torch_load(path: str | Path, trust_checkpoint: bool = False) -> dict:
    """torch.load with weights_only=True and an allow-list; `trust_checkpoint` lifts it (arbitrary code can run)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"class {found.group(1)}" if found else "an object"
        raise CheckpointError(f"{path} pickles {what} that s3r does not unpickle by default; pass "
                              f"--trust-checkpoint (trust_checkpoint=True) if you trust this file") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------------------------------
# fairseq


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


def config_from_fairseq(model_cfg: dict, task_cfg: dict | None = None, head_cfg: dict | None = None) -> Wav2Vec2Config:
    """Our config from a fairseq encoder config (`cfg.model`, or `cfg.model.w2v_args.model` for CTC checkpoints)."""
    m = dict(model_cfg)
    get = m.get
    conv = parse_conv_layers(get("conv_feature_layers") or FAIRSEQ_DEFAULT_CONV)
    depth = int(get("pos_conv_depth", 1) or 1)
    conv_pos = int(get("conv_pos", 128))
    head = dict(head_cfg or {})  # the CTC finetuning config overrides the encoder's regularisation
    pick = lambda key, default: head[key] if key in head and head[key] is not None else get(key, default)  # noqa: E731
    return Wav2Vec2Config(
        conv_dim=tuple(t[0] for t in conv), conv_kernel=tuple(t[1] for t in conv), conv_stride=tuple(t[2] for t in conv),
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
        activation_dropout=float(pick("activation_dropout", 0.0)), feat_proj_dropout=float(pick("dropout_input", 0.0)),
        final_dropout=float(head.get("final_dropout", 0.0) or 0.0),
        layerdrop=float(head.get("layerdrop", get("encoder_layerdrop", 0.0)) or 0.0),
        mask_time_prob=float(pick("mask_prob", 0.0)), mask_time_length=int(pick("mask_length", 10)),
        mask_feature_prob=float(pick("mask_channel_prob", 0.0)), mask_feature_length=int(pick("mask_channel_length", 64)),
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


def _rename(state: dict, rules, dropped: re.Pattern, model: Wav2Vec2ForCTC, source: str) -> dict:
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


def _as_dict(obj) -> dict:
    if obj is None:
        return {}
    return vars(obj) if isinstance(obj, argparse.Namespace) else dict(obj)


def _fairseq_configs(ckpt: dict, path) -> tuple[dict, dict, dict, dict]:
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


def load_fairseq(ckpt: dict, path) -> Wav2Vec2ForCTC:
    enc_cfg, task_cfg, head_cfg, route_cfg = _fairseq_configs(ckpt, path)
    state = {k.removeprefix("w2v_encoder.").removeprefix("w2v_model."): v for k, v in ckpt["model"].items()}
    vocab_size = state["proj.weight"].shape[0] if "proj.weight" in state else 0
    config = config_from_fairseq(enc_cfg, task_cfg, head_cfg)
    config.vocab_size = vocab_size
    model = Wav2Vec2ForCTC(config)
    state = _rename(state, FAIRSEQ_KEYS, FAIRSEQ_DROPPED, model, str(path))
    if any(k.endswith(".scores") for k in state):  # an upstream S3-Router (wav2vec_ctc_st) checkpoint
        for option in ("layerwise_prune_rate", "fc_attn_prune_rate"):  # per-layer rates: not modelled by RouteConfig
            if route_cfg.get(option):
                raise CheckpointError(f"{path}: upstream option {option}={list(route_cfg[option])} is not supported")
        has = lambda prefix: any(k.startswith(prefix) and k.endswith(".scores") for k in state)  # noqa: E731
        route = RouteConfig(prune_rate=float(route_cfg.get("prune_rate", 1.0)), fix_attn=bool(route_cfg.get("fix_attn")),
                            fix_fc=bool(route_cfg.get("fix_fc")), route_feature_extractor=has("feature_extractor."),
                            route_pos_conv=has("encoder.pos_conv_embed."),
                            route_feature_projection=has("feature_projection."))
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


def config_from_hf(hf: dict, normalize: bool | None = None) -> Wav2Vec2Config:
    model_type = hf.get("model_type", "wav2vec2")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"unsupported Hugging Face model_type {model_type!r}; s3r reads {', '.join(HF_MODEL_TYPES)}")
    for flag in ("conv_pos_batch_norm", "add_adapter", "use_weighted_layer_sum"):
        if hf.get(flag):
            raise CheckpointError(f"unsupported Hugging Face option {flag}=true")
    if hf.get("feat_extract_activation", "gelu") != "gelu":  # our conv extractor always uses GELU, as fairseq does
        raise CheckpointError(f"unsupported Hugging Face option feat_extract_activation={hf['feat_extract_activation']!r}")
    data2vec = model_type == "data2vec-audio"
    g = lambda k, d=None: hf.get(k, d)  # noqa: E731
    return Wav2Vec2Config(
        conv_dim=tuple(g("conv_dim")), conv_kernel=tuple(g("conv_kernel")), conv_stride=tuple(g("conv_stride")),
        conv_bias=bool(g("conv_bias", False)),
        feat_extract_norm="layer" if data2vec else g("feat_extract_norm", "group"),  # data2vec: always layer norm
        hidden_size=g("hidden_size"), num_hidden_layers=g("num_hidden_layers"), num_attention_heads=g("num_attention_heads"),
        intermediate_size=g("intermediate_size"), hidden_act=g("hidden_act", "gelu"),
        layer_norm_first=bool(g("do_stable_layer_norm", False)) and not data2vec, layer_norm_eps=float(g("layer_norm_eps", 1e-5)),
        feat_proj_layer_norm=bool(g("feat_proj_layer_norm", True)),
        conv_pos_kernel=g("conv_pos_kernel_size") if data2vec else g("num_conv_pos_embeddings", 128),
        conv_pos_groups=g("num_conv_pos_embedding_groups", 16),
        conv_pos_depth=g("num_conv_pos_embeddings") if data2vec else 1,
        normalize=(data2vec or g("feat_extract_norm") == "layer") if normalize is None else normalize,
        hidden_dropout=g("hidden_dropout", 0.1), attention_dropout=g("attention_dropout", 0.1),
        activation_dropout=g("activation_dropout", 0.1), feat_proj_dropout=g("feat_proj_dropout", 0.0),
        final_dropout=g("final_dropout", 0.0), layerdrop=g("layerdrop", 0.1),
        mask_time_prob=g("mask_time_prob", 0.0), mask_time_length=g("mask_time_length", 10),
        mask_feature_prob=g("mask_feature_prob", 0.0), mask_feature_length=g("mask_feature_length", 64),
    )


def load_hf(directory: Path) -> Wav2Vec2ForCTC:
    hf = json.loads((directory / "config.json").read_text())
    pre = directory / "preprocessor_config.json"
    normalize = json.loads(pre.read_text()).get("do_normalize") if pre.is_file() else None
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file
        state = load_file(str(directory / "model.safetensors"))
    elif (directory / "pytorch_model.bin").is_file():
        state = torch_load(directory / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{directory}: neither model.safetensors nor pytorch_model.bin")
    prefix = next((p for p in HF_PREFIXES if any(k.startswith(p) for k in state)), "")
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    config = config_from_hf(hf, normalize)
    config.vocab_size = state["lm_head.weight"].shape[0] if "lm_head.weight" in state else 0
    model = Wav2Vec2ForCTC(config)
    _load_state(model, _rename(state, HF_KEYS, HF_DROPPED, model, str(directory)), str(directory))
    if (directory / "vocab.json").is_file():
        from .text import Vocabulary
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


def s3r_checkpoint(model: Wav2Vec2ForCTC, vocab=None, pretrained: str | None = None, **extra) -> dict:
    """The dict s3r saves: config, route, vocabulary and weights, so that a model rebuilds from the file alone.

    With `pretrained` (the path the frozen weights came from) a routed model stores only what it trained (scores,
    head, any unfrozen tensor) plus the path and fingerprint of the rest.
    """
    state = model.state_dict()
    ref = None
    if pretrained is not None and model.route_config is not None:
        trained = {n for n, p in model.named_parameters() if p.requires_grad} | {k for k in state if k.endswith(".scores")}
        state = {k: v for k, v in state.items() if k in trained}
        ref = {"path": str(Path(pretrained).resolve()), "sha256": weights_fingerprint(model)}
    vocab = vocab if vocab is not None else getattr(model, "vocab", None)
    return {"format": S3R_FORMAT, "version": 1, "config": model.config.to_dict(),
            "route": asdict(model.route_config) if model.route_config is not None else None,
            "vocab": vocab.to_dict() if vocab is not None else None, "pretrained": ref, "model": state, **extra}


def save_atomic(obj, path: str | Path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_s3r(ckpt: dict, path, trust_checkpoint: bool = False) -> Wav2Vec2ForCTC:
    config = Wav2Vec2Config.from_dict(ckpt["config"])
    ref = ckpt.get("pretrained")
    if ref is not None:  # frozen weights live in the pretrained checkpoint this one was trained from
        model = load_pretrained(ref["path"], trust_checkpoint=trust_checkpoint)
        if model.config.vocab_size != config.vocab_size:
            model.set_vocab_size(config.vocab_size)
        if weights_fingerprint(model) != ref["sha256"]:
            raise CheckpointError(f"{path}: the weights at {ref['path']} are not the ones this checkpoint was trained on")
        model.config = config
    else:
        model = Wav2Vec2ForCTC(config)
    if ckpt.get("route") is not None:
        model.route(RouteConfig(**ckpt["route"]), init_scores=False)
    _load_state(model, ckpt["model"], str(path), partial=ref is not None)
    if ckpt.get("vocab") is not None:
        from .text import Vocabulary
        model.vocab = Vocabulary.from_dict(ckpt["vocab"])
    return model


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def _load_state(model: Wav2Vec2ForCTC, state: dict, source: str, partial: bool = False):
    """Load with shape checks; every model tensor must be present except those a checkpoint may lack."""
    ours = model.state_dict()
    for key, tensor in state.items():
        if key not in ours:
            raise CheckpointError(f"{source}: unknown checkpoint key {key!r}")
        if tuple(tensor.shape) != tuple(ours[key].shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(ours[key].shape)}")
    optional = {"masked_spec_embed"}  # absent from HF checkpoints saved without SpecAugment
    missing = sorted(set(ours) - set(state) - optional)
    if missing and not partial:
        raise CheckpointError(f"{source}: missing checkpoint key {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    with torch.no_grad():
        for key, tensor in state.items():
            ours[key].copy_(tensor)


def load_pretrained(path: str | Path, prune_rate: float | None = None, init_score: str = "kaiming_uniform",
                    fix_attn: bool = False, trainable_proj: bool = True, *, masks: str | Path | None = None,
                    vocab_size: int | None = None, trust_checkpoint: bool = False, **route_options) -> Wav2Vec2ForCTC:
    """Load any supported checkpoint as a `Wav2Vec2ForCTC` in eval mode.

    path: a fairseq `.pt` (pretraining or CTC, `cfg` or `args` style), a Hugging Face directory (or a file in one),
    or an s3r checkpoint. `prune_rate` (fraction KEPT) switches to S3-Router mask mode with `RouteConfig` options;
    weight-based `init_score`s read the weights just loaded. `vocab_size` gives the model a fresh CTC head of that
    size when it has none or another size. `masks` applies a route file written by `python -m s3r.masks export`.
    """
    path = Path(path)
    if path.is_dir() or path.suffix in (".safetensors", ".json") or path.name == "pytorch_model.bin":
        directory = path if path.is_dir() else path.parent
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{directory}: no config.json (a Hugging Face model directory is expected)")
        model = load_hf(directory)
    else:
        ckpt = torch_load(path, trust_checkpoint)
        if not isinstance(ckpt, dict):
            raise CheckpointError(f"{path}: not a checkpoint dictionary")
        if ckpt.get("format") == S3R_FORMAT:
            model = load_s3r(ckpt, path, trust_checkpoint)
        elif "model" in ckpt and ("cfg" in ckpt or "args" in ckpt):
            model = load_fairseq(ckpt, path)
        else:
            raise CheckpointError(f"{path}: neither an s3r nor a fairseq checkpoint (top-level keys: "
                                  f"{', '.join(sorted(map(str, ckpt))[:8])})")
    if not hasattr(model, "vocab"):
        model.vocab = None
    model.source = str(path)
    if vocab_size is not None and vocab_size != model.config.vocab_size:
        model.set_vocab_size(vocab_size)
    if masks is not None:
        from .masks import apply_route
        apply_route(model, masks)
    if prune_rate is not None:
        known = {f.name for f in fields(RouteConfig)}
        unknown = sorted(set(route_options) - known)
        if unknown:
            raise TypeError(f"unknown route option(s): {', '.join(unknown)}")
        model.route(RouteConfig(prune_rate=prune_rate, init_score=init_score, fix_attn=fix_attn,
                                trainable_proj=trainable_proj, **route_options))
    return model.eval()
