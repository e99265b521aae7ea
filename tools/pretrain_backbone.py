"""Pretrain the miniature's backbone self-supervised, as HuBERT does: no transcript is ever read.

    python -m tools.pretrain_corpus                  # unlabelled audio -> runs/pretrain/corpus/{train,valid}.tsv
    python -m tools.pretrain_backbone                # iteration 1 -> runs/pretrain/it1/, s3r/assets/miniature/
    python -m tools.pretrain_backbone --out runs/pretrain/it2 --label-model runs/pretrain/it1/checkpoint.pt \
        --label-layer 2                              # iteration 2: targets from layer 2 of iteration 1

The objective is HuBERT's (Hsu et al. 2021, fairseq `models/hubert/hubert.py`, `criterions/hubert_criterion.py`):
  1. targets: k-means units (K=100) of every 20 ms frame of the training audio. Iteration 1 clusters 39-d MFCCs
     (13 + deltas + delta-deltas, 25 ms windows every 20 ms: one row per encoder frame); iteration 2 clusters the
     hidden states of one layer of the iteration-1 model (`--label-layer`). K-means is fitted on a sample of frames.
  2. masking: spans of 10 frames starting at ~8% of the frames (mask probability 0.8, span 10, HuBERT base's values),
     each masked frame's projected conv feature replaced by the learned mask embedding (fairseq `mask_emb`).
  3. prediction on masked frames only (HuBERT's pred_masked_weight 1, pred_nomask_weight 0): the transformer's output
     goes through `final_proj` to 64 dimensions, and the logit of unit k is the cosine similarity with the learned
     label embedding k divided by a temperature of 0.1 (`label_embs_concat`, `logit_temp`). This is HuBERT's own
     head rather than a plain linear layer: its logits are bounded (|logit| <= 10), which keeps a from-scratch model
     stable at our high learning rate, and it makes the checkpoint a HuBERT pretraining checkpoint in every tensor,
     so that s3r drops `final_proj` / `label_embs_concat` when loading it exactly as it does for a published one.
  plus HuBERT's feature penalty (10 x the mean squared conv feature) and its 0.1 gradient scale on the conv stack.
The data is only the fairseq manifest (`train.tsv`: root, then relpath<TAB>samples); there is no transcript argument,
and the tests run this script on a corpus whose transcripts are deleted.

The model is the miniature's (tools.pretrain_supervised.CONFIG: wav2vec 2.0 / HuBERT architecture at ~2M parameters,
pre-LN, frames every 20 ms). The saved checkpoint is a fairseq HuBERT pretraining checkpoint (`cfg.model._name`
"hubert", fairseq key names, `final_proj` and `label_embs_concat` included) in fp16. Its stored dropout / layerdrop
are the finetuning values the miniature has always used (tools.pretrain_supervised.FINETUNE_REGULARIZATION);
pretraining itself ran without dropout (a 2M-parameter model on hours of audio underfits).

Resumable: runs/.../state.pt is written every --save-every updates and when --max-minutes is reached; run the same
command again to continue. The learning-rate schedule is defined over --max-updates.
"""
import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F

from s3r import Wav2Vec2Config, Wav2Vec2ForCTC
from s3r.checkpoint import save_atomic
from s3r.model import compute_mask_indices
from tools.pretrain_supervised import CONFIG, FINETUNE_REGULARIZATION, PRETRAIN_REGULARIZATION, mfcc_frames

ROOT = Path(__file__).resolve().parent.parent
UNITS = 100
MASK_PROB, MASK_LENGTH = 0.8, 10
FINAL_DIM, LOGIT_TEMP = 64, 0.1
FEATURE_PEN, FEATURE_GRAD_MULT = 10.0, 0.1


# ------------------------------------------------------------------------------------------------ data
def read_manifest(tsv: Path) -> list[Path]:
    """fairseq audio manifest: the root folder, then `relpath<TAB>num_samples` per line."""
    if not tsv.exists():
        raise SystemExit(f"error: no manifest {tsv}")
    lines = tsv.read_text().splitlines()
    root = Path(lines[0].strip())
    return [root / line.split("\t")[0] for line in lines[1:] if line.strip()]


