"""Transcribe (or classify) audio files with a route bundle or one checkpoint: application 2 as a command.

    python -m s3r.transcribe langs.bundle talk.wav --route nl              # every file through route nl
    python -m s3r.transcribe langs.bundle nl=a.wav zh=b.flac es=c.mp3      # ROUTE=FILE: a route per file
    python -m s3r.transcribe langs.bundle *.wav --route auto               # a language-ID route picks each route
    python -m s3r.transcribe checkpoint_best.pt long.ogg --chunk-s 30 --json out.json

One line per file on stdout, tab-separated: the path, the route, the transcript (a classification route: the label
and its probability). Files are grouped by route and each group runs with its route installed: a bundle keeps its
shared weights in place and switching installs only the route's bits, head and trained tensors (0.04-0.08 s at
wav2vec2-base size), so the outputs are those of each route's own checkpoint, file by file.

Audio: whatever soundfile reads (wav, flac, mp3, ogg/opus), at any sample rate (resampled to 16 kHz with
torchaudio's sinc kernel), channels averaged. Recordings longer than --chunk-s seconds are cut into windows that
overlap by --stride-s on each side; each window's CTC logits lose their strides and are concatenated, then decoded
once (the Hugging Face ASR pipeline's chunk_length_s / stride_length_s scheme). A file that cannot be read is one
line on stderr and does not stop the others; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import CheckpointError, checkpoint_vocab, load_pretrained, torch_load
from .data import SAMPLE_RATE, load_audio
from .decode import BeamSearchDecoder, greedy_decode
from .errors import ArgumentParser, S3RError
from .route_format import BUNDLE_FORMAT
from .routes import RouteBundle, bundle_from_dict

AUTO = "auto"


# ----------------------------------------------------------------------------------------------------------------
# Long audio: the Hugging Face pipeline's chunks and strides


def chunk_windows(samples: int, chunk: int, left: int, right: int) -> list[tuple[int, int, int, int]]:
    """(start, end, stride_left, stride_right) in samples of each window over a recording of `samples`.

    transformers' `chunk_iter` (pipelines/automatic_speech_recognition.py): windows of `chunk` samples every
    `chunk - left - right`; the first has no left stride, the last (the first reaching the end) no right one.
    `chunk` 0, or a recording no longer than it: one window.
    """
    if chunk <= 0 or samples <= chunk:
        return [(0, samples, 0, 0)]
    step = chunk - left - right
    if step <= 0:
        raise S3RError(f"--chunk-s must exceed twice --stride-s ({chunk} samples vs strides {left} + {right})")
    windows = []
    for start in range(0, samples, step):
        end = min(start + chunk, samples)
        last = start + chunk >= samples
        stride_left, stride_right = (0 if start == 0 else left), (0 if last else right)
        if end - start > stride_left:
            windows.append((start, end, stride_left, stride_right))
        if last:
            break
    return windows


def align(seconds: float, hop: int) -> int:
    """Seconds as samples, rounded to a multiple of the model's hop (320 samples: 20 ms), as transformers aligns
    chunk and stride lengths to `inputs_to_logits_ratio`: window starts then fall on the frame grid."""
    return int(round(seconds * SAMPLE_RATE / hop)) * hop


def strip_strides(logits: torch.Tensor, samples: int, left: int, right: int, hop: int) -> torch.Tensor:
    """The frames of one window's (T, V) logits outside its strides: transformers' `rescale_stride` and slice
    (`logits[left : round(samples / hop) - right]` in frames). With hop-aligned windows and strides the kept frames
    of consecutive windows meet exactly: no frame lost, none doubled."""
    first = int(round(left / hop))
    last = int(round(samples / hop)) - int(round(right / hop))
    return logits[first:min(last, logits.shape[0])]


# ----------------------------------------------------------------------------------------------------------------
# The models: a bundle (many routes) or one checkpoint (one route)


class Routes:
    """The model(s) behind a transcription: a route bundle, or one checkpoint seen as a bundle of one route."""

    def __init__(self, path: str | Path, trust_checkpoint: bool = False, dict_path: str | None = None,
                 device: torch.device | str = "cpu"):
        self.path, self.device = str(path), torch.device(device)
        obj = torch_load(path, trust_checkpoint) if Path(path).is_file() and Path(path).suffix == ".bundle" else None
        if obj is None:
            try:
                model = load_pretrained(path, trust_checkpoint=trust_checkpoint)
            except CheckpointError as e:
                if "route bundle" not in str(e):
                    raise
                obj = torch_load(path, trust_checkpoint)
        if isinstance(obj, dict) and obj.get("format") == BUNDLE_FORMAT:
            self.bundle: RouteBundle | None = bundle_from_dict(obj, path)
            self.bundle.model.to(self.device)
            self.names = self.bundle.names
            self.single = None
        elif obj is not None:
            raise S3RError(f"{path}: not a route bundle")
        else:
            if getattr(model, "lm_head", None) is None and getattr(model.config, "labels", None) is None:
                raise S3RError(f"{path} has no head (CTC or classification): it is a pretrained checkpoint, "
                               f"finetune it first")
            if getattr(model.config, "labels", None) is None:
                model.vocab = checkpoint_vocab(model, path, dict_path)
                if model.vocab is None:
                    raise S3RError(f"{path}: no vocabulary inside or beside it; pass --dict dict.ltr.txt or vocab.json")
                if len(model.vocab) != model.config.vocab_size:
                    raise S3RError(f"vocabulary has {len(model.vocab)} symbols but the CTC head of {path} "
                                   f"{model.config.vocab_size}")
            self.bundle, self.single = None, model.to(self.device).eval()
            self.names = [Path(path).stem]
        self.current: str | None = None

    def use(self, name: str) -> torch.nn.Module:
        """The model with route `name` installed (a bundle switches only when the route changes)."""
        if name not in self.names:
            raise S3RError(f"no route {name!r} in {self.path}; it has {', '.join(self.names)}")
        if self.bundle is None:
            return self.single
        if self.current != name:
            self.model = self.bundle.use(name)
            self.model.to(self.device)
            self.current = name
        return self.model


def is_classifier(model: torch.nn.Module) -> bool:
    return getattr(model.config, "labels", None) is not None


# ----------------------------------------------------------------------------------------------------------------
# Running files through routes


@dataclass
class Result:
    """One file's outcome: a transcript (CTC route) or a label and its probability (classification route)."""
    path: str
    route: str | None = None
    text: str | None = None
    label: str | None = None
    probability: float | None = None
    seconds: float | None = None
    error: str | None = None
    auto: dict | None = None  # --route auto: the language-ID route, its label and probability
    logits: torch.Tensor | None = field(default=None, repr=False)  # (T, V) stitched CTC logits or (K,) class logits

    def line(self) -> str:
        route = self.route if self.auto is None else f"{self.route} (auto {self.auto['probability']:.2f})"
        out = self.text if self.label is None else f"{self.label} ({self.probability:.3f})"
        return f"{self.path}\t{route}\t{out}"

    def to_dict(self) -> dict:
        keys = ("path", "route", "text", "label", "probability", "seconds", "error", "auto")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def read_audio(path: str) -> torch.Tensor:
    """(S,) float32 mono at 16 kHz; one-line S3RError for a missing, empty, undecodable or too short file."""
    if not Path(path).is_file():
        raise S3RError(f"{path}: no such file")
    wav = load_audio(path)  # soundfile + torchaudio resampling, channels averaged (s3r.data)
    if wav.numel() < 400:  # wav2vec 2.0's first conv window (25 ms): nothing shorter gives a frame
        raise S3RError(f"{path}: too short ({wav.numel()} samples at 16 kHz, at least 400 needed)")
    return wav


