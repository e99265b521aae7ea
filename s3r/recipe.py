"""The finetuning recipe: every knob of a run (TrainConfig), the upstream presets, and the model for a run.

The command line speaks fairseq (the names of upstream's yamls and README commands), the model configs speak
Hugging Face (`Wav2Vec2Config`) or S3-Router (`RouteConfig`); MODEL_FLAGS is the one table between them.
S3-Router's options and their defaults are RouteConfig's; the encoder's regularisation flags override the
pretrained checkpoint's Wav2Vec2Config, as fairseq's Wav2Vec2AsrConfig does, with base_1h's values.

    cfg, _ = parse_config(["--init", "wav2vec_small.pt", "--data", "train-1h", "--prune-rate", "0.9"])
    model, vocab, pretrained = build_model(cfg, resolve_corpus(cfg.data, cfg.data_root))
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import checkpoint_vocab, load_pretrained
from .classify import Wav2Vec2ForSequenceClassification, is_head
from .cluster import load_last
from .compact import fold_masks
from .config import INIT_SCORES, RouteConfig, Wav2Vec2Config
from .data import LIBRILIGHT_SPLITS, LIBRISPEECH_SPLITS, Corpus, resolve_corpus
from .decode import transcribe
from .errors import ArgumentParser, ConfigError, S3RError, warn
from .metrics import score
from .model import Wav2Vec2ForCTC
from .prune import PARP_REPRUNE_INTERVAL, load_dense, start_parp
from .tasks import Labels, TaskCorpus, accuracy, classify, cross_entropy_sum, is_task, resolve_task
from .text import OutOfVocabularyError, Vocabulary

DEMO_BACKBONE = Path(__file__).resolve().parent / "assets" / "demo" / "backbone.pt"


class Flag(NamedTuple):
    """A command-line flag that sets a field of one of the model's configs."""

    config: type  # RouteConfig or Wav2Vec2Config
    field: str
    help: str


# CLI name (fairseq's, `--prune-rate` is prune_rate) -> the config field it sets. RouteConfig flags take
# RouteConfig's defaults; Wav2Vec2Config flags override the init checkpoint's config (Wav2Vec2AsrConfig).
MODEL_FLAGS: dict[str, Flag] = {
    # S3-Router (upstream model._name=wav2vec_ctc_st)
    "prune_rate": Flag(RouteConfig, "prune_rate", "model.prune_rate: fraction of each routed weight tensor KEPT "
                       "(0.9 = 10% sparsity)"),
    "init_score": Flag(RouteConfig, "init_score", "model.init_score: how the scores start (weight_rank: the first "
                       "mask is magnitude pruning)"),
    "score_scale": Flag(RouteConfig, "score_scale", "model.init_score_scale: scores = W / scale for "
                        "weight_magnitude_with_scale"),
    "fix_attn": Flag(RouteConfig, "fix_attn", "model.fix_attn: attention stays dense, only the FFN is routed"),
    "fix_fc": Flag(RouteConfig, "fix_fc", "model.fix_fc: the FFN stays dense, only attention is routed"),
    "trainable_proj": Flag(RouteConfig, "trainable_proj", "model.trainable_proj: train the CTC head"),
    "trainable_bias": Flag(RouteConfig, "trainable_bias", "model.trainable_bias"),
    "trainable_layer_norm": Flag(RouteConfig, "trainable_layer_norm", "model.trainable_layer_norm"),
    "trainable_pos": Flag(RouteConfig, "trainable_pos", "model.trainable_pos: the positional convolution trains too"),
    "trainable_post_extract_proj": Flag(RouteConfig, "trainable_feature_projection",
                                        "model.trainable_post_extract_proj: the feature projection trains too"),
    "co_train": Flag(RouteConfig, "co_train", "model.co_train: weights train together with the masks"),
    "route_granularity": Flag(RouteConfig, "route_granularity", "(s3r) what one score covers: weight, row, column, "
                              "neuron, head, neuron+head or n:m (e.g. 2:4); neuron/head routes export --compact"),
    # regularisation of the encoder (fairseq Wav2Vec2AsrConfig overrides of the pretrained config)
    "dropout": Flag(Wav2Vec2Config, "hidden_dropout", "model.dropout"),
    "attention_dropout": Flag(Wav2Vec2Config, "attention_dropout", "model.attention_dropout"),
    "activation_dropout": Flag(Wav2Vec2Config, "activation_dropout", "model.activation_dropout"),
    "dropout_input": Flag(Wav2Vec2Config, "feat_proj_dropout", "model.dropout_input (after the feature projection)"),
    "final_dropout": Flag(Wav2Vec2Config, "final_dropout", "model.final_dropout (before the CTC head)"),
    "layerdrop": Flag(Wav2Vec2Config, "layerdrop", "model.layerdrop"),
    "apply_mask": Flag(Wav2Vec2Config, "apply_spec_augment", "model.apply_mask: SpecAugment-style time and channel "
                       "masking while training (--no-apply-mask: none, whatever --mask-prob says)"),
    "mask_prob": Flag(Wav2Vec2Config, "mask_time_prob", "model.mask_prob: time masking with the learned mask "
                      "embedding"),
    "mask_length": Flag(Wav2Vec2Config, "mask_time_length", "model.mask_length"),
    "mask_channel_prob": Flag(Wav2Vec2Config, "mask_feature_prob", "model.mask_channel_prob"),
    "mask_channel_length": Flag(Wav2Vec2Config, "mask_feature_length", "model.mask_channel_length"),
    "checkpoint_activations": Flag(Wav2Vec2Config, "gradient_checkpointing", "model.checkpoint_activations: "
                                   "recompute activations in backward to save memory"),
}
# base_1h.yaml's encoder values that are not Wav2Vec2Config defaults (the others are: dropouts 0.1, layerdrop 0.1...)
BASE_1H_ENCODER = dict(mask_prob=0.65, mask_channel_prob=0.25)