def load_audio(tsv: Path, cache: Path) -> list[torch.Tensor]:
    """Every clip of the manifest as int16 (S,) at 16 kHz, decoded once and cached (hours of audio: 2 bytes/sample)."""
    if cache.exists():
        return torch.load(cache)
    clips = []
    for path in read_manifest(tsv):
        audio, rate = sf.read(path, dtype="int16")
        if rate != 16000 or audio.ndim != 1:
            raise SystemExit(f"error: {path}: expected 16 kHz mono, got {rate} Hz, shape {audio.shape}")
        clips.append(torch.from_numpy(audio))
    save_atomic(clips, cache)
    return clips


def as_float(clip: torch.Tensor) -> torch.Tensor:
    return clip.float() / 32768.0


# ------------------------------------------------------------------------------------------------ targets
def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on (N, D) rows; returns the (k, D) centres."""
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=g)]
    d2 = torch.cdist(x, centers).squeeze(1) ** 2
    for _ in range(k - 1):  # k-means++: the next centre drawn with probability proportional to squared distance
        nxt = x[torch.multinomial(d2 / d2.sum(), 1, generator=g)]
        centers = torch.cat([centers, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).squeeze(1) ** 2)
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0  # an empty cluster is moved onto a random frame
        centers = torch.where(empty[:, None], x[torch.randint(len(x), (k,), generator=g)],
                              sums / counts.clamp(min=1)[:, None])
    return centers


def assign_units(feats: list[torch.Tensor], centers: torch.Tensor) -> list[torch.Tensor]:
    return [torch.cdist(f, centers).argmin(1).to(torch.uint8 if len(centers) <= 256 else torch.int16) for f in feats]


@torch.no_grad()
def layer_features(model: Wav2Vec2ForCTC, wav: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: (T, C)} outputs of the given transformer layers (0: the projected conv features before the
    transformer) for one utterance, read with forward hooks; the model runs in eval mode, unmasked."""
    out, hooks = {}, []
    for n in layers:
        if n == 0:
            hooks.append(model.feature_projection.register_forward_hook(
                lambda m, i, o, n=n: out.__setitem__(n, o[0] if isinstance(o, tuple) else o)))
        else:
            hooks.append(model.encoder.layers[n - 1].register_forward_hook(
                lambda m, i, o, n=n: out.__setitem__(n, o[0] if isinstance(o, tuple) else o)))
    try:
        model.eval()
        model(wav[None])
    finally:
        for h in hooks:
            h.remove()
    return {n: v.reshape(-1, v.shape[-1]) for n, v in out.items()}


def teacher_frames(teacher: Wav2Vec2ForCTC, layer: int, wav: torch.Tensor) -> torch.Tensor:
    """(T, C) fp32 features of one layer of an iteration-2 teacher: what its k-means units are fitted on."""
    return layer_features(teacher, wav, [layer])[layer].float()


def make_targets(clips, args, seed: int) -> tuple[list[torch.Tensor], dict]:
    """(per-clip unit ids, description): k-means of MFCCs, or of one layer of `--label-model`."""
    if args.label_model:
        from s3r.checkpoint import load_pretrained
        teacher = load_pretrained(args.label_model)
        feats = [teacher_frames(teacher, args.label_layer, as_float(c)) for c in clips]
        source = f"layer {args.label_layer} of {args.label_model}"
        teacher_info = {"label_model": str(args.label_model), "label_layer": args.label_layer}
    else:
        feats = [mfcc_frames(as_float(c)) for c in clips]
        source = "39-d MFCC (13 + deltas + delta-deltas), per-utterance normalised"
        teacher_info = {}
    x = torch.cat(feats)
    g = torch.Generator().manual_seed(seed)
    sample = x[torch.randperm(len(x), generator=g)[: args.kmeans_frames]]
    centers = kmeans(sample, args.units, seed=seed)
    units = assign_units(feats, centers)
    counts = torch.bincount(torch.cat(units).long(), minlength=args.units).float()
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(args.units))
    info = {"source": source, "k": args.units, "kmeans_frames": len(sample), "frames": len(x),
            "units_used": int((counts > 0).sum()), "usage_entropy": round(entropy, 4), **teacher_info}
    return units, {"centers": centers, **info}


