"""Export a routed model for use without s3r: a Hugging Face directory, or a dense s3r checkpoint.

    python -m s3r.export --hf DIR CKPT                 # config.json, model.safetensors, vocab.json, processor files
    python -m s3r.export --dense OUT.pt CKPT           # s3r checkpoint with the masks folded into the weights
    python -m s3r.export --compact OUT.pt CKPT         # neuron/head routes: a smaller dense model (s3r/compact.py)
    python -m s3r.export --hf DIR PRETRAINED --route ROUTE   # the same from shared weights + a route file

Either way the masks are multiplied into the weights (`s3r.compact.fold_masks`), so dropped weights are real
zeros and the model runs in any wav2vec2 implementation. The Hugging Face layout follows transformers'
`modeling_wav2vec2.py` (and its data2vec-audio / HuBERT siblings): our module names behind a `wav2vec2.` prefix,
the weight-normed positional conv under `parametrizations.weight.original0/1` (g/v) as transformers 5 saves it,
and `Wav2Vec2Processor` files (tokenizer + feature extractor) so `from_pretrained(DIR)` gives a working pipeline.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import load_pretrained, s3r_checkpoint, save_atomic
from .classify import is_head
from .compact import compact, fold_masks
from .config import Wav2Vec2Config
from .errors import ArgumentParser, S3RError
from .model import Wav2Vec2ForCTC

HF_CLASSES = {"wav2vec2": ("Wav2Vec2ForCTC", "wav2vec2."), "hubert": ("HubertForCTC", "hubert."),
              "data2vec-audio": ("Data2VecAudioForCTC", "data2vec_audio.")}
# a classification model (s3r/classify.py) exports as the family's *ForSequenceClassification
HF_CLASSIFIERS = {"wav2vec2": "Wav2Vec2ForSequenceClassification", "hubert": "HubertForSequenceClassification",
                  "data2vec-audio": "Data2VecAudioForSequenceClassification"}
HF_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # HF names of fairseq's <s> <pad> </s> <unk>; index 0 is the blank


def hf_model_type(config: Wav2Vec2Config) -> str:
    """The transformers family that has our architecture: data2vec's conv stack, HuBERT's optional norm, or wav2vec2."""
    if config.conv_pos_depth > 1:
        if config.layer_norm_first or config.feat_extract_norm != "layer":
            raise S3RError("a positional conv stack needs data2vec-audio, which has no pre-LN or group-norm variant")
        return "data2vec-audio"
    return "wav2vec2" if config.feat_proj_layer_norm else "hubert"


def hf_config(config: Wav2Vec2Config, model_type: str) -> dict:
    """config.json for transformers (the inverse of checkpoint.config_from_hf)."""
    c = config
    if c.intermediate_sizes is not None or c.num_heads_per_layer is not None:
        raise S3RError("a compact model's per-layer FFN widths / head counts have no transformers config field; "
                       "keep it as an s3r checkpoint (or export the routed model itself with --hf)")
    classifier = c.labels is not None
    d = {"architectures": [(HF_CLASSIFIERS[model_type] if classifier else HF_CLASSES[model_type][0])],
         "model_type": model_type,
         "conv_dim": list(c.conv_dim), "conv_kernel": list(c.conv_kernel), "conv_stride": list(c.conv_stride),
         "num_feat_extract_layers": len(c.conv_dim), "conv_bias": c.conv_bias, "feat_extract_norm": c.feat_extract_norm,
         "feat_extract_activation": "gelu", "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
         "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
         "hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps, "do_stable_layer_norm": c.layer_norm_first,
         "feat_proj_layer_norm": c.feat_proj_layer_norm, "num_conv_pos_embeddings": c.conv_pos_kernel,
         "num_conv_pos_embedding_groups": c.conv_pos_groups, "vocab_size": c.vocab_size,
         "hidden_dropout": c.hidden_dropout, "attention_dropout": c.attention_dropout,
         "activation_dropout": c.activation_dropout, "feat_proj_dropout": c.feat_proj_dropout,
         "final_dropout": c.final_dropout, "layerdrop": c.layerdrop,
         "apply_spec_augment": c.apply_spec_augment,
         "mask_time_prob": c.mask_time_prob, "mask_time_length": c.mask_time_length, "mask_time_min_masks": 2,
         "mask_feature_prob": c.mask_feature_prob, "mask_feature_length": c.mask_feature_length,
         "ctc_loss_reduction": "sum", "ctc_zero_infinity": True,  # fairseq's CTC criterion: summed, zero_infinity
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32"}
    if classifier:  # transformers' num_labels is len(id2label)
        d.update(id2label={str(i): name for i, name in enumerate(c.labels)},
                 label2id={name: i for i, name in enumerate(c.labels)},
                 classifier_proj_size=c.classifier_proj_size, use_weighted_layer_sum=c.use_weighted_layer_sum)
    if model_type == "data2vec-audio":  # data2vec counts its stacked positional convs in num_conv_pos_embeddings
        d.update(num_conv_pos_embeddings=c.conv_pos_depth, conv_pos_kernel_size=c.conv_pos_kernel)
        del d["do_stable_layer_norm"], d["feat_extract_norm"], d["feat_proj_layer_norm"]
    elif model_type == "wav2vec2":
        del d["feat_proj_layer_norm"]  # a HuBERT-only option; wav2vec2 always normalises the features
    return d


def hf_state_dict(model: Wav2Vec2ForCTC, model_type: str) -> dict[str, torch.Tensor]:
    """Our (folded) state dict under transformers' key names."""
    prefix = HF_CLASSES[model_type][1]
    spec_augment = model.config.mask_time_prob > 0 or model.config.mask_feature_prob > 0
    out = {}
    for key, tensor in model.state_dict().items():
        if key.endswith(".scores") or (key == "masked_spec_embed" and not spec_augment):
            continue  # transformers creates masked_spec_embed only when SpecAugment is on
        key = key.replace("conv.weight_g", "conv.parametrizations.weight.original0")
        key = key.replace("conv.weight_v", "conv.parametrizations.weight.original1")
        out[key if is_head(key) else prefix + key] = tensor.detach().cpu().contiguous().clone()
    return out