def _encoder_recipe() -> dict:
    """The encoder overrides of the default recipe, keyed by Wav2Vec2Config field."""
    model = {f.name: f.default for f in fields(Wav2Vec2Config)}
    return {flag.field: BASE_1H_ENCODER.get(name, model[flag.field])
            for name, flag in MODEL_FLAGS.items() if flag.config is Wav2Vec2Config}


def opt(default: Any, help: str) -> Any:
    """A TrainConfig field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a run; saved flat, by CLI name, in each checkpoint (train_state.config)."""

    # what to train
    init: str = opt("", "model.w2v_path / checkpoint.finetune_from_model: a fairseq, HF or s3r checkpoint; "
                    "'' = the built-in demo backbone, s3r/assets/demo/backbone.pt")
    data: str = opt("demo", "dataset.train_subset: train-1h, train-clean-100, pl-train, a manifest .tsv, demo")
    data_root: str = opt(".", "task.data: folder holding LibriSpeech/, librispeech_finetuning/, cv-corpus-*/")
    valid: str = opt("auto", "dataset.valid_subset; auto: dev-other (LibriSpeech), <lang>-dev (CommonVoice), "
                     "demo-test (demo); '' = no validation")
    save_dir: str = opt("checkpoints", "checkpoint.save_dir; an existing checkpoint_last.pt there is resumed")
    preset: str = opt("", "upstream recipe yaml: 10m (base_10m), 1h (base_1h), 10h (base_10h), xlsr (xlsr/finetune)")
    finetune_weights: bool = opt(False, "model._name=wav2vec_ctc: standard weight finetuning (the baseline), no masks")
    # S3-Router's options (RouteConfig) and the encoder's regularisation (Wav2Vec2Config fields): MODEL_FLAGS
    route: RouteConfig = field(default_factory=RouteConfig)
    encoder: dict = field(default_factory=_encoder_recipe)
    # PARP (s3r/prune.py; the IMP driver `python -m s3r.prune imp` runs its rounds with these flags)
    parp: bool = opt(False, "(s3r) PARP (Lai et al., NeurIPS 2021): weight finetuning (implies --finetune-weights) "
                     "of the layers the route flags name (--no-fix-attn: attention and FFN), keeping the --prune-rate "
                     "fraction of largest |W| per tensor; pruned weights are zeroed but still learn, the mask is "
                     "re-selected by |W| every --reprune-interval updates; writes checkpoint_pruned.pt at the end")
    reprune_interval: int = opt(PARP_REPRUNE_INTERVAL, "(s3r) PARP: updates between re-prunings (the PARP "
                                "paper's n = 50); 0 = never: the mask stays fixed and pruned weights get no "
                                "gradient (IMP's rounds)")
    parp_mask_from: str = opt("", "(s3r) PARP: the checkpoint whose |W| give the first mask (a finetuned or "
                              "other-language model of the same architecture); '' = the --init weights (the paper's "
                              "MPI, magnitude pruning of the pretrained model)")
    freeze_finetune_updates: int = opt(0, "model.freeze_finetune_updates: the encoder is frozen (only the head "
                                       "trains) for this many updates")
    # data
    normalize: str = opt("auto", "task.normalize: auto (as the checkpoint was pretrained), true or false")
    units: str = opt("auto", "task.labels: letter (ltr), char or phone; auto: letter for LibriSpeech, char for "
                     "CommonVoice")
    vocab: str = opt("auto", "target dictionary: auto, init, corpus (its dict.ltr.txt, or the LibriSpeech letters), "
                     "build (from the transcripts), or a dict.ltr.txt / vocab.json path")
    max_tokens: int = opt(1_200_000, "dataset.max_tokens: padded audio samples per batch and process "
                          "(yaml 3.2M, README 1.2M)")
    max_tokens_valid: int = opt(800_000, "dataset.max_tokens_valid")
    required_batch_size_multiple: int = opt(8, "dataset.required_batch_size_multiple: a batch of this many "
                                            "utterances or more is cut to a multiple of it")
    max_sample_size: int = opt(0, "task.max_sample_size: crop longer audio to this many samples; 0 = never "
                               "(fairseq finetuning)")
    num_workers: int = opt(-1, "dataset.num_workers: DataLoader processes per rank; -1: min(6 (the yamls), CPU "
                           "cores per rank)")
    skip_bad: bool = opt(False, "(s3r) skip unreadable or too long utterances, count them in the log, instead of "
                         "stopping")
    # optimisation
    max_updates: int = opt(15000, "optimization.max_update")
    update_freq: int = opt(4, "optimization.update_freq: batches accumulated per update (the recipe assumes 2 "
                           "processes)")
    lr: float = opt(5e-5, "optimization.lr (peak)")
    sentence_avg: bool = opt(True, "optimization.sentence_avg: loss normalised per sentence, else per target unit")
    clip_norm: float = opt(0.0, "optimization.clip_norm; 0 = no clipping")
    adam_betas: tuple = opt((0.9, 0.98), "optimizer.adam_betas")
    adam_eps: float = opt(1e-8, "optimizer.adam_eps")
    weight_decay: float = opt(0.0, "optimizer.weight_decay")
    phase_ratio: tuple = opt((0.1, 0.4, 0.5), "lr_scheduler.phase_ratio: warmup, hold, exponential decay")
    init_lr_scale: float = opt(0.01, "lr_scheduler.init_lr_scale")
    final_lr_scale: float = opt(1e-4, "lr_scheduler.final_lr_scale (yaml 0.05; every README command sets 0.0001)")
    schedule_updates: int = opt(0, "lr_scheduler.max_update: length of the schedule; 0 = --max-updates")
    seed: int = opt(1, "common.seed")
    # bookkeeping
    validate_interval: int = opt(1000, "dataset.validate_interval_updates (and at every save, as fairseq)")
    validate_before: bool = opt(False, "(s3r) validate once before the first update, so the log shows the "
                                "starting error rate")
    save_interval: int = opt(1000, "checkpoint.save_interval_updates (checkpoint_last.pt; checkpoint_best.pt is "
                             "chosen at these save points only, as fairseq)")
    save_interval_minutes: float = opt(0.0, "(s3r) also write checkpoint_last.pt after every M minutes of "
                                       "training, for preemptible machines; 0 = only every --save-interval updates")
    keep_interval_updates: int = opt(0, "checkpoint.keep_interval_updates: also write checkpoint_<epoch>_<update>.pt "
                                     "every --save-interval updates and keep the newest K; -1 = all (fairseq's "
                                     "default), 0 = none")
    best_metric: str = opt("auto", "checkpoint.best_checkpoint_metric: wer, cer, uer (fairseq's, separators "
                           "counted), per (phones) or accuracy (classification); auto: uer for char/phone units, "
                           "accuracy for a classification set, else wer")
    classifier_proj_size: int = opt(256, "(classification sets) HF classifier_proj_size: the projector's width "
                                    "before mean pooling (s3prl projector_dim)")
    use_weighted_layer_sum: bool = opt(False, "(classification sets) HF use_weighted_layer_sum: pool a learned "
                                       "softmax-weighted sum of every hidden state (SUPERB's weighted sum)")
    log_interval: int = opt(200, "common.log_interval (updates between log.jsonl lines)")
    amp: str = opt("auto", "common.fp16 / bf16: auto = bf16 on GPUs that support it, else fp16; none on CPU")
    compile: bool = opt(False, "(s3r) torch.compile the model; experimental: it recompiles for new batch shapes")
    device: str = opt("auto", "(s3r) auto (cuda when available), cpu or cuda")
    threads: int = opt(0, "(s3r) torch.set_num_threads in each process; 0 = torch's default (OMP_NUM_THREADS; "
                       "torchrun sets 1 when unset). CPU results are bit-identical only at the same thread count")
    trust_checkpoint: bool = opt(False, "(s3r) allow --init files that pickle arbitrary classes (only for files "
                                 "you trust)")

    def __post_init__(self):
        if self.parp:
            self.finetune_weights = True  # PARP trains the weights; the masks follow their magnitudes
        if self.reprune_interval < 0:
            raise ConfigError(f"--reprune-interval must be >= 0 (0: never re-prune), not {self.reprune_interval}")


