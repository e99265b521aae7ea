"""s3r/tasks.py readers on small synthetic copies of each layout (tools/synth_tasks.py), and classification runs
of train.py / eval.py.

Expected counts are hand-counted from how tools/synth_tasks.py deals utterances (per class: all but the last two to
train, one to dev, one to test; Speech Commands' silence: ten 1-second clips per noise file, clip k to dev when
k % 10 == 0, to test when k % 10 == 1). The layout tests use tone "speech" (fast); the learning tests espeak-ng.
"""
import json
import shutil

import pytest
import soundfile as sf
import torch

import eval as evaluate
import train
from s3r import load_pretrained
from s3r.classify import Wav2Vec2ForSequenceClassification
from s3r.data import DataError, load_audio
from s3r.errors import S3RError
from s3r.recipe import Task, best_metric, build_for, improves, parse_config, resolve_data
from s3r.tasks import KS_LABELS, accuracy, is_task, resolve_task
from s3r.tasks import main as tasks_main
from tools import synth_tasks

PER_CLASS = 4


@pytest.fixture(scope="module")
def tasks_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    synth_tasks.keywords(root, per_class=PER_CLASS, tone=True)
    synth_tasks.voices(root, per_class=PER_CLASS, tone=True)
    synth_tasks.intents(root, per_class=PER_CLASS, tone=True)
    synth_tasks.languages(root, per_class=PER_CLASS, tone=True)
    return root


def counts(corpus) -> dict:
    out = {}
    for u in corpus.utterances:
        out[u.text] = out.get(u.text, 0) + 1
    return out


# ----------------------------------------------------------------------------------------------------------------
# Speech Commands


def test_speech_commands_splits_and_labels(tasks_root):
    train_set = resolve_task("speech_commands_v0.01-train", str(tasks_root))
    assert train_set.labels == KS_LABELS  # s3prl's order, whatever the data holds
    words = {w: 2 for w in KS_LABELS[:10]}
    assert counts(train_set) == {**words, "_unknown_": 6 * 2, "_silence_": 2 * 8}
    for split in ("dev", "valid", "test"):
        assert counts(resolve_task(f"speech_commands_v0.01-{split}", str(tasks_root))) == {
            **{w: 1 for w in KS_LABELS[:10]}, "_unknown_": 6, "_silence_": 2}
    dev = {u.id for u in resolve_task("speech_commands_v0.01-dev", str(tasks_root)).utterances}
    listed = (tasks_root / "speech_commands_v0.01" / "validation_list.txt").read_text().split()
    assert {name.removesuffix(".wav") for name in listed} <= dev


def test_silence_clips_are_seconds_of_the_noise_files(tasks_root):
    test = resolve_task("speech_commands_v0.01-test", str(tasks_root))
    clips = [u for u in test.utterances if u.text == "_silence_"]
    assert sorted(u.id for u in clips) == ["pink_noise#1", "white_noise#1"]  # clip 1 of each file
    for u in clips:
        noise, rate = sf.read(u.path, dtype="float32")
        assert torch.equal(load_audio(u.path, expected=u.num_samples, offset=u.offset),
                           torch.from_numpy(noise[rate: 2 * rate]))


def test_speech_commands_v002_and_the_folder_itself(tasks_root, tmp_path):
    (tmp_path / "speech_commands_v0.02").symlink_to(tasks_root / "speech_commands_v0.01")
    assert len(resolve_task("speech_commands_v0.02-test", str(tmp_path)).utterances) == 18
    assert len(resolve_task("speech_commands_v0.01-test", str(tasks_root / "speech_commands_v0.01")).utterances) == 18


