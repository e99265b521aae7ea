"""Tiny peer models for the parity tests: Hugging Face models with random weights, and fairseq-format checkpoints
written from those same weights, so that the expected outputs always come from Hugging Face.

fairseq names were learned from `fairseq/models/wav2vec/wav2vec2.py` (Wav2Vec2Config fields;
ConvFeatureExtractionModel blocks `Sequential(conv, dropout, norm, GELU)`, whose layer norm is itself
`Sequential(TransposeLast, Fp32LayerNorm, TransposeLast)`; TransformerEncoder `pos_conv` = `Sequential(weight-normed
conv, SamePad, GELU)` or, with `pos_conv_depth` > 1 (data2vec), a stack of `Sequential(conv, SamePad, TransposeLast,
LayerNorm, TransposeLast, GELU)`; TransformerSentenceEncoderLayer `self_attn.{q,k,v,out}_proj`, `self_attn_layer_norm`,
`fc1`, `fc2`, `final_layer_norm`), `wav2vec2_asr.py` (Wav2VecCtc -> `w2v_encoder.w2v_model.*` + `w2v_encoder.proj`,
the encoder's own {model, task} config kept in `cfg.model.w2v_args`), `examples/data2vec/models/data2vec_audio.py`
(`final_proj`, the EMA teacher stored under `_ema`), `models/hubert/hubert.py` (`label_embs_concat`, `final_proj`) and
the upstream S3-Router fork (`wav2vec_ctc_st`: every q/k/v/out/fc1/fc2 is a `Linear_ST` with a `scores` tensor,
`cfg.model.prune_rate` is the kept fraction, `fix_attn` leaves the attention dense but still stores its scores).
"""
from __future__ import annotations

import argparse
import re

import torch

VARIANTS = ("base", "large", "data2vec", "hubert")

# A tiny extractor: 20x downsampling, odd channel counts so that no size divides evenly by accident.
CONV = dict(conv_dim=(16, 24, 20), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2))
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=52)
VOCAB = 11