CHOICES = {"preset": ["", "10m", "1h", "10h", "xlsr", "demo"], "init_score": list(INIT_SCORES),
           "normalize": ["auto", "true", "false"], "units": ["auto", "letter", "char", "phone"],
           "best_metric": ["auto", "wer", "cer", "uer", "per", "accuracy"],
           "amp": ["auto", "bf16", "fp16", "none"], "device": ["auto", "cpu", "cuda"]}
ALIASES = {"best_metric": ("--best-checkpoint-metric",)}  # fairseq's own spelling, beside the short one
# Upstream yaml values that differ from the defaults (= base_1h.yaml + the README command line, whose init_score,
# fix_attn, trainable_proj (RouteConfig's defaults), final_lr_scale and max_tokens apply to every preset).
PRESETS = {
    "10m": dict(max_updates=13000),  # base_10m.yaml
    "1h": dict(),  # base_1h.yaml
    "10h": dict(max_updates=20000, mask_channel_prob=0.5, layerdrop=0.05, prune_rate=0.7),  # base_10h.yaml
    # xlsr/config/finetune.yaml (validate_interval_updates 1000, save_interval_updates 10000) + the README's
    # XLS-R command
    "xlsr": dict(max_updates=13000, normalize="true", mask_prob=0.75, dropout=0.0, attention_dropout=0.0,
                 save_interval=10000, prune_rate=0.94, checkpoint_activations=True, best_metric="uer"),
    # (s3r) the built-in demo (s3r/assets/demo: 3 minutes of Spanish, a 2M-parameter backbone), applied whenever
    # --data demo is given without --preset: minutes on 2 CPU cores, scored by phone error rate before and after
    "demo": dict(max_updates=200, lr=1e-2, final_lr_scale=0.05, max_tokens=128000, update_freq=1, valid="demo-test",
                 validate_interval=50, save_interval=50, validate_before=True, mask_prob=0.3, mask_channel_prob=0.1,
                 mask_channel_length=16, layerdrop=0.05, log_interval=10),
}
# (s3r) what a preset changes for --finetune-weights: the demo's lr 1e-2 (S3-Router's, for scores) makes 2M weights
# diverge, so the head learns alone for the first updates (fairseq freeze_finetune_updates), then everything at 3e-3
PRESETS_FINETUNE_WEIGHTS = {"demo": dict(lr=3e-3, freeze_finetune_updates=50)}
_NESTED = ("route", "encoder")