# ------------------------------------------------------------------------------------------------ model
def init_for_pretraining(model: Wav2Vec2ForCTC) -> Wav2Vec2ForCTC:
    """fairseq's initialisation of a wav2vec 2.0 / HuBERT model trained from scratch (s3r's model keeps PyTorch's
    defaults, being meant for loading checkpoints): kaiming-normal conv weights in the feature extractor
    (ConvFeatureExtractionModel), and init_bert_params for the transformer's linear layers (normal, std 0.02, zero
    bias). With PyTorch's default conv init the variance shrinks ~6x per conv layer, so the 7-layer stack's output
    starts at ~1e-7 in mean square, below LayerNorm's eps (1e-5), where the transformer barely sees the audio."""
    for layer in model.feature_extractor.conv_layers:
        nn.init.kaiming_normal_(layer.conv.weight)
    for m in model.encoder.layers.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return model


class HubertHead(nn.Module):
    """HuBERT's prediction head: final_proj to FINAL_DIM, cosine similarity with each unit's label embedding."""
    def __init__(self, hidden: int, units: int):
        super().__init__()
        self.final_proj = nn.Linear(hidden, FINAL_DIM)
        self.label_embs_concat = nn.Parameter(torch.empty(units, FINAL_DIM).uniform_())  # fairseq's init

    def forward(self, x):  # (N, C) -> (N, units)
        return F.cosine_similarity(self.final_proj(x)[:, None, :], self.label_embs_concat[None], dim=-1) / LOGIT_TEMP


def hubert_step(model, head, wav, lengths, targets, mask_prob: float = MASK_PROB, mask_length: int = MASK_LENGTH,
                feature_grad_mult: float = FEATURE_GRAD_MULT):
    """One masked-prediction forward: (loss, feature penalty, masked accuracy, masked frames)."""
    features = model.feature_extractor(wav, lengths)  # (B, T, 512)
    features = features * feature_grad_mult + features.detach() * (1 - feature_grad_mult)  # fairseq GradMultiply
    feature_pen = features.float().pow(2).mean()
    x = model.feature_projection(features)  # (B, T, C)
    B, T, _ = x.shape
    out_lengths = model.output_lengths(lengths).clamp(max=T)
    padding_mask = torch.arange(T)[None, :] >= out_lengths[:, None]
    mask = compute_mask_indices((B, T), out_lengths, mask_prob, mask_length, min_masks=2) & ~padding_mask
    x = torch.where(mask.unsqueeze(-1), model.masked_spec_embed.to(x.dtype), x)
    h = model.encoder(x, padding_mask if bool(padding_mask.any()) else None)  # (B, T, C)
    tgt = torch.full((B, T), -1, dtype=torch.long)
    for b, t in enumerate(targets):
        n = min(len(t), int(out_lengths[b]))
        tgt[b, :n] = t[:n].long()
    sel = mask & (tgt >= 0)
    logits = head(h[sel])
    loss = F.cross_entropy(logits.float(), tgt[sel])
    acc = (logits.argmax(-1) == tgt[sel]).float().mean()
    return loss, feature_pen, acc, int(sel.sum())


def batches(lengths: list[int], max_seconds: float, rng: random.Random) -> list[list[int]]:
    """Length-sorted batches of at most max_seconds padded audio, in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    out, cur, longest = [], [], 0
    for i in order:
        if cur and max(longest, lengths[i]) * (len(cur) + 1) > max_seconds * 16000:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, lengths[i])
    out.append(cur)
    rng.shuffle(out)
    return out


def collate(clips, idx, crop: int, rng: random.Random):
    """Padded float batch; clips longer than `crop` samples are cut at a random 320-sample-aligned offset (HuBERT
    crops to max_sample_size), so that the targets stay aligned: returns (wav, lengths, frame offsets)."""
    pieces, offsets = [], []
    for i in idx:
        c = clips[i]
        start = rng.randrange(0, (len(c) - crop) // 320 + 1) * 320 if len(c) > crop else 0
        pieces.append(as_float(c[start:start + crop]))
        offsets.append(start // 320)
    lengths = torch.tensor([len(p) for p in pieces])
    wav = torch.zeros(len(pieces), int(lengths.max()))
    for b, p in enumerate(pieces):
        wav[b, : len(p)] = p
    return wav, lengths, offsets


@torch.no_grad()
def validate(model, head, clips, units, mask: tuple[float, int] = (MASK_PROB, MASK_LENGTH), seed: int = 0) -> dict:
    """Masked-prediction loss and accuracy on the valid clips, fixed masks (seeded), eval mode."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    model.eval()
    tot_loss = tot_acc = tot_n = 0.0
    rng = random.Random(seed)
    for idx in batches([len(c) for c in clips], 30, rng):
        wav, lengths, offsets = collate(clips, idx, 10 ** 9, rng)
        loss, _, acc, n = hubert_step(model, head, wav, lengths, [units[i] for i in idx], *mask)
        tot_loss, tot_acc, tot_n = tot_loss + loss.item() * n, tot_acc + acc.item() * n, tot_n + n
    model.train()
    torch.set_rng_state(state)
    return {"valid_loss": round(tot_loss / tot_n, 4), "valid_acc_masked": round(tot_acc / tot_n, 4)}