def export_hf(model: Wav2Vec2ForCTC, directory: str | Path, model_type: str | None = None) -> Path:
    """Write `model` (masks folded in place) as a transformers Wav2Vec2ForCTC-style directory, or, a classification
    model, Wav2Vec2ForSequenceClassification-style (config.json id2label names its classes)."""
    from safetensors.torch import save_file  # only this export needs safetensors

    if model.lm_head is None and model.config.labels is None:
        raise S3RError(f"{getattr(model, 'source', 'model')} has no CTC head (nor a classifier); the Hugging Face "
                       f"export is a *ForCTC or *ForSequenceClassification model")
    model_type = model_type or hf_model_type(model.config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fold_masks(model)
    save_file(hf_state_dict(model, model_type), str(directory / "model.safetensors"), metadata={"format": "pt"})

    def write_json(name: str, obj: dict) -> None:
        (directory / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write_json("config.json", hf_config(model.config, model_type))
    write_json("preprocessor_config.json", {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor", "processor_class": "Wav2Vec2Processor",
        "feature_size": 1, "sampling_rate": 16000, "padding_value": 0.0, "padding_side": "right",
        "do_normalize": model.config.normalize,
        "return_attention_mask": model.config.feat_extract_norm == "layer"})  # group-norm models ignore padding masks
    vocab = getattr(model, "vocab", None)
    if vocab is not None:
        symbols = list(vocab.symbols)
        if symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]:
            symbols[:4] = HF_SPECIALS  # same indices; HF's CTC tokenizer calls the blank (index 0) <pad>
        write_json("vocab.json", {s: i for i, s in enumerate(symbols)})
        specials = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
        if vocab.units == "phone":  # phones joined by spaces, "|" kept between words: s3r's decoding (text.py)
            write_json("tokenizer_config.json", {
                "tokenizer_class": "Wav2Vec2PhonemeCTCTokenizer", "processor_class": "Wav2Vec2Processor",
                **specials, "phone_delimiter_token": " ", "word_delimiter_token": None, "do_phonemize": False})
        else:
            write_json("tokenizer_config.json", {
                "tokenizer_class": "Wav2Vec2CTCTokenizer", "processor_class": "Wav2Vec2Processor",
                **specials, "word_delimiter_token": vocab.word_sep or "|", "do_lower_case": False})
    return directory


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m s3r.export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an s3r checkpoint (mask mode or dense), or pretrained weights with --route")
    p.add_argument("--hf", metavar="DIR", help="write a Hugging Face model directory")
    p.add_argument("--dense", metavar="OUT", help="write a dense s3r checkpoint with the masks folded in")
    p.add_argument("--compact", metavar="OUT", help="write a smaller dense s3r checkpoint without the FFN neurons and "
                   "attention heads a neuron/head route drops (a 2:4 route: dense, in the 2:4 pattern)")
    p.add_argument("--route", "--masks", metavar="ROUTE", help="apply this route file (python -m s3r.routes export) "
                   "to the checkpoint first")
    p.add_argument("--model-type", choices=sorted(HF_CLASSES), help="transformers family (default: from the config)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling arbitrary classes")
    args = p.parse_args(argv)
    if not (args.hf or args.dense or args.compact):
        p.error("give --hf DIR, --dense OUT and/or --compact OUT")
    try:
        model = load_pretrained(args.checkpoint, route=args.route, trust_checkpoint=args.trust_checkpoint)
        if args.compact:  # first: --hf and --dense fold the masks into `model`
            save_atomic(s3r_checkpoint(small := compact(model)), args.compact)
            c = small.config
            print(f"wrote {args.compact}: FFN widths {list(c.intermediate_sizes or [c.intermediate_size])}, "
                  f"heads {list(c.num_heads_per_layer or [c.num_attention_heads])}")
        if args.hf:
            export_hf(model, args.hf, args.model_type)
            print(f"wrote {args.hf}")
        if args.dense:
            save_atomic(s3r_checkpoint(fold_masks(model)), args.dense)
            print(f"wrote {args.dense}")
    except (S3RError, OSError, ValueError) as e:  # ValueError: a config value out of range (--prune-rate 2)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
