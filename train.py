"""Finetune wav2vec 2.0 for CTC speech recognition with S3-Router masks (or plain weight finetuning).

S3-Router (Fu et al., NeurIPS 2022) keeps the pretrained weights frozen and learns which ones to keep: every
routed weight tensor gets a score tensor, the forward pass keeps the top `--prune-rate` fraction of |scores|
and the scores learn by straight-through gradients (see s3r/model.py). The recipe is upstream's fairseq one
(`examples/wav2vec/config/finetuning/base_1h.yaml` and the S3-Router README command line); s3r/recipe.py holds
it (TrainConfig, PRESETS, the flag table) and `python train.py --help` names the fairseq option of every flag.

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
Resume: run the same command again with the same --save-dir: the saved config, no preset; a flag that changes a
saved value wins, and one warning line names every change.
SIGTERM / Ctrl-C: the current update finishes, checkpoint_last.pt is written, every rank exits 0 (torchrun itself,
signalled, still reports the signal; it waits 30 s for its workers before killing them). A rank that dies: the
others exit with one line, and under `torchrun --max-restarts N` the new group resumes from checkpoint_last.pt.
Outputs in --save-dir: checkpoint_last.pt (every --save-interval updates and --save-interval-minutes minutes),
checkpoint_best.pt (the best validation at the update save points, by --best-metric), checkpoint_<epoch>_<update>.pt
(with --keep-interval-updates K, the newest K) and log.jsonl (metrics every --log-interval updates, one line per
validation).
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
from s3r.data import SAMPLE_RATE, make_loader, resolve_corpus, set_epoch
from s3r.decode import transcribe
from s3r.errors import S3RError
from s3r.metrics import score
from s3r.prune import PRUNED_NAME, reprune, reprune_due, save_pruned
from s3r.recipe import (
    RunLog,
    TrainConfig,
    best_metric,
    build_model,
    config_values,
    ctc_loss_sum,
    default_valid,
    parse_config,
    rng_state,
    runtime,
    seed_update,
    set_rng_state,
    tri_stage_lr,
)
from s3r.text import Vocabulary


@dataclass
class Progress:
    """Where a run stands: saved in checkpoint_last.pt (train_state) and restored on resume."""

    update: int = 0
    epoch: int = 0
    offset: int = 0  # batches of this epoch this rank has trained on
    best: float | None = None  # the best validation value at a save point (checkpoint_best.pt)
    skipped: int = 0  # utterances left out so far (--skip-bad)


def train(cfg: TrainConfig, ckpt: dict | None, stop: cluster.StopSignal) -> None:
    # ------------------------------------------------------------------------------------------------------------
    # setup
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # first: the thread count sets summation orders
    ddp, rank, world, device = cluster.setup_distributed(cfg.device)
    env = runtime()
    if cfg.update_freq < 1 or cfg.max_tokens < 1:
        raise S3RError("--update-freq and --max-tokens must be positive")

    # ------------------------------------------------------------------------------------------------------------
    # model: the init checkpoint, rebuilt with the recipe's regularisation, a CTC head and (mask mode) routed
    torch.manual_seed(cfg.seed)  # the same fresh head and initial scores on every rank
    units = None if cfg.units == "auto" else cfg.units
    corpus = resolve_corpus(cfg.data, cfg.data_root, cfg.skip_bad, units)
    if not corpus.utterances:
        raise S3RError(f"{cfg.data}: no utterances under {cfg.data_root}")
    model, vocab, pretrained = build_model(cfg, corpus, Vocabulary.from_dict(ckpt["vocab"]) if ckpt else None)
    # The fingerprint of the frozen weights as loaded: with co_train or trainable_pos some of them train later.
    pretrained_sha = weights_fingerprint(model) if pretrained else None
    model = model.to(device)
    metric = best_metric(cfg.best_metric, vocab.units)

    # ------------------------------------------------------------------------------------------------------------
    # data: every rank gets the same number of batches (TokenBatchSampler pads the epoch), DDP never waits forever
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = cfg.num_workers if cfg.num_workers >= 0 else min(6, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    common = dict(normalize_waveform=model.config.normalize, seed=cfg.seed, num_workers=workers,
                  skip_bad=cfg.skip_bad, required_batch_size_multiple=cfg.required_batch_size_multiple)
    loader = make_loader(corpus.utterances, vocab, cfg.max_tokens, train=True, world_size=world, rank=rank,
                         max_sample_size=cfg.max_sample_size or None, **common)
    loader.worker_init_fn = cluster.worker_init_fn
    valid_name = cfg.valid if cfg.valid != "auto" else default_valid(cfg.data)
    valid_loader = None
    if valid_name:
        try:
            valid = resolve_corpus(valid_name, cfg.data_root, cfg.skip_bad, units)
        except S3RError as e:
            if cfg.valid != "auto":
                raise
            valid = None
            if rank == 0:
                print(f"warning: no validation ({e}); pass --valid NAME", file=sys.stderr)
        if valid is not None:  # every rank decodes its share; validate() gathers the rows
            valid_loader = make_loader(valid.utterances[rank::world], vocab, cfg.max_tokens_valid, train=False,
                                       allow_unk=True, **common)
            valid_loader.worker_init_fn = cluster.worker_init_fn
    bad = corpus.skipped + loader.dataset.skipped

    # ------------------------------------------------------------------------------------------------------------
    # optimisation: Adam over the trainable tensors only (scores and head in mask mode), fp32 state
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay)
    amp = cfg.amp
    if amp == "auto":
        amp = "none" if device.type == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, init_scale=128.0, enabled=amp == "fp16")  # common.fp16_init_scale

    # ------------------------------------------------------------------------------------------------------------
    # resume: model, optimizer, scaler, position in the data and RNG states from checkpoint_last.pt
    progress = Progress(skipped=len(bad))
    if ckpt is not None:
        ref, last = ckpt.get("pretrained"), f"{cfg.save_dir}/checkpoint_last.pt"
        if ref is not None and ref["sha256"] != weights_fingerprint(model):
            raise S3RError(f"{last} was trained on other weights than {cfg.init}")
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if unexpected or (missing and ref is None):  # mask mode stores only what trained; the rest is the pretrained
            raise S3RError(f"{last}: {'unexpected' if unexpected else 'missing'} key {(unexpected or missing)[0]!r} "
                           f"(trained with other --finetune-weights or routing flags?)")
        ts = ckpt["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        scaler.load_state_dict(ts["scaler"])
        changed = [f"{k} {ts[k]} -> {env[k]}" for k in ("threads", "torch") if k in ts and ts[k] != env[k]]
        if changed and rank == 0:
            print(f"warning: resuming {last} with other {', '.join(changed)}: not bit-identical to an uninterrupted "
                  f"run", file=sys.stderr)
        same_world = ts["world_size"] == world
        progress = Progress(ts["update"], ts["epoch"], ts["batch_offset"] if same_world else 0, ts["best"],
                            ts["skipped"])
        if same_world:
            set_rng_state(ts["rng"][rank])
        elif rank == 0:
            print(f"warning: resuming {ts['world_size']}-process training with {world}: epoch {progress.epoch} "
                  f"restarts", file=sys.stderr)
    # freeze_finetune_updates: the encoder output is detached, so only the head learns
    model.encoder.register_forward_hook(
        lambda mod, inp, out: out.detach() if progress.update < cfg.freeze_finetune_updates else out)
    net = torch.compile(model) if cfg.compile else model
    enc = cfg.encoder
    find_unused = enc["layerdrop"] > 0 or cfg.freeze_finetune_updates > progress.update or enc["mask_time_prob"] > 0
    if ddp:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)

    # ------------------------------------------------------------------------------------------------------------
    # validation and checkpoints
    def validate() -> dict:
        """Greedy-decode the validation set (sharded over ranks); every rank gets the scores of all of it."""
        with cluster.signals_deferred():  # the loader forks its workers in there
            rows = transcribe(model, valid_loader, vocab, device, autocast)
        return score([r for part in cluster.gather(rows, ddp, world) for r in part], vocab.units)

    def report(metrics: dict) -> None:
        out.log({"valid": valid_name, "update": progress.update, **metrics, "best": progress.best})
        rates = " | ".join(f"{k} {100 * metrics[k]:.2f}" for k in ("wer", "cer", "uer", "per") if k in metrics)
        best = "-" if progress.best is None else f"{100 * progress.best:.2f}"
        out.write(f"valid {valid_name} | update {progress.update} | {rates} | best {metric} {best} | "
                  f"{metrics['utterances']} utterances")

    def save(names: list[str]) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes each file atomically (temp file + rename)."""
        rngs = cluster.gather(rng_state(), ddp, world)
        if rank != 0:
            return
        train_state = {"update": progress.update, "epoch": progress.epoch, "batch_offset": progress.offset,
                       "best": progress.best, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                       "rng": rngs, "world_size": world, "skipped": progress.skipped, "config": config_values(cfg),
                       **env}
        ckpt = s3r_checkpoint(model, vocab, pretrained=pretrained, train_state=train_state)
        if ckpt["pretrained"] is not None:  # of the weights as loaded (trained ones are stored in "model" anyway)
            ckpt["pretrained"]["sha256"] = pretrained_sha
        state = model.state_dict()  # a fresh head or mask embedding is not in the pretrained file, trained or not
        ckpt["model"].update({k: v for k, v in state.items() if k.startswith("lm_head.") or k == "masked_spec_embed"})
        for name in names:
            save_atomic(ckpt, os.path.join(cfg.save_dir, name))
        cluster.prune_numbered(cfg.save_dir, cfg.keep_interval_updates)

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    with RunLog(cfg.save_dir, cfg.max_updates, progress.update, rank == 0) as out:
        if rank == 0:
            n_params = sum(p.numel() for p in params)
            out.log({"event": "resume" if ckpt else "start", "update": progress.update, "world_size": world, **env,
                     "amp": amp, "trainable_parameters": n_params, "vocab": len(vocab),
                     "train_utterances": len(corpus.utterances), "train_seconds": round(corpus.seconds, 1),
                     "skipped": [{"path": p, "reason": r} for p, r in bad], "config": config_values(cfg)})
            mode = "weight finetuning" if cfg.finetune_weights else f"S3-Router, prune rate {cfg.route.prune_rate}"
            out.write(f"{mode}: {n_params:,} trainable parameters, {len(corpus.utterances)} utterances "
                      f"({corpus.seconds / 3600:.2f} h), {world} process(es), amp {amp}, {len(bad)} skipped")
        if progress.update >= cfg.max_updates:
            out.write(f"nothing to do: {cfg.save_dir}/checkpoint_last.pt is at update {progress.update} "
                      f"(--max-updates {cfg.max_updates})")
            return
        if cluster.any_rank(stop.requested, ddp, device):  # a signal during setup: nothing trained, nothing to save
            out.warn("stopped by a signal before the first update")
            return
        errors.setup_phase(False)  # from here on an error may be one rank's own (its data)
        if cfg.validate_before and progress.update == 0 and valid_loader is not None:
            report(validate())  # where training starts (a fresh CTC head: about 100% error); not a best candidate
        acc, n_acc, t_log = torch.zeros(4, dtype=torch.float64), 0, time.perf_counter()  # since the last log line
        t_save = time.monotonic()  # --save-interval-minutes counts from here and from every save
        while True:
            set_epoch(loader, progress.epoch, progress.offset)
            with cluster.signals_deferred():  # iter() forks the DataLoader workers
                batches = iter(loader)
            while group := list(islice(batches, cfg.update_freq)):
                progress.offset += len(group)
                seed_update(cfg.seed, rank, progress.update)
                # One update over `group`: gradients accumulate locally, DDP all-reduces after the last batch.
                # fairseq divides the summed loss by the sample size of the whole update on all ranks (sentences
                # with sentence_avg); DDP averages gradients over ranks, hence the factor world.
                sizes = [len(b["ids"]) if cfg.sentence_avg else int(b["target_lengths"].sum()) for b in group]
                total = torch.tensor(float(sum(sizes)), device=device)
                if ddp:
                    dist.all_reduce(total)
                loss_weight = world / max(float(total), 1.0)
                net.train()
                optimizer.zero_grad(set_to_none=True)
                stats = torch.zeros(6, dtype=torch.float64)  # loss sum, sentences, audio s, skipped, stop, save due
                for i, batch in enumerate(group):
                    for path, reason in batch["skipped"]:  # counted in log.jsonl; named here by the rank that met it
                        out.warn(f"skipped {path}: {reason}")
                    stats[3] += len(batch["skipped"])
                    with contextlib.nullcontext() if not ddp or i == len(group) - 1 else net.no_sync():
                        if not batch["ids"]:  # every utterance was unreadable (--skip-bad): join DDP with nothing
                            with autocast():
                                logits, _ = net(torch.zeros(1, SAMPLE_RATE, device=device), None)
                            loss = logits.float().sum() * 0.0
                        else:
                            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                                     for k, v in batch.items()}
                            with autocast():
                                logits, out_lengths = net(batch["wav"], batch["lengths"])  # (B, T, V), (B,)
                            loss = ctc_loss_sum(logits, out_lengths, batch)
                            stats[0] += loss.item()
                            stats[1] += len(batch["ids"])
                            stats[2] += float(batch["lengths"].sum()) / SAMPLE_RATE
                        scaler.scale(loss * loss_weight).backward()
                lr = tri_stage_lr(progress.update, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                scaler.unscale_(optimizer)
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm if cfg.clip_norm > 0 else
                                                             float("inf")))
                loss_scale = scaler.get_scale() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                model.refresh_masks()  # the scores moved: routed layers drop any mask they kept
                # fp16 overflow: the scaler skipped the step and lowered the scale; as in fairseq, no update counted
                overflow = loss_scale is not None and scaler.get_scale() < loss_scale
                stats[4] = float(stop.requested)
                stats[5] = float(0 < cfg.save_interval_minutes <= (time.monotonic() - t_save) / 60)
                if ddp:  # one small all-reduce: the log, a stop request and a save due by time, agreed by all ranks
                    stats = stats.to(device)
                    dist.all_reduce(stats)
                stats = stats.cpu()
                stopping = bool(stats[4] > 0)
                progress.skipped += int(stats[3])
                if overflow and not stopping:
                    continue
                progress.update += not overflow
                if cfg.parp and reprune_due(progress.update, cfg.reprune_interval, cfg.max_updates):
                    out.log({"update": progress.update, "revived": reprune(model)})  # PARP: masks by |W|
                acc, n_acc, wall = acc + stats[:4], n_acc + 1, time.perf_counter() - t_log
                out.bar.update(1)
                out.bar.set_postfix(loss=f"{stats[0] / max(stats[1], 1):.3f}", lr=f"{lr:.2e}",
                                    audio_s_per_s=f"{acc[2] / wall:.1f}", refresh=False)
                done = progress.update >= cfg.max_updates
                if progress.update % cfg.log_interval == 0 or done or stopping:
                    # loss: nats per sentence (fairseq logs bits: divide by ln 2)
                    out.log({"update": progress.update, "epoch": progress.epoch, "loss": float(acc[0] / max(acc[1], 1)),
                             "lr": lr, "gnorm": gnorm, "sentences": int(acc[1]),
                             "audio_seconds": round(float(acc[2]), 2), "audio_s_per_s": round(float(acc[2]) / wall, 2),
                             "s_per_update": round(wall / n_acc, 4), "skipped": progress.skipped,
                             "loss_scale": scaler.get_scale() if scaler.is_enabled() else None})
                    acc, n_acc, t_log = torch.zeros(4, dtype=torch.float64), 0, time.perf_counter()
                # As fairseq: validate every --validate-interval updates and at every save point; checkpoint_best.pt
                # is chosen at save points only. A signal saves at once, validating only if it was due anyway.
                interval = progress.update % cfg.save_interval == 0
                saving, best = stopping or done or interval or bool(stats[5] > 0), False
                if valid_loader is not None and (interval or done or progress.update % cfg.validate_interval == 0):
                    metrics = validate()
                    if saving and (progress.best is None or metrics[metric] < progress.best):
                        progress.best, best = metrics[metric], True
                    report(metrics)
                if saving:
                    numbered = [cluster.numbered_name(progress.epoch + 1, progress.update)] if interval and \
                        cfg.keep_interval_updates != 0 else []
                    if cfg.parp and done and rank == 0:  # PARP's result; written first, it marks the end
                        save_pruned(model, vocab, os.path.join(cfg.save_dir, PRUNED_NAME))
                    save(["checkpoint_last.pt"] + (["checkpoint_best.pt"] if best else []) + numbered)
                    t_save = time.monotonic()
                if stopping and rank == 0:
                    out.warn(f"stopped by a signal at update {progress.update}; the same command resumes")
                if done and not stopping:
                    out.write(saved_message(cfg, valid_name, metric, progress.best))
                if stopping or done:
                    return
            progress.epoch, progress.offset = progress.epoch + 1, 0


