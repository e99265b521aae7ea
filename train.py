"""Finetune wav2vec 2.0 for CTC speech recognition with S3-Router masks (or plain weight
finetuning).

S3-Router (Fu et al., NeurIPS 2022) keeps the pretrained weights frozen and learns which ones to
keep: every routed weight tensor gets a score tensor, the forward pass keeps the top `--prune-rate`
fraction of |scores| and the scores learn by straight-through gradients (see s3r/model.py). The
recipe is upstream's fairseq one (`examples/wav2vec/config/finetuning/base_1h.yaml` and the
S3-Router README command line); s3r/recipe.py holds it (TrainConfig, PRESETS, the flag table) and
`python train.py --help` names the fairseq option of every flag.

One process (CPU or one GPU):
    python train.py --init wav2vec_small.pt --data train-1h --data-root /data --prune-rate 0.9
One node, N GPUs (NCCL; gloo when on CPU):
    torchrun --standalone --nproc_per_node=N train.py --init wav2vec_small.pt --data train-1h ...
Several nodes (the same command on each; HOST is one of them):
    torchrun --nnodes=M --nproc_per_node=8 --rdzv_id=run1 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py ...
The upstream README commands, one for one (S3-Router at 10% sparsity, data2vec, XLS-R at 6%,
then the two steps of pruning):
    torchrun --standalone --nproc_per_node=2 train.py --init wav2vec_small.pt --data train-1h \
        --valid test-clean --data-root /data --prune-rate 0.9 --fix-attn --trainable-proj \
        --init-score weight_rank
    ... --init data2vec_base.pt --normalize true --init-score kaiming_uniform
    ... --preset xlsr --init xlsr2_300m.pt --data zh-TW-train --valid zh-TW-test
    ... --finetune-weights --final-lr-scale 0.05 --save-dir ft
    ... --init ft/checkpoint_best.pt --prune-rate 0.3 --no-fix-attn \
        --init-score weight_magnitude_with_scale
Resume: run the same command again with the same --save-dir: the saved config, no preset; a flag
that changes a saved value wins, and one warning line names every change.
SIGTERM / Ctrl-C: the current update finishes, checkpoint_last.pt is written, every rank exits 0
(torchrun itself, signalled, still reports the signal; it waits 30 s for its workers before
killing them). A rank that dies: the others exit with one line, and under
`torchrun --max-restarts N` the new group resumes from checkpoint_last.pt.
Outputs in --save-dir: checkpoint_last.pt (every --save-interval updates and --save-interval-minutes
minutes), checkpoint_best.pt (the best validation at the update save points, by --best-metric),
checkpoint_<epoch>_<update>.pt (with --keep-interval-updates K, the newest K) and log.jsonl (metrics
every --log-interval updates, one line per validation); with --parp (s3r/prune.py) also
checkpoint_pruned.pt at the end, the final mask applied (a dense model with zeros).

Reading order: setup and make_loaders build a Run, resume restores a Progress, then train() is
the loop: train_step (forward and backward over one update's batches), optimizer_step,
validate_and_save.
"""
import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass
from itertools import islice

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from s3r import cluster, errors
from s3r.checkpoint import s3r_checkpoint, save_atomic, weights_fingerprint
from s3r.classify import is_head
from s3r.data import SAMPLE_RATE, make_loader, set_epoch
from s3r.decode import greedy_decode
from s3r.errors import S3RError
from s3r.prune import PRUNED_NAME, reprune, reprune_due, save_pruned
from s3r.recipe import (
    RunLog,
    Task,
    TrainConfig,
    build_for,
    config_values,
    default_valid,
    improves,
    parse_config,
    resolve_data,
    rng_state,
    runtime,
    seed_update,
    set_rng_state,
    task_functions,
    tri_stage_lr,
)
from s3r.text import Vocabulary

# A CTC run has collapsed to blanks when, after the warm-up, validation decodes (almost) nothing.
COLLAPSED_BLANK_RATE = 0.99  # of the validation frames whose best unit is the blank


@dataclass
class Progress:
    """Where a run stands: saved in checkpoint_last.pt (train_state) and restored on resume."""

    update: int = 0
    epoch: int = 0
    offset: int = 0  # batches of this epoch this rank has trained on
    best: float | None = None  # the best validation value at a save point (checkpoint_best.pt)
    skipped: int = 0  # utterances left out so far (--skip-bad)


