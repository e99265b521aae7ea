"""Finetune wav2vec 2.0 for CTC speech recognition with S3-Router masks (or plain weight finetuning).

S3-Router (Fu et al., NeurIPS 2022) keeps the pretrained weights frozen and learns which ones to keep: every
routed weight tensor gets a score tensor, the forward pass keeps the top `--prune-rate` fraction of |scores|
and the scores learn by straight-through gradients (see s3r/model.py). The recipe is upstream's fairseq one
(`examples/wav2vec/config/finetuning/base_1h.yaml` and the S3-Router README command line); each field of
TrainConfig below names the fairseq option it stands for.

One process (CPU or one GPU):
    python train.py --init wav2vec_small.pt --data train-1h --data-root /data --prune-rate 0.9
One node, N GPUs (NCCL; gloo when on CPU):
    torchrun --standalone --nproc_per_node=N train.py --init wav2vec_small.pt --data train-1h --data-root /data
Several nodes (the same command on each; HOST is one of them):
    torchrun --nnodes=M --nproc_per_node=8 --rdzv_id=run1 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
The upstream README commands, one for one:
    torchrun --standalone --nproc_per_node=2 train.py --init wav2vec_small.pt --data train-1h --valid test-clean \
        --data-root /data --prune-rate 0.9 --fix-attn --trainable-proj --init-score weight_rank       # S3-Router, 10%
    ... --init data2vec_base.pt --normalize true --init-score kaiming_uniform                          # data2vec
    ... --preset xlsr --init xlsr2_300m.pt --data zh-TW-train --valid zh-TW-test                       # XLS-R, 6%
    ... --finetune-weights --final-lr-scale 0.05 --save-dir ft                                         # pruning step 1
    ... --init ft/checkpoint_best.pt --prune-rate 0.3 --no-fix-attn --init-score weight_magnitude_with_scale  # step 2
Resume: run the same command again with the same --save-dir; flags given again override the saved ones.
SIGTERM / Ctrl-C: the current update finishes, checkpoint_last.pt is written, every rank exits 0 (torchrun itself,
signalled, still reports the signal; it waits 30 s for its workers before killing them).
Outputs in --save-dir: checkpoint_last.pt, checkpoint_best.pt (by validation WER, or UER for character and phone
units) and log.jsonl (training metrics every --log-interval updates, one line per validation).
"""
import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import random
import re
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from s3r import RouteConfig, S3RError, Wav2Vec2ForCTC, load_pretrained
from s3r.checkpoint import s3r_checkpoint, save_atomic, torch_load, weights_fingerprint
from s3r.data import LIBRILIGHT_SPLITS, LIBRISPEECH_SPLITS, SAMPLE_RATE, make_loader, resolve_corpus, set_epoch
from s3r.model import INIT_SCORES
from s3r.text import OutOfVocabularyError, Vocabulary
from eval import checkpoint_vocab, score, transcribe

DEMO_BACKBONE = Path(__file__).resolve().parent / "s3r" / "assets" / "demo" / "backbone.pt"