def config_values(cfg: TrainConfig) -> dict:
    """The flat form of a config, keyed by CLI name: what --help lists and what checkpoints store."""
    values = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if f.name not in _NESTED}
    for name, flag in MODEL_FLAGS.items():
        values[name] = getattr(cfg.route, flag.field) if flag.config is RouteConfig else cfg.encoder[flag.field]
    return values


def config_from_values(values: dict) -> TrainConfig:
    """The inverse of config_values (lists, as a checkpoint may hold them, become tuples again)."""
    unknown = sorted(set(values) - set(config_values(TrainConfig())))
    if unknown:
        raise ConfigError(f"unknown train option(s): {', '.join(unknown)}")
    route = {f.field: values[n] for n, f in MODEL_FLAGS.items() if f.config is RouteConfig and n in values}
    encoder = {f.field: values[n] for n, f in MODEL_FLAGS.items() if f.config is Wav2Vec2Config and n in values}
    run = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k not in MODEL_FLAGS}
    return TrainConfig(**run, route=RouteConfig(**route), encoder={**_encoder_recipe(), **encoder})


def build_parser() -> argparse.ArgumentParser:
    """Every flag of train.py, named as its fairseq option (help texts say which); all default to SUPPRESS."""
    p = ArgumentParser(description="Finetune wav2vec 2.0 for CTC with S3-Router masks (or weight "
                       "finetuning)", epilog="Defaults are base_1h as the upstream README runs it. --data demo (the "
                       "default) applies the demo preset unless --preset is given: its values are shown as 'demo: "
                       "...' ('demo --finetune-weights: ...' where weight finetuning differs). --preset fills another "
                       "recipe; flags given explicitly win. A resumed run keeps its saved values: no preset applies, "
                       "flags given again win and are named in one warning line.")
    defaults = config_values(TrainConfig())
    helps = {f.name: f.metadata.get("help") for f in fields(TrainConfig)} | {n: f.help for n, f in MODEL_FLAGS.items()}
    demo, demo_ft = PRESETS["demo"], PRESETS_FINETUNE_WEIGHTS["demo"]
    groups = {RouteConfig: p.add_argument_group("S3-Router (RouteConfig; its defaults are upstream's README command)"),
              Wav2Vec2Config: p.add_argument_group("encoder regularisation (overrides of the init checkpoint's "
                                                   "Wav2Vec2Config)")}
    for name, default in defaults.items():
        shown = f"default: {default!r}" + (f"; demo: {demo[name]!r}" if name in demo else "") + (
            f"; demo --finetune-weights: {demo_ft[name]!r}" if name in demo_ft else "")
        kw = dict(default=argparse.SUPPRESS, help=f"{helps[name]} ({shown})".replace("%", "%%"))
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kw.update(nargs=len(default), type=float)
        else:
            kw.update(type=type(default), choices=CHOICES.get(name))
        group = groups[MODEL_FLAGS[name].config] if name in MODEL_FLAGS else p
        group.add_argument("--" + name.replace("_", "-"), *ALIASES.get(name, ()), dest=name, **kw)
    return p


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, dict | None]:
    """(config, checkpoint_last or None). A new run: defaults < --preset (`--data demo` without one: the demo
    preset) < explicit flags. A resumed run (checkpoint_last.pt in --save-dir): the config it was started with <
    explicit flags; no preset applies, and the values the flags change are named in one warning line."""
    given = vars(build_parser().parse_args(argv))
    values = config_values(TrainConfig())
    ckpt = load_last(given.get("save_dir", values["save_dir"]))  # unreadable: names the newest numbered one
    if ckpt is None:
        preset = given.get("preset") or ("demo" if given.get("data", values["data"]) == "demo" else "")
        if preset:
            values.update(PRESETS[preset])
            if given.get("finetune_weights", values["finetune_weights"]):
                values.update(PRESETS_FINETUNE_WEIGHTS.get(preset, {}))
        return config_from_values({**values, **given}), None
    # where it was found, whatever folder it was saved in (a run directory may be moved)
    values.update({k: v for k, v in ckpt["train_state"]["config"].items() if k in values and k != "save_dir"})
    values["save_dir"] = given.get("save_dir", values["save_dir"])
    last = Path(values["save_dir"]) / "checkpoint_last.pt"
    if given.get("preset", values["preset"]) != values["preset"]:
        raise ConfigError(f"--preset {given['preset']}: {last} resumes a run started with --preset "
                          f"{values['preset'] or '(none)'}; a preset does not apply on resume (pass its values as "
                          f"flags, or use another --save-dir)")
    norm = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731  checkpoints hold tuples as lists
    changed = [k for k, v in given.items() if norm(v) != norm(values[k])]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {norm(values[k])} -> {norm(given[k])}" for k in changed)
        warn(f"resuming {last} (update {ckpt['train_state'].get('update', '?')}) with changed values: {flags}")
    return config_from_values({**values, **given}), ckpt


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary, model and validation split for a run


