"""Probe a frozen backbone before any finetuning: how much phone information does each layer hold?

    python -m tools.probe_backbone --backbone ssl=s3r/assets/miniature/backbone-ssl.pt \
        --backbone supervised=s3r/assets/demo/backbone.pt --targets runs/pretrain/it1/targets.pt \
        --out bench/results/backbone

Frame-level phone labels come from espeak-ng itself: the speech is synthesised through libespeak-ng with phoneme
events on (espeakINITIALIZE_PHONEME_EVENTS | _IPA), which report the sample at which each phone starts; an encoder
frame (25 ms window every 20 ms) gets the phone under its centre, "sil" for pauses. For each language (two held in:
en, de; two held out: es, ru), PROBE_UTTS utterances of new text and voices are made; a linear softmax probe
(logistic regression, features standardised) is fitted on the first two thirds and scored on the rest, for every
layer: 0 is the projected conv features the transformer reads, 1..L the transformer layers' outputs. MFCCs
(the 39-d iteration-1 features) are probed the same way, as the floor a backbone should beat.

With `--targets` (a targets.pt of tools.pretrain_backbone), the k-means units are scored against the same phone
labels, as in the HuBERT paper: phone purity (share of frames whose phone is their unit's most common phone),
cluster purity (share of frames whose unit is their phone's most common unit) and PNMI (mutual information of
phone and unit over the phone entropy), plus the units' usage on the
training audio (how many used, normalised entropy: no collapse).
"""
import argparse
import ctypes
import functools
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from s3r.checkpoint import load_pretrained
from tools import text_sources
from tools.pretrain_backbone import layer_features, teacher_frames
from tools.pretrain_corpus import VARIANTS
from tools.pretrain_supervised import mfcc_frames

ROOT = Path(__file__).resolve().parent.parent
HELD_IN, HELD_OUT = ["en", "de"], ["es", "ru"]
PROBE_UTTS = 90
STRESS = str.maketrans("", "", "ˈˌ")


# ------------------------------------------------------------------------------------------------ aligned speech
class _Event(ctypes.Structure):  # espeak_EVENT (speak_lib.h)
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
EVENT_PHONEME, EVENT_LIST_TERMINATED = 7, 0


@functools.cache
def _espeak():
    """libespeak-ng, initialised once: synchronous output, phoneme events with IPA names; returns (lib, state)."""
    try:
        lib = ctypes.CDLL("libespeak-ng.so.1")
    except OSError as e:
        raise SystemExit(f"error: libespeak-ng not found ({e}): apt-get install espeak-ng") from None
    rate = lib.espeak_Initialize(2, 0, None, 0x0001 | 0x0002)  # AUDIO_OUTPUT_SYNCHRONOUS; PHONEME_EVENTS | _IPA
    state = {"rate": rate, "samples": [], "events": []}

    def callback(wav, n, events):
        if wav and n > 0:
            state["samples"].extend(wav[:n])
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            if events[i].type == EVENT_PHONEME:
                state["events"].append((events[i].sample, events[i].id.decode("utf-8", "replace")))
            i += 1
        return 0

    state["callback"] = _CALLBACK(callback)  # kept referenced: libespeak-ng calls it later
    lib.espeak_SetSynthCallback(state["callback"])
    return lib, state


def speak_aligned(text: str, voice: str, variant: str = "m1", pitch: int = 50, wpm: int = 170):
    """(float32 audio at 16 kHz, [(start sample at 16 kHz, phone)]): every phone espeak-ng spoke, where it starts;
    pauses are "sil"."""
    import torchaudio
    lib, state = _espeak()
    state["samples"].clear()
    state["events"].clear()
    if lib.espeak_SetVoiceByName(f"{voice}+{variant}".encode()) != 0:
        raise SystemExit(f"error: espeak-ng has no voice {voice}+{variant}")
    lib.espeak_SetParameter(1, wpm, 0)  # espeakRATE
    lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH
    data = text.encode()
    lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, espeakCHARS_UTF8
    lib.espeak_Synchronize()
    audio = torch.tensor(state["samples"], dtype=torch.float32) / 32768.0
    audio = torchaudio.functional.resample(audio, state["rate"], 16000)
    scale = 16000 / state["rate"]
    phones = [(round(s * scale), p.translate(STRESS) or "sil") for s, p in state["events"]]
    return audio, phones


