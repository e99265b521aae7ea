"""Utterance-level task corpora by name (`--data NAME --data-root DIR`), for the classifier of s3r/classify.py.

    speech_commands_v0.01-{train,dev,test}   keyword spotting, SUPERB's KS (Speech Commands v0.01; v0.02 alike):
        DIR/speech_commands_v0.01/ (or DIR itself) with <word>/<file>.wav, validation_list.txt, testing_list.txt and
        _background_noise_/*.wav. 12 classes in s3prl's order: yes no up down left right on off stop go, _unknown_
        (every other word folder), _silence_ (1-second clips cut from the background noise files, one after the
        other; clip k of each file goes to dev when k % 10 == 0, to test when k % 10 == 1, to train otherwise).
        A file is dev (test) when validation_list.txt (testing_list.txt) names it, train otherwise.
    voxceleb1-{train,dev,test}               speaker identification, SUPERB's SID: iden_split.txt (1 train, 2 dev,
        3 test) and the audio under DIR/wav/idXXXXX/<video>/<n>.wav (or DIR/*/wav/..., the dev and test archives
        unpacked side by side); DIR may also hold a VoxCeleb1/ folder. Labels: the speaker ids (id10001 ...).
    fluent_speech_commands-{train,dev,test}  intent classification, SUPERB's IC: DIR/fluent_speech_commands_dataset/
        (or DIR) with data/{train,valid,test}_data.csv (columns path, action, object, location, by name). The label
        is the whole intent `action/object/location`: accuracy counts an utterance right only when all three are,
        SUPERB's IC accuracy (s3prl scores three heads that way; here one head has the 31 intents).
    FILE.tsv whose rows are `path<TAB>label` (an optional `path<TAB>label` header; paths relative to the file's
        folder): any other task (language ID, emotion, ...). A fairseq manifest (first line: the audio root alone)
        is a CTC corpus, not this.
`-valid` is accepted for `-dev`. Labels are the training set's (sorted; Speech Commands: its fixed 12); a dev or
test label the model was not trained on is an error naming the file and line.

    python -m s3r.tasks speech_commands_v0.01-train --data-root DIR     # counts per label, hours, problems
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import Corpus, DataError, Utterance, _first_dir, _Problems, _read_bytes, _read_lines, scan_audio
from .decode import run_over
from .errors import S3RError

KS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
KS_LABELS = KS_WORDS + ("_unknown_", "_silence_")  # s3prl downstream/speech_commands CLASSES
SPLITS = {"train": "train", "dev": "dev", "valid": "dev", "test": "test"}
_NAME = re.compile(r"(speech_commands_v0\.0[12]|voxceleb1|fluent_speech_commands)-(train|dev|valid|test)")


@dataclass
class TaskCorpus(Corpus):
    """A classification corpus: every utterance's `text` is its label; `labels` the classes in output order."""
    labels: tuple = ()


class Labels:
    """Class names <-> indices for SpeechDataset (the `vocab` it encodes targets with): one index per utterance."""

    units = "label"

    def __init__(self, labels):
        self.labels = tuple(labels)
        self.index = {name: i for i, name in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, label: str, where: str = "", allow_unk: bool = False) -> list[int]:
        if label not in self.index:
            shown = ", ".join(self.labels[:8]) + (", ..." if len(self.labels) > 8 else "")
            raise DataError(f"{where or 'an utterance'}: label {label!r} is not one of the {len(self.labels)} labels "
                            f"the model was trained on ({shown})")
        return [self.index[label]]


def is_task(name: str, root: str | None = None) -> bool:
    """Whether `--data NAME` names a classification corpus (a task name, or a path<TAB>label manifest)."""
    if _NAME.fullmatch(name):
        return True
    if name.endswith(".tsv"):
        path = Path(name) if Path(name).is_file() or root is None else Path(root) / name
        return path.is_file() and "\t" in _first_line(path)
    return False


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        return f.readline().decode("utf-8", "replace")