@dataclass
class TrainConfig:
    """Every knob of a run; saved in each checkpoint (train_state.config)."""

    # what to train
    init: str = ""  # model.w2v_path / checkpoint.finetune_from_model: a fairseq, HF or s3r checkpoint;
    #                 '' = the built-in demo backbone, s3r/assets/demo/backbone.pt
    data: str = "demo"  # dataset.train_subset: train-1h, train-clean-100, pl-train, a manifest .tsv, demo
    data_root: str = "."  # task.data: folder holding LibriSpeech/, librispeech_finetuning/, cv-corpus-*/
    valid: str = "auto"  # dataset.valid_subset; auto: dev-other (LibriSpeech), <lang>-dev (CommonVoice),
    #                      demo-test (demo); '' = no validation
    save_dir: str = "checkpoints"  # checkpoint.save_dir; an existing checkpoint_last.pt there is resumed
    preset: str = ""  # upstream recipe yaml: 10m (base_10m), 1h (base_1h), 10h (base_10h), xlsr (xlsr/finetune)
    # S3-Router (model._name=wav2vec_ctc_st)
    finetune_weights: bool = False  # model._name=wav2vec_ctc: standard weight finetuning (the baseline), no masks
    prune_rate: float = 0.9  # model.prune_rate: fraction of each routed weight tensor KEPT (0.9 = 10% sparsity)
    init_score: str = "weight_rank"  # model.init_score; upstream default kaiming_uniform, every README command
    #                                  but data2vec's sets weight_rank
    score_scale: float = 1.0  # model.init_score_scale: scores = W / scale for weight_magnitude_with_scale
    fix_attn: bool = True  # model.fix_attn: attention stays dense, only the FFN is routed; upstream default
    #                        false, the README's finetuning commands set true (its pruning command false)
    fix_fc: bool = False  # model.fix_fc: FFN stays dense, only attention is routed
    trainable_proj: bool = True  # model.trainable_proj: train the CTC head; upstream default false (a random
    #                              frozen head), every README command sets true
    trainable_bias: bool = False  # model.trainable_bias
    trainable_layer_norm: bool = False  # model.trainable_layer_norm
    trainable_pos: bool = False  # model.trainable_pos: the positional convolution trains too
    trainable_post_extract_proj: bool = False  # model.trainable_post_extract_proj: the feature projection trains too
    co_train: bool = False  # model.co_train: weights train together with the masks
    route_granularity: str = "weight"  # (s3r) weight, row, column, neuron, head, neuron+head or n:m (e.g. 2:4)
    # regularisation of the encoder (fairseq Wav2Vec2AsrConfig overrides of the pretrained config)
    dropout: float = 0.1  # model.dropout
    attention_dropout: float = 0.1  # model.attention_dropout
    activation_dropout: float = 0.1  # model.activation_dropout
    dropout_input: float = 0.0  # model.dropout_input (after the feature projection)
    final_dropout: float = 0.0  # model.final_dropout (before the CTC head)
    layerdrop: float = 0.1  # model.layerdrop
    mask_prob: float = 0.65  # model.mask_prob: time masking with the learned mask embedding (apply_mask true)
    mask_length: int = 10  # model.mask_length
    mask_channel_prob: float = 0.25  # model.mask_channel_prob
    mask_channel_length: int = 64  # model.mask_channel_length
    freeze_finetune_updates: int = 0  # model.freeze_finetune_updates: the encoder is frozen (only the head
    #                                   trains) for this many updates
    checkpoint_activations: bool = False  # model.checkpoint_activations: recompute activations in backward to save memory
    # data
    normalize: str = "auto"  # task.normalize: auto (as the checkpoint was pretrained), true or false
    units: str = "auto"  # task.labels: letter (ltr), char or phone; auto: letter for LibriSpeech, char for CommonVoice
    vocab: str = "auto"  # target dictionary: auto, init, corpus (its dict.ltr.txt, or the LibriSpeech letters),
    #                      build (from the transcripts), or a dict.ltr.txt / vocab.json path
    max_tokens: int = 1_200_000  # dataset.max_tokens: padded audio samples per batch and process (yaml 3.2M, README 1.2M)
    max_tokens_valid: int = 800_000  # dataset.max_tokens_valid
    max_sample_size: int = 0  # task.max_sample_size: crop longer audio to this many samples; 0 = never (fairseq finetuning)
    num_workers: int = -1  # dataset.num_workers: DataLoader processes per rank; -1: min(6 (the yamls),
    #                        CPU cores per rank)
    skip_bad: bool = False  # (s3r) skip unreadable or too long utterances, count them in the log, instead of stopping
    # optimisation
    max_updates: int = 15000  # optimization.max_update
    update_freq: int = 4  # optimization.update_freq: batches accumulated per update (the recipe assumes 2 processes)
    lr: float = 5e-5  # optimization.lr (peak)
    sentence_avg: bool = True  # optimization.sentence_avg: loss normalised per sentence, else per target unit
    clip_norm: float = 0.0  # optimization.clip_norm; 0 = no clipping
    adam_betas: tuple = (0.9, 0.98)  # optimizer.adam_betas
    adam_eps: float = 1e-8  # optimizer.adam_eps
    weight_decay: float = 0.0  # optimizer.weight_decay
    phase_ratio: tuple = (0.1, 0.4, 0.5)  # lr_scheduler.phase_ratio: warmup, hold, exponential decay
    init_lr_scale: float = 0.01  # lr_scheduler.init_lr_scale
    final_lr_scale: float = 1e-4  # lr_scheduler.final_lr_scale (yaml 0.05; every README command sets 0.0001)
    schedule_updates: int = 0  # lr_scheduler.max_update: length of the schedule; 0 = --max-updates
    seed: int = 1  # common.seed
    # bookkeeping
    validate_interval: int = 1000  # dataset.validate_interval_updates
    validate_before: bool = False  # (s3r) validate once before the first update, so the log shows the
    #                                starting error rate
    save_interval: int = 1000  # checkpoint.save_interval_updates (checkpoint_last.pt)
    best_metric: str = "auto"  # checkpoint.best_checkpoint_metric: wer, cer or uer; auto: uer for char/phone
    #                            units, else wer
    log_interval: int = 200  # common.log_interval (updates between log.jsonl lines)
    amp: str = "auto"  # common.fp16 / bf16: auto = bf16 on GPUs that support it, else fp16; none on CPU
    compile: bool = False  # (s3r) torch.compile the model; experimental: it recompiles for new batch shapes
    device: str = "auto"  # (s3r) auto (cuda when available), cpu or cuda
    trust_checkpoint: bool = False  # (s3r) allow --init files that pickle arbitrary classes (only for files you trust)