# ------------------------------------------------------------------------------------------------ checkpoint
TO_FAIRSEQ = [  # our key -> fairseq HubertModel key (the inverse of s3r.checkpoint.FAIRSEQ_KEYS)
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(\w+)", r"feature_extractor.conv_layers.\1.0.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(\w+)", r"feature_extractor.conv_layers.\1.2.\2"),
    (r"feature_projection\.layer_norm\.(\w+)", r"layer_norm.\1"),
    (r"feature_projection\.projection\.(\w+)", r"post_extract_proj.\1"),
    (r"masked_spec_embed", r"mask_emb"),
    (r"encoder\.pos_conv_embed\.conv\.(\w+)", r"encoder.pos_conv.0.\1"),
    (r"encoder\.layers\.(\d+)\.attention\.(\w+_proj)\.(\w+)", r"encoder.layers.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.layer_norm\.(\w+)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(\w+)", r"encoder.layers.\1.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(\w+)", r"encoder.layers.\1.fc2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"encoder\.layer_norm\.(\w+)", r"encoder.layer_norm.\1"),
]


def fairseq_key(key: str) -> str:
    for pattern, repl in TO_FAIRSEQ:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", repl, key)
    raise KeyError(f"no fairseq name for {key!r}")


def conv_feature_layers(c: Wav2Vec2Config) -> str:
    return repr([(d, k, s) for d, k, s in zip(c.conv_dim, c.conv_kernel, c.conv_stride, strict=True)])


def hubert_checkpoint(model: Wav2Vec2ForCTC, head: HubertHead, extra: dict,
                      mask: tuple[float, int] = (MASK_PROB, MASK_LENGTH), feature_grad_mult: float = FEATURE_GRAD_MULT,
                      feature_pen: float = FEATURE_PEN) -> dict:
    """A fairseq HuBERT pretraining checkpoint ({cfg: {model, task, criterion}, model: state}) in fp16."""
    c = model.config
    state = {fairseq_key(k): v for k, v in model.state_dict().items()}
    state.update({"final_proj.weight": head.final_proj.weight, "final_proj.bias": head.final_proj.bias,
                  "label_embs_concat": head.label_embs_concat})
    reg = FINETUNE_REGULARIZATION
    model_cfg = {"_name": "hubert", "label_rate": 50.0, "extractor_mode": "default",
                 "conv_feature_layers": conv_feature_layers(c), "conv_bias": c.conv_bias,
                 "encoder_layers": c.num_hidden_layers, "encoder_embed_dim": c.hidden_size,
                 "encoder_ffn_embed_dim": c.intermediate_size, "encoder_attention_heads": c.num_attention_heads,
                 "activation_fn": c.hidden_act, "layer_norm_first": c.layer_norm_first,
                 "conv_pos": c.conv_pos_kernel, "conv_pos_groups": c.conv_pos_groups,
                 "dropout": reg["hidden_dropout"], "attention_dropout": reg["attention_dropout"],
                 "activation_dropout": reg["activation_dropout"], "encoder_layerdrop": reg["layerdrop"],
                 "dropout_input": 0.0, "dropout_features": 0.0, "feature_grad_mult": feature_grad_mult,
                 "mask_prob": mask[0], "mask_length": mask[1], "mask_selection": "static",
                 "mask_channel_prob": 0.0, "final_dim": FINAL_DIM, "untie_final_proj": False,
                 "logit_temp": LOGIT_TEMP, "skip_masked": False, "skip_nomask": True}
    task_cfg = {"_name": "hubert_pretraining", "labels": ["km"], "label_rate": 50.0, "sample_rate": 16000,
                "normalize": False, "max_sample_size": 250000}
    criterion = {"_name": "hubert", "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0,
                 "loss_weights": [feature_pen]}
    return {"cfg": {"model": model_cfg, "task": task_cfg, "criterion": criterion, "common": {"fp16": True}},
            "model": {k: v.detach().half() for k, v in state.items()},
            "optimizer_history": [], "extra_state": extra}


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT / "runs" / "pretrain" / "corpus"),
                   help="folder with the fairseq manifests train.tsv and valid.tsv (no transcripts)")
    p.add_argument("--out", default=str(ROOT / "runs" / "pretrain" / "it1"))
    p.add_argument("--save", default=str(ROOT / "s3r" / "assets" / "miniature" / "backbone-ssl.pt"),
                   help="where the fp16 HuBERT pretraining checkpoint is copied at the end ('' for none)")
    p.add_argument("--label-model", default=None, help="iteration 2: the checkpoint whose layer gives the targets")
    p.add_argument("--label-layer", type=int, default=2, help="iteration 2: which layer (0: before the transformer)")
    p.add_argument("--units", type=int, default=UNITS, help="k-means clusters (HuBERT iteration 1: 100)")
    p.add_argument("--kmeans-frames", type=int, default=200000, help="frames sampled to fit k-means")
    p.add_argument("--max-updates", type=int, default=16000,
                   help="16,000 updates of 8 s: ~4 epochs of the 5.4 h, ~60 CPU minutes at one thread")
    p.add_argument("--max-minutes", type=float, default=1e9, help="stop (resumably) after this much wall time")
    p.add_argument("--batch-seconds", type=float, default=8.0, help="padded audio seconds per batch")
    p.add_argument("--crop-seconds", type=float, default=5.0, help="longer clips are cut at a random offset")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="peak learning rate (2e-3 held the loss at the units' marginal for 1,500 updates)")
    p.add_argument("--feature-pen", type=float, default=FEATURE_PEN,
                   help="weight of the conv features' mean square (fairseq loss_weights; HuBERT: 10)")
    p.add_argument("--feature-grad-mult", type=float, default=FEATURE_GRAD_MULT,
                   help="gradient scale into the conv stack (fairseq feature_grad_mult; HuBERT: 0.1)")
    p.add_argument("--mask-prob", type=float, default=MASK_PROB, help="fairseq mask_prob (HuBERT base: 0.8)")
    p.add_argument("--mask-length", type=int, default=MASK_LENGTH, help="fairseq mask_length (HuBERT base: 10)")
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--valid-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-overrides", default="{}",
                   help="JSON of Wav2Vec2Config fields to change (tests: a tiny transformer); keep the conv stack, "
                        "whose 20 ms frames the targets are computed for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-now", action="store_true",
                   help="stop training where the saved state is: validate and write the checkpoint as it is")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out, data = Path(a.out), Path(a.data)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    train = load_audio(data / "train.tsv", out / "train_audio.pt")
    valid = load_audio(data / "valid.tsv", out / "valid_audio.pt")
    hours = sum(len(c) for c in train) / 16000 / 3600
    print(f"{len(train)} train clips ({hours:.2f} h), {len(valid)} valid", flush=True)
    targets_path = out / "targets.pt"  # the k-means units of every frame, computed once
    if not targets_path.exists():
        t0 = time.time()
        units, info = make_targets(train + valid, a, a.seed)
        info["seconds"] = round(time.time() - t0, 1)
        save_atomic({"train": units[: len(train)], "valid": units[len(train):], "info": info}, targets_path)
    targets = torch.load(targets_path)
    info = {k: v for k, v in targets["info"].items() if k != "centers"}
    print(f"targets: {json.dumps(info)}", flush=True)

    torch.manual_seed(a.seed)
    config = Wav2Vec2Config(**{**CONFIG, **PRETRAIN_REGULARIZATION, **json.loads(a.model_overrides)}, vocab_size=0)
    model = init_for_pretraining(Wav2Vec2ForCTC(config))
    head = HubertHead(config.hidden_size, a.units)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)

    def lr_at(step):  # linear warmup, then linear decay to 5% (fairseq polynomial_decay, as HuBERT)
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        return a.lr * max(0.05, 1 - (step - a.warmup) / max(1, a.max_updates - a.warmup))

    state_path = out / "state.pt"
    step, epoch, pos, seconds, cpu, log = 0, 0, 0, 0.0, 0.0, []
    rng = random.Random(a.seed)
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, epoch, pos, seconds, cpu, log = (st["step"], st["epoch"], st["pos"], st["seconds"], st["cpu"],
                                               st["log"])
        rng.setstate(st["py_rng"])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed at update {step} (epoch {epoch}, {cpu / 60:.1f} CPU min of training)", flush=True)

    def save_state():
        save_atomic({"model": model.state_dict(), "head": head.state_dict(), "opt": opt.state_dict(), "step": step,
                     "epoch": epoch, "pos": pos, "seconds": seconds, "cpu": cpu, "log": log, "py_rng": rng.getstate(),
                     "torch_rng": torch.get_rng_state(), "args": vars(a)}, state_path)

    mask = (a.mask_prob, a.mask_length)
    lengths = [len(c) for c in train]
    crop = int(a.crop_seconds * 16000)
    max_updates = step if a.export_now else a.max_updates
    model.train()
    while step < max_updates:
        order = batches(lengths, a.batch_seconds, random.Random(a.seed * 1000 + epoch))
        while pos < len(order) and step < max_updates:
            t0, c0 = time.time(), time.process_time()
            idx = order[pos]
            wav, lens, offsets = collate(train, idx, crop, rng)
            tgts = [targets["train"][i][o:] for i, o in zip(idx, offsets, strict=True)]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss, pen, acc, _ = hubert_step(model, head, wav, lens, tgts, *mask, a.feature_grad_mult)
            opt.zero_grad(set_to_none=True)
            (loss + a.feature_pen * pen).backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            step, pos = step + 1, pos + 1
            seconds, cpu = seconds + time.time() - t0, cpu + time.process_time() - c0
            if step % 20 == 0:
                print(f"update {step} epoch {epoch} loss {loss.item():.3f} acc_m {acc.item():.3f} pen {pen.item():.3f} "
                      f"lr {lr_at(step):.2e} {lens.sum().item() / 16000 / (time.time() - t0):.1f} audio-s/s "
                      f"cpu {cpu / 60:.1f} min",
                      flush=True)
                log.append({"step": step, "loss": round(loss.item(), 4), "acc_m": round(acc.item(), 4)})
            if step % a.valid_every == 0:
                log.append({"step": step, **validate(model, head, valid, targets["valid"], mask)})
                print(f"valid {log[-1]}", flush=True)
            if step % a.save_every == 0:
                save_state()
            if (time.time() - t_start) / 60 > a.max_minutes:
                save_state()
                print(f"stopping after {a.max_minutes} min at update {step}; run again to continue", flush=True)
                return
        if pos >= len(order):
            epoch, pos = epoch + 1, 0
    save_state()

    val = validate(model, head, valid, targets["valid"], mask)
    report = {"objective": "HuBERT masked prediction of k-means units (no transcripts)",
              "iteration": 2 if a.label_model else 1, "targets": info, "updates": step, "epochs": epoch,
              "train_cpu_minutes": round(cpu / 60, 1), "train_wall_minutes": round(seconds / 60, 1),
              "train_hours": round(hours, 2),
              "params": sum(p.numel() for p in model.parameters()), **val,
              "command": " ".join(["python -m tools.pretrain_backbone", *(sys.argv[1:] if argv is None else argv)])}
    ckpt = hubert_checkpoint(model, head, {"miniature": report}, mask, a.feature_grad_mult, a.feature_pen)
    save_atomic(ckpt, out / "checkpoint.pt")
    if a.save:
        Path(a.save).parent.mkdir(parents=True, exist_ok=True)
        save_atomic(ckpt, a.save)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {out / 'checkpoint.pt'}: {json.dumps(report)}", flush=True)


if __name__ == "__main__":
    main()