def resolve_task(name: str, root: str | None = None, skip_bad: bool = False,
                 labels: tuple | None = None) -> TaskCorpus:
    """Read the classification corpus `name` under `root`. `labels`: the classes of the model being trained or
    evaluated (every label must be one of them); None: the corpus's own (sorted; Speech Commands: its 12)."""
    base, bad = Path(root or "."), _Problems(skip_bad)
    m = _NAME.fullmatch(name)
    if m is None and not is_task(name, root):
        raise DataError(f"{name!r} is not a classification corpus: expected speech_commands_v0.01-<split>, "
                        f"speech_commands_v0.02-<split>, voxceleb1-<split>, fluent_speech_commands-<split> "
                        f"(split train, dev or test) or a path<TAB>label .tsv")
    if m is None:
        kind, where = "labels", Path(name) if Path(name).is_file() or root is None else base / name
        rows, clips = _read_label_manifest(where, bad), []
    else:
        kind, split = m.group(1), SPLITS[m.group(2)]
        if kind.startswith("speech_commands"):
            where = _first_dir([base / kind, base], f"no {kind} folder (with validation_list.txt) under {base}")
            if not (where / "validation_list.txt").is_file():
                raise DataError(f"{where}: no validation_list.txt (is this the Speech Commands folder?)")
            rows, clips = _speech_commands(where, split, bad)
        elif kind == "voxceleb1":
            where = _first_dir([base / "VoxCeleb1", base], f"no VoxCeleb1 folder under {base}")
            rows, clips = _voxceleb1(where, split, bad), []
        else:
            where = _first_dir([base / "fluent_speech_commands_dataset", base],
                               f"no fluent_speech_commands_dataset folder under {base}")
            rows, clips = _fluent(where, split, bad), []
    sizes = scan_audio(sorted({p for _, p, _ in rows} | {p for p, _ in clips}), bad)
    utts = [Utterance(uid, p, *sizes[p], label) for uid, p, label in rows if p in sizes]
    for path, k in clips:  # _silence_: clip k of a background noise file, one second at the file's rate
        if path in sizes:
            n, rate = sizes[path]
            utts.append(Utterance(f"{Path(path).stem}#{k}", path, rate, rate, "_silence_", offset=k * rate))
    if labels is None:
        labels = KS_LABELS if kind.startswith("speech_commands") else tuple(sorted({u.text for u in utts}))
    known = set(labels)
    for u in utts:
        if u.text not in known:
            raise DataError(f"{u.path}: label {u.text!r} is not one of the {len(labels)} labels the model was "
                            f"trained on")
    return TaskCorpus(name, kind, str(where), None, "label", utts, None, list(bad), labels=tuple(labels))