@dataclass
class Step:
    """The numbers of one update: this rank's until `summed()`, then all ranks' together."""

    loss: float = 0.0  # CTC loss summed over the update's utterances (nats)
    sentences: int = 0
    audio_seconds: float = 0.0
    skipped: int = 0  # utterances --skip-bad left out of the update's batches
    stop: bool = False  # a SIGTERM / Ctrl-C arrived (on any rank, once summed)
    save_due: bool = False  # --save-interval-minutes have passed since the last save
    lr: float = 0.0
    gnorm: float = 0.0  # the gradient norm before clipping
    overflow: bool = False  # fp16: the scaler skipped the step (no update counted, as in fairseq)

    def summed(self, ddp: bool, device: torch.device) -> "Step":
        """One small all-reduce: the log numbers, a stop request and a save due, agreed by all
        ranks."""
        counts = [self.loss, self.sentences, self.audio_seconds, self.skipped]
        t = torch.tensor(counts + [self.stop, self.save_due], dtype=torch.float64)
        if ddp:
            t = t.to(device)
            dist.all_reduce(t)
        loss, sentences, audio, skipped, stop, save_due = t.cpu().tolist()
        return Step(loss, int(sentences), audio, int(skipped), stop > 0, save_due > 0,
                    self.lr, self.gnorm, self.overflow)


@dataclass
class Run:
    """Everything setup() builds: the process group, the model, the data, the optimizer."""

    cfg: TrainConfig
    ddp: bool
    rank: int
    world: int
    device: torch.device
    env: dict  # runtime(): thread count and versions the numbers depend on
    model: torch.nn.Module  # Wav2Vec2ForCTC, or Wav2Vec2ForSequenceClassification
    vocab: Vocabulary  # the CTC targets; a classification set's: its s3r.tasks.Labels
    pretrained: str | None  # the init checkpoint whose frozen weights mask mode keeps
    pretrained_sha: str | None  # their fingerprint as loaded (co_train changes them later)
    metric: str  # the validation metric that picks checkpoint_best.pt
    corpus: object  # s3r.data.Corpus
    loader: torch.utils.data.DataLoader = None
    valid_loader: torch.utils.data.DataLoader | None = None
    valid_name: str = ""
    bad: list = None  # (path, reason) of the utterances left out (--skip-bad)
    params: list = None  # the trainable tensors
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None
    amp: str = "none"
    autocast: object = contextlib.nullcontext  # () -> the context one forward runs in
    task: Task = None  # loss, validation and best metric: CTC, or classification (s3r/recipe.py)
    collapse_warned: bool = False  # the collapse warning is printed once per run


