"""Word error rate of a CTC checkpoint on a corpus: greedy decoding (or lexicon + KenLM beam search) and jiwer;
accuracy and a per-class table for a classification checkpoint on a task corpus (s3r/tasks.py).

    python eval.py --checkpoint checkpoints/checkpoint_best.pt --data test-clean --data-root /data
    python eval.py --checkpoint wav2vec_small_960h.pt --dict dict.ltr.txt --data test-other --data-root /data \
        --json out.json --hyp out.tsv
    python eval.py --checkpoint facebook-wav2vec2-base-960h/ --data dev-clean --data-root /data \
        --lexicon librispeech_lexicon.lst --kenlm 4-gram.bin --beam 500
    python eval.py --checkpoint checkpoints/checkpoint_best.pt --data demo-test        # after train.py --data demo
    python eval.py --init xlsr2_300m.pt --route nl.route --data nl-test --data-root /data   # a route file
    python eval.py --bundle langs.bundle --route nl --data nl-test --data-root /data        # a route of a bundle
    python eval.py --checkpoint ks/checkpoint_best.pt --data speech_commands_v0.01-test --data-root /data  # accuracy

Reads s3r checkpoints (config, route and vocabulary inside), CTC-finetuned fairseq checkpoints (vocabulary from the
dict.ltr.txt next to them, or --dict) and Hugging Face model folders (vocab.json). Prints WER and CER; for
character and phone units also UER (fairseq's unit error rate, word separators counted: upstream's CommonVoice
metric), for phones PER (separators not counted). --hyp writes id<TAB>reference<TAB>hypothesis per utterance,
--json the scores.
"""
import contextlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from s3r import S3RError, load_pretrained
from s3r.checkpoint import checkpoint_vocab
from s3r.data import SAMPLE_RATE, make_loader, resolve_corpus
from s3r.decode import BeamSearchDecoder, transcribe
from s3r.errors import ArgumentParser, warn
from s3r.metrics import score
from s3r.tasks import Labels, accuracy, classify, resolve_task