# ---------------------------------------------------------------- the layouts
def _speech_commands(folder: Path, split: str, bad: _Problems) -> tuple[list, list]:
    """(uid, path, label) of the word files of `split`, and (noise file, clip index) of its _silence_ clips."""
    lists = {}
    for key, file in (("dev", "validation_list.txt"), ("test", "testing_list.txt")):
        path = folder / file
        if not path.is_file():
            raise DataError(f"{path} not found")
        lists[key] = {text.strip() for _, text in _read_lines(path, bad) if text and text.strip()}
    rows = []
    for wav in sorted(folder.glob("*/*.wav")):
        word = wav.parent.name
        if word == "_background_noise_":
            continue
        rel = f"{word}/{wav.name}"
        where = "dev" if rel in lists["dev"] else "test" if rel in lists["test"] else "train"
        if where == split:
            rows.append((rel.removesuffix(".wav"), str(wav), word if word in KS_WORDS else "_unknown_"))
    listed = {f"{w.parent.name}/{w.name}" for w in folder.glob("*/*.wav")}
    for key, names in lists.items():
        missing = sorted(names - listed)
        if missing:
            raise DataError(f"{folder / ('validation_list.txt' if key == 'dev' else 'testing_list.txt')}: "
                            f"{missing[0]} is not in {folder}" + (f" (and {len(missing) - 1} more)"
                                                                  if len(missing) > 1 else ""))
    noise = sorted((folder / "_background_noise_").glob("*.wav"))
    if not noise:
        raise DataError(f"{folder / '_background_noise_'}: no .wav files (the _silence_ class is cut from them)")
    sizes = scan_audio([str(p) for p in noise], bad)
    pick = {"dev": lambda k: k % 10 == 0, "test": lambda k: k % 10 == 1, "train": lambda k: k % 10 > 1}[split]
    clips = [(path, k) for path, (n, rate) in sizes.items() for k in range(n // rate) if pick(k)]
    return rows, clips


def _voxceleb1(folder: Path, split: str, bad: _Problems) -> list:
    split_file = folder / "iden_split.txt"
    if not split_file.is_file():
        raise DataError(f"{split_file} not found (VoxCeleb1's identification split)")
    roots = [folder / "wav"] + sorted(folder.glob("*/wav"))
    roots = [r for r in roots if r.is_dir()]
    if not roots:
        raise DataError(f"{folder}: no wav/ folder (nor */wav/) with the VoxCeleb1 audio")
    want, rows = {"train": "1", "dev": "2", "test": "3"}[split], []
    for n, text in _read_lines(split_file, bad):
        if text is None or not text.strip():
            continue
        fields = text.split()
        if len(fields) != 2 or fields[0] not in ("1", "2", "3") or not re.fullmatch(r"id\d+/.+\.wav", fields[1]):
            bad(f"{split_file}:{n}", f"expected '<1|2|3> idXXXXX/<video>/<n>.wav', got {text.strip()!r}")
            continue
        if fields[0] != want:
            continue
        path = next((r / fields[1] for r in roots if (r / fields[1]).is_file()), roots[0] / fields[1])
        rows.append((fields[1].removesuffix(".wav"), str(path), fields[1].split("/")[0]))
    return rows


def _fluent(folder: Path, split: str, bad: _Problems) -> list:
    csv_path = folder / "data" / f"{'valid' if split == 'dev' else split}_data.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path} not found")
    reader = csv.reader(io.StringIO(_read_bytes(csv_path).decode("utf-8", "replace")))
    header = next(reader, [])
    need = ("path", "action", "object", "location")
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(f"{csv_path}: no column {missing[0]!r} in the header (has {', '.join(header)})")
    col = {c: header.index(c) for c in need}
    rows = []
    for n, fields in enumerate(reader, 2):
        if not fields:
            continue
        if len(fields) != len(header) or any(not fields[col[c]].strip() for c in need):
            bad(f"{csv_path}:{n}", f"expected {len(header)} columns with path, action, object and location")
            continue
        rel = fields[col["path"]]
        intent = "/".join(fields[col[c]].strip() for c in ("action", "object", "location"))
        rows.append((str(Path(rel).with_suffix("")), str(folder / rel), intent))
    return rows


def _read_label_manifest(tsv: Path, bad: _Problems) -> list:
    if not tsv.is_file():
        raise DataError(f"manifest {tsv} not found")
    rows = []
    for n, text in _read_lines(tsv, bad):
        if text is None or not text.strip() or (n == 1 and text.strip().split("\t") == ["path", "label"]):
            continue
        fields = text.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            bad(f"{tsv}:{n}", f"expected 'path<TAB>label', got {text.strip()!r}")
            continue
        path = Path(fields[0].strip())
        path = path if path.is_absolute() else tsv.parent / path
        rows.append((str(Path(fields[0].strip()).with_suffix("")), str(path), fields[1].strip()))
    return rows


# ---------------------------------------------------------------- predicting and scoring
def classify(model: torch.nn.Module, loader: torch.utils.data.DataLoader, labels: Labels, device: torch.device,
             autocast: Callable = contextlib.nullcontext) -> list[tuple[str, str, str]]:
    """[(id, reference label, predicted label)] for every utterance of `loader` (the rows `transcribe` gives for
    CTC); utterances the loader skipped (skip_bad) are named on stderr."""
    rows = []
    for ids, refs, (logits, _) in run_over(model, loader, device, autocast):  # (B, K)
        best = logits.float().argmax(-1).tolist()
        rows += zip(ids, refs, [labels.labels[k] for k in best], strict=True)
    return rows


def accuracy(rows: list[tuple[str, str, str]], labels: tuple | None = None) -> dict:
    """Accuracy of [(id, reference, prediction)] and, per reference label, [correct, utterances]."""
    per_class = {label: [0, 0] for label in labels or ()}
    for _, ref, hyp in rows:
        counts = per_class.setdefault(ref, [0, 0])
        counts[0] += ref == hyp
        counts[1] += 1
    correct = sum(c for c, _ in per_class.values())
    return {"accuracy": correct / max(len(rows), 1), "correct": correct, "utterances": len(rows),
            "per_class": per_class}


def cross_entropy_sum(logits: torch.Tensor, out_lengths: torch.Tensor, batch: dict) -> torch.Tensor:
    """Cross-entropy summed over the batch (train.py normalises per sentence, as for CTC); targets[:, 0] is the
    label index (SpeechDataset encodes one per utterance)."""
    return F.cross_entropy(logits.float(), batch["targets"][:, 0], reduction="sum")


# ---------------------------------------------------------------- command line
def summarize(corpus: TaskCorpus) -> dict:
    counts = Counter(u.text for u in corpus.utterances)
    return {"name": corpus.name, "kind": corpus.kind, "root": corpus.root, "utterances": len(corpus.utterances),
            "hours": round(corpus.seconds / 3600, 4), "labels": len(corpus.labels),
            "per_label": {label: counts.get(label, 0) for label in corpus.labels},
            "skipped": [{"path": p, "reason": r} for p, r in corpus.skipped]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m s3r.tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="speech_commands_v0.01-train, voxceleb1-dev, fluent_speech_commands-test, FILE.tsv")
    p.add_argument("--data-root", default=".", help="the folder holding the corpus")
    p.add_argument("--skip-bad", action="store_true", help="list bad rows and files instead of stopping")
    args = p.parse_args(argv)
    try:
        s = summarize(resolve_task(args.name, args.data_root, args.skip_bad))
    except S3RError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s['name']} ({s['kind']}, {s['root']}): {s['utterances']} utterances, {s['hours']} h, "
          f"{s['labels']} labels")
    for label, count in s["per_label"].items():
        print(f"  {label:30s} {count}")
    for item in s["skipped"]:
        print(f"skipped {item['path']}: {item['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