CHOICES = {"preset": ["", "10m", "1h", "10h", "xlsr", "demo"], "init_score": list(INIT_SCORES),
           "normalize": ["auto", "true", "false"], "units": ["auto", "letter", "char", "phone"],
           "best_metric": ["auto", "wer", "cer", "uer"],
           "amp": ["auto", "bf16", "fp16", "none"], "device": ["auto", "cpu", "cuda"]}
# Upstream yaml values that differ from the defaults above (= base_1h.yaml + the README command line, whose
# fix_attn, trainable_proj, init_score, final_lr_scale and max_tokens overrides apply to every preset).
PRESETS = {
    "10m": dict(max_updates=13000),  # base_10m.yaml
    "1h": dict(),  # base_1h.yaml
    "10h": dict(max_updates=20000, mask_channel_prob=0.5, layerdrop=0.05, prune_rate=0.7),  # base_10h.yaml
    "xlsr": dict(max_updates=13000, normalize="true", mask_prob=0.75, dropout=0.0, attention_dropout=0.0,  # finetune.yaml
                 prune_rate=0.94, checkpoint_activations=True, best_metric="uer"),  # + the README's XLS-R command
    # (s3r) the built-in demo (s3r/assets/demo: 3 minutes of Spanish, a 2M-parameter backbone), applied whenever
    # --data demo is given without --preset: minutes on 2 CPU cores, scored by phone error rate before and after
    "demo": dict(max_updates=200, lr=1e-2, final_lr_scale=0.05, max_tokens=128000, update_freq=1, valid="demo-test",
                 validate_interval=50, save_interval=50, validate_before=True, mask_prob=0.3, mask_channel_prob=0.1,
                 mask_channel_length=16, layerdrop=0.05, log_interval=10),
}


def field_help() -> dict:
    """The trailing comment of each TrainConfig field (and its indented continuation lines): its --help text."""
    helps, name = {}, None
    for line in inspect.getsource(TrainConfig).splitlines():
        if m := re.fullmatch(r"    (\w+): .*?  # (.*)", line):
            name, helps[m.group(1)] = m.group(1), m.group(2)
        elif name and (m := re.fullmatch(r" +# {2,}(.*)", line)):  # "    #      more words" continues the field
            helps[name] += " " + m.group(1)
        else:
            name = None
    return helps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Defaults are base_1h as the upstream README "
                                "runs it; --preset fills another recipe; flags given explicitly win.")
    helps = field_help()
    for f in fields(TrainConfig):
        kw = dict(default=argparse.SUPPRESS, help=f"{helps[f.name]} (default: {f.default!r})".replace("%", "%%"))
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):
            kw.update(nargs=len(f.default), type=float)
        else:
            kw.update(type=type(f.default), choices=CHOICES.get(f.name))
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p


def parse_config(argv=None) -> tuple[TrainConfig, dict | None]:
    """Defaults < saved config (when resuming) < --preset < explicit flags. Returns (config, checkpoint_last or None)."""
    given = vars(build_parser().parse_args(argv))
    values = asdict(TrainConfig())
    last = Path(given.get("save_dir", values["save_dir"])) / "checkpoint_last.pt"
    ckpt = torch_load(last) if last.is_file() else None
    if ckpt is not None:
        values.update({k: v for k, v in ckpt["train_state"]["config"].items() if k in values})
    preset = given.get("preset") or ("demo" if given.get("data", values["data"]) == "demo" else "")
    values.update(PRESETS[preset] if preset else {})
    values.update(given)
    tuples = {f.name for f in fields(TrainConfig) if isinstance(f.default, tuple)}
    return TrainConfig(**{k: tuple(v) if k in tuples else v for k, v in values.items()}), ckpt