def hf_config(variant: str, vocab_size: int = VOCAB):
    """A tiny transformers config of one architecture family, dropout and SpecAugment off."""
    import transformers as tf

    common = dict(**CONV, **SIZES, vocab_size=vocab_size, hidden_dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                  mask_time_prob=0.05, num_conv_pos_embedding_groups=4)
    if variant == "base":  # group norm in the first conv, post-LN, no conv bias, even positional kernel
        return tf.Wav2Vec2Config(**common, feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False,
                                 num_conv_pos_embeddings=16)
    if variant == "large":  # layer norm in every conv, conv bias, pre-LN, odd positional kernel
        return tf.Wav2Vec2Config(**common, feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True,
                                 num_conv_pos_embeddings=15)
    if variant == "data2vec":  # layer-norm extractor, post-LN, a stack of 3 positional convs of kernel 5
        return tf.Data2VecAudioConfig(**common, conv_bias=False, num_conv_pos_embeddings=3, conv_pos_kernel_size=5)
    if variant == "hubert":
        return tf.HubertConfig(**common, feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False,
                               num_conv_pos_embeddings=16)
    raise ValueError(variant)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05):
    """Add noise to every parameter: HF initialises biases to 0 and norms to 1, which would hide swapped keys."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def hf_model(variant: str, ctc: bool, seed: int = 0):
    """A random, perturbed HF model in eval mode: `*ForCTC` when `ctc`, else the bare `*Model`."""
    import transformers as tf

    torch.manual_seed(seed)
    cls = {"base": ("Wav2Vec2Model", "Wav2Vec2ForCTC"), "large": ("Wav2Vec2Model", "Wav2Vec2ForCTC"),
           "data2vec": ("Data2VecAudioModel", "Data2VecAudioForCTC"),
           "hubert": ("HubertModel", "HubertForCTC")}[variant][int(ctc)]
    model = getattr(tf, cls)(hf_config(variant))
    return perturb_(model, seed).eval()


def hf_bare_state(model) -> dict:
    """HF state dict without the `wav2vec2.` / `data2vec_audio.` / `hubert.` prefix, weight norm as g/v."""
    state = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^(wav2vec2|data2vec_audio|hubert)\.", "", k)
        state[k] = v.detach().clone()
    return old_weight_norm_spelling(state)


def old_weight_norm_spelling(state: dict) -> dict:
    """`parametrizations.weight.original0/1` (torch >= 2.1 weight norm) -> `weight_g/weight_v` (older torch)."""
    g, v = "parametrizations.weight.original0", "parametrizations.weight.original1"
    return {k.replace(g, "weight_g").replace(v, "weight_v"): t for k, t in state.items()}


# ----------------------------------------------------------------------------------------------------------------
# HF (bare, our names) -> fairseq names, written out key by key from fairseq's module tree (not from s3r's loader).
# tests/test_checkpoint.py checks these names against torchaudio's own fairseq importer (`import_fairseq._map_key`).


def fairseq_names(variant: str, cfg) -> dict[str, str]:
    """{HF bare key: fairseq Wav2Vec2Model / Data2VecAudioModel / HubertModel key} for every encoder tensor."""
    names = {}
    layer_norm_extractor = variant == "data2vec" or cfg.feat_extract_norm == "layer"
    for i in range(len(cfg.conv_dim)):  # ConvFeatureExtractionModel: conv_layers[i] = Sequential(conv, dropout, ...)
        names[f"feature_extractor.conv_layers.{i}.conv.weight"] = f"feature_extractor.conv_layers.{i}.0.weight"
        if cfg.conv_bias:
            names[f"feature_extractor.conv_layers.{i}.conv.bias"] = f"feature_extractor.conv_layers.{i}.0.bias"
        for p in ("weight", "bias"):
            ours = f"feature_extractor.conv_layers.{i}.layer_norm.{p}"
            if layer_norm_extractor:  # every block: ..., Sequential(TransposeLast, Fp32LayerNorm, TransposeLast), GELU
                names[ours] = f"feature_extractor.conv_layers.{i}.2.1.{p}"
            elif i == 0:  # extractor_mode "default": conv, dropout, Fp32GroupNorm, GELU in the first block only
                names[ours] = f"feature_extractor.conv_layers.0.2.{p}"
    names["masked_spec_embed"] = "mask_emb"
    for p in ("weight", "bias"):
        names[f"feature_projection.layer_norm.{p}"] = f"layer_norm.{p}"  # Wav2Vec2Model.layer_norm (features)
        names[f"feature_projection.projection.{p}"] = f"post_extract_proj.{p}"
        names[f"encoder.layer_norm.{p}"] = f"encoder.layer_norm.{p}"  # TransformerEncoder.layer_norm
    if variant == "data2vec":  # pos_conv = Sequential(block, block, ...), each Sequential(conv, SamePad, ...)
        for j in range(cfg.num_conv_pos_embeddings):
            for p in ("weight", "bias"):
                names[f"encoder.pos_conv_embed.layers.{j}.conv.{p}"] = f"encoder.pos_conv.{j}.0.{p}"
    else:  # pos_conv = Sequential(weight_norm(conv), SamePad, GELU)
        for p in ("weight_g", "weight_v", "bias"):
            names[f"encoder.pos_conv_embed.conv.{p}"] = f"encoder.pos_conv.0.{p}"
    for i in range(cfg.num_hidden_layers):  # TransformerSentenceEncoderLayer
        ours, theirs = f"encoder.layers.{i}.", f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                names[f"{ours}attention.{proj}.{p}"] = f"{theirs}self_attn.{proj}.{p}"
            names[f"{ours}layer_norm.{p}"] = f"{theirs}self_attn_layer_norm.{p}"
            names[f"{ours}feed_forward.intermediate_dense.{p}"] = f"{theirs}fc1.{p}"
            names[f"{ours}feed_forward.output_dense.{p}"] = f"{theirs}fc2.{p}"
            names[f"{ours}final_layer_norm.{p}"] = f"{theirs}final_layer_norm.{p}"
    return names


def fairseq_encoder_state(bare: dict, variant: str, cfg, weight_norm: str = "gv") -> dict:
    """fairseq keys for the encoder part of an HF state dict (no head, no pretraining modules); every key is named."""
    names = fairseq_names(variant, cfg)
    encoder = {k: v for k, v in bare.items() if not k.startswith("lm_head.")}
    unnamed, unused = sorted(set(encoder) - set(names)), sorted(set(names) - set(encoder))
    if unnamed or unused:
        raise KeyError(f"fairseq_names does not fit the model: no fairseq name for {unnamed[:3]}, "
                       f"names for absent keys {unused[:3]}")
    out = {names[k]: v for k, v in encoder.items()}
    if weight_norm == "parametrizations":  # fairseq run under torch >= 2.1 weight norm
        out = {k.replace("pos_conv.0.weight_g", "pos_conv.0.parametrizations.weight.original0")
                .replace("pos_conv.0.weight_v", "pos_conv.0.parametrizations.weight.original1"): v
               for k, v in out.items()}
    return out


def conv_feature_layers(cfg) -> str:
    """fairseq's `conv_feature_layers` expression, written the way fairseq configs write it."""
    layers = list(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride, strict=True))
    return " + ".join(f"[{t}]" for t in layers).replace(" ", "").replace("+", " + ")