def frame_labels(phones: list[tuple[int, str]], frames: int) -> list[str]:
    """The phone under each 20 ms frame's centre (frame t spans samples 320 t .. 320 t + 400)."""
    out, k = [], 0
    for t in range(frames):
        centre = 320 * t + 200
        while k + 1 < len(phones) and phones[k + 1][0] <= centre:
            k += 1
        out.append(phones[k][1] if phones and phones[k][0] <= centre else "sil")
    return out


def probe_data(lang: str, num: int, seed: int) -> list[tuple[torch.Tensor, list[str]]]:
    """`num` aligned utterances of `lang`: new text (its own seed), voice variant, pitch and speed per utterance."""
    rng = random.Random(seed)
    items = []
    for text in text_sources.sentences(lang, num, seed=seed):
        audio, phones = speak_aligned(text, text_sources.voice(lang), rng.choice(VARIANTS), rng.randint(25, 75),
                                      rng.randint(140, 200))
        frames = (len(audio) - 400) // 320 + 1
        items.append((audio, frame_labels(phones, frames)))
    return items


# ------------------------------------------------------------------------------------------------ probes
def linear_probe(train_x, train_y, test_x, test_y, classes: int, steps: int = 300) -> float:
    """Accuracy of a softmax regression (standardised features, L-BFGS, small L2) on the test frames."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    tx, sx = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(tx.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(tx @ w + b, train_y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((sx @ w + b).argmax(1) == test_y).float().mean())


def pnmi(units: torch.Tensor, phones: torch.Tensor) -> dict:
    """HuBERT's cluster-quality measures of (N,) unit ids against (N,) phone ids."""
    joint = torch.zeros(int(units.max()) + 1, int(phones.max()) + 1)
    joint.index_put_((units, phones), torch.ones(len(units)), accumulate=True)
    p = joint / joint.sum()
    pu, pp = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pu @ pp)[nz]).log()).sum())
    h_phone = float(-(pp[pp > 0] * pp[pp > 0].log()).sum())
    # HuBERT's definitions: phone purity E_z[max_y p(y|z)], cluster purity E_y[max_z p(z|y)]
    return {"pnmi": round(mi / h_phone, 4), "cluster_purity": round(float(p.max(0).values.sum()), 4),
            "phone_purity": round(float(p.max(1).values.sum()), 4)}