# ------------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, ckpt: dict | None) -> Run:
    """The process group, the model (init checkpoint + the recipe's regularisation + CTC head +
    routes), the loaders, and Adam over the trainable tensors only (in mask mode: scores, head)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # first: the thread count sets summation orders
    ddp, rank, world, device = cluster.setup_distributed(cfg.device)
    if cfg.update_freq < 1 or cfg.max_tokens < 1:
        raise S3RError("--update-freq and --max-tokens must be positive")
    torch.manual_seed(cfg.seed)  # the same fresh head and initial scores on every rank
    units = None if cfg.units == "auto" else cfg.units
    corpus = resolve_data(cfg.data, cfg.data_root, cfg.skip_bad, units)  # or a classification set
    if not corpus.utterances:
        raise S3RError(f"{cfg.data}: no utterances under {cfg.data_root}")
    model, vocab, pretrained = build_for(cfg, corpus, ckpt)  # ckpt: the saved vocabulary or labels
    task = task_functions(cfg, vocab)
    # The fingerprint of the frozen weights as loaded (co_train or trainable_pos train some later).
    pretrained_sha = weights_fingerprint(model) if pretrained else None
    run = Run(cfg, ddp, rank, world, device, runtime(), model.to(device), vocab, pretrained,
              pretrained_sha, task.metric, corpus, task=task)
    make_loaders(run)

    run.params = [p for p in model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.Adam(run.params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                     eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    run.amp = cfg.amp
    if run.amp == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        run.amp = "none" if device.type == "cpu" else "bf16" if bf16 else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp)
    if dtype is not None:
        run.autocast = lambda: torch.autocast(device.type, dtype=dtype)
    # init_scale: fairseq's common.fp16_init_scale
    run.scaler = torch.amp.GradScaler(device.type, init_scale=128.0, enabled=run.amp == "fp16")
    return run


def make_loaders(run: Run) -> None:
    """Token-bucketed training batches (every rank gets as many: the sampler pads the epoch, so DDP
    never waits forever) and the validation set, sharded over the ranks."""
    cfg, model = run.cfg, run.model
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    workers = cfg.num_workers if cfg.num_workers >= 0 else min(6, cores // per_node)
    common = dict(normalize_waveform=model.config.normalize, seed=cfg.seed, num_workers=workers,
                  skip_bad=cfg.skip_bad,
                  required_batch_size_multiple=cfg.required_batch_size_multiple)
    run.loader = make_loader(run.corpus.utterances, run.vocab, cfg.max_tokens, train=True,
                             world_size=run.world, rank=run.rank,
                             max_sample_size=cfg.max_sample_size or None, **common)
    run.loader.worker_init_fn = cluster.worker_init_fn
    run.bad = run.corpus.skipped + run.loader.dataset.skipped
    run.valid_name = cfg.valid if cfg.valid != "auto" else default_valid(cfg.data, cfg.data_root)
    if not run.valid_name:
        return
    units = None if cfg.units == "auto" else cfg.units
    try:
        labels = getattr(run.vocab, "labels", None)  # a classification set: the model's classes
        valid = resolve_data(run.valid_name, cfg.data_root, cfg.skip_bad, units, labels)
    except S3RError as e:
        if cfg.valid != "auto":
            raise
        if run.rank == 0:
            print(f"warning: no validation ({e}); pass --valid NAME", file=sys.stderr)
        return
    # every rank decodes its share; validate() gathers the rows
    shard = valid.utterances[run.rank::run.world]
    run.valid_loader = make_loader(shard, run.vocab, cfg.max_tokens_valid, train=False,
                                   allow_unk=True, **common)
    run.valid_loader.worker_init_fn = cluster.worker_init_fn


def resume(run: Run, ckpt: dict | None) -> Progress:
    """Model, optimizer, scaler, position in the data and RNG states from checkpoint_last.pt."""
    progress = Progress(skipped=len(run.bad))
    if ckpt is None:
        return progress
    cfg, model = run.cfg, run.model
    ref, last = ckpt.get("pretrained"), f"{cfg.save_dir}/checkpoint_last.pt"
    if ref is not None and ref["sha256"] != weights_fingerprint(model):
        raise S3RError(f"{last} was trained on other weights than {cfg.init}")
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    # mask mode stores only what trained; the rest is the pretrained weights
    if unexpected or (missing and ref is None):
        kind, key = ("unexpected", unexpected[0]) if unexpected else ("missing", missing[0])
        raise S3RError(f"{last}: {kind} key {key!r} "
                       f"(trained with other --finetune-weights or routing flags?)")
    ts = ckpt["train_state"]
    run.optimizer.load_state_dict(ts["optimizer"])
    run.scaler.load_state_dict(ts["scaler"])
    changed = [f"{k} {ts[k]} -> {run.env[k]}" for k in ("threads", "torch")
               if k in ts and ts[k] != run.env[k]]
    if changed and run.rank == 0:
        print(f"warning: resuming {last} with other {', '.join(changed)}: not bit-identical to an "
              f"uninterrupted run", file=sys.stderr)
    same_world = ts["world_size"] == run.world
    offset = ts["batch_offset"] if same_world else 0
    progress = Progress(ts["update"], ts["epoch"], offset, ts["best"], ts["skipped"])
    if same_world:
        set_rng_state(ts["rng"][run.rank])
    elif run.rank == 0:
        print(f"warning: resuming {ts['world_size']}-process training with {run.world}: "
              f"epoch {progress.epoch} restarts", file=sys.stderr)
    return progress


def wrap(run: Run, progress: Progress) -> torch.nn.Module:
    """The module the training forward calls: the model, compiled on request, in DDP when
    distributed."""
    net = torch.compile(run.model) if run.cfg.compile else run.model
    if not run.ddp:
        return net
    # DDP must look for parameters without a gradient only where some go unused: LayerDrop skips
    # whole blocks, a frozen encoder (freeze_finetune_updates) leaves all but the head without one.
    # (An update where LayerDrop skips nothing makes DDP warn once: see the README.)
    layerdrop = run.cfg.encoder["layerdrop"] > 0
    find_unused = layerdrop or run.cfg.freeze_finetune_updates > progress.update
    ids = [run.device.index] if run.device.type == "cuda" else None
    return DDP(net, device_ids=ids, find_unused_parameters=find_unused)


# ------------------------------------------------------------------------------------ one update
def train_step(run: Run, net: torch.nn.Module, group: list[dict], progress: Progress,
               out: RunLog) -> Step:
    """Forward and backward over one update's batches: gradients accumulate locally, DDP all-reduces
    them after the last batch. fairseq divides the summed loss by the sample size of the whole
    update on all ranks (sentences with sentence_avg); DDP averages gradients over ranks, hence the
    factor world."""
    cfg, step = run.cfg, Step()
    sizes = [len(b["ids"]) if cfg.sentence_avg else int(b["target_lengths"].sum()) for b in group]
    total = torch.tensor(float(sum(sizes)), device=run.device)
    if run.ddp:
        dist.all_reduce(total)
    loss_weight = run.world / max(float(total), 1.0)
    # freeze_finetune_updates: the encoder's output is detached, so only the head learns
    detach_encoder = progress.update < cfg.freeze_finetune_updates
    net.train()
    run.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(group):
        for path, reason in batch["skipped"]:  # in log.jsonl; named here by the rank that met it
            out.warn(f"skipped {path}: {reason}")
        step.skipped += len(batch["skipped"])
        last = i == len(group) - 1
        with contextlib.nullcontext() if not run.ddp or last else net.no_sync():
            loss = batch_loss(run, net, batch, detach_encoder, step)
            run.scaler.scale(loss * loss_weight).backward()
    return step


def batch_loss(run: Run, net: torch.nn.Module, batch: dict, detach_encoder: bool,
               step: Step) -> torch.Tensor:
    """The summed CTC loss of one batch, counted into `step`."""
    if not batch["ids"]:  # every utterance was unreadable (--skip-bad): join DDP with nothing
        with run.autocast():
            silence = torch.zeros(1, SAMPLE_RATE, device=run.device)
            logits, _ = net(silence, None, detach_encoder=detach_encoder)
        return logits.float().sum() * 0.0
    batch = {k: v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in batch.items()}
    with run.autocast():
        # (B, T, V), (B,)
        logits, out_lengths = net(batch["wav"], batch["lengths"], detach_encoder=detach_encoder)
    loss = run.task.loss(logits, out_lengths, batch)
    step.loss += loss.item()
    step.sentences += len(batch["ids"])
    step.audio_seconds += float(batch["lengths"].sum()) / SAMPLE_RATE
    return loss


def optimizer_step(run: Run, step: Step, update: int) -> None:
    """fairseq's tri-stage learning rate, clipping, one Adam step (skipped on fp16 overflow)."""
    cfg, scaler = run.cfg, run.scaler
    step.lr = tri_stage_lr(update, cfg)
    for g in run.optimizer.param_groups:
        g["lr"] = step.lr
    scaler.unscale_(run.optimizer)
    max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
    step.gnorm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    loss_scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(run.optimizer)
    scaler.update()
    run.model.refresh_masks()  # the scores moved: routed layers drop any mask they kept
    # fp16 overflow: the scaler skipped the step and lowered the scale
    step.overflow = loss_scale is not None and scaler.get_scale() < loss_scale


