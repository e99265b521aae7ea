"""Word error rate of a CTC checkpoint on a corpus: greedy decoding (or lexicon + KenLM beam search) and jiwer.

    python eval.py --checkpoint checkpoints/checkpoint_best.pt --data test-clean --data-root /data
    python eval.py --checkpoint wav2vec_small_960h.pt --dict dict.ltr.txt --data test-other --data-root /data \
        --json out.json --hyp out.tsv
    python eval.py --checkpoint facebook-wav2vec2-base-960h/ --data dev-clean --data-root /data \
        --lexicon librispeech_lexicon.lst --kenlm 4-gram.bin --beam 500

Reads s3r checkpoints (config, route and vocabulary inside), CTC-finetuned fairseq checkpoints (vocabulary from the
dict.ltr.txt next to them, or --dict) and Hugging Face model folders (vocab.json). Prints WER and CER (and UER, the
unit error rate, for character and phone units: upstream's metric for CommonVoice); --hyp writes
id<TAB>reference<TAB>hypothesis per utterance and --json the scores.
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from s3r import S3RError, load_pretrained
from s3r.data import SAMPLE_RATE, make_loader, resolve_corpus
from s3r.decode import BeamSearchDecoder, error_rates, greedy_decode, unit_error_rate
from s3r.text import Vocabulary


def checkpoint_vocab(model, path: str, dict_path: str | None = None) -> Vocabulary | None:
    """The vocabulary a checkpoint was trained with: --dict, the checkpoint's own, or dict.ltr.txt / vocab.json beside it."""
    if dict_path:
        if not Path(dict_path).is_file():
            raise S3RError(f"--dict {dict_path}: no such file")
        return Vocabulary.from_hf_vocab(dict_path) if dict_path.endswith(".json") else Vocabulary.from_fairseq_dict(dict_path)
    if getattr(model, "vocab", None) is not None:
        return model.vocab
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if (folder / "dict.ltr.txt").is_file():  # fairseq keeps the dictionary in the data folder; copy it beside the model
        return Vocabulary.from_fairseq_dict(str(folder / "dict.ltr.txt"))
    if (folder / "vocab.json").is_file():
        return Vocabulary.from_hf_vocab(str(folder / "vocab.json"))
    return None


@torch.no_grad()
def transcribe(model, loader, vocab: Vocabulary, device, autocast=contextlib.nullcontext, decode=None) -> list:
    """[(id, reference, hypothesis)] for every utterance of `loader` (greedy CTC unless `decode` is given)."""
    decode = decode or (lambda logits, lengths: greedy_decode(logits, lengths, vocab))
    was_training = model.training
    model.eval()
    rows = []
    for batch in loader:
        for path, reason in batch["skipped"]:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        if not batch["ids"]:
            continue
        with autocast():
            logits, lengths = model(batch["wav"].to(device), batch["lengths"].to(device))  # (B, T, V), (B,)
        hyps = decode(logits.float(), lengths)
        refs = [loader.dataset.utterances[i].text for i in batch["indices"]]  # normalized transcripts
        rows += zip(batch["ids"], refs, hyps)
    model.train(was_training)
    return rows


def score(rows: list, units: str) -> dict:
    """Corpus WER and CER (jiwer), and UER: phones for phone units, non-space characters otherwise."""
    refs, hyps = [r for _, r, _ in rows], [h for _, _, h in rows]
    m = error_rates(refs, hyps)
    return {"wer": m["wer"], "cer": m["cer"], "uer": unit_error_rate(refs, hyps, "phone" if units == "phone" else "char"),
            "utterances": len(rows), "words": m["words"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="s3r or CTC-finetuned fairseq checkpoint, or a Hugging Face folder")
    p.add_argument("--data", required=True, help="corpus name: test-clean, dev-other, pl-test, demo-dev, x.tsv")
    p.add_argument("--data-root", default=".", help="folder holding LibriSpeech/, librispeech_finetuning/, cv-corpus-*/")
    p.add_argument("--json", default=None, metavar="OUT", help="write the scores as JSON")
    p.add_argument("--hyp", default=None, metavar="FILE", help="write id<TAB>reference<TAB>hypothesis per utterance")
    p.add_argument("--dict", default=None, help="vocabulary (dict.ltr.txt or vocab.json) when the checkpoint has none")
    p.add_argument("--batch-seconds", type=float, default=50.0, help="padded audio per batch (50 s = fairseq max_tokens_valid 800000)")
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
        device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
        model = load_pretrained(a.checkpoint, trust_checkpoint=a.trust_checkpoint).to(device)
        if model.lm_head is None:
            raise S3RError(f"{a.checkpoint} has no CTC head: it is a pretrained checkpoint, finetune it first (train.py)")
        vocab = checkpoint_vocab(model, a.checkpoint, a.dict)
        if vocab is None:
            raise S3RError(f"{a.checkpoint}: no vocabulary inside or beside it; pass --dict dict.ltr.txt (or vocab.json)")
        if len(vocab) != model.config.vocab_size:
            raise S3RError(f"vocabulary has {len(vocab)} symbols but the CTC head of {a.checkpoint} {model.config.vocab_size}")
        decode = None
        if a.lexicon or a.kenlm:
            decode = BeamSearchDecoder(vocab, a.lexicon, a.kenlm, a.beam, a.lm_weight, a.word_score)
        corpus = resolve_corpus(a.data, a.data_root, a.skip_bad, "phone" if vocab.units == "phone" else None)
        loader = make_loader(corpus.utterances, vocab, int(a.batch_seconds * SAMPLE_RATE), train=False,
                             normalize=model.config.normalize, num_workers=a.num_workers, skip_bad=a.skip_bad, allow_unk=True)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.amp)
        autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype and device.type == "cuda" else contextlib.nullcontext
        rows = transcribe(model, loader, vocab, device, autocast, decode)
    except S3RError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = score(rows, vocab.units)
    skipped = corpus.skipped + loader.dataset.skipped
    result = {"checkpoint": a.checkpoint, "data": a.data, **metrics, "units": vocab.units,
              "decoder": "beam" if decode else "greedy", "skipped": [{"path": p, "reason": r} for p, r in skipped]}
    if a.hyp:
        Path(a.hyp).write_text("".join(f"{i}\t{r}\t{h}\n" for i, r, h in rows), encoding="utf-8")
    if a.json:
        Path(a.json).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    uer = f" UER {100 * metrics['uer']:.2f}%" if vocab.units in ("char", "phone") else ""
    print(f"{a.data}: WER {100 * metrics['wer']:.2f}% CER {100 * metrics['cer']:.2f}%{uer} on {metrics['utterances']} "
          f"utterances ({len(skipped)} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