def load_model(a):
    """The model --checkpoint, --init with --route (a route file) or --bundle with --route (a name) names."""
    given = [flag for flag in ("checkpoint", "init", "bundle") if getattr(a, flag)]
    if len(given) != 1:
        raise S3RError("give one of --checkpoint CKPT, --init PRETRAINED --route FILE, --bundle FILE --route NAME")
    if a.route is None and not a.checkpoint:
        raise S3RError(f"--{given[0]} needs --route ({'a route file' if a.init else 'the name of one of its routes'})")
    if a.checkpoint:
        if a.route is not None:
            raise S3RError("--route goes with --init PRETRAINED (a route file) or --bundle (a route name), not with "
                           "--checkpoint")
        return load_pretrained(a.checkpoint, trust_checkpoint=a.trust_checkpoint)
    if a.init:
        return load_pretrained(a.init, route=a.route, trust_checkpoint=a.trust_checkpoint)
    from s3r.routes import load_bundle
    return load_bundle(a.bundle).use(a.route)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="s3r or CTC-finetuned fairseq checkpoint, or a HF folder")
    p.add_argument("--init", metavar="PRETRAINED", help="the pretrained checkpoint a --route file was learned on")
    p.add_argument("--bundle", help="a route bundle (python -m s3r.routes bundle); --route names the route")
    p.add_argument("--route", help="with --init: a route file (python -m s3r.routes export); with --bundle: a name")
    p.add_argument("--data", required=True, help="corpus name: test-clean, dev-other, pl-test, demo-test, x.tsv")
    p.add_argument("--data-root", default=".", help="folder holding LibriSpeech/, librispeech_finetuning/, "
                   "cv-corpus-*/")
    p.add_argument("--json", default=None, metavar="OUT", help="write the scores as JSON")
    p.add_argument("--hyp", default=None, metavar="FILE", help="write id<TAB>reference<TAB>hypothesis per utterance")
    p.add_argument("--dict", default=None, help="vocabulary (dict.ltr.txt or vocab.json) when the checkpoint has none")
    p.add_argument("--batch-seconds", type=float, default=50.0,
                   help="padded audio per batch (50 s = fairseq max_tokens_valid 800000)")
    p.add_argument("--lexicon", default=None, help="word lexicon for beam search (needs flashlight-text)")
    p.add_argument("--kenlm", default=None, help="KenLM binary or ARPA language model for beam search")
    p.add_argument("--beam", type=int, default=50, help="beam size")
    p.add_argument("--lm-weight", type=float, default=2.0, help="language model weight")
    p.add_argument("--word-score", type=float, default=-1.0, help="word insertion score")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast on GPU (default fp32)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable audio (listed) instead of stopping")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that pickle arbitrary classes")
    a = p.parse_args(argv)
    try:
        cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if cuda else "cpu")
        model = load_model(a).to(device)
        name = a.checkpoint or a.route  # for messages; the vocabulary may lie beside the file
        if getattr(model.config, "labels", None) is not None:  # a classifier (s3r/classify.py)
            return evaluate_classifier(a, model, device)
        if model.lm_head is None:
            raise S3RError(f"{name} has no CTC head: it is a pretrained checkpoint, finetune it first")
        vocab = checkpoint_vocab(model, a.checkpoint or (a.route if a.init else a.bundle), a.dict)
        if vocab is None:
            raise S3RError(f"{name}: no vocabulary inside or beside it; pass --dict dict.ltr.txt or vocab.json")
        if len(vocab) != model.config.vocab_size:
            raise S3RError(f"vocabulary has {len(vocab)} symbols but the CTC head of {name} "
                           f"{model.config.vocab_size}")
        if a.data == "demo" or re.search(r"(^|-)train($|-)", a.data):
            warn(f"{a.data} is a training split: its error rate says how well the model fits what it learned from"
                 + (", not how it does on new speech (the demo's test split is demo-test)" if a.data.startswith("demo")
                    else ""))
        decode = None
        if a.lexicon or a.kenlm:
            decode = BeamSearchDecoder(vocab, a.lexicon, a.kenlm, a.beam, a.lm_weight, a.word_score)
        corpus = resolve_corpus(a.data, a.data_root, a.skip_bad, "phone" if vocab.units == "phone" else None)
        loader = make_loader(corpus.utterances, vocab, int(a.batch_seconds * SAMPLE_RATE), train=False,
                             normalize_waveform=model.config.normalize, num_workers=a.num_workers,
                             skip_bad=a.skip_bad, allow_unk=True)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.amp) if device.type == "cuda" else None
        autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        rows = transcribe(model, loader, vocab, device, autocast, decode)
        metrics = score(rows, vocab.units)
    except S3RError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = corpus.skipped + loader.dataset.skipped
    result = {"checkpoint": a.checkpoint, "init": a.init, "bundle": a.bundle, "route": a.route,
              "data": a.data, **metrics, "units": vocab.units,
              "decoder": "beam" if decode else "greedy", "skipped": [{"path": p, "reason": r} for p, r in skipped]}
    if a.hyp:
        Path(a.hyp).write_text("".join(f"{i}\t{r}\t{h}\n" for i, r, h in rows), encoding="utf-8")
    if a.json:
        Path(a.json).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    shown = ["wer", "cer"] + ["uer"] * (vocab.units in ("char", "phone")) + ["per"] * ("per" in metrics)
    rates = " ".join(f"{k.upper()} {100 * metrics[k]:.2f}%" for k in shown)
    print(f"{a.data}: {rates} on {metrics['utterances']} utterances ({len(skipped)} skipped)")
    return 0


def evaluate_classifier(a, model, device) -> int:
    """Accuracy and the per-class table of a classification checkpoint on a task corpus (s3r/tasks.py)."""
    labels = Labels(model.config.labels)
    corpus = resolve_task(a.data, a.data_root, a.skip_bad, labels.labels)
    loader = make_loader(corpus.utterances, labels, int(a.batch_seconds * SAMPLE_RATE), train=False,
                         normalize_waveform=model.config.normalize, num_workers=a.num_workers, skip_bad=a.skip_bad)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.amp) if device.type == "cuda" else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    rows = classify(model, loader, labels, device, autocast)
    metrics = accuracy(rows, labels.labels)
    skipped = corpus.skipped + loader.dataset.skipped
    predicted = Counter(h for _, _, h in rows)
    result = {"checkpoint": a.checkpoint, "init": a.init, "bundle": a.bundle, "route": a.route, "data": a.data,
              **metrics, "predicted": {k: predicted.get(k, 0) for k in labels.labels},
              "skipped": [{"path": p, "reason": r} for p, r in skipped]}
    if a.hyp:
        Path(a.hyp).write_text("".join(f"{i}\t{r}\t{h}\n" for i, r, h in rows), encoding="utf-8")
    if a.json:
        Path(a.json).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{a.data}: accuracy {100 * metrics['accuracy']:.2f}% ({metrics['correct']} of {metrics['utterances']} "
          f"utterances, {len(labels)} classes; {len(skipped)} skipped)")
    width = max(len("class"), *(len(k) for k in metrics["per_class"]))
    print(f"{'class':{width}s}  utterances  correct  accuracy  predicted")
    for label, (correct, total) in metrics["per_class"].items():
        rate = f"{100 * correct / total:7.2f}%" if total else "       -"
        print(f"{label:{width}s}  {total:10d}  {correct:7d}  {rate}  {predicted.get(label, 0):9d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