# ---------------------------------------------------------------------- validation and checkpoints
def validate(run: Run) -> dict:
    """Greedy-decode (or classify) the validation set, sharded over ranks; every rank gets all of
    its scores. A CTC run adds blank_rate (the fraction of frames whose best unit is the blank) and
    empty (the fraction of hypotheses that decode to nothing): a run collapsing to blanks shows
    in them before its error rate says why."""
    ctc = isinstance(run.vocab, Vocabulary)
    frames = [0, 0]  # this rank's frames whose best unit is the blank, and all its frames
    decode = {"decode": counting_blanks(run.vocab, frames)} if ctc else {}
    with cluster.signals_deferred():  # the loader forks its workers in there
        rows = run.task.predict(run.model, run.valid_loader, run.vocab, run.device, run.autocast,
                                **decode)
    parts = cluster.gather((rows, frames), run.ddp, run.world)
    rows = [r for part, _ in parts for r in part]
    metrics = run.task.score(rows)
    if ctc:
        metrics["blank_rate"] = sum(f[0] for _, f in parts) / max(sum(f[1] for _, f in parts), 1)
        metrics["empty"] = sum(not hyp.strip() for _, _, hyp in rows) / max(len(rows), 1)
    return metrics


def counting_blanks(vocab: Vocabulary, frames: list[int]):
    """Greedy CTC decoding that also adds, to `frames`, the frames whose argmax is the blank
    (index 0) and all frames (padding excluded)."""
    def decode(logits: torch.Tensor, lengths: torch.Tensor | None) -> list[str]:
        best = logits.argmax(-1)  # (B, T)
        valid = torch.ones_like(best, dtype=torch.bool)
        if lengths is not None:
            valid = torch.arange(best.shape[1], device=best.device) < lengths[:, None]
        frames[0] += int(((best == 0) & valid).sum())
        frames[1] += int(valid.sum())
        return greedy_decode(logits, lengths, vocab)
    return decode