def fairseq_model_cfg(variant: str, cfg) -> dict:
    """The fairseq pretraining model config (Wav2Vec2Config / Data2VecAudioConfig / HubertConfig field names)."""
    data2vec = variant == "data2vec"
    layer_norm = data2vec or cfg.feat_extract_norm == "layer"
    model = {
        "_name": {"data2vec": "data2vec_audio", "hubert": "hubert"}.get(variant, "wav2vec2"),
        "extractor_mode": "layer_norm" if layer_norm else "default",
        "encoder_layers": cfg.num_hidden_layers, "encoder_embed_dim": cfg.hidden_size,
        "encoder_ffn_embed_dim": cfg.intermediate_size, "encoder_attention_heads": cfg.num_attention_heads,
        "activation_fn": "gelu", "layer_type": "transformer",
        "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.05,
        "dropout_input": 0.1, "dropout_features": 0.1, "final_dim": 24,
        "layer_norm_first": bool(getattr(cfg, "do_stable_layer_norm", False)) and not data2vec,
        "conv_feature_layers": conv_feature_layers(cfg), "conv_bias": bool(cfg.conv_bias),
        "logit_temp": 0.1, "quantize_targets": True, "quantize_input": False, "same_quantizer": False,
        "target_glu": False, "feature_grad_mult": 0.1, "quantizer_depth": 1, "quantizer_factor": 3,
        "latent_vars": 5, "latent_groups": 2, "latent_dim": 0,
        "mask_length": 10, "mask_prob": 0.65, "mask_selection": "static", "mask_other": 0.0,
        "no_mask_overlap": False, "mask_min_space": 1, "require_same_masks": True, "mask_dropout": 0.0,
        "mask_channel_length": 10, "mask_channel_prob": 0.0, "mask_channel_before": False,
        "mask_channel_selection": "static", "mask_channel_other": 0.0, "no_mask_channel_overlap": False,
        "mask_channel_min_space": 1, "num_negatives": 100, "negatives_from_everywhere": False,
        "cross_sample_negatives": 0, "codebook_negatives": 0,
        "conv_pos": cfg.num_conv_pos_embeddings, "conv_pos_groups": cfg.num_conv_pos_embedding_groups,
        "pos_conv_depth": 1, "latent_temp": [2.0, 0.5, 0.999995], "max_positions": 100000,
        "checkpoint_activations": False, "required_seq_len_multiple": 1, "crop_seq_to_multiple": 1,
    }
    if data2vec:  # fairseq derives each layer's kernel as max(3, conv_pos // pos_conv_depth)
        depth, k = cfg.num_conv_pos_embeddings, cfg.conv_pos_kernel_size
        model.update(conv_pos=k * depth, pos_conv_depth=depth, loss_beta=0.0, average_top_k_layers=2,
                     layer_norm_target_layer=False, instance_norm_target_layer=True, ema_decay=0.999,
                     ema_end_decay=0.9999, ema_anneal_end_step=1000, ema_transformer_only=True, ema_layers_only=True)
        for key in ("quantize_targets", "latent_vars", "latent_groups", "latent_dim", "latent_temp", "final_dim"):
            model.pop(key)
    if variant == "hubert":
        model.update(label_rate=50, skip_masked=False, skip_nomask=False, untie_final_proj=False)
        for key in ("quantize_targets", "latent_vars", "latent_groups", "latent_dim", "latent_temp"):
            model.pop(key)
    return model