def choose_vocab(corpus: Corpus, init_vocab: Vocabulary | None = None, source: str = "auto") -> Vocabulary:
    """The target dictionary: `auto` takes the init checkpoint's when it covers the transcripts, then the corpus's
    (dict.ltr.txt, or fairseq's LibriSpeech letters), else builds one from the training transcripts."""
    def covers(v: Vocabulary) -> bool:
        try:
            for u in corpus.utterances:
                v.encode(u.text, f"utterance {u.id}")
            return True
        except OutOfVocabularyError:
            return False

    if source == "auto":
        source = "init" if init_vocab is not None and covers(init_vocab) else "corpus" if corpus.vocab else "build"
    if source == "init":
        if init_vocab is None:
            raise S3RError("--vocab init: the init checkpoint has no vocabulary (no dict.ltr.txt or vocab.json)")
        return init_vocab
    if source == "corpus":
        if corpus.vocab is None:
            raise S3RError(f"--vocab corpus: {corpus.name} comes without a dictionary; use --vocab build")
        return corpus.vocab
    if source == "build":
        return Vocabulary.build([u.text for u in corpus.utterances], corpus.units)
    if not Path(source).is_file():
        raise S3RError(f"--vocab {source}: no such file (or use auto, init, corpus, build)")
    return Vocabulary.from_hf_vocab(source) if source.endswith(".json") else Vocabulary.from_fairseq_dict(source)