def collapsed(run: Run, update: int, metrics: dict) -> str | None:
    """One line when a CTC run has collapsed to blanks after its warm-up (every validation
    hypothesis empty, or COLLAPSED_BLANK_RATE of the frames blank), naming the usual causes."""
    warmup = int((run.cfg.schedule_updates or run.cfg.max_updates) * run.cfg.phase_ratio[0])
    if "blank_rate" not in metrics or update == 0 or update < warmup:
        return None
    rate, empty = metrics["blank_rate"], metrics["empty"]
    if empty < 1.0 and rate < COLLAPSED_BLANK_RATE:
        return None
    causes = [f"a peak --lr too high or too low ({run.cfg.lr:g})",
              "too short a warm-up (--phase-ratio)"]
    if not run.cfg.finetune_weights:
        causes.append(f"too few kept weights (--prune-rate {run.cfg.route.prune_rate:g})")
    causes.append("too few updates to leave CTC's all-blank plateau (--max-updates)")
    return (f"update {update}: the model has collapsed to blanks ({100 * rate:.1f}% of the "
            f"validation frames blank, {100 * empty:.0f}% of its hypotheses empty); likely causes: "
            + ", ".join(causes))


def report(run: Run, progress: Progress, metrics: dict, out: RunLog) -> None:
    """One validation line in log.jsonl and on stdout."""
    out.log({"valid": run.valid_name, "update": progress.update, **metrics, "best": progress.best})
    keys = ("wer", "cer", "uer", "per", "accuracy", "blank_rate", "empty")
    rates = " | ".join(f"{k} {100 * metrics[k]:.2f}" for k in keys if k in metrics)
    best = "-" if progress.best is None else f"{100 * progress.best:.2f}"
    out.write(f"valid {run.valid_name} | update {progress.update} | {rates} | "
              f"best {run.metric} {best} | {metrics['utterances']} utterances")


def save(run: Run, progress: Progress, names: list[str]) -> None:
    """All ranks call this (RNG states are gathered); rank 0 writes each file atomically (temp
    file + rename)."""
    rngs = cluster.gather(rng_state(), run.ddp, run.world)
    if run.rank != 0:
        return
    cfg, model = run.cfg, run.model
    train_state = {"update": progress.update, "epoch": progress.epoch,
                   "batch_offset": progress.offset, "best": progress.best,
                   "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                   "rng": rngs, "world_size": run.world, "skipped": progress.skipped,
                   "config": config_values(cfg), **run.env}
    ckpt = s3r_checkpoint(model, run.vocab, pretrained=run.pretrained, train_state=train_state)
    if ckpt["pretrained"] is not None:  # of the weights as loaded (trained ones are in "model")
        ckpt["pretrained"]["sha256"] = run.pretrained_sha
    # a fresh head or mask embedding is not in the pretrained file, trained or not
    fresh = {k: v for k, v in model.state_dict().items()
             if is_head(k) or k == "masked_spec_embed"}
    ckpt["model"].update(fresh)
    for name in names:
        save_atomic(ckpt, os.path.join(cfg.save_dir, name))
    cluster.prune_numbered(cfg.save_dir, cfg.keep_interval_updates)


