"""Corpus naming and layouts, audio loading, token-budget batching and bad input, on tiny real-layout corpora."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from s3r import data
from s3r.data import (
    DataError,
    TokenBatchSampler,
    Utterance,
    collate,
    load_audio,
    make_loader,
    resolve_corpus,
    set_epoch,
)
from s3r.text import Vocabulary

REPO = Path(__file__).resolve().parent.parent
CV_TEXTS = ["你好，世界！", "今天天氣很好。", "我們去公園散步吧", "謝謝你的幫忙"]
PL_TEXTS = ["Zażółć gęślą jaźń.", "Chrząszcz brzmi w trzcinie!", "\"Ala ma kota\", powiedziała."]


# ---------------------------------------------------------------- naming and layouts
def test_librispeech(tiny_corpus):
    root = tiny_corpus("librispeech", split="dev-clean")
    corpus = resolve_corpus("dev-clean", str(root))
    assert (corpus.kind, corpus.language, corpus.units, len(corpus.utterances)) == ("librispeech", "en", "letter", 6)
    u = corpus.utterances[0]
    assert u.id == Path(u.path).stem and u.path.endswith(".flac") and u.sample_rate == 16000
    assert u.num_samples == sf.info(u.path).frames == u.length
    assert u.text == u.text.upper() and corpus.vocab == Vocabulary.librispeech()
    # DIR may also be the LibriSpeech folder itself; same utterances
    inside = resolve_corpus("dev-clean", str(root / "LibriSpeech"))
    assert [x.id for x in inside.utterances] == [x.id for x in corpus.utterances]
    phones = resolve_corpus("dev-clean", str(root), units="phone")  # the .phn.txt files next to .trans.txt
    assert phones.vocab is None and "|" in phones.utterances[0].text.split()
    with pytest.raises(DataError, match="test-other"):
        resolve_corpus("test-other", str(root))


def test_librilight_splits(tiny_corpus):
    root = tiny_corpus("librilight", num=28)  # two utterances in each of the 14 leaf folders
    counts = {name: len(resolve_corpus(name, str(root)).utterances) for name in data.LIBRILIGHT_SPLITS}
    assert counts == {"train-10m": 4, "train-1h": 24, "train-10h": 28}
    ten_min = resolve_corpus("train-10m", str(root / "librispeech_finetuning"))
    assert ten_min.kind == "librilight"
    assert all("/1h/0/" in u.path for u in ten_min.utterances)
    assert {Path(u.path).parts[-4] for u in ten_min.utterances} == {"clean", "other"}


@pytest.fixture(scope="module")
def cv_roots(tiny_corpus):
    """Two releases with different TSV headers: zh-TW (2024 columns) and pl (pre-2022 columns)."""
    zh = tiny_corpus("commonvoice", num=8, voice="cmn", lang="zh-TW", texts=CV_TEXTS, cv_header="new")
    pl = tiny_corpus("commonvoice", num=8, voice="pl", lang="pl", texts=PL_TEXTS, cv_header="old",
                     release="cv-corpus-6.1-2020-12-11")
    return zh, pl


@pytest.mark.parametrize("name", ["zh-TW-train", "zh_TW-train"])
@pytest.mark.parametrize("where", ["above", "release", "language"])
def test_commonvoice_names_and_roots(cv_roots, name, where):
    zh = cv_roots[0]
    root = {"above": zh, "release": zh / "cv-corpus-17.0-2024-03-15",
            "language": zh / "cv-corpus-17.0-2024-03-15" / "zh-TW"}[where]
    corpus = resolve_corpus(name, str(root))
    assert (corpus.kind, corpus.language, corpus.units, len(corpus.utterances)) == ("commonvoice", "zh-TW", "char", 4)
    u = corpus.utterances[0]
    assert u.sample_rate == 48000 and u.length == math.ceil(u.num_samples / 3) and u.id.startswith("common_voice_")
    assert all("，" not in x.text and "！" not in x.text for x in corpus.utterances)  # punctuation stripped


def test_commonvoice_splits_headers_and_folder_spelling(cv_roots, tiny_corpus):
    zh, pl = cv_roots
    sizes = {s: len(resolve_corpus(f"pl-{s}", str(pl)).utterances) for s in ("train", "dev", "test", "validated")}
    assert sizes == {"train": 4, "dev": 2, "test": 2, "validated": 8}
    pl_train = resolve_corpus("pl-train", str(pl))
    assert all(u.text == u.text.lower() and '"' not in u.text for u in pl_train.utterances)
    assert "zażółć gęślą jaźń" in {u.text for u in resolve_corpus("pl-validated", str(pl)).utterances}
    phones = resolve_corpus("pl-dev", str(pl), units="phone")  # the extra `phonemes` column
    assert " | " in phones.utterances[0].text
    # upstream's zh_TW folder spelling is found by both name spellings
    fresh = tiny_corpus("commonvoice", num=4, voice="cmn", lang="zh_TW", texts=CV_TEXTS, fresh=True)
    assert len(resolve_corpus("zh-TW-validated", str(fresh)).utterances) == 4
    with pytest.raises(DataError, match="folder of 'zh-TW', not 'pl'"):
        resolve_corpus("pl-train", str(zh / "cv-corpus-17.0-2024-03-15" / "zh-TW"))
    both = fresh / "cv-corpus-18.0-2024-06-14"  # a second release holding the same language
    shutil.copytree(fresh / "cv-corpus-17.0-2024-03-15", both)
    with pytest.raises(DataError, match="several CommonVoice releases"):
        resolve_corpus("zh_TW-train", str(fresh))
    with pytest.raises(DataError, match="no CommonVoice folder for 'de'"):
        resolve_corpus("de-train", str(fresh))


def test_commonvoice_header_without_sentence(tmp_path):
    lang = tmp_path / "cv-corpus-1" / "xx"
    (lang / "clips").mkdir(parents=True)
    (lang / "train.tsv").write_text("client_id\tfilename\ttext\n")
    with pytest.raises(DataError, match=r"train\.tsv: no path or sentence column"):
        resolve_corpus("xx-train", str(tmp_path))


def test_manifest(tiny_corpus):
    root = tiny_corpus("manifest", num=5, split="train")
    corpus = resolve_corpus(str(root / "train.tsv"))
    assert (corpus.kind, corpus.language, len(corpus.utterances)) == ("manifest", None, 5)
    assert corpus.vocab == Vocabulary.from_fairseq_dict(str(root / "dict.ltr.txt"))
    ltr = (root / "train.ltr").read_text().splitlines()
    assert [" ".join(corpus.vocab.tokenize(u.text)) for u in corpus.utterances] == ltr  # .ltr reproduced
    rows = (root / "train.tsv").read_text().splitlines()[1:]
    assert [u.num_samples for u in corpus.utterances] == [int(r.split("\t")[1]) for r in rows]
    assert resolve_corpus("train.tsv", str(root)).utterances == corpus.utterances  # name relative to the root
    phones = resolve_corpus("train.tsv", str(root), units="phone")
    assert phones.vocab.units == "phone"
    assert phones.utterances[0].text == (root / "train.phn").read_text().split("\n")[0]


def test_manifest_wrd_labels_and_mismatch(tiny_corpus):
    root = tiny_corpus("manifest", num=4, fresh=True)
    with_ltr = resolve_corpus(str(root / "train.tsv")).utterances
    (root / "train.ltr").unlink()  # .wrd is the fallback
    assert [u.text for u in resolve_corpus(str(root / "train.tsv")).utterances] == [u.text for u in with_ltr]
    (root / "train.wrd").write_text("ONE LINE\n")
    with pytest.raises(DataError, match="train.wrd: 1 lines but train.tsv has 4 rows"):
        resolve_corpus(str(root / "train.tsv"))
    with pytest.raises(DataError, match="not found"):
        resolve_corpus(str(root / "valid.tsv"))


def test_demo_name(tiny_corpus, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEMO_DIR", tmp_path / "missing")
    with pytest.raises(DataError, match="demo corpus is not in this checkout"):
        resolve_corpus("demo")
    manifest = tiny_corpus("manifest", num=4)
    monkeypatch.setattr(data, "DEMO_DIR", manifest)
    assert len(resolve_corpus("demo").utterances) == 4  # demo = demo-train = <demo>/train.tsv
    monkeypatch.setattr(data, "DEMO_DIR", tiny_corpus("librispeech", split="dev-clean"))
    assert resolve_corpus("demo-dev-clean").kind == "librispeech"
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"unknown corpus name 'demo-dev': the demo's splits are demo \(= demo-train\), "
                       "demo-test, demo-train$"):
        resolve_corpus("demo-dev")


def test_unknown_name():
    with pytest.raises(DataError, match="unknown corpus name 'dev_clean'"):
        resolve_corpus("dev_clean", ".")


def test_scan_cache(tiny_corpus, monkeypatch):
    root = tiny_corpus("librispeech", num=4, fresh=True)
    first = resolve_corpus("dev-clean", str(root)).utterances

    def no_info(path):
        raise AssertionError("soundfile.info called although the scan is cached")

    monkeypatch.setattr(data.sf, "info", no_info)
    assert resolve_corpus("dev-clean", str(root)).utterances == first
    sf.write(first[0].path, np.zeros(800, dtype=np.float32), 16000)  # a changed file is scanned again
    monkeypatch.undo()
    assert resolve_corpus("dev-clean", str(root)).utterances[0].num_samples == 800


# ---------------------------------------------------------------- audio
def test_load_audio_mp3_48k_resampled(cv_roots):
    u = resolve_corpus("zh-TW-dev", str(cv_roots[0])).utterances[0]
    wav = load_audio(u.path)
    assert wav.dtype == torch.float32 and wav.shape == (u.length,)
    raw, rate = sf.read(u.path, dtype="float32")
    assert torch.allclose(wav, AF.resample(torch.from_numpy(raw), rate, 16000), atol=1e-6)


def test_load_audio_stereo_rate_and_normalize(write_audio):
    path = write_audio("stereo.wav", seconds=0.5, rate=22050, channels=2)  # right channel = 2 x left
    raw, _ = sf.read(path, dtype="float32")
    wav = load_audio(str(path))
    assert wav.shape == (math.ceil(len(raw) * 16000 / 22050),)
    expected = AF.resample(torch.from_numpy(raw.mean(1)), 22050, 16000)
    assert torch.allclose(wav, expected, atol=1e-6)
    norm = load_audio(str(path), normalize_waveform=True)
    assert abs(norm.mean()) < 1e-4 and abs(norm.std(unbiased=False) - 1) < 1e-3
    assert torch.allclose(norm, torch.nn.functional.layer_norm(wav, wav.shape), atol=1e-5)  # fairseq's recipe


# ---------------------------------------------------------------- batching
def random_lengths(n=300, seed=0):
    return np.random.default_rng(seed).integers(8_000, 250_000, n).tolist()


@pytest.mark.parametrize("max_tokens", [250_000, 400_000, 1_400_000])
def test_batches_respect_token_budget(max_tokens):
    lengths = random_lengths()
    sampler = TokenBatchSampler(lengths, max_tokens, seed=3, max_batch_size=16)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # one rank: each exactly once
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= max_tokens and len(b) <= 16


@pytest.mark.parametrize("world_size", [2, 3])
def test_batches_shard_evenly(world_size):
    lengths = random_lengths(301)
    shards = [TokenBatchSampler(lengths, 500_000, world_size, rank, seed=1) for rank in range(world_size)]
    for epoch in range(3):
        for s in shards:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in shards]
        assert len({len(p) for p in per_rank}) == 1 and len({len(s) for s in shards}) == 1
        seen = [i for p in per_rank for b in p for i in b]
        assert set(seen) == set(range(len(lengths)))  # all utterances, a few batches repeated at most
        single = len(TokenBatchSampler(lengths, 500_000, seed=1))
        assert len(per_rank[0]) * world_size - single < world_size
    tiny = [TokenBatchSampler([100], 1000, world_size, r) for r in range(world_size)]
    assert [list(t) for t in tiny] == [[[0]]] * world_size  # one batch, repeated for every rank


def test_batches_reproducible_and_resumable():
    lengths = random_lengths()
    a, b = TokenBatchSampler(lengths, 600_000, seed=7), TokenBatchSampler(lengths, 600_000, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != list(b)  # a new shuffle each epoch
    b.set_epoch(1, offset=5)  # resume after 5 batches of epoch 1
    assert list(b) == epoch1[5:] and len(b) == len(epoch1) - 5
    assert list(TokenBatchSampler(lengths, 600_000, seed=8)) != list(TokenBatchSampler(lengths, 600_000, seed=7))
    ordered = list(TokenBatchSampler(lengths, 600_000, shuffle=False))
    flat = [lengths[i] for batch in ordered for i in batch]
    assert flat == sorted(flat, reverse=True)  # unshuffled: longest first, as fairseq orders


def test_batch_by_size_multiple_of_8_counted_by_hand():
    lengths = [10] * 25
    # max_tokens 100 holds 10 of them: 10 + 10 + 5
    assert [len(b) for b in data.batch_by_size(list(range(25)), lengths, 100)] == [10, 10, 5]
    # multiple of 8: 0-9 fill the batch and 10 does not fit, so 10 are cut to 8: out 0-7; 8, 9 carry over and
    # 10 joins them; 8-17 fill the batch and 18 does not fit: out 8-15; 16, 17 carry over, 16-24 are the
    # last 9, out whole (fairseq does not cut the last batch)
    batches = data.batch_by_size(list(range(25)), lengths, 100, required_batch_size_multiple=8)
    assert batches == [list(range(0, 8)), list(range(8, 16)), list(range(16, 25))]
    assert list(TokenBatchSampler(lengths, 100, shuffle=False)) == batches  # the sampler's default is 8
    # a batch smaller than 8 goes out whole: [60] (60 + 30 would pad to 120), [30, 30, 30] (+20 pads to 120), [20]
    assert data.batch_by_size([0, 1, 2, 3, 4], [60, 30, 30, 30, 20], 100, required_batch_size_multiple=8) == [
        [0], [1, 2, 3], [4]]
    # 20 of length 5, max_tokens 60 (12 fit): 0-11 fill, cut to 0-7; 8-11 carry, 8-19 fill and 20 is the end
    assert [len(b) for b in data.batch_by_size(list(range(20)), [5] * 20, 60, None, 8)] == [8, 12]
    with pytest.raises(data.S3RError, match="at least 1"):
        TokenBatchSampler(lengths, 100, required_batch_size_multiple=0)


def test_batches_count_the_cropped_size():
    utts = [Utterance("long", "a.flac", 64000, 16000, "A"), Utterance("short", "b.flac", 800, 16000, "B")]
    with pytest.raises(DataError, match="4.0 s"):
        make_loader(utts, None, 32000)
    # cropped to 16000 samples: 2 x 16000 fits 32000, so both share one batch; at 31999 they do not
    loader = make_loader(utts, None, 32000, max_sample_size=16000, num_workers=0)
    assert loader.batch_sampler.lengths.tolist() == [16000, 800] and list(loader.batch_sampler) == [[0, 1]]
    loader = make_loader(utts, None, 31999, max_sample_size=16000, num_workers=0)
    assert sorted(loader.batch_sampler) == [[0], [1]]
    with pytest.raises(DataError, match=r"16000 samples after cropping\) is longer than max_tokens=8000"):
        make_loader(utts, None, 8000, max_sample_size=16000)


def test_too_long_utterance():
    with pytest.raises(DataError, match="more than max_tokens=1000"):
        TokenBatchSampler([10, 5000], 1000)
    utts = [Utterance("short", "a.flac", 800, 16000, "A"), Utterance("long", "b.flac", 64000, 16000, "B")]
    with pytest.raises(DataError, match=r"b\.flac: 4\.0 s \(64000 samples\) is longer than max_tokens=16000"):
        make_loader(utts, None, 16000)
    loader = make_loader(utts, None, 16000, skip_bad=True, num_workers=0)
    assert len(loader.dataset) == 1 and loader.dataset.skipped[0][0] == "b.flac"
    assert len(make_loader(utts, None, 16000, max_sample_size=16000, num_workers=0).dataset) == 2  # cropped


def test_loader_end_to_end(tiny_corpus):
    corpus = resolve_corpus("dev-clean", str(tiny_corpus("librispeech", split="dev-clean")))
    vocab = corpus.vocab
    longest = max(u.length for u in corpus.utterances)
    loader = make_loader(corpus.utterances, vocab, max_tokens=2 * longest, num_workers=0, seed=1)
    set_epoch(loader, 2)
    seen = []
    for batch in loader:
        B, S = batch["wav"].shape
        assert B * S <= 2 * longest and batch["lengths"].max() == S and batch["skipped"] == []
        for b, uid in enumerate(batch["ids"]):
            u = next(x for x in corpus.utterances if x.id == uid)
            assert batch["lengths"][b] == u.length
            assert vocab.decode(batch["targets"][b, : batch["target_lengths"][b]].tolist()) == u.text
            assert (batch["targets"][b, batch["target_lengths"][b]:] == 1).all()  # padded with <pad>
        seen += batch["ids"]
    assert sorted(seen) == sorted(u.id for u in corpus.utterances)


def test_random_crop_is_seeded(tiny_corpus):
    corpus = resolve_corpus("dev-clean", str(tiny_corpus("librispeech", split="dev-clean")))
    ds = data.SpeechDataset(corpus.utterances[:1], max_sample_size=8000, seed=0)
    first = ds[0]["wav"]
    assert first.shape == (8000,) and torch.equal(first, ds[0]["wav"])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0]["wav"])  # a different window next epoch
    full = load_audio(corpus.utterances[0].path)
    assert any(torch.equal(first, full[s: s + 8000]) for s in range(len(full) - 7999))


def test_collate_pads_and_lists_skips():
    items = [{"index": 0, "id": "a", "wav": torch.ones(3), "targets": torch.tensor([5, 6])},
             {"index": 1, "id": "b", "skipped": ("b.flac", "truncated")},
             {"index": 2, "id": "c", "wav": torch.ones(5), "targets": torch.tensor([7])}]
    batch = collate(items)
    assert batch["wav"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["lengths"].tolist() == [3, 5] and batch["target_lengths"].tolist() == [2, 1]
    assert batch["targets"].tolist() == [[5, 6], [7, 1]] and batch["ids"] == ["a", "c"]
    assert batch["skipped"] == [("b.flac", "truncated")]
    assert collate(items[1:2])["wav"].shape == (0, 0)


def test_out_of_vocabulary_fails_before_training(tiny_corpus):
    corpus = resolve_corpus("pl-train", str(tiny_corpus("commonvoice", num=8, voice="pl", lang="pl",
                                                          texts=PL_TEXTS, cv_header="old",
                                                          release="cv-corpus-6.1-2020-12-11")))
    with pytest.raises(DataError.__mro__[1], match=r"utterance common_voice_pl_\d+: symbol 'z'"):
        data.SpeechDataset(corpus.utterances, Vocabulary.librispeech())


# ---------------------------------------------------------------- bad input
def damage(case: str, tiny_corpus) -> tuple[list[str], str]:
    """Make one bad-input case in a fresh corpus; returns (CLI args, text the error must contain)."""
    if case in ("missing_clip", "non_utf8_tsv", "truncated_mp3"):
        root = tiny_corpus("commonvoice", num=8, voice="pl", lang="pl", texts=PL_TEXTS, fresh=True)
        lang = root / "cv-corpus-17.0-2024-03-15" / "pl"
        if case == "truncated_mp3":  # mpg123 warns on fd 2 about such files; the report must stay one line
            clip = sorted((lang / "clips").glob("*.mp3"))[0]
            clip.write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])
            return ["--data-root", str(root), "--data", "pl-validated", "--check"], f"{clip.name}: truncated"
        if case == "missing_clip":
            clip = (lang / "dev.tsv").read_text().splitlines()[1].split("\t")[1]
            (lang / "clips" / clip).unlink()
            return ["--data-root", str(root), "--data", "pl-dev"], "dev.tsv:2: clip"
        tsv = lang / "dev.tsv"
        lines = tsv.read_bytes().split(b"\n")
        lines[1] = lines[1].replace(b"\tpl\t", b"\tpl\xb9\t")  # a latin-1 byte in row 1 (line 2)
        tsv.write_bytes(b"\n".join(lines))
        return ["--data-root", str(root), "--data", "pl-dev"], "dev.tsv:2: not UTF-8"
    if case in ("short_cv_row", "text_as_audio"):
        root = tiny_corpus("commonvoice", num=8, voice="pl", lang="pl", texts=PL_TEXTS, fresh=True)
        lang = root / "cv-corpus-17.0-2024-03-15" / "pl"
        if case == "text_as_audio":
            clip = sorted((lang / "clips").glob("*.mp3"))[0]
            clip.write_text("this is a text file, not audio\n")
            return ["--data-root", str(root), "--data", "pl-validated"], f"{clip.name}: cannot decode audio"
        tsv = lang / "dev.tsv"
        lines = tsv.read_text(encoding="utf-8").split("\n")
        lines[1] = lines[1].split("\t")[0]  # a row cut after its first column
        tsv.write_text("\n".join(lines), encoding="utf-8")
        return ["--data-root", str(root), "--data", "pl-dev"], "dev.tsv:2: 1 columns, header has"
    if case == "missing_manifest_audio":
        root = tiny_corpus("manifest", num=4, fresh=True)
        next((root / "audio").rglob("*.flac")).unlink()
        return ["--data", str(root / "train.tsv")], "train.tsv:"
    root = tiny_corpus("librispeech", num=4, fresh=True)
    chapter = next((root / "LibriSpeech" / "dev-clean").glob("*/*"))
    trans = next(chapter.glob("*.trans.txt"))
    flac = sorted(chapter.glob("*.flac"))[0]
    args = ["--data-root", str(root), "--data", "dev-clean"]
    if case == "missing_audio":
        flac.unlink()
        return args, f"{trans.name}:1: transcript line has no audio file {flac.name}"
    if case == "no_transcript":
        shutil.copy(flac, chapter / "100-1001-9999.flac")
        return args, "100-1001-9999.flac: audio file has no line"
    if case == "empty":
        flac.write_bytes(b"")
        return args, f"{flac.name}: empty file"
    if case == "corrupt":
        flac.write_bytes(os.urandom(2000))
        return args, f"{flac.name}: cannot decode audio"
    if case == "truncated":  # the header still promises all samples: only decoding (--check) notices
        flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
        return args + ["--check"], f"{flac.name}: cannot decode audio"
    if case == "non_utf8":
        trans.write_bytes(trans.read_bytes().replace(b"\n", b" \xff\n", 1))
        return args, f"{trans.name}:1: not UTF-8 text (byte 0xff"
    raise ValueError(case)


BAD_CASES = ["missing_audio", "no_transcript", "empty", "corrupt", "truncated", "non_utf8", "missing_clip",
             "non_utf8_tsv", "truncated_mp3", "missing_manifest_audio", "short_cv_row", "text_as_audio"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input(case, tiny_corpus, capfd):
    args, message = damage(case, tiny_corpus)
    assert data.main(args) == 2  # the CLI's code path, in process (the subprocess tests below run it for real)
    err = capfd.readouterr().err  # file descriptor 2: what C libraries print counts too
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert data.main(args + ["--skip-bad", "--json"]) == 0
    summary = json.loads(capfd.readouterr().out)
    assert len(summary["skipped"]) == 1 and message.split(":")[0] in summary["skipped"][0]["path"]
    assert summary["skipped"][0]["reason"] and isinstance(summary["utterances"], int)


def unreadable(case: str, tiny_corpus, tmp_path) -> tuple[list[str], str]:
    """A whole file or folder that cannot be read as what it should be: (CLI args, text the error must contain)."""
    if case in ("cv_tsv_as_manifest", "cv_no_path_column", "cv_split_missing"):
        root = tiny_corpus("commonvoice", num=4, voice="pl", lang="pl", texts=PL_TEXTS, fresh=True)
        lang = root / "cv-corpus-17.0-2024-03-15" / "pl"
        if case == "cv_tsv_as_manifest":
            return ["--data", str(lang / "train.tsv")], "train.tsv:1: not a fairseq manifest"
        if case == "cv_split_missing":
            (lang / "dev.tsv").unlink()
            return ["--data-root", str(root), "--data", "pl-dev"], "dev.tsv not found"
        tsv = lang / "train.tsv"
        tsv.write_text(tsv.read_text(encoding="utf-8").replace("\tpath\t", "\tfile\t", 1), encoding="utf-8")
        return ["--data-root", str(root), "--data", "pl-train"], "train.tsv: no path column (header: client_id"
    if case.startswith("manifest"):
        root = tiny_corpus("manifest", num=4, fresh=True)
        tsv = root / "train.tsv"
        if case == "manifest_empty":
            tsv.write_text("")
            return ["--data", str(tsv)], "train.tsv: not a fairseq manifest: line 1 must be the audio root"
        if case == "manifest_missing_root":
            tsv.write_text("/no/such/audio\n" + "".join(tsv.read_text().splitlines(True)[1:]))
            return ["--data", str(tsv)], "train.tsv:1: audio root folder /no/such/audio does not exist"
        if case == "manifest_dict_not_utf8":
            (root / "dict.ltr.txt").write_bytes(b"| 5\n\xe9 2\n")
            return ["--data", str(tsv)], "dict.ltr.txt:2: not UTF-8 text (byte 0xe9)"
    if case == "no_data_root":
        return ["--data-root", str(tmp_path / "nowhere"), "--data", "dev-clean"], "nowhere: no such folder"
    if case == "cv_data_root_is_a_file":
        (tmp_path / "file").write_text("x")
        return ["--data-root", str(tmp_path / "file"), "--data", "pl-dev"], "file: not a folder"
    if case == "no_transcripts":
        root = tiny_corpus("librispeech", num=4, fresh=True)
        for trans in (root / "LibriSpeech" / "dev-clean").rglob("*.txt"):
            trans.unlink()
        return ["--data-root", str(root), "--data", "dev-clean"], "dev-clean: no *.trans.txt transcripts found"
    if case == "librilight_fold_missing":
        root = tiny_corpus("librilight", num=14, fresh=True)
        shutil.rmtree(root / "librispeech_finetuning" / "9h")
        return ["--data-root", str(root), "--data", "train-10h"], "9h: folder missing"
    raise ValueError(case)


UNREADABLE = ["cv_tsv_as_manifest", "cv_no_path_column", "cv_split_missing", "manifest_empty",
              "manifest_missing_root", "manifest_dict_not_utf8", "no_data_root", "cv_data_root_is_a_file",
              "no_transcripts", "librilight_fold_missing"]


@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_file_or_folder_is_one_line(case, tiny_corpus, tmp_path, capfd):
    args, message = unreadable(case, tiny_corpus, tmp_path)
    for extra in ([], ["--skip-bad"]):  # a whole file or folder is not skipped: nothing would be left to read
        assert data.main(args + extra) == 2
        err = capfd.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_truncated_audio_while_training(tiny_corpus):
    root = tiny_corpus("commonvoice", num=4, voice="pl", lang="pl", texts=PL_TEXTS, fresh=True)
    corpus = resolve_corpus("pl-validated", str(root))
    clip = Path(corpus.utterances[0].path)
    clip.write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])  # mp3 decoders stop early, silently
    with pytest.raises(DataError, match="truncated, decoded"):
        data.SpeechDataset(corpus.utterances)[0]
    item = data.SpeechDataset(corpus.utterances, skip_bad=True)[0]
    assert item["skipped"][0] == str(clip) and "truncated" in item["skipped"][1]


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "s3r.data", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)


def check_cli(args, message):
    plain, skipping = cli(*args), cli(*args, "--skip-bad", "--json")  # both at once: imports dominate
    out, err = plain.communicate(timeout=120)
    assert plain.returncode == 2 and out == "", err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    out, err = skipping.communicate(timeout=120)
    assert skipping.returncode == 0, err
    summary = json.loads(out)
    assert isinstance(summary["seconds"], float) and isinstance(summary["vocab"], list)
    assert [set(s) for s in summary["skipped"]] == [{"path", "reason"}]


def test_cli_subprocess_missing_audio(tiny_corpus):
    check_cli(*damage("missing_audio", tiny_corpus))


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in BAD_CASES if c != "missing_audio"])
def test_cli_subprocess_bad_input(case, tiny_corpus):
    check_cli(*damage(case, tiny_corpus))


def test_cli_summary(tiny_corpus, capsys):
    root = tiny_corpus("librilight", num=28)
    assert data.main(["--data-root", str(root), "--data", "train-1h", "--json", "--bench", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["utterances"] == 24 and summary["seconds"] > 10 and summary["vocab"][4] == "|"
    assert summary["skipped"] == [] and summary["bench"]["utterances_per_s"] > 0
    assert summary["shortest"]["seconds"] <= summary["longest"]["seconds"]
    assert data.main(["--data-root", str(root), "--data", "train-10m"]) == 0
    assert "utterances: 4" in capsys.readouterr().out


# ---------------------------------------------------------------- CommonVoice clip lists (Rivière et al. 2020)
def cv_table(tsv: Path) -> dict[str, dict[str, str]]:
    """{clip stem: row} of a release TSV, read here independently of s3r.data."""
    header, *rows = tsv.read_text(encoding="utf-8").splitlines()
    table = [dict(zip(header.split("\t"), r.split("\t"), strict=True)) for r in rows]
    return {Path(r["path"]).stem: r for r in table}


@pytest.fixture
def cv_lists(tiny_corpus):
    """A pl release with a published-style 1 h train list above it and a dev-1h.txt in the language folder."""
    root = tiny_corpus("commonvoice", num=8, voice="pl", lang="pl", texts=PL_TEXTS, fresh=True)
    lang = root / "cv-corpus-17.0-2024-03-15" / "pl"
    lists = root / "common_voices_splits" / "pl"
    lists.mkdir(parents=True)
    # a clip name, a file name and a path: the list formats seen in the wild
    (lists / "trainSeqs_1.0_uniform_new_version.txt").write_text(
        "common_voice_pl_3000005\nclips/common_voice_pl_3000001.mp3\n\ncommon_voice_pl_3000002.mp3\n")
    (lang / "dev-1h.txt").write_text("common_voice_pl_3000007\n")
    return root, lang


def test_commonvoice_clip_list(cv_lists):
    root, lang = cv_lists
    corpus = resolve_corpus("pl-train-1h", str(root))
    assert [u.id for u in corpus.utterances] == ["common_voice_pl_3000005", "common_voice_pl_3000001",
                                                 "common_voice_pl_3000002"]  # the list's order
    published = root / "common_voices_splits" / "pl" / "trainSeqs_1.0_uniform_new_version.txt"
    assert (corpus.kind, corpus.language, corpus.units, corpus.root) == ("commonvoice", "pl", "char", str(published))
    rows = cv_table(lang / "validated.tsv")
    assert [u.text for u in corpus.utterances] == [
        " ".join(rows[u.id]["sentence"].lower().replace(".", " ").replace("!", " ").replace('"', " ").replace(",", " ")
                 .split()) for u in corpus.utterances]
    assert all(u.path == str(lang / "clips" / f"{u.id}.mp3") and u.sample_rate == 48000 for u in corpus.utterances)
    dev = resolve_corpus("pl-dev-1h", str(root / "cv-corpus-17.0-2024-03-15"))  # a list beside the TSVs
    assert [u.id for u in dev.utterances] == ["common_voice_pl_3000007"]
    with pytest.raises(DataError, match=r"no clip list for pl-train-5h: looked for train-5h\.txt or "
                                        r"trainSeqs_5\.0_uniform_new_version\.txt"):
        resolve_corpus("pl-train-5h", str(root))


def test_commonvoice_clip_list_bad_lines(cv_lists, capfd):
    root, lang = cv_lists
    (lang / "test-1h.txt").write_text("common_voice_pl_3000003\ncommon_voice_pl_9999999\ncommon_voice_pl_3000003\n")
    args = ["--data-root", str(root), "--data", "pl-test-1h"]
    assert data.main(args) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "test-1h.txt:2: clip common_voice_pl_9999999 is in no TSV of" in err, err
    assert data.main(args + ["--skip-bad", "--json"]) == 0
    summary = json.loads(capfd.readouterr().out)
    assert summary["utterances"] == 1 and [s["path"].rsplit("/", 1)[-1] for s in summary["skipped"]] == [
        "test-1h.txt:2", "test-1h.txt:3"]
    assert summary["skipped"][1]["reason"] == "clip common_voice_pl_3000003 is listed twice"
    (lang / "test-1h.txt").write_text("\n")
    assert data.main(args) == 2 and "test-1h.txt: no clip names in it" in capfd.readouterr().err


def drop_phonemes_column(lang: Path) -> dict[str, str]:
    """Remove the synthetic `phonemes` column (what espeak-ng said while speaking); returns {clip stem: phones}."""
    said = {stem: row["phonemes"] for stem, row in cv_table(lang / "validated.tsv").items()}
    for tsv in lang.glob("*.tsv"):
        lines = tsv.read_text(encoding="utf-8").splitlines()
        tsv.write_text("".join(line.rsplit("\t", 1)[0] + "\n" for line in lines), encoding="utf-8")
    return said


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_commonvoice_phones_from_espeak_cached(cv_lists, monkeypatch):
    root, lang = cv_lists
    said = drop_phonemes_column(lang)
    corpus = resolve_corpus("pl-train-1h", str(root), units="phone")
    assert corpus.units == "phone" and corpus.vocab is None
    # the synthesizer's espeak-ng run spoke the raw sentence; phonemizing it again gives the same phones
    assert [u.text for u in corpus.utterances] == [said[u.id] for u in corpus.utterances]
    assert all(" | " in u.text for u in corpus.utterances)
    official = resolve_corpus("pl-dev", str(root), units="phone")  # a release TSV split: phonemized the same way
    assert [u.text for u in official.utterances] == [said[u.id] for u in official.utterances]

    def no_espeak(*args, **kw):
        raise AssertionError("espeak-ng run although its phones are cached")

    monkeypatch.setattr(data.subprocess, "run", no_espeak)
    assert resolve_corpus("pl-train-1h", str(root), units="phone").utterances == corpus.utterances
    assert [u.text for u in resolve_corpus("pl-dev-1h", str(root), units="phone").utterances] == [
        said["common_voice_pl_3000007"]]  # same sentences as train (3 sentences, 8 clips): cached too


def test_commonvoice_phones_need_espeak(cv_lists, monkeypatch, capfd):
    root, lang = cv_lists
    drop_phonemes_column(lang)
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    assert data.main(["--data-root", str(root), "--data", "pl-train-1h", "--units", "phone"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "need espeak-ng to phonemize the sentences" in err, err


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_espeak_voice_from_commonvoice_language():
    # Rivière et al.'s languages: es fr it ky nl ru sv-SE tr tt zh-TW, phonemized with these voices
    voices = {lang: data.espeak_voice(lang) for lang in ("es", "fr", "it", "ky", "nl", "ru", "sv-SE", "tr", "tt",
                                                          "zh-TW", "zh_TW")}
    assert voices == {"es": "es", "fr": "fr-fr", "it": "it", "ky": "ky", "nl": "nl", "ru": "ru", "sv-SE": "sv",
                      "tr": "tr", "tt": "tt", "zh-TW": "cmn", "zh_TW": "cmn"}
    with pytest.raises(DataError, match="espeak-ng has no voice for the CommonVoice language 'xx-YY'"):
        data.espeak_voice("xx-YY")