def init_path(cfg: TrainConfig) -> str:
    """--init, or the built-in demo backbone when it is empty."""
    if cfg.init:
        return cfg.init
    if not DEMO_BACKBONE.is_file():
        raise S3RError(f"--init is required (a pretrained or finetuned checkpoint); the built-in demo backbone "
                       f"{DEMO_BACKBONE} is not in this installation")
    return str(DEMO_BACKBONE)


def build_model(cfg: TrainConfig, corpus: Corpus | None = None,
                vocab: Vocabulary | None = None) -> tuple[Wav2Vec2ForCTC, Vocabulary, str | None]:
    """(model, vocabulary, pretrained path or None) for a run: the init checkpoint with the recipe's regularisation,
    a CTC head for the vocabulary (`vocab`, else chosen from `corpus` by cfg.vocab; fresh when the checkpoint has
    none or another) and, unless cfg.finetune_weights, routed by cfg.route. The pretrained path is recorded in
    checkpoints so that they need not repeat the frozen weights."""
    path = init_path(cfg)
    init = load_pretrained(path, trust_checkpoint=cfg.trust_checkpoint)
    pretrained = None if cfg.finetune_weights or init.route_config is not None else path
    if init.route_config is not None:
        fold_masks(init)  # a routed s3r checkpoint as the start: its pruned weights become real zeros
    init_vocab = checkpoint_vocab(init, path)
    if vocab is None:
        if corpus is None:
            raise S3RError("build_model needs a corpus or a vocabulary")
        vocab = choose_vocab(corpus, init_vocab, cfg.vocab)
    normalize = init.config.normalize if cfg.normalize == "auto" else cfg.normalize == "true"
    config = replace(init.config, **cfg.encoder, normalize=normalize, vocab_size=len(vocab))
    model = Wav2Vec2ForCTC(config)  # rebuilt rather than patched: dropout rates are fixed when modules are made
    state = init.state_dict()
    if init.config.vocab_size != len(vocab) or (init_vocab is not None and init_vocab.symbols != vocab.symbols):
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}  # keep the model's fresh head
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("lm_head.") or k == "masked_spec_embed" for k in missing)
    del init
    if cfg.finetune_weights:
        model.freeze_feature_encoder()  # feature_grad_mult 0
        model.masked_spec_embed.requires_grad_(config.apply_spec_augment and config.mask_time_prob > 0)
    else:
        model.route(cfg.route)
    if cfg.parp:  # the first mask: magnitude pruning of the init weights, or of another checkpoint's
        mask_from = load_dense(cfg.parp_mask_from, cfg.trust_checkpoint) if cfg.parp_mask_from else None
        start_parp(model, cfg.route, mask_from, revive=cfg.reprune_interval > 0)
    model.vocab = vocab
    return model, vocab, pretrained


def best_metric(name: str, units: str) -> str:
    """The metric checkpoint_best.pt is chosen by: `auto` is upstream's, uer for char/phone units, else wer;
    accuracy for a classification set (units `label`)."""
    if (units == "label") != (name == "accuracy") and name != "auto":
        raise S3RError(f"--best-metric {name} does not score {'a classification' if units == 'label' else 'a CTC'} "
                       f"run (accuracy scores classification sets; wer, cer, uer, per transcripts)")
    if units == "label":
        return "accuracy"
    if name == "auto":
        return "uer" if units in ("char", "phone") else "wer"
    if name == "per" and units != "phone":
        raise S3RError(f"--best-metric per needs phone units, not {units}")
    return name