def test_speech_commands_errors(tasks_root, tmp_path):
    folder = tmp_path / "speech_commands_v0.01"
    shutil.copytree(tasks_root / "speech_commands_v0.01", folder)
    with open(folder / "testing_list.txt", "a") as f:
        f.write("yes/gone_nohash_0.wav\n")
    with pytest.raises(DataError, match=r"testing_list.txt: yes/gone_nohash_0.wav is not in"):
        resolve_task("speech_commands_v0.01-train", str(tmp_path))
    shutil.rmtree(folder / "_background_noise_")
    (folder / "testing_list.txt").write_text("")
    with pytest.raises(DataError, match="_background_noise_: no .wav files"):
        resolve_task("speech_commands_v0.01-train", str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# VoxCeleb1, Fluent Speech Commands, path<TAB>label manifests


def test_voxceleb1_identification_split(tasks_root):
    speakers = ("id10001", "id10002", "id10003", "id10004")
    train_set = resolve_task("voxceleb1-train", str(tasks_root))
    assert train_set.labels == speakers and counts(train_set) == dict.fromkeys(speakers, PER_CLASS - 2)
    assert counts(resolve_task("voxceleb1-dev", str(tasks_root))) == dict.fromkeys(speakers, 1)
    test = resolve_task("voxceleb1-test", str(tasks_root))
    assert [u.id for u in test.utterances][0] == f"id10001/vid{(PER_CLASS - 1) % 4:02d}/{PER_CLASS:05d}"


def test_voxceleb1_bad_rows_and_missing_audio(tasks_root, tmp_path):
    folder = tmp_path / "VoxCeleb1"
    shutil.copytree(tasks_root / "VoxCeleb1", folder)
    lines = (folder / "iden_split.txt").read_text().splitlines()
    (folder / "iden_split.txt").write_text("\n".join(lines[:2] + ["4 id10001/x/00001.wav"] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"iden_split.txt:3: expected '<1\|2\|3> idXXXXX"):
        resolve_task("voxceleb1-train", str(tmp_path))
    skipped = resolve_task("voxceleb1-train", str(tmp_path), skip_bad=True).skipped
    assert [where for where, _ in skipped] == [f"{folder / 'iden_split.txt'}:3"]
    (folder / "iden_split.txt").write_text("\n".join(lines) + "\n")
    (folder / "wav" / "id10002" / "vid00" / "00001.wav").unlink()
    with pytest.raises(DataError, match=r"id10002/vid00/00001.wav: cannot decode audio"):
        resolve_task("voxceleb1-train", str(tmp_path))


def test_fluent_speech_commands_intents(tasks_root, tmp_path):
    train_set = resolve_task("fluent_speech_commands-train", str(tasks_root))
    intents = sorted({"/".join(i[1:]) for i in synth_tasks.INTENTS})
    assert train_set.labels == tuple(intents) and "activate/lights/none" in intents
    assert counts(train_set) == dict.fromkeys(intents, PER_CLASS - 2)
    assert len(resolve_task("fluent_speech_commands-dev", str(tasks_root)).utterances) == len(intents)
    folder = tmp_path / "fluent_speech_commands_dataset"
    shutil.copytree(tasks_root / "fluent_speech_commands_dataset", folder)
    csv = folder / "data" / "test_data.csv"
    csv.write_text(csv.read_text().replace(",location", ",place"))
    with pytest.raises(DataError, match=r"test_data.csv: no column 'location'"):
        resolve_task("fluent_speech_commands-test", str(tmp_path))
    csv = folder / "data" / "valid_data.csv"
    csv.write_text(csv.read_text() + "99,wavs/x.wav,spk,Hello,activate\n")
    with pytest.raises(DataError, match=rf"valid_data.csv:{len(intents) + 2}: expected 7 columns"):
        resolve_task("fluent_speech_commands-dev", str(tmp_path))


def test_label_manifest(tasks_root, tmp_path):
    lid = tasks_root / "lid"
    train_set = resolve_data(str(lid / "train.tsv"))
    assert train_set.labels == tuple(sorted(synth_tasks.LANGUAGES)) and train_set.kind == "labels"
    assert train_set.utterances[0].path == str(lid / "audio" / "de" / "000.wav")  # relative to the manifest
    (tmp_path / "odd.tsv").write_text(f"{lid / 'audio/de/000.wav'}\tde\n{lid / 'audio/it/000.wav'}\tsw\n")
    assert is_task("odd.tsv", str(tmp_path))  # no header needed; absolute paths
    with pytest.raises(DataError, match=r"audio/it/000.wav: label 'sw' is not one of the 6 labels"):
        resolve_task("odd.tsv", str(tmp_path), labels=train_set.labels)
    (tmp_path / "bad.tsv").write_text("path\tlabel\na.wav\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected 'path<TAB>label', got 'a.wav'"):
        resolve_task("bad.tsv", str(tmp_path))
    (tmp_path / "fairseq.tsv").write_text(f"{lid}\naudio/de/000.wav\t16000\n")  # root line: a CTC manifest
    assert not is_task("fairseq.tsv", str(tmp_path)) and not is_task("train-1h")
    with pytest.raises(DataError, match="not a classification corpus"):
        resolve_task("train-1h", str(tmp_path))


def test_larger_held_out_splits(tmp_path):
    """held_out=3 of per_class=8: per class 2 to train, 3 to dev, 3 to test (Speech Commands: dev and test speakers
    6 and 7 saying a word 3 times each; silence stays 2 clips a split)."""
    synth_tasks.keywords(tmp_path, per_class=8, held_out=3, tone=True)
    synth_tasks.voices(tmp_path, speakers=3, per_class=8, held_out=3, tone=True)
    synth_tasks.languages(tmp_path, per_class=8, held_out=3, tone=True)
    ks = {s: counts(resolve_task(f"speech_commands_v0.01-{s}", str(tmp_path))) for s in ("train", "dev", "test")}
    assert ks["train"] == {**{w: 2 for w in KS_LABELS[:10]}, "_unknown_": 6 * 2, "_silence_": 2 * 8}
    assert ks["dev"] == ks["test"] == {**{w: 3 for w in KS_LABELS[:10]}, "_unknown_": 6 * 3, "_silence_": 2}
    test_names = (tmp_path / "speech_commands_v0.01" / "testing_list.txt").read_text().split()
    assert len(test_names) == 16 * 3 and all(n.split("/")[1].startswith("00000007_") for n in test_names)
    speakers = ["id10001", "id10002", "id10003"]
    assert [counts(resolve_task(f"voxceleb1-{s}", str(tmp_path))) for s in ("train", "dev", "test")] == [
        dict.fromkeys(speakers, 2), dict.fromkeys(speakers, 3), dict.fromkeys(speakers, 3)]
    langs = sorted(synth_tasks.LANGUAGES)
    assert [counts(resolve_data(str(tmp_path / "lid" / f"{s}.tsv"))) for s in ("train", "valid", "test")] == [
        dict.fromkeys(langs, 2), dict.fromkeys(langs, 3), dict.fromkeys(langs, 3)]
    with pytest.raises(SystemExit, match="2"):  # 2 dev + 2 test of 4 leave none to train
        synth_tasks.main([str(tmp_path / "x"), "--task", "languages", "--per-class", "4", "--held-out", "2", "--tone"])
    assert not (tmp_path / "x").exists()


def test_tasks_command_line(tasks_root, capsys):
    assert tasks_main(["voxceleb1-train", "--data-root", str(tasks_root)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("voxceleb1-train (voxceleb1, ") and "8 utterances" in out
    assert "  id10003" in out
    assert tasks_main(["voxceleb1-train", "--data-root", str(tasks_root / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------
# The recipe's task functions; train.py and eval.py on a classification set


def test_accuracy_and_best_metric():
    rows = [("a", "yes", "yes"), ("b", "yes", "no"), ("c", "no", "no"), ("d", "go", "no")]
    m = accuracy(rows, ("yes", "no", "go", "up"))
    assert m["accuracy"] == 0.5 and m["correct"] == 2 and m["utterances"] == 4
    assert m["per_class"] == {"yes": [1, 2], "no": [1, 1], "go": [0, 1], "up": [0, 0]}
    assert best_metric("auto", "label") == "accuracy" and best_metric("accuracy", "label") == "accuracy"
    with pytest.raises(S3RError, match="--best-metric wer does not score a classification run"):
        best_metric("wer", "label")
    with pytest.raises(S3RError, match="--best-metric accuracy does not score a CTC run"):
        best_metric("accuracy", "letter")
    higher, lower = Task(None, None, None, "accuracy", True), Task(None, None, None, "wer", False)
    assert improves(higher, 0.6, 0.5) and not improves(higher, 0.5, 0.5) and improves(higher, 0.1, None)
    assert improves(lower, 0.4, 0.5) and not improves(lower, 0.6, 0.5)


def test_train_and_eval_on_a_classification_set(tasks_root, tiny_init, tmp_path, capsys):
    lid, save = tasks_root / "lid", tmp_path / "run"
    common = ["--init", str(tiny_init), "--data", str(lid / "train.tsv"), "--save-dir", str(save), "--max-tokens",
              "200000", "--update-freq", "1", "--num-workers", "0", "--log-interval", "1", "--lr", "1e-3",
              "--validate-interval", "2", "--save-interval", "2", "--classifier-proj-size", "16"]
    assert train.main(common + ["--max-updates", "4"]) == 0
    log = [json.loads(line) for line in (save / "log.jsonl").read_text().splitlines()]
    assert log[0]["vocab"] == len(synth_tasks.LANGUAGES) and log[0]["config"]["valid"] == "auto"
    valid = [e for e in log if "valid" in e]
    assert [e["update"] for e in valid] == [2, 4] and valid[0]["valid"] == str(lid / "valid.tsv")
    assert all(e["utterances"] == len(synth_tasks.LANGUAGES) and 0 <= e["accuracy"] <= 1 for e in valid)
    assert not any("blank_rate" in e or "warning" in e for e in log)  # a classifier has no CTC blank
    assert valid[-1]["best"] == max(e["accuracy"] for e in valid)  # higher is better
    assert "accuracy" in capsys.readouterr().out
    model = load_pretrained(save / "checkpoint_best.pt")
    assert isinstance(model, Wav2Vec2ForSequenceClassification)
    assert model.config.labels == tuple(sorted(synth_tasks.LANGUAGES)) and model.config.classifier_proj_size == 16
    ckpt = torch.load(save / "checkpoint_last.pt", weights_only=False)
    assert {"projector.weight", "classifier.bias"} <= set(ckpt["model"]) and ckpt["vocab"] is None
    # resume: the same command with more updates continues from checkpoint_last.pt
    assert train.main(common + ["--max-updates", "6"]) == 0
    log = [json.loads(line) for line in (save / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log if "event" in e] == ["start", "resume"] and log[-1]["update"] == 6
    # eval.py: accuracy and the per-class table
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(save / "checkpoint_last.pt"), "--data", str(lid / "test.tsv"),
                          "--num-workers", "0", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{lid / 'test.tsv'}: accuracy ") and "of 6 utterances, 6 classes" in out[0]
    assert out[1].split() == ["class", "utterances", "correct", "accuracy", "predicted"] and len(out) == 2 + 6
    result = json.loads((tmp_path / "m.json").read_text())
    assert sum(result["predicted"].values()) == 6 and result["per_class"]["de"][1] == 1


def test_weight_finetuning_a_classifier(tasks_root, tiny_init, tmp_path):
    """--finetune-weights: no masks; the encoder's weights (not the extractor's) and the head train."""
    save = tmp_path / "run"
    assert train.main(["--init", str(tiny_init), "--data", str(tasks_root / "lid" / "train.tsv"), "--save-dir",
                       str(save), "--max-tokens", "200000", "--num-workers", "0", "--max-updates", "2",
                       "--finetune-weights", "--lr", "1e-3", "--valid", ""]) == 0
    model, init = load_pretrained(save / "checkpoint_last.pt"), load_pretrained(tiny_init)
    assert isinstance(model, Wav2Vec2ForSequenceClassification) and model.route_config is None
    state, before = model.state_dict(), init.state_dict()
    ffn = "encoder.layers.0.feed_forward.intermediate_dense.weight"
    assert not torch.equal(state[ffn], before[ffn])
    conv = "feature_extractor.conv_layers.0.conv.weight"
    assert torch.equal(state[conv], before[conv])


def test_a_ctc_run_does_not_resume_as_classification(tasks_root, tiny_init, tmp_path, corpus_root):
    save = tmp_path / "run"
    assert train.main(["--init", str(tiny_init), "--data", "train-1h", "--data-root", str(corpus_root), "--save-dir",
                       str(save), "--max-tokens", "80000", "--num-workers", "0", "--max-updates", "1",
                       "--valid", ""]) == 0
    cfg, ckpt = parse_config(["--data", str(tasks_root / "lid" / "train.tsv"), "--save-dir", str(save)])
    with pytest.raises(S3RError, match="checkpoint_last.pt is a CTC run"):
        build_for(cfg, resolve_data(cfg.data), ckpt)


# ----------------------------------------------------------------------------------------------------------------
# Learning: each task on espeak-ng speech, S3-Router over the demo backbone (s3r/assets/demo/backbone.pt)

LEARNING = {  # task -> (generator options, --data, classes)
    "keywords": (dict(per_class=5), "speech_commands_v0.01-train", 12),
    "voices": (dict(per_class=6, speakers=4), "voxceleb1-train", 4),
    "intents": (dict(per_class=5), "fluent_speech_commands-train", len(synth_tasks.INTENTS)),
    "languages": (dict(per_class=5), "lid/train.tsv", len(synth_tasks.LANGUAGES)),
}
UPDATES = 24


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(LEARNING))
def test_each_task_learns_above_chance(task, tmp_path):
    """A few dozen S3-Router updates (FFN masks at the default prune rate 0.9 plus the head) lift dev accuracy from
    about chance to well above it, on held-out speakers (keywords, intents, languages) or videos (voices)."""
    options, data, classes = LEARNING[task]
    synth_tasks.TASKS[task](tmp_path, seed=1, **options)
    save = tmp_path / "run"
    assert train.main(["--data", data, "--data-root", str(tmp_path), "--save-dir", str(save), "--max-updates",
                       str(UPDATES), "--lr", "5e-3", "--max-tokens", "240000", "--update-freq", "1",
                       "--num-workers", "0", "--validate-before", "--validate-interval", str(UPDATES),
                       "--save-interval", str(UPDATES), "--log-interval", str(UPDATES), "--mask-prob", "0",
                       "--mask-channel-prob", "0", "--layerdrop", "0", "--seed", "1"]) == 0
    log = [json.loads(line) for line in (save / "log.jsonl").read_text().splitlines()]
    valid = [e for e in log if "accuracy" in e]
    before, after = valid[0]["accuracy"], valid[-1]["accuracy"]
    print(f"{task}: dev accuracy {before:.2f} -> {after:.2f} after {UPDATES} updates (chance {1 / classes:.2f})")
    assert after >= 2.5 / classes and after > before + 0.2, (before, after)