# ----------------------------------------------------------------------------------------------------------------
# Learning rate, loss, seeds


def tri_stage_lr(update: int, cfg: TrainConfig) -> float:
    """fairseq tri_stage: linear warmup from init_lr_scale * lr, hold at lr, exponential decay to final_lr_scale * lr."""
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


def ctc_loss_sum(logits, out_lengths, batch) -> torch.Tensor:
    """fairseq's ctc criterion: fp32 log-probs, blank 0, summed over the batch, infinite losses zeroed."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(log_probs, batch["targets"], out_lengths, batch["target_lengths"], blank=0,
                      reduction="sum", zero_infinity=True)


def seed_update(seed: int, rank: int, update: int):
    """Reseed every RNG from (seed, rank, update), as fairseq's Trainer does: dropout, layerdrop and masking of an update
    do not depend on what ran before it (validation, a restart), so a resumed run repeats the uninterrupted one."""
    s = int(np.random.SeedSequence([seed, rank, update]).generate_state(1)[0])
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # plain lists: checkpoints load with weights_only
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": [keys.tolist(), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Model and vocabulary


def choose_vocab(cfg: TrainConfig, corpus, init_vocab: Vocabulary | None) -> Vocabulary:
    """The target dictionary: --vocab auto takes the init checkpoint's when it covers the transcripts, then the
    corpus's (dict.ltr.txt, or fairseq's LibriSpeech letters), else builds one from the training transcripts."""
    texts = [u.text for u in corpus.utterances]

    def covers(v):
        try:
            for u in corpus.utterances:
                v.encode(u.text, f"utterance {u.id}")
            return True
        except OutOfVocabularyError:
            return False

    source = cfg.vocab
    if source == "auto":
        source = "init" if init_vocab is not None and covers(init_vocab) else "corpus" if corpus.vocab else "build"
    if source == "init":
        if init_vocab is None:
            raise S3RError(f"--vocab init: {cfg.init} has no vocabulary (dict.ltr.txt next to it, or vocab.json)")
        return init_vocab
    if source == "corpus":
        if corpus.vocab is None:
            raise S3RError(f"--vocab corpus: {corpus.name} comes without a dictionary; use --vocab build")
        return corpus.vocab
    if source == "build":
        return Vocabulary.build(texts, corpus.units)
    if not Path(source).is_file():
        raise S3RError(f"--vocab {source}: no such file (or use auto, init, corpus, build)")
    return Vocabulary.from_hf_vocab(source) if source.endswith(".json") else Vocabulary.from_fairseq_dict(source)


def build_model(cfg: TrainConfig, corpus, vocab: Vocabulary | None):
    """(model, vocabulary, pretrained path or None): the init checkpoint with the recipe's regularisation, a CTC head
    for the vocabulary (fresh, initialised as fairseq's, when the checkpoint has none or another) and, in mask mode,
    routed. The pretrained path is recorded in checkpoints so that they need not repeat the frozen weights."""
    init = load_pretrained(cfg.init, trust_checkpoint=cfg.trust_checkpoint)
    pretrained = None if cfg.finetune_weights or init.route_config is not None else cfg.init
    if init.route_config is not None:
        init.fold_masks()  # a routed s3r checkpoint as the start: its pruned weights become real zeros
    vocab = vocab or choose_vocab(cfg, corpus, checkpoint_vocab(init, cfg.init))
    c = init.config
    config = replace(c, hidden_dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                     activation_dropout=cfg.activation_dropout, feat_proj_dropout=cfg.dropout_input,
                     final_dropout=cfg.final_dropout, layerdrop=cfg.layerdrop, mask_time_prob=cfg.mask_prob,
                     mask_time_length=cfg.mask_length, mask_feature_prob=cfg.mask_channel_prob,
                     mask_feature_length=cfg.mask_channel_length, gradient_checkpointing=cfg.checkpoint_activations,
                     normalize=c.normalize if cfg.normalize == "auto" else cfg.normalize == "true", vocab_size=len(vocab))
    model = Wav2Vec2ForCTC(config)  # rebuilt rather than patched: dropout rates are fixed when modules are made
    state = init.state_dict()
    init_vocab = checkpoint_vocab(init, cfg.init)
    fresh_head = c.vocab_size != len(vocab) or (init_vocab is not None and init_vocab.symbols != vocab.symbols)
    if fresh_head:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
        nn.init.xavier_uniform_(model.lm_head.weight)  # fairseq Wav2VecEncoder.proj = Linear(): xavier, zero bias
        nn.init.zeros_(model.lm_head.bias)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("lm_head.") or k == "masked_spec_embed" for k in missing)
    del init
    if cfg.finetune_weights:
        model.freeze_feature_encoder()  # feature_grad_mult 0
        model.masked_spec_embed.requires_grad_(cfg.mask_prob > 0)
    else:
        model.route(RouteConfig(prune_rate=cfg.prune_rate, init_score=cfg.init_score, score_scale=cfg.score_scale,
                                fix_attn=cfg.fix_attn, fix_fc=cfg.fix_fc, trainable_proj=cfg.trainable_proj,
                                trainable_bias=cfg.trainable_bias, trainable_layer_norm=cfg.trainable_layer_norm,
                                trainable_pos=cfg.trainable_pos,
                                trainable_feature_projection=cfg.trainable_post_extract_proj, co_train=cfg.co_train,
                                route_granularity=cfg.route_granularity))
    model.vocab = vocab
    return model, vocab, pretrained


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup and checkpoints


def setup_distributed(device: str) -> tuple[bool, int, int, torch.device]:
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is one process."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise S3RError("--device cuda: no CUDA device is visible")
    if not ddp:
        return False, 0, 1, torch.device("cuda" if cuda else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return True, rank, world, torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def gather(obj, ddp: bool, world: int) -> list:
    if not ddp:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def save_checkpoints(run, names: list[str]):
    """All ranks call this (RNG states are gathered); rank 0 writes each file atomically (temp file + rename)."""
    rngs = gather(rng_state(), run.ddp, run.world)
    if run.rank != 0:
        return
    train_state = {"update": run.update, "epoch": run.epoch, "batch_offset": run.offset, "best": run.best,
                   "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "rng": rngs,
                   "world_size": run.world, "skipped": run.skipped, "config": asdict(run.cfg)}
    ckpt = s3r_checkpoint(run.raw_model, run.vocab, pretrained=run.pretrained, train_state=train_state)
    if ckpt["pretrained"] is not None:  # of the weights as loaded (trained ones are stored in "model" anyway)
        ckpt["pretrained"]["sha256"] = run.pretrained_sha
    state = run.raw_model.state_dict()  # a fresh head or mask embedding is not in the pretrained file, trained or not
    ckpt["model"].update({k: v for k, v in state.items() if k.startswith("lm_head.") or k == "masked_spec_embed"})
    for name in names:
        save_atomic(ckpt, Path(run.cfg.save_dir) / name)


def resume(run, ckpt: dict):
    """Load model, optimizer, scaler, position in the data and RNG states from checkpoint_last.pt."""
    ref = ckpt.get("pretrained")
    if ref is not None and ref["sha256"] != weights_fingerprint(run.raw_model):
        raise S3RError(f"{run.cfg.save_dir}/checkpoint_last.pt was trained on other weights than {run.cfg.init}")
    missing, unexpected = run.raw_model.load_state_dict(ckpt["model"], strict=False)
    if unexpected or (missing and ref is None):  # mask mode stores only what trained; the rest is the pretrained file
        raise S3RError(f"{run.cfg.save_dir}/checkpoint_last.pt: {'unexpected' if unexpected else 'missing'} key "
                       f"{(unexpected or missing)[0]!r} (trained with other --finetune-weights or routing flags?)")
    ts = ckpt["train_state"]
    run.optimizer.load_state_dict(ts["optimizer"])
    run.scaler.load_state_dict(ts["scaler"])
    run.update, run.epoch, run.best, run.skipped = ts["update"], ts["epoch"], ts["best"], ts["skipped"]
    run.offset = ts["batch_offset"] if ts["world_size"] == run.world else 0
    if ts["world_size"] == run.world:
        set_rng_state(ts["rng"][run.rank])
    elif run.rank == 0:
        print(f"warning: resuming {ts['world_size']}-process training with {run.world}: epoch {run.epoch} restarts",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# The run


class Run:
    """Everything one training run holds; cleared in a `finally` so DDP and gloo shut down cleanly."""


def default_valid(name: str) -> str:
    if name in LIBRISPEECH_SPLITS or name in LIBRILIGHT_SPLITS:
        return "dev-other"
    if name == "demo" or name.startswith("demo-"):
        return "demo-test"  # the built-in demo has train and test splits only
    if m := re.fullmatch(r"(.+)-(train|dev|test|validated)", name):
        return f"{m.group(1)}-dev"
    if name.endswith(".tsv"):
        found = [Path(name).with_name(n) for n in ("valid.tsv", "dev_other.tsv") if Path(name).with_name(n).exists()]
        return str(found[0]) if found else ""
    return ""


def validate(run) -> bool:
    """Greedy-decode the validation set (sharded over ranks), score it, log one line; True if it is the best yet."""
    rows = transcribe(run.raw_model, run.valid_loader, run.vocab, run.device, run.autocast)
    rows = [r for part in gather(rows, run.ddp, run.world) for r in part]
    metrics = score(rows, run.vocab.units)
    value = metrics[run.best_metric]
    improved = run.best is None or value < run.best
    run.best = value if improved else run.best
    if run.rank == 0:
        line = {"valid": run.valid_name, "update": run.update, **metrics, "best": run.best}
        run.log(line)
        extra = " | ".join(f"{k} {100 * metrics[k]:.2f}" for k in ("wer", "cer", "uer") if k in metrics)
        run.write(f"valid {run.valid_name} | update {run.update} | {extra} | best {run.best_metric} {100 * run.best:.2f}"
                  f" | {metrics['utterances']} utterances")
    return improved


def train(cfg: TrainConfig, ckpt: dict | None, run: Run):
    run.cfg = cfg
    run.ddp, run.rank, run.world, run.device = setup_distributed(cfg.device)
    if not cfg.init:
        if not DEMO_BACKBONE.is_file():
            raise S3RError(f"--init is required (a pretrained or finetuned checkpoint); the built-in demo backbone "
                           f"{DEMO_BACKBONE} is not in this checkout")
        cfg.init = str(DEMO_BACKBONE)
    if cfg.update_freq < 1 or cfg.max_tokens < 1:
        raise S3RError("--update-freq and --max-tokens must be positive")
    torch.manual_seed(cfg.seed)  # the same fresh head and initial scores on every rank
    units = None if cfg.units == "auto" else cfg.units
    corpus = resolve_corpus(cfg.data, cfg.data_root, cfg.skip_bad, units)
    if not corpus.utterances:
        raise S3RError(f"{cfg.data}: no utterances under {cfg.data_root}")
    vocab = Vocabulary.from_dict(ckpt["vocab"]) if ckpt is not None else None
    model, run.vocab, run.pretrained = build_model(cfg, corpus, vocab)
    # The fingerprint of the frozen weights as loaded: with co_train or trainable_pos some of them train later.
    run.pretrained_sha = weights_fingerprint(model) if run.pretrained else None
    run.raw_model = model.to(run.device)
    run.best_metric = cfg.best_metric if cfg.best_metric != "auto" else \
        "uer" if run.vocab.units in ("char", "phone") else "wer"

    # data: every rank gets the same number of batches (TokenBatchSampler pads the epoch), DDP never waits forever
    normalize = model.config.normalize
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = cfg.num_workers if cfg.num_workers >= 0 else min(6, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    run.loader = make_loader(corpus.utterances, run.vocab, cfg.max_tokens, True, normalize, cfg.max_sample_size or None,
                             run.world, run.rank, cfg.seed, workers, cfg.skip_bad)
    run.loader.worker_init_fn = _worker_init
    run.valid_name = cfg.valid if cfg.valid != "auto" else default_valid(cfg.data)
    run.valid_loader = None
    if run.valid_name:
        try:
            valid = resolve_corpus(run.valid_name, cfg.data_root, cfg.skip_bad, units)
        except S3RError as e:
            if cfg.valid != "auto":
                raise
            valid, reason = None, str(e)
            if run.rank == 0:
                print(f"warning: no validation ({reason}); pass --valid NAME", file=sys.stderr)
        if valid is not None:
            run.valid_loader = make_loader(valid.utterances[run.rank:: run.world], run.vocab, cfg.max_tokens_valid, False,
                                           normalize, None, 1, 0, cfg.seed, workers, cfg.skip_bad, allow_unk=True)
            run.valid_loader.worker_init_fn = _worker_init
    bad = corpus.skipped + run.loader.dataset.skipped
    run.skipped = len(bad)

    # optimisation: Adam over the trainable tensors only (scores and head in mask mode), fp32 state
    params = [p for p in model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)
    amp = cfg.amp
    if amp == "auto":
        amp = "none" if run.device.type == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    run.autocast = (lambda: torch.autocast(run.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    run.scaler = torch.amp.GradScaler(run.device.type, init_scale=128.0, enabled=amp == "fp16")  # common.fp16_init_scale
    run.update, run.epoch, run.offset, run.best = 0, 0, 0, None
    if ckpt is not None:
        resume(run, ckpt)
    run.frozen = False  # freeze_finetune_updates: the encoder output is detached, so only the head learns
    model.encoder.register_forward_hook(lambda mod, inp, out: out.detach() if run.frozen else out)
    net = torch.compile(model) if cfg.compile else model
    find_unused = cfg.layerdrop > 0 or cfg.freeze_finetune_updates > run.update or cfg.mask_prob > 0
    run.model = DDP(net, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                    find_unused_parameters=find_unused) if run.ddp else net

    # logging (rank 0)
    log_file = None
    if run.rank == 0:
        Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
        log_file = open(Path(cfg.save_dir) / "log.jsonl", "a", encoding="utf-8")
    from tqdm import tqdm
    bar = tqdm(total=cfg.max_updates, initial=run.update, disable=run.rank != 0, dynamic_ncols=True, desc="train")
    run.write = bar.write  # stdout, without breaking the progress bar
    run.warn = lambda msg: bar.write(msg, file=sys.stderr)
    run.log = lambda obj: (log_file.write(json.dumps(obj) + "\n"), log_file.flush())
    if run.rank == 0:
        n_params = sum(p.numel() for p in params)
        run.log({"event": "resume" if ckpt else "start", "update": run.update, "world_size": run.world, "amp": amp,
                 "trainable_parameters": n_params, "vocab": len(run.vocab), "train_utterances": len(corpus.utterances),
                 "train_seconds": round(corpus.seconds, 1), "skipped": [{"path": p, "reason": r} for p, r in bad],
                 "config": asdict(cfg)})
        mode = "weight finetuning" if cfg.finetune_weights else f"S3-Router, prune rate {cfg.prune_rate}"
        bar.write(f"{mode}: {n_params:,} trainable parameters, {len(corpus.utterances)} utterances "
                  f"({corpus.seconds / 3600:.2f} h), {run.world} process(es), amp {amp}, {len(bad)} skipped")
    if run.update >= cfg.max_updates:
        if run.rank == 0:
            bar.write(f"nothing to do: {cfg.save_dir}/checkpoint_last.pt is at update {run.update} "
                      f"(--max-updates {cfg.max_updates})")
        return

    # SIGTERM / SIGINT: finish this update, save, exit 0 (a second Ctrl-C interrupts at once)
    run.stop = False

    def request_stop(signum, frame):
        run.stop = True
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        train_loop(run, bar)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        bar.close()
        if log_file:
            log_file.close()


def _worker_init(worker_id: int):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it saves first)


def train_step(run, group: list[dict]) -> torch.Tensor:
    """One update over `group` micro-batches: gradients accumulate locally, DDP all-reduces after the last one.
    Returns [loss sum, sentences, audio seconds, skipped, stop] summed over ranks."""
    cfg, model = run.cfg, run.model
    # fairseq divides the summed loss by the sample size of the whole update on all ranks (sentences with
    # sentence_avg); DDP averages gradients over ranks, hence the factor world_size.
    sizes = [len(b["ids"]) if cfg.sentence_avg else int(b["target_lengths"].sum()) for b in group]
    total = torch.tensor(float(sum(sizes)), device=run.device)
    if run.ddp:
        dist.all_reduce(total)
    scale = run.world / max(float(total), 1.0)
    model.train()
    run.frozen = run.update < cfg.freeze_finetune_updates
    run.optimizer.zero_grad(set_to_none=True)
    stats = torch.zeros(5, dtype=torch.float64)
    for i, batch in enumerate(group):
        sync = not run.ddp or i == len(group) - 1
        for path, reason in batch["skipped"]:  # counted in log.jsonl; named here by the rank that met it
            run.warn(f"skipped {path}: {reason}")
        stats[3] += len(batch["skipped"])
        with contextlib.nullcontext() if sync else model.no_sync():
            if not batch["ids"]:  # every utterance of this batch was unreadable (--skip-bad): join DDP with nothing
                wav, lengths = torch.zeros(1, SAMPLE_RATE, device=run.device), None
                with run.autocast():
                    logits, _ = model(wav, lengths)
                loss = logits.float().sum() * 0.0
            else:
                batch = {k: v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                with run.autocast():
                    logits, out_lengths = model(batch["wav"], batch["lengths"])
                loss = ctc_loss_sum(logits, out_lengths, batch)
                stats[0] += loss.item()
                stats[1] += len(batch["ids"])
                stats[2] += float(batch["lengths"].sum()) / SAMPLE_RATE
            run.scaler.scale(loss * scale).backward()
    for g in run.optimizer.param_groups:
        g["lr"] = tri_stage_lr(run.update, cfg)
    run.scaler.unscale_(run.optimizer)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    run.gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm if cfg.clip_norm > 0 else float("inf")))
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    # fp16 overflow: the scaler skipped the step and lowered the scale; like fairseq, it does not count as an update
    run.overflow = scale is not None and run.scaler.get_scale() < scale
    stats[4] = float(run.stop)
    if run.ddp:  # one small all-reduce: the log and a stop request (SIGTERM on any rank stops all of them together)
        stats = stats.to(run.device)
        dist.all_reduce(stats)
    return stats.cpu()


def train_loop(run, bar):
    cfg = run.cfg
    if cfg.validate_before and run.update == 0 and run.valid_loader is not None:
        validate(run)  # where training starts (a fresh CTC head: about 100% error)
        run.best = None  # only trained models compete for checkpoint_best.pt
    acc, n_acc, t_log = torch.zeros(4, dtype=torch.float64), 0, time.perf_counter()  # since the last log line
    while True:
        set_epoch(run.loader, run.epoch, run.offset)
        batches = iter(run.loader)
        while group := list(islice(batches, cfg.update_freq)):
            run.offset += len(group)
            seed_update(cfg.seed, run.rank, run.update)
            stats = train_step(run, group)
            stop = bool(stats[4] > 0)
            run.skipped += int(stats[3])
            if run.overflow and not stop:
                continue
            run.update += not run.overflow
            acc, n_acc = acc + stats[:4], n_acc + 1
            lr, wall = run.optimizer.param_groups[0]["lr"], time.perf_counter() - t_log
            bar.update(1)
            bar.set_postfix(loss=f"{stats[0] / max(stats[1], 1):.3f}", lr=f"{lr:.2e}",
                            audio_s_per_s=f"{acc[2] / wall:.1f}", refresh=False)
            done = run.update >= cfg.max_updates
            if run.update % cfg.log_interval == 0 or done or stop:
                if run.rank == 0:  # loss: nats per sentence (fairseq logs bits: divide by ln 2)
                    run.log({"update": run.update, "epoch": run.epoch, "loss": float(acc[0] / max(acc[1], 1)), "lr": lr,
                             "gnorm": run.gnorm, "sentences": int(acc[1]), "audio_seconds": round(float(acc[2]), 2),
                             "audio_s_per_s": round(float(acc[2]) / wall, 2), "s_per_update": round(wall / n_acc, 4),
                             "skipped": run.skipped,
                             "loss_scale": run.scaler.get_scale() if run.scaler.is_enabled() else None})
                acc, n_acc, t_log = torch.zeros(4, dtype=torch.float64), 0, time.perf_counter()
            best = False
            if run.valid_loader is not None and (run.update % cfg.validate_interval == 0 or done):
                best = validate(run)
            if stop or done or run.update % cfg.save_interval == 0 or best:
                save_checkpoints(run, ["checkpoint_last.pt"] + (["checkpoint_best.pt"] if best else []))
            if stop and run.rank == 0:
                run.warn(f"stopped by a signal at update {run.update}; the same command resumes")
            if stop or done:
                return
        run.epoch, run.offset = run.epoch + 1, 0


PEER_LOST = re.compile(r"closed by peer|Connection reset|remote worker|NCCL|Timed out|timed out")


def main(argv=None) -> int:
    run = Run()
    code = 1
    try:
        cfg, ckpt = parse_config(argv)
        train(cfg, ckpt, run)
        code = 0
    except S3RError as e:
        print(f"error: {e}" + (f" (rank {run.rank})" if getattr(run, "ddp", False) else ""), file=sys.stderr)
        code = 2
    except (dist.DistError, RuntimeError) as e:
        if not (dist.is_initialized() and (isinstance(e, dist.DistError) or PEER_LOST.search(str(e)))):
            traceback.print_exc()
        else:  # another rank failed (its own message is above) and its connection closed
            print(f"error: rank {run.rank} lost the other processes: {str(e).splitlines()[0][:160]}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Exception:
        traceback.print_exc()
    finally:
        # The DDP model and optimizer must be gone before the process group is, or gloo can abort at exit.
        run.__dict__.clear()
        gc.collect()
        if dist.is_initialized():
            if code == 0 or dist.get_backend() == "gloo":
                dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