def default_valid(name: str, root: str = ".") -> str:
    """The validation split of a training split: dev-other (LibriSpeech), <lang>-dev, demo-test, valid.tsv (beside
    a manifest NAME, itself a path or one under `root`, as --data-root reads it)."""
    if name in LIBRISPEECH_SPLITS or name in LIBRILIGHT_SPLITS:
        return "dev-other"
    if name == "demo" or name.startswith("demo-"):
        return "demo-test"  # the built-in demo has train and test splits only
    if m := re.fullmatch(r"(.+)-(train|dev|test|validated)", name):
        return f"{m.group(1)}-dev"
    if name.endswith(".tsv"):
        path = Path(name) if Path(name).is_file() else Path(root) / name
        found = [path.with_name(n) for n in ("valid.tsv", "dev_other.tsv") if path.with_name(n).exists()]
        return str(found[0]) if found else ""
    return ""


# ----------------------------------------------------------------------------------------------------------------
# Utterance classification (s3r/classify.py, s3r/tasks.py): the same run, another head, loss and metric


class Task(NamedTuple):
    """What differs between a CTC run and a classification run, for train.py."""

    loss: Callable  # (logits, out_lengths, batch) -> the loss summed over the batch
    predict: Callable  # (model, loader, targets, device, autocast) -> [(id, reference, hypothesis)]
    score: Callable  # rows -> metrics (dict)
    metric: str  # the metric of checkpoint_best.pt
    higher_is_better: bool


def resolve_data(name: str, root: str | None = None, skip_bad: bool = False, units: str | None = None,
                 labels: tuple | None = None) -> Corpus:
    """The corpus `--data NAME` names: a classification set (s3r.tasks; `labels`: the model's classes) or a
    transcribed one (s3r.data)."""
    if is_task(name, root):
        return resolve_task(name, root, skip_bad, labels)
    return resolve_corpus(name, root, skip_bad, units)


def build_for(cfg: TrainConfig, corpus: Corpus, ckpt: dict | None = None) -> tuple[Wav2Vec2ForCTC, Any, str | None]:
    """(model, targets, pretrained) for a run on `corpus`: a CTC model and its Vocabulary, or, for a classification
    set, a classifier and its Labels; `ckpt` (checkpoint_last.pt when resuming) fixes the vocabulary or labels."""
    saved = None if ckpt is None else ckpt["config"].get("labels")
    if isinstance(corpus, TaskCorpus):
        if cfg.parp:
            raise S3RError(f"--parp prunes CTC models only; {corpus.name} is a classification set")
        if ckpt is not None and saved is None:
            raise S3RError(f"{cfg.save_dir}/checkpoint_last.pt is a CTC run; {corpus.name} is a classification set")
        return build_classifier(cfg, tuple(saved) if saved is not None else corpus.labels)
    if saved is not None:
        raise S3RError(f"{cfg.save_dir}/checkpoint_last.pt is a classification run; {corpus.name} is transcribed")
    return build_model(cfg, corpus, Vocabulary.from_dict(ckpt["vocab"]) if ckpt else None)


