"""Train the miniature's small wav2vec 2.0 backbone, the stand-in for a self-supervised checkpoint.

    python -m tools.pretrain_supervised --data-root runs/miniature/corpus --out runs/miniature/backbone \
        --save s3r/assets/demo/backbone.pt

What it is, plainly: the exact wav2vec 2.0 architecture (s3r.Wav2Vec2ForCTC; 7 strided convs, positional conv,
pre-LN transformer as in wav2vec 2.0 large / XLS-R) at ~2M parameters, trained from scratch on the pretraining
languages (tools/text_sources.PRETRAIN) with two losses on one shared encoder, NOT with wav2vec 2.0's contrastive
objective (that needs far more audio and compute than two CPU cores give):
  - SUPERVISED CTC on the espeak-ng phone transcripts (a multilingual phone recogniser), and
  - HuBERT iteration-1 style prediction of MFCC k-means units (100 clusters, 20 ms frames, cross-entropy on every
    frame with time masking on): self-supervised, frame-level, so it shapes the encoder from the first updates,
    while CTC alone sat on its blank plateau for hundreds of updates in this budget.
The held-out languages (text_sources.HELD_OUT) are never seen. The phone head is dropped: the saved checkpoint
is the encoder alone, like a pretrained wav2vec 2.0 checkpoint, in fp16 (s3r's loader casts back to fp32).

Resumable: runs/.../state.pt is written every --save-every updates and at the end; run the command again to
continue. The learning-rate schedule is defined over --max-updates, so a resumed run follows the same curve.
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from s3r import Wav2Vec2Config, Wav2Vec2ForCTC
from s3r.checkpoint import s3r_checkpoint, save_atomic
from s3r.data import load_audio, resolve_corpus
from s3r.decode import greedy_decode
from s3r.metrics import per
from s3r.text import Vocabulary
from tools import text_sources

ROOT = Path(__file__).resolve().parent.parent

# ~2M parameters; frames every 20 ms like every wav2vec 2.0 model. Sized for 2 shared CPU cores: the whole
# miniature grid finetunes this model dozens of times. Pre-LN transformer (layer_norm_first, as wav2vec 2.0 large and
# XLS-R, upstream's CommonVoice backbone): from scratch it leaves CTC's blank plateau within ~100 updates, where the
# post-LN base layout was still on it after 400.
CONFIG = dict(conv_dim=(64,) * 7, hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
              conv_pos_kernel=32, conv_pos_groups=16, layer_norm_first=True)
# Pretraining here is short and underfits, so it runs without dropout or masking (also faster); the saved
# config carries ordinary finetuning values, as a pretrained wav2vec 2.0 checkpoint does.
PRETRAIN_REGULARIZATION = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
FINETUNE_REGULARIZATION = dict(hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, layerdrop=0.05,
                               mask_time_prob=0.0, mask_time_length=10)


def load_split(root: str, langs: list[str], splits: list[str], cache: Path) -> list[tuple[torch.Tensor, str, str]]:
    """[(wav (S,) at 16 kHz, phone transcript, lang)], decoded once and cached (mp3 decoding is slow)."""
    if cache.exists():
        return torch.load(cache)
    items = []
    for lang in langs:
        for split in splits:
            for u in resolve_corpus(f"{lang}-{split}", root, units="phone").utterances:
                items.append((load_audio(u.path), u.text, lang))
    torch.save(items, cache)
    return items


UNITS = 100  # k-means clusters of MFCC frames (HuBERT iteration 1 uses 100)


def mfcc_frames(wav: torch.Tensor) -> torch.Tensor:
    """(T, 39) MFCC + deltas + delta-deltas, 25 ms windows every 20 ms: exactly one row per encoder frame
    (the conv stack's receptive field is 400 samples, its stride 320), normalized per utterance."""
    import torchaudio
    mfcc = torchaudio.transforms.MFCC(16000, 13, melkwargs=dict(n_fft=400, win_length=400, hop_length=320, n_mels=40,
                                                                center=False))(wav)  # (13, T)
    d1 = torchaudio.functional.compute_deltas(mfcc)
    f = torch.cat([mfcc, d1, torchaudio.functional.compute_deltas(d1)]).T  # (T, 39)
    return (f - f.mean(0)) / (f.std(0) + 1e-5)


def kmeans_units(items, k: int = UNITS, iters: int = 20, seed: int = 0) -> list[torch.Tensor]:
    """Cluster every training frame's MFCCs (Lloyd's algorithm); returns each utterance's (T,) unit ids."""
    feats = [mfcc_frames(w) for w, _, _ in items]
    x = torch.cat(feats)
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centers[c] = members.mean(0)
    return [torch.cdist(f, centers).argmin(1) for f in feats], centers


def batches(items, max_seconds: float, rng: random.Random) -> list[list[int]]:
    """Length-sorted batches of at most max_seconds padded audio, in random order."""
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out, cur, longest = [], [], 0
    for i in order:
        n = len(items[i][0])
        if cur and max(longest, n) * (len(cur) + 1) > max_seconds * 16000:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    out.append(cur)
    rng.shuffle(out)
    return out


def collate(items, idx, vocab):
    wavs = [items[i][0] for i in idx]
    lengths = torch.tensor([len(w) for w in wavs])
    wav = torch.zeros(len(wavs), int(lengths.max()))
    for b, w in enumerate(wavs):
        wav[b, : len(w)] = w * (0.5 + random.random())  # random gain
    targets = [torch.tensor(vocab.encode(items[i][1])) for i in idx]
    return wav, lengths, torch.cat(targets), torch.tensor([len(t) for t in targets])


@torch.no_grad()
def evaluate(model, items, vocab, per_lang: bool = True) -> dict:
    model.eval()
    refs, hyps, langs = [], [], []
    for idx in batches(items, 60, random.Random(0)):
        wav, lengths, _, _ = collate(items, idx, vocab)
        logits, out_lengths = model(wav, lengths)
        hyps += greedy_decode(logits[..., : len(vocab)], out_lengths, vocab)
        refs += [items[i][1] for i in idx]
        langs += [items[i][2] for i in idx]
    model.train()
    res = {"per": per(refs, hyps)}
    if per_lang:
        for lang in sorted(set(langs)):
            sel = [k for k, other in enumerate(langs) if other == lang]
            res[f"per_{lang}"] = per([refs[k] for k in sel], [hyps[k] for k in sel])
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(ROOT / "runs" / "miniature" / "corpus"))
    p.add_argument("--out", default=str(ROOT / "runs" / "miniature" / "backbone"))
    p.add_argument("--save", default=str(ROOT / "s3r" / "assets" / "demo" / "backbone.pt"),
                   help="where the head-less fp16 backbone goes")
    p.add_argument("--langs", nargs="*", default=text_sources.PRETRAIN)
    p.add_argument("--max-updates", type=int, default=4000)
    p.add_argument("--max-minutes", type=float, default=48.0, help="stop (resumably) after this much wall time")
    p.add_argument("--batch-seconds", type=float, default=8.0, help="padded audio seconds per batch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="a second thread is no faster at this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-now", action="store_true",
                   help="stop training here: evaluate and save the backbone as it is")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    train = load_split(a.data_root, a.langs, ["train", "dev"], out / "train_audio.pt")
    test = load_split(a.data_root, a.langs, ["test"], out / "test_audio.pt")
    vocab = Vocabulary.build([t for _, t, _ in train + test], units="phone")
    print(f"{len(train)} train utterances ({sum(len(w) for w, _, _ in train) / 16000 / 60:.1f} min), "
          f"{len(test)} test ({sum(len(w) for w, _, _ in test) / 16000 / 60:.1f} min), {len(vocab)} phone units",
          flush=True)

    units_path = out / "units.pt"  # k-means units of every training frame, computed once
    if not units_path.exists():
        save_atomic(dict(zip(("units", "centers"), kmeans_units(train, seed=a.seed), strict=True)), units_path)
    units = torch.load(units_path)["units"]
    torch.manual_seed(a.seed)
    # one output layer, two heads: logits[:V] are the phones (CTC), logits[V:] the k-means units (cross-entropy)
    config = Wav2Vec2Config(**CONFIG, **PRETRAIN_REGULARIZATION, vocab_size=len(vocab) + UNITS,
                            mask_time_prob=0.3, mask_time_length=5)
    model = Wav2Vec2ForCTC(config)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)

    def lr_at(step):  # linear warmup, cosine decay to 5%
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        frac = (step - a.warmup) / max(1, a.max_updates - a.warmup)
        return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    state_path = out / "state.pt"
    step, epoch, pos, seconds_trained, log = 0, 0, 0, 0.0, []
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, epoch, pos, seconds_trained, log = st["step"], st["epoch"], st["pos"], st["seconds_trained"], st["log"]
        random.setstate(st["py_rng"])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed at update {step} (epoch {epoch}, batch {pos}, {seconds_trained / 60:.1f} min trained)",
              flush=True)

    def save_state():
        save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "epoch": epoch, "pos": pos,
                     "seconds_trained": seconds_trained, "log": log, "py_rng": random.getstate(),
                     "torch_rng": torch.get_rng_state(), "vocab": vocab.to_dict(), "config": config.to_dict()},
                    state_path)

    model.train()
    t_run = time.time()
    max_updates = step if a.export_now else a.max_updates
    while step < max_updates:
        order = batches(train, a.batch_seconds, random.Random(a.seed * 1000 + epoch))
        while pos < len(order) and step < max_updates:
            t0 = time.time()
            wav, lengths, targets, target_lengths = collate(train, order[pos], vocab)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits, out_lengths = model(wav, lengths)  # (B, T, V + UNITS)
            V = len(vocab)
            ctc = F.ctc_loss(logits[..., :V].float().log_softmax(-1).transpose(0, 1), targets, out_lengths,
                             target_lengths, blank=0, reduction="sum", zero_infinity=True) / target_lengths.sum()
            unit_targets = torch.full(logits.shape[:2], -100, dtype=torch.long)  # (B, T); -100 = padding, ignored
            for b, i in enumerate(order[pos]):
                n = min(len(units[i]), int(out_lengths[b]))
                unit_targets[b, :n] = units[i][:n]
            ce = F.cross_entropy(logits[..., V:].flatten(0, 1).float(), unit_targets.flatten(), ignore_index=-100)
            loss = ctc + ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step, pos = step + 1, pos + 1
            seconds_trained += time.time() - t0
            if step % 10 == 0:
                print(f"update {step} epoch {epoch} ctc {ctc.item():.3f} units {ce.item():.3f} lr {lr_at(step):.2e} "
                      f"{lengths.sum().item() / 16000 / (time.time() - t0):.1f} audio-s/s", flush=True)
                log.append({"step": step, "ctc": round(ctc.item(), 4), "units": round(ce.item(), 4)})
            if step % a.save_every == 0:
                save_state()
            if (time.time() - t_run) / 60 > a.max_minutes:
                save_state()
                print(f"stopping after {a.max_minutes} min at update {step}; run again to continue", flush=True)
                return
        if pos >= len(order):
            epoch, pos = epoch + 1, 0
    save_state()

    res = evaluate(model, test, vocab)
    print("held-in test PER " + " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("lm_head"))
    full = s3r_checkpoint(model, None, phone_vocab=vocab.to_dict())  # both heads, for reference (not committed)
    save_atomic(full, out / "backbone_with_phone_head.pt")
    model.set_vocab_size(0)  # drop the head: a "pretrained" encoder
    model.config = Wav2Vec2Config(**{**model.config.to_dict(), **FINETUNE_REGULARIZATION})
    ckpt = s3r_checkpoint(model, None, miniature={
        "objective": "supervised phone CTC + HuBERT-style MFCC k-means unit prediction (stand-in for "
                     "self-supervised pretraining)",
        "languages": a.langs, "updates": step, "train_minutes": round(seconds_trained / 60, 1),
        "held_in_per": round(res["per"], 4), "params": params, "script": "tools/pretrain_supervised.py"})
    ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    save_atomic(ckpt, a.save)
    report = {"params": params, "updates": step, "epochs": epoch, "train_cpu_minutes": round(seconds_trained / 60, 1),
              "train_audio_minutes": round(sum(len(w) for w, _, _ in train) / 16000 / 60, 1),
              "bytes": Path(a.save).stat().st_size, "vocab": vocab.symbols, **{k: round(v, 4) for k, v in res.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"saved {a.save} ({report['bytes'] / 1e6:.1f} MB, {params / 1e6:.2f}M parameters)", flush=True)


if __name__ == "__main__":
    main()