def main(argv=None):
    """Rows already in OUT.json from the same languages and utterance count are kept (another backbone's)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", action="append", required=True, help="NAME=CHECKPOINT (repeatable)")
    p.add_argument("--targets", action="append", default=[],
                   help="NAME=targets.pt of tools.pretrain_backbone: score its k-means units (repeatable)")
    p.add_argument("--langs", nargs="*", default=HELD_IN + HELD_OUT)
    p.add_argument("--utts", type=int, default=PROBE_UTTS)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "backbone"), help="writes OUT.json (+ .md)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    data = {lang: probe_data(lang, a.utts, seed=9000 + i) for i, lang in enumerate(a.langs)}
    split = {lang: len(items) * 2 // 3 for lang, items in data.items()}
    labels = {}
    for lang, items in data.items():
        names = sorted({ph for _, lab in items for ph in lab})
        labels[lang] = [torch.tensor([names.index(ph) for ph in lab]) for _, lab in items]
    result = {"langs": a.langs, "held_in": [lg for lg in a.langs if lg in HELD_IN], "utterances_per_lang": a.utts,
              "frames": {lg: sum(len(y) for y in labels[lg]) for lg in a.langs},
              "phone_classes": {lg: int(max(int(y.max()) for y in labels[lg]) + 1) for lg in a.langs},
              "probe": {}, "units": {}}

    def score(feats_of) -> dict:  # {lang: accuracy} of a linear probe on per-utterance (T, D) features
        accs = {}
        for lang, items in data.items():
            feats = [feats_of(audio)[: len(y)] for (audio, _), y in zip(items, labels[lang], strict=True)]
            ys = [y[: len(f)] for f, y in zip(feats, labels[lang], strict=True)]
            k = split[lang]
            accs[lang] = round(linear_probe(torch.cat(feats[:k]), torch.cat(ys[:k]), torch.cat(feats[k:]),
                                            torch.cat(ys[k:]), result["phone_classes"][lang]), 4)
        accs["mean"] = round(sum(accs[lg] for lg in a.langs) / len(a.langs), 4)
        return accs

    result["probe"]["mfcc"] = {"mfcc": score(mfcc_frames)}
    for spec in a.backbone:
        name, path = spec.split("=", 1)
        model = load_pretrained(path)
        layers = list(range(model.config.num_hidden_layers + 1))
        cache = {}

        def feats_of(audio, n, model=model, layers=layers, cache=cache):
            key = id(audio)
            if key not in cache:
                cache[key] = layer_features(model, audio, layers)
            return cache[key][n].float()

        result["probe"][name] = {f"layer{n}": score(lambda au, n=n: feats_of(au, n)) for n in layers}
        result["probe"][name]["checkpoint"] = path
        print(f"{name}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in result["probe"][name].items()
                                      if isinstance(v, dict)), flush=True)
    for spec in a.targets:
        name, path = spec.split("=", 1)
        t = torch.load(path)
        frames_of = mfcc_frames
        if "label_model" in t["info"]:  # iteration 2's units: k-means of a layer of the teacher model
            teacher, layer = load_pretrained(t["info"]["label_model"]), t["info"]["label_layer"]
            frames_of = functools.partial(teacher_frames, teacher, layer)
        centers = t["info"]["centers"]
        units, phones = [], []
        for lang, items in data.items():
            for (audio, _), y in zip(items, labels[lang], strict=True):
                f = frames_of(audio)[: len(y)]
                units.append(torch.cdist(f, centers).argmin(1))
                phones.append(y[: len(f)] + 1000 * a.langs.index(lang))  # one phone set per language
        u, ph = torch.cat(units), torch.cat(phones)
        _, ph = torch.unique(ph, return_inverse=True)
        info = {k: v for k, v in t["info"].items() if k != "centers"}
        result["units"][name] = {**pnmi(u, ph), "k": info["k"], "units_used_train": info["units_used"],
                                 "usage_entropy_train": info["usage_entropy"], "source": info["source"]}
    result["seconds"] = round(time.time() - t0, 1)
    result["command"] = " ".join(["python -m tools.probe_backbone", *(sys.argv[1:] if argv is None else argv)])
    out = Path(a.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else None
    if old and old["langs"] == result["langs"] and old["utterances_per_lang"] == result["utterances_per_lang"]:
        # the same (deterministic) probe data: rows of other backbones / targets measured earlier are kept
        for key in ("probe", "units"):
            result[key] = {**old[key], **result[key]}
        result["seconds"] = round(result["seconds"] + old["seconds"], 1)
        result["command"] = f"{old['command']}; {result['command']}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    langs = r["langs"]
    lines = ["# Backbone probes (before any finetuning)", "",
             f"Frame-level phone accuracy (%) of a linear probe per layer; espeak-ng phone alignments, "
             f"{r['utterances_per_lang']} utterances per language (2/3 fit, 1/3 scored); held in: "
             f"{', '.join(r['held_in'])}; held out: {', '.join(lg for lg in langs if lg not in r['held_in'])}.", "",
             "| backbone | features | " + " | ".join(langs) + " | mean |", "|---|---|" + "---:|" * (len(langs) + 1)]
    for name, layers in r["probe"].items():
        for layer, accs in layers.items():
            if isinstance(accs, dict):
                lines.append(f"| {name} | {layer} | " + " | ".join(f"{100 * accs[lg]:.1f}" for lg in langs)
                             + f" | {100 * accs['mean']:.1f} |")
    if r["units"]:
        lines += ["", "k-means targets against the same phone labels (all four languages):", "",
                  "| targets | K | PNMI | cluster purity | phone purity | units used (train) | usage entropy |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, u in r["units"].items():
            lines.append(f"| {name} | {u['k']} | {u['pnmi']:.3f} | {u['cluster_purity']:.3f} | "
                         f"{u['phone_purity']:.3f} | {u['units_used_train']} | {u['usage_entropy_train']:.3f} |")
    lines += ["", f"Command: `{r['command']}` ({r['seconds'] / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