def _windows_of(wav: torch.Tensor, chunk: int, left: int, right: int, min_samples: int = 400) -> list[tuple]:
    """chunk_windows, but a last window too short for one frame is dropped and its predecessor keeps its end."""
    windows = chunk_windows(wav.numel(), chunk, left, right)
    if len(windows) > 1 and windows[-1][1] - windows[-1][0] < min_samples:
        windows.pop()
        windows[-1] = (*windows[-1][:3], 0)
    return windows


@torch.no_grad()
def _forward(model: torch.nn.Module, wavs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One padded batch -> each item's output: (T_i, V) CTC logits over its valid frames, or (K,) class logits."""
    normalize = model.config.normalize
    wavs = [F.layer_norm(w, w.shape) if normalize else w for w in wavs]  # fairseq task.normalize, per window
    lengths = torch.tensor([w.numel() for w in wavs])
    batch = torch.zeros(len(wavs), int(lengths.max()))
    for i, w in enumerate(wavs):
        batch[i, : w.numel()] = w
    out, out_lengths = model(batch.to(device), lengths.to(device) if len(wavs) > 1 else None)
    out = out.float().cpu()
    if is_classifier(model):
        return list(out)
    return [out[i, : int(out_lengths[i])] for i in range(len(wavs))]


def run_route(model: torch.nn.Module, files: list[tuple[int, str]], results: list[Result], *, chunk_s: float,
              stride_s: float, batch_size: int, device: torch.device,
              decode: Callable | None, keep_logits: bool, progress: Callable[[int], None]) -> None:
    """Run `files` ([(index, path)]) through one installed route, longest first in batches of `batch_size`
    windows; fill results[index] with the transcript (or label), or the error."""
    classify = is_classifier(model)
    hop = math.prod(model.config.conv_stride)
    chunk, stride = align(chunk_s, hop), align(stride_s, hop)
    lengths = {}
    for i, path in files:  # sort by duration (cheap header reads) so a batch pads little
        try:
            info = sf.info(path)
            lengths[i] = info.frames / info.samplerate
        except (RuntimeError, OSError):
            lengths[i] = 0.0  # unreadable: read_audio reports it in order
    order = sorted(files, key=lambda f: -lengths[f[0]])
    pending: list[tuple[int, int, torch.Tensor, tuple]] = []  # (file index, window number, samples, window)
    parts: dict[int, list] = {}

    def flush():
        outs = _forward(model, [p[2] for p in pending], device)
        for (i, n, _, (start, end, sl, sr)), out in zip(pending, outs, strict=True):
            parts[i][n] = out if classify else strip_strides(out, end - start, sl, sr, hop)
            if all(p is not None for p in parts[i]):
                finish(i)
        pending.clear()

    def finish(i):
        r, outs = results[i], parts.pop(i)
        if classify:  # windows of a long file: mean of their class probabilities
            probs = torch.stack([o.softmax(-1) for o in outs]).mean(0)
            k = int(probs.argmax())
            r.label, r.probability = model.config.labels[k], float(probs[k])
            r.logits = torch.stack(outs).mean(0) if keep_logits else None
        else:
            logits = torch.cat(outs)
            r.text = (decode or (lambda lg, n: greedy_decode(lg, n, model.vocab)))(logits[None], None)[0]
            r.logits = logits if keep_logits else None
        progress(1)

    for i, path in order:
        try:
            wav = read_audio(path)
        except S3RError as e:
            results[i].error = str(e)
            progress(1)
            continue
        results[i].seconds = round(wav.numel() / SAMPLE_RATE, 3)
        windows = _windows_of(wav, chunk, stride, stride)
        parts[i] = [None] * len(windows)
        for n, (start, end, sl, sr) in enumerate(windows):
            pending.append((i, n, wav[start:end], (start, end, sl, sr)))
            if len(pending) >= batch_size:
                flush()
    if pending:
        flush()


def transcribe_files(routes: Routes, files: list[tuple[str, str | None]], *, default_route: str | None = None,
                     lid: str | None = None, chunk_s: float = 30.0, stride_s: float | None = None,
                     batch_size: int = 1, decoders: dict[str, Callable] | None = None, keep_logits: bool = False,
                     progress: bool = False) -> list[Result]:
    """Results in the order of `files` ([(path, route or None)]); a file's route is its own, else `default_route`
    (AUTO: the language-ID route `lid` picks it), else the only route there is."""
    decoders = decoders or {}
    stride_s = chunk_s / 6 if stride_s is None else stride_s  # transformers' default stride_length_s
    results = [Result(path) for path, _ in files]
    wanted = []
    for path, route in files:
        route = route or default_route
        if route is None:
            if len(routes.names) > 1:
                raise S3RError(f"{routes.path} holds {len(routes.names)} routes ({', '.join(routes.names)}): "
                               f"pass --route NAME, --route auto or ROUTE=FILE for {path}")
            route = routes.names[0]
        if route != AUTO and route not in routes.names:
            raise S3RError(f"no route {route!r} in {routes.path}; it has {', '.join(routes.names)}")
        wanted.append(route)
    # disable=None: tqdm shows the bar only when stderr is a terminal
    bar = tqdm(total=len(files) + wanted.count(AUTO), disable=True if not progress or len(files) < 2 else None,
               unit="file", dynamic_ncols=True, file=sys.stderr)
    common = dict(chunk_s=chunk_s, stride_s=stride_s, device=routes.device, batch_size=batch_size,
                  progress=bar.update)
    auto = [i for i, r in enumerate(wanted) if r == AUTO]
    if auto:  # language ID first: its labels name the routes that transcribe
        lid = lid or find_lid(routes)
        lid_model = routes.use(lid)
        if not is_classifier(lid_model):
            raise S3RError(f"--lid {lid}: not a classification route")
        unknown = sorted(set(lid_model.config.labels) - set(routes.names))
        if unknown:
            raise S3RError(f"--lid {lid}: its label {unknown[0]!r} names no route of {routes.path}")
        found = [Result(files[i][0]) for i in auto]
        run_route(lid_model, [(n, files[i][0]) for n, i in enumerate(auto)], found, decode=None, keep_logits=False,
                  **common)
        for i, r in zip(auto, found, strict=True):
            if r.error:
                results[i].error = r.error
            else:
                wanted[i] = r.label
                results[i].auto = {"route": lid, "label": r.label, "probability": r.probability}
    for name in routes.names:  # each route's files in one group: one switch per route
        group = [(i, files[i][0]) for i, r in enumerate(wanted) if r == name and results[i].error is None]
        if group:
            model = routes.use(name)
            run_route(model, group, results, decode=decoders.get(name), keep_logits=keep_logits, **common)
            for i, _ in group:
                results[i].route = name
    bar.close()
    return results


def find_lid(routes: Routes) -> str:
    """The bundle's language-ID route: the classification route whose labels are all route names."""
    if routes.bundle is None:
        raise S3RError(f"--route auto needs a bundle with a language-ID route; {routes.path} is one checkpoint")
    found = []
    for name in routes.names:
        labels = routes.bundle.routes[name]["config"].get("labels")
        if labels and set(labels) <= set(routes.names) - {name}:
            found.append(name)
    if len(found) != 1:
        raise S3RError(f"--route auto: {routes.path} has {'no' if not found else 'more than one'} classification "
                       f"route whose labels are route names{'' if not found else ' (' + ', '.join(found) + ')'}; "
                       f"name it with --lid ROUTE")
    return found[0]


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_files(items: list[str], names: list[str]) -> list[tuple[str, str | None]]:
    """FILE or ROUTE=FILE (ROUTE one of `names`; an existing file of that name wins)."""
    out = []
    for item in items:
        route, sep, path = item.partition("=")
        if sep and route in names and not Path(item).exists():
            out.append((path, route))
        else:
            out.append((item, None))
    return out


def parse_per_route(items: list[str] | None, names: list[str], flag: str) -> dict[str, str]:
    """--lexicon/--kenlm values, FILE (every route) or ROUTE=FILE, as {route: file}."""
    out = {}
    for item in items or []:
        route, sep, path = item.partition("=")
        if sep and route in names:
            out[route] = path
        elif sep and not Path(item).exists():
            raise S3RError(f"{flag} {item}: no route {route!r} (routes: {', '.join(names)})")
        else:
            out.update({n: item for n in names})
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m s3r.transcribe", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a route bundle (python -m s3r.routes bundle) or a CTC / classification checkpoint")
    p.add_argument("files", nargs="+", help="audio files; ROUTE=FILE gives a file its own route")
    p.add_argument("--route", default=None, help="route for files without one; 'auto': a language-ID route picks")
    p.add_argument("--lid", default=None, metavar="ROUTE", help="the language-ID route of --route auto (default: the "
                   "classification route whose labels are route names)")
    p.add_argument("--json", default=None, metavar="OUT", help="write every result (and error) as JSON")
    p.add_argument("--chunk-s", type=float, default=30.0, help="longer recordings are cut into windows of this many "
                   "seconds (0: never)")
    p.add_argument("--stride-s", type=float, default=None, help="overlap on each side of a window (default chunk-s/6)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (zero-padded to the longest; "
                   "padding changes no output)")
    p.add_argument("--dict", default=None, help="vocabulary of a checkpoint that has none inside")
    p.add_argument("--lexicon", action="append", metavar="[ROUTE=]FILE", help="word lexicon for beam search (per "
                   "route with ROUTE=; repeatable)")
    p.add_argument("--kenlm", action="append", metavar="[ROUTE=]FILE", help="KenLM model for beam search (per route)")
    p.add_argument("--beam", type=int, default=50, help="beam size")
    p.add_argument("--lm-weight", type=float, default=2.0, help="language model weight")
    p.add_argument("--word-score", type=float, default=-1.0, help="word insertion score")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that pickle arbitrary classes")
    a = p.parse_args(argv)
    try:
        if a.batch_size < 1 or a.chunk_s < 0 or (a.stride_s is not None and a.stride_s < 0):
            raise S3RError("--batch-size must be >= 1, --chunk-s and --stride-s >= 0")
        cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
        routes = Routes(a.model, a.trust_checkpoint, a.dict, "cuda" if cuda else "cpu")
        if a.route not in (None, AUTO) and a.route not in routes.names:
            raise S3RError(f"--route {a.route}: no such route in {a.model}; it has {', '.join(routes.names)}")
        lexicons = parse_per_route(a.lexicon, routes.names, "--lexicon")
        lms = parse_per_route(a.kenlm, routes.names, "--kenlm")
        decoders = {}
        for name in sorted(set(lexicons) | set(lms)):
            vocab = routes.use(name).vocab
            decoders[name] = BeamSearchDecoder(vocab, lexicons.get(name), lms.get(name), a.beam, a.lm_weight,
                                               a.word_score)
        results = transcribe_files(routes, parse_files(a.files, routes.names), default_route=a.route, lid=a.lid,
                                   chunk_s=a.chunk_s, stride_s=a.stride_s, batch_size=a.batch_size,
                                   decoders=decoders, progress=not a.no_progress)
    except S3RError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for r in results:
        if r.error:
            failed += 1
            print(f"error: {r.error}", file=sys.stderr)
        else:
            print(r.line())
    if a.json:
        Path(a.json).write_text(json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=1) + "\n",
                                encoding="utf-8")
    if failed:
        print(f"{failed} of {len(results)} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