def validate_and_save(run: Run, progress: Progress, step: Step, out: RunLog) -> bool:
    """As fairseq: validate every --validate-interval updates and at every save point;
    checkpoint_best.pt is chosen at save points only. A signal saves at once, validating only if it
    was due anyway. Returns whether it saved."""
    cfg, update = run.cfg, progress.update
    done = update >= cfg.max_updates
    interval = update % cfg.save_interval == 0
    saving, best = step.stop or done or interval or step.save_due, False
    due = interval or done or update % cfg.validate_interval == 0
    if run.valid_loader is not None and due:
        metrics = validate(run)
        if saving and improves(run.task, metrics[run.metric], progress.best):
            progress.best, best = metrics[run.metric], True
        report(run, progress, metrics, out)
        warning = None if run.collapse_warned else collapsed(run, update, metrics)
        if warning and run.rank == 0:
            out.log({"update": update, "warning": warning})
            out.warn(f"warning: {warning}")
        run.collapse_warned = run.collapse_warned or warning is not None
    if not saving:
        return False
    names = ["checkpoint_last.pt"] + ["checkpoint_best.pt"] * best
    if interval and cfg.keep_interval_updates != 0:
        names.append(cluster.numbered_name(progress.epoch + 1, update))
    if cfg.parp and done and run.rank == 0:  # PARP's result; written first, it marks the end
        save_pruned(run.model, run.vocab, os.path.join(cfg.save_dir, PRUNED_NAME))
    save(run, progress, names)
    return True


# ---------------------------------------------------------------------------------------- the loop
def start(run: Run, progress: Progress, resumed: bool, out: RunLog,
          stop: cluster.StopSignal) -> bool:
    """The run's first lines, and validation where training starts (--validate-before). False:
    there is nothing to train."""
    cfg, corpus, n_bad = run.cfg, run.corpus, len(run.bad)
    if run.rank == 0:
        n_params = sum(p.numel() for p in run.params)
        skipped = [{"path": p, "reason": r} for p, r in run.bad]
        out.log({"event": "resume" if resumed else "start", "update": progress.update,
                 "world_size": run.world, **run.env, "amp": run.amp,
                 "trainable_parameters": n_params, "vocab": len(run.vocab),
                 "train_utterances": len(corpus.utterances),
                 "train_seconds": round(corpus.seconds, 1), "skipped": skipped,
                 "config": config_values(cfg)})
        mode = "weight finetuning" if cfg.finetune_weights else \
            f"S3-Router, prune rate {cfg.route.prune_rate}"
        out.write(f"{mode}: {n_params:,} trainable parameters, {len(corpus.utterances)} utterances "
                  f"({corpus.seconds / 3600:.2f} h), {run.world} process(es), amp {run.amp}, "
                  f"{n_bad} skipped")
    if progress.update >= cfg.max_updates:
        out.write(f"nothing to do: {cfg.save_dir}/checkpoint_last.pt is at update "
                  f"{progress.update} (--max-updates {cfg.max_updates})")
        return False
    # a signal during setup: nothing trained, nothing to save
    if cluster.any_rank(stop.requested, run.ddp, run.device):
        out.warn("stopped by a signal before the first update")
        return False
    errors.setup_phase(False)  # from here on an error may be one rank's own (its data)
    if cfg.validate_before and progress.update == 0 and run.valid_loader is not None:
        # where training starts (a fresh CTC head: about 100% error); not a best candidate
        report(run, progress, validate(run), out)
    return True


def update_groups(run: Run, progress: Progress):
    """The batches of one update (--update-freq of them) at a time, epoch after epoch, from where
    `progress` stands; `progress.offset` counts the batches taken."""
    while True:
        set_epoch(run.loader, progress.epoch, progress.offset)
        with cluster.signals_deferred():  # iter() forks the DataLoader workers
            batches = iter(run.loader)
        while group := list(islice(batches, run.cfg.update_freq)):
            progress.offset += len(group)
            yield group
        progress.epoch, progress.offset = progress.epoch + 1, 0