def fairseq_task_cfg(variant: str, normalize: bool) -> dict:
    name = "hubert_pretraining" if variant == "hubert" else "audio_pretraining"
    return {"_name": name, "data": "/data/manifests", "labels": None, "sample_rate": 16000, "normalize": normalize,
            "enable_padding": False, "max_sample_size": 250000, "min_sample_size": 32000}


def _pretraining_heads(variant: str, cfg, g: torch.Generator) -> dict:
    """The modules a pretraining checkpoint carries that finetuning drops."""
    C, E = cfg.hidden_size, cfg.conv_dim[-1]

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if variant == "data2vec":
        return {"final_proj.weight": r(C, C), "final_proj.bias": r(C),
                "_ema": {"layers.0.fc1.weight": r(cfg.intermediate_size, C),
                         "layers.0.fc1.bias": r(cfg.intermediate_size)}}
    if variant == "hubert":
        return {"final_proj.weight": r(24, C), "final_proj.bias": r(24), "label_embs_concat": r(504, 24)}
    return {"quantizer.vars": r(1, 10, 12), "quantizer.weight_proj.weight": r(10, E),
            "quantizer.weight_proj.bias": r(10), "project_q.weight": r(24, 24), "project_q.bias": r(24),
            "final_proj.weight": r(24, C), "final_proj.bias": r(24)}


def _fairseq_top(model_cfg: dict, task_cfg: dict, style: str) -> dict:
    """`{"cfg": {...}}` (fairseq >= 0.10, Hydra) or `{"args": Namespace}` (older fairseq, one flat namespace)."""
    if style == "cfg":
        return {"cfg": {"_name": None, "common": {"fp16": True, "log_interval": 200, "seed": 1},
                        "checkpoint": {"save_dir": "checkpoints", "best_checkpoint_metric": "wer"},
                        "optimization": {"max_update": 20000, "lr": [5e-05], "update_freq": [4]},
                        "model": model_cfg, "task": task_cfg, "criterion": {"_name": "ctc", "zero_infinity": True}}}
    flat = {**task_cfg, **{k: v for k, v in model_cfg.items() if k != "_name"}, "arch": model_cfg["_name"],
            "task": task_cfg["_name"], "fp16": True, "seed": 1, "lr": [5e-05], "optimizer": "adam"}
    flat.pop("_name")
    return {"args": argparse.Namespace(**flat)}


def fairseq_pretraining_checkpoint(variant: str, hf, style: str = "cfg", normalize: bool = False,
                                   weight_norm: str = "gv", seed: int = 0) -> dict:
    """A fairseq pretraining checkpoint (`Wav2Vec2Model`, `Data2VecAudioModel`, `HubertModel`) of the bare HF model."""
    cfg = hf.config
    state = fairseq_encoder_state(hf_bare_state(hf), variant, cfg, weight_norm)
    state.update(_pretraining_heads(variant, cfg, torch.Generator().manual_seed(seed)))
    return {**_fairseq_top(fairseq_model_cfg(variant, cfg), fairseq_task_cfg(variant, normalize), style),
            "model": state, "optimizer_history": [{"criterion_name": "Wav2vecCriterion", "num_updates": 400000}],
            "extra_state": {"epoch": 10, "train_iterator": {"epoch": 10}}, "last_optimizer_state": None}


def ctc_model_cfg(variant: str, w2v_args, name: str = "wav2vec_ctc", **extra) -> dict:
    """Wav2Vec2CtcConfig (or HubertCtcConfig) fields of a finetuning run."""
    return {"_name": name, "w2v_path": "/ckpt/pretrained.pt", "no_pretrained_weights": False, "dropout_input": 0.0,
            "final_dropout": 0.0, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.1,
            "apply_mask": True, "mask_length": 10, "mask_prob": 0.65, "mask_selection": "static", "mask_other": 0.0,
            "no_mask_overlap": False, "mask_channel_length": 64, "mask_channel_prob": 0.25,
            "mask_channel_selection": "static", "mask_channel_other": 0.0, "no_mask_channel_overlap": False,
            "freeze_finetune_updates": 0, "feature_grad_mult": 0.0, "layerdrop": 0.1, "mask_channel_min_space": 1,
            "mask_channel_before": False, "normalize": w2v_normalize(w2v_args), "data": "/data/1h",
            "w2v_args": w2v_args, "blank_weight": 0.0, "blank_mode": "add", **extra}


