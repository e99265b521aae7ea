"""The committed demo (s3r/assets/demo) and the miniature's helpers (python -m tools.miniature)."""
import json
from pathlib import Path

import pytest

import tools.miniature as mini
import train
from s3r import load_pretrained
from s3r.data import resolve_corpus
from s3r.recipe import DEMO_BACKBONE

DEMO = DEMO_BACKBONE.parent


def test_demo_assets_are_small_and_complete():
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) <= 15e6  # the ceiling
    model = load_pretrained(DEMO / "backbone.pt")
    assert model.lm_head is None and model.config.layer_norm_first  # a head-less "pretrained" encoder
    assert 1.5e6 < sum(p.numel() for p in model.parameters()) < 2.5e6
    for split, num in (("train", 60), ("test", 24)):
        corpus = resolve_corpus(f"demo-{split}")
        assert len(corpus.utterances) == num
        assert all(Path(u.path).is_file() and u.text.strip() for u in corpus.utterances)


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The README's main job on the committed demo in one process, up to its first validation: the demo's own 50
    first updates (--schedule-updates 200 keeps the 200-update learning-rate schedule). The phone error rate on
    demo-test must fall to well under half of the fresh head's (measured: 212.5% -> 30.3%; seeds 2 and 3: 15.8%,
    24.2%)."""
    assert train.main(["--data", "demo", "--prune-rate", "0.9", "--max-updates", "50", "--schedule-updates", "200",
                       "--validate-interval", "50", "--save-dir", str(tmp_path), "--num-workers", "0"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    valid = [d for d in lines if "per" in d]  # one line per validation
    before, after = valid[0], valid[-1]
    assert (before["update"], after["update"]) == (0, 50)
    assert after["per"] < 0.5 and after["per"] < 0.5 * before["per"]


def _cv_folder(root: Path, rows: dict[str, list[str]]) -> Path:
    folder = root / "xx"
    folder.mkdir()
    for split, phones in rows.items():
        lines = ["path\tsentence\tphonemes"] + [f"{split}{i}.mp3\tsome text\t{p}" for i, p in enumerate(phones)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_close_phone_set_moves_unseen_phones_to_train(tmp_path):
    folder = _cv_folder(tmp_path, {"train": ["a b | c"], "dev": ["a | b", "a ʃ"], "test": ["ʃ | c", "z"]})
    assert mini.close_phone_set(folder) == 2  # "a ʃ" brings ʃ into train, so "ʃ | c" may stay; "z" must move
    read = lambda s: (folder / f"{s}.tsv").read_text(encoding="utf-8").splitlines()[1:]  # noqa: E731
    assert [r.split("\t")[2] for r in read("train")] == ["a b | c", "a ʃ", "z"]
    assert [r.split("\t")[2] for r in read("dev")] == ["a | b"]
    assert [r.split("\t")[2] for r in read("test")] == ["ʃ | c"]
    assert mini.close_phone_set(folder) == 0  # idempotent


def test_per_cell_format():
    assert mini.per_cell([0.10, 0.14]) == "12.0 ±2.0"
    assert mini.per_cell([0.081]) == "8.1 (1)"


def test_run_logged_counts_each_commands_own_cpu_time(tmp_path):
    """Two commands side by side (--jobs 2): each is charged its own CPU seconds, not the other's, and its log
    starts with the thread count it ran with."""
    import sys
    from concurrent.futures import ThreadPoolExecutor
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass"
    with ThreadPoolExecutor(2) as pool:
        short, long = (pool.submit(mini.run_logged, [sys.executable, "-c", burn.format(s)], tmp_path / f"{s}.log", 1)
                       for s in (0.3, 1.0))
        short, long = short.result(), long.result()
    assert 0.3 <= short < 0.6 and 1.0 <= long < 1.25  # os.times() charged the short one's 0.3 s to the long one too
    assert (tmp_path / "0.3.log").read_text().startswith(f"$ OMP_NUM_THREADS=1 {sys.executable} -c ")
    with pytest.raises(RuntimeError, match="exit 3"):
        mini.run_logged([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log", 1)


def test_make_corpus_subset_makes_the_same_speech(tmp_path, monkeypatch):
    """A language's corpus seed is its own (its place in CORPUS_LANGS), so `--corpus-langs es` makes the speech the
    full corpus stage makes for es (the miniature's cached cells stay valid)."""
    import tools.synth_corpus
    calls = {}

    def fake_synth(out, layout, num, *, lang, seed, release, **kw):
        calls.setdefault(lang, []).append(seed)
        folder = Path(out) / release / lang
        folder.mkdir(parents=True)
        for split in ("train", "dev", "test"):
            (folder / f"{split}.tsv").write_text("path\tsentence\tphonemes\nx.mp3\tx\ta\n", encoding="utf-8")

    monkeypatch.setattr(tools.synth_corpus, "synth_corpus", fake_synth)
    monkeypatch.setattr(mini.text_sources, "sentences", lambda lang, num, seed: ["x"] * num)
    mini.make_corpus(tmp_path / "full", ["nl", "es"])
    mini.make_corpus(tmp_path / "one", ["es"])
    assert calls["es"] == [1000 + mini.CORPUS_LANGS.index("es")] * 2
    assert calls["nl"] == [1000 + mini.CORPUS_LANGS.index("nl")]


def test_routed_weight_counts_as_deployed(tmp_path):
    """Attention + FFN weight entries left in the model one would ship, against hand counts on the demo backbone
    (4 layers, 192 channels, 4 heads, FFN 768): per weight the zeros of the folded masks, per neuron+head the
    rows and columns compact() cut out."""
    import torch

    from s3r.checkpoint import s3r_checkpoint
    from s3r.routes import omp
    torch.set_num_threads(1)
    dense = 4 * (4 * 192 * 192 + 2 * 192 * 768)
    assert mini.routed_weight_counts(DEMO_BACKBONE) == (dense, dense)
    torch.save(s3r_checkpoint(omp(load_pretrained(DEMO_BACKBONE), 0.5, route_granularity="neuron+head")),
               tmp_path / "nh.pt")
    half = 4 * (4 * 192 * 96 + 2 * 192 * 384)  # 2 of 4 heads, 384 of 768 neurons, every entry of them kept
    assert mini.routed_weight_counts(tmp_path / "nh.pt") == (half, half)
    torch.save(s3r_checkpoint(omp(load_pretrained(DEMO_BACKBONE), 0.3)), tmp_path / "w.pt")
    kept = 4 * (4 * (192 * 192 - int(0.7 * 192 * 192)) + 2 * (192 * 768 - int(0.7 * 192 * 768)))  # kept_count
    assert mini.routed_weight_counts(tmp_path / "w.pt") == (kept, dense)