def log_window(run: Run, progress: Progress, window: list[Step], wall: float) -> dict:
    """log.jsonl's line for the updates since the last one; loss in nats per sentence (fairseq logs
    bits: divide by ln 2)."""
    sentences = sum(s.sentences for s in window)
    audio = sum(s.audio_seconds for s in window)
    scaler = run.scaler
    return {"update": progress.update, "epoch": progress.epoch,
            "loss": sum(s.loss for s in window) / max(sentences, 1), "lr": window[-1].lr,
            "gnorm": window[-1].gnorm, "sentences": sentences, "audio_seconds": round(audio, 2),
            "audio_s_per_s": round(audio / wall, 2), "s_per_update": round(wall / len(window), 4),
            "skipped": progress.skipped,
            "loss_scale": scaler.get_scale() if scaler.is_enabled() else None}


def train(cfg: TrainConfig, ckpt: dict | None, stop: cluster.StopSignal) -> None:
    run = setup(cfg, ckpt)
    progress = resume(run, ckpt)
    net = wrap(run, progress)
    with RunLog(cfg.save_dir, cfg.max_updates, progress.update, run.rank == 0) as out:
        if not start(run, progress, ckpt is not None, out, stop):
            return
        window, t_log = [], time.perf_counter()  # the updates since the last log line
        t_save = time.monotonic()  # --save-interval-minutes counts from here and from every save
        for group in update_groups(run, progress):
            seed_update(cfg.seed, run.rank, progress.update)
            step = train_step(run, net, group, progress, out)
            optimizer_step(run, step, progress.update)
            step.stop = stop.requested
            step.save_due = 0 < cfg.save_interval_minutes <= (time.monotonic() - t_save) / 60
            step = step.summed(run.ddp, run.device)
            progress.skipped += step.skipped
            if step.overflow and not step.stop:
                continue
            progress.update += not step.overflow
            if cfg.parp and reprune_due(progress.update, cfg.reprune_interval, cfg.max_updates):
                out.log({"update": progress.update, "revived": reprune(run.model)})  # PARP: by |W|
            window.append(step)
            wall = time.perf_counter() - t_log
            audio = sum(s.audio_seconds for s in window)
            out.bar.update(1)
            out.bar.set_postfix(loss=f"{step.loss / max(step.sentences, 1):.3f}",
                                lr=f"{step.lr:.2e}", audio_s_per_s=f"{audio / wall:.1f}",
                                refresh=False)
            done = progress.update >= cfg.max_updates
            if progress.update % cfg.log_interval == 0 or done or step.stop:
                out.log(log_window(run, progress, window, wall))
                window, t_log = [], time.perf_counter()
            if validate_and_save(run, progress, step, out):
                t_save = time.monotonic()
            if step.stop and run.rank == 0:
                out.warn(f"stopped by a signal at update {progress.update}; "
                         "the same command resumes")
            if done and not step.stop:
                out.write(saved_message(cfg, run.valid_name, run.metric, progress.best))
            if step.stop or done:
                return


def saved_message(cfg: TrainConfig, valid_name: str, metric: str, best: float | None) -> str:
    """The last line of a run: where it saved, and the command that evaluates it."""
    if best is None:
        return f"saved {os.path.join(cfg.save_dir, 'checkpoint_last.pt')}"
    path = os.path.join(cfg.save_dir, "checkpoint_best.pt")
    data_root = f" --data-root {cfg.data_root}" if cfg.data_root != "." else ""
    return (f"saved {path} (best {metric} {100 * best:.2f} on {valid_name}) and "
            f"checkpoint_last.pt; evaluate: "
            f"python eval.py --checkpoint {path} --data {valid_name}{data_root}")


def main(argv: list[str] | None = None) -> int:
    code = 1
    errors.setup_phase(True)
    try:
        # from the start: a signal during setup stops before the first update
        with cluster.StopSignal() as stop:
            cfg, ckpt = parse_config(argv)
            train(cfg, ckpt, stop)
        code = 0
    except S3RError as e:
        # set-up errors once (rank 0), later ones by the rank that met them
        errors.report(e, cluster.rank())
        code = 2
    except (dist.DistError, RuntimeError) as e:
        # another rank failed (its own message is above) and its connection closed
        if cluster.peer_lost(e):
            first = str(e).splitlines()[0][:160]
            print(f"error: rank {cluster.rank()} lost the other processes: {first}",
                  file=sys.stderr)
        else:
            traceback.print_exc()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Exception:
        traceback.print_exc()
    finally:
        cluster.shutdown(clean=code == 0)  # train()'s DDP model and optimizer went with its frame
    return code


if __name__ == "__main__":
    sys.exit(main())