def w2v_normalize(w2v_args) -> bool:
    if isinstance(w2v_args, argparse.Namespace):
        return bool(getattr(w2v_args, "normalize", False))
    return bool(w2v_args["task"]["normalize"])


def fairseq_ctc_checkpoint(variant: str, hf_ctc, style: str = "cfg", normalize: bool = False,
                           weight_norm: str = "gv", route: dict | None = None, seed: int = 0) -> dict:
    """A fairseq CTC checkpoint (`wav2vec_ctc` / `hubert_ctc`, or upstream S3-Router `wav2vec_ctc_st` when `route`).

    `route` = {"prune_rate": p, "fix_attn": bool, "scores": {our layer name: tensor}}: every attention and FFN
    linear then stores `.scores` (upstream builds them all as Linear_ST, `fix_attn` only switches the mask off).
    """
    cfg = hf_ctc.config
    bare = hf_bare_state(hf_ctc)
    enc = fairseq_encoder_state(bare, variant, cfg, weight_norm)
    state = {f"w2v_encoder.w2v_model.{k}": v for k, v in enc.items()}
    state["w2v_encoder.proj.weight"], state["w2v_encoder.proj.bias"] = bare["lm_head.weight"], bare["lm_head.bias"]
    enc_model, enc_task = fairseq_model_cfg(variant, cfg), fairseq_task_cfg(variant, normalize)
    extra, name = {}, {"hubert": "hubert_ctc"}.get(variant, "wav2vec_ctc")
    if route is not None:
        name = "wav2vec_ctc_st"
        enc_model = {**enc_model, "_name": enc_model["_name"] + "_st", "no_prune_extractor": True, "no_prune_pos": True,
                     "no_prune_post_extract_proj": True, "linear_st_op": "linear_st"}
        extra = {"prune_rate": route["prune_rate"], "no_prune_proj": True, "no_prune_extractor": True,
                 "no_prune_pos": True, "no_prune_post_extract_proj": True, "trainable_bias": False,
                 "trainable_layer_norm": False, "trainable_if_unpruned": False, "trainable_pos": False,
                 "trainable_proj": True, "trainable_post_extract_proj": False, "init_score": "weight_rank",
                 "init_score_scale": 1.0, "fix_attn": route.get("fix_attn", False), "fix_fc": False,
                 "layerwise_prune_rate": [], "fc_attn_prune_rate": [], "co_train": False, "ste_sigmoid": False,
                 "linear_st_op": "linear_st", "fix_mask": False, "fix_mask_before": 0, "load_mask_only": False,
                 "load_mask_before": 0, "eval_only": False}
        names = fairseq_names(variant, cfg)
        for layer, scores in route["scores"].items():  # beside each weight: `...fc1.weight` -> `...fc1.scores`
            state["w2v_encoder.w2v_model." + names[layer + ".weight"].removesuffix(".weight") + ".scores"] = scores
    if style == "cfg":
        w2v_args = {"_name": None, "common": {"fp16": True}, "model": enc_model, "task": enc_task,
                    "criterion": None, "lr_scheduler": None}
        top = _fairseq_top(ctc_model_cfg(variant, w2v_args, name, **extra),
                           {"_name": "audio_finetuning", "data": "/data/1h", "labels": "ltr", "normalize": normalize,
                            "sample_rate": 16000}, "cfg")
    else:  # old fairseq: the finetuning args hold the pretraining args as a Namespace
        w2v_args = _fairseq_top(enc_model, enc_task, "args")["args"]
        head = ctc_model_cfg(variant, w2v_args, name, **extra)
        flat = {**{k: v for k, v in head.items() if k != "_name"}, "arch": name, "task": "audio_pretraining",
                "labels": "ltr", "sample_rate": 16000, "normalize": normalize, "fp16": True}
        top = {"args": argparse.Namespace(**flat)}
    return {**top, "model": state, "optimizer_history": [{"criterion_name": "CtcCriterion", "num_updates": 20000}],
            "extra_state": {"epoch": 100}, "last_optimizer_state": None}