def saved_message(cfg: TrainConfig, valid_name: str, metric: str, best: float | None) -> str:
    """The last line of a run: where it saved, and the command that evaluates it."""
    if best is None:
        return f"saved {os.path.join(cfg.save_dir, 'checkpoint_last.pt')}"
    path = os.path.join(cfg.save_dir, "checkpoint_best.pt")
    data_root = f" --data-root {cfg.data_root}" if cfg.data_root != "." else ""
    return (f"saved {path} (best {metric} {100 * best:.2f} on {valid_name}) and checkpoint_last.pt; evaluate: "
            f"python eval.py --checkpoint {path} --data {valid_name}{data_root}")


def main(argv: list[str] | None = None) -> int:
    code = 1
    errors.setup_phase(True)
    try:
        with cluster.StopSignal() as stop:  # from the start: a signal during setup stops before the first update
            cfg, ckpt = parse_config(argv)
            train(cfg, ckpt, stop)
        code = 0
    except S3RError as e:
        errors.report(e, cluster.rank())  # set-up errors once (rank 0), later ones by the rank that met them
        code = 2
    except (dist.DistError, RuntimeError) as e:
        if cluster.peer_lost(e):  # another rank failed (its own message is above) and its connection closed
            print(f"error: rank {cluster.rank()} lost the other processes: {str(e).splitlines()[0][:160]}",
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