def build_classifier(cfg: TrainConfig, labels: tuple) -> tuple[Wav2Vec2ForSequenceClassification, Labels, str | None]:
    """build_model's counterpart for classification: the init checkpoint's encoder, a fresh head for `labels`
    (kept instead when --init is a classifier with these labels and sizes), routed by cfg.route unless
    cfg.finetune_weights."""
    path = init_path(cfg)
    init = load_pretrained(path, trust_checkpoint=cfg.trust_checkpoint)
    pretrained = None if cfg.finetune_weights or init.route_config is not None else path
    if init.route_config is not None:
        fold_masks(init)
    normalize = init.config.normalize if cfg.normalize == "auto" else cfg.normalize == "true"
    config = replace(init.config, **cfg.encoder, normalize=normalize, vocab_size=0, labels=tuple(labels),
                     classifier_proj_size=cfg.classifier_proj_size, use_weighted_layer_sum=cfg.use_weighted_layer_sum)
    model = Wav2Vec2ForSequenceClassification(config)
    same_head = all(getattr(init.config, k) == getattr(config, k)
                    for k in ("labels", "classifier_proj_size", "use_weighted_layer_sum"))
    state = {k: v for k, v in init.state_dict().items()
             if not k.startswith("lm_head.") and (same_head or not is_head(k))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(is_head(k) or k == "masked_spec_embed" for k in missing), (missing, unexpected)
    del init
    if cfg.finetune_weights:
        model.freeze_feature_encoder()
        model.masked_spec_embed.requires_grad_(config.apply_spec_augment and config.mask_time_prob > 0)
    else:
        model.route(cfg.route)
    model.vocab = None
    return model, Labels(labels), pretrained


def task_functions(cfg: TrainConfig, targets: Vocabulary | Labels) -> Task:
    """The loss, validation and best-checkpoint metric of a run: CTC (a Vocabulary) or classification (Labels)."""
    metric = best_metric(cfg.best_metric, targets.units)
    if isinstance(targets, Labels):
        return Task(cross_entropy_sum, classify, lambda rows: accuracy(rows, targets.labels), metric, True)
    return Task(ctc_loss_sum, transcribe, lambda rows: score(rows, targets.units), metric, False)


def improves(task: Task, value: float, best: float | None) -> bool:
    """Whether a validation value beats the best so far (lower error rate, or higher accuracy)."""
    return best is None or (value > best if task.higher_is_better else value < best)


# ----------------------------------------------------------------------------------------------------------------
# Learning rate and loss


def tri_stage_lr(update: int, cfg: TrainConfig) -> float:
    """fairseq tri_stage: linear warmup from init_lr_scale * lr, hold at lr, exponential decay to final_lr_scale*lr."""
    total = cfg.schedule_updates or cfg.max_updates
    warmup, hold, decay = (int(total * r) for r in cfg.phase_ratio)
    init_lr, final_lr = cfg.init_lr_scale * cfg.lr, cfg.final_lr_scale * cfg.lr
    if update < warmup:
        return init_lr + (cfg.lr - init_lr) / warmup * update
    if update < warmup + hold:
        return cfg.lr
    if update <= warmup + hold + decay:
        return cfg.lr * math.exp(math.log(cfg.final_lr_scale) / max(decay, 1) * (update - warmup - hold))
    return final_lr


def ctc_loss_sum(logits: torch.Tensor, out_lengths: torch.Tensor, batch: dict) -> torch.Tensor:
    """fairseq's ctc criterion: fp32 log-probs, blank 0, summed over the batch, infinite losses zeroed."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(log_probs, batch["targets"], out_lengths, batch["target_lengths"], blank=0,
                      reduction="sum", zero_infinity=True)


# ----------------------------------------------------------------------------------------------------------------
# Seeds and what else a run's numbers depend on


def runtime() -> dict:
    """Besides config and seed, what a run's floating-point results depend on: the thread count (summation order),
    torch's version and the CPU kernels it picked. Logged and saved so that a rerun can match them."""
    return {"threads": torch.get_num_threads(), "torch": str(torch.__version__),  # not TorchVersion: weights_only
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def seed_update(seed: int, rank: int, update: int) -> None:
    """Reseed torch, python and numpy from (seed, rank, update) before every update.

    fairseq reseeds torch only, with seed + update, identically on every rank. s3r seeds from the rank too, so
    that ranks draw independent dropout, layerdrop and SpecAugment masks (as one process over the combined batch
    would), and reseeds python's and numpy's global generators as well (s3r's own code draws from torch only; its
    cropping and shuffling use explicit numpy generators). What both share: an update's randomness does not depend
    on what ran before it (validation, a restart), so a resumed run repeats the uninterrupted one.
    """
    s = int(np.random.SeedSequence([seed, rank, update]).generate_state(1)[0])
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def rng_state() -> dict:
    """Every RNG state of this process, as plain lists and tensors (checkpoints load with weights_only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [keys.tolist(), pos, has_gauss, gauss]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Output of a run


class RunLog:
    """Rank 0's output: log.jsonl in the save dir, a progress bar, messages printed around it; silent elsewhere."""

    def __init__(self, save_dir: str, total: int, initial: int, enabled: bool):
        self.enabled, self.file = enabled, None
        if enabled:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(save_dir) / "log.jsonl", "a", encoding="utf-8")  # closed by __exit__
        # no bar when there is nothing left to do (a finished run started again)
        self.bar = tqdm(total=total, initial=initial, disable=not enabled or initial >= total, dynamic_ncols=True,
                        desc="train")

    def log(self, obj: dict) -> None:
        """One JSON line in log.jsonl."""
        if self.file is not None:
            self.file.write(json.dumps(obj) + "\n")
            self.file.flush()

    def write(self, msg: str) -> None:
        """A line on stdout (without breaking the bar); rank 0 only."""
        if self.enabled:
            self.bar.write(msg)

    def warn(self, msg: str) -> None:
        """A line on stderr (every rank: warnings name what that rank met)."""
        self.bar.write(msg, file=sys.stderr)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
