"""train.py and s3r.recipe: flags, presets, the model for a run, the tri-stage schedule, exact resume, best at save
points, atomic checkpoints, signals, bad data, 2-process torchrun.

The model is a 2-layer, 32-wide wav2vec 2.0 with random weights saved in the fairseq pretraining format (by
tests/fairseq_fixtures.py); the corpus is a Libri-light layout (train-1h) plus a LibriSpeech dev-other split of tone
"speech" written by tools/synth_corpus.py. Training runs in-process where it can (no interpreter start-up), in a
subprocess where the test needs a signal, a kill or torchrun.
"""
import ast
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import s3r.recipe as recipe
import train
from s3r import RouteConfig, Wav2Vec2Config, load_pretrained
from s3r.checkpoint import torch_load
from s3r.data import resolve_corpus
from s3r.recipe import (
    MODEL_FLAGS,
    PRESETS,
    TrainConfig,
    best_metric,
    build_model,
    config_from_values,
    config_values,
    parse_config,
    tri_stage_lr,
)
from s3r.text import Vocabulary

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))  # 2 shared cores: one thread per process


def args(init, root, save_dir, *extra) -> list[str]:
    """Small batches (5 s of audio, 2 per update), no DataLoader workers, every line logged."""
    return ["--init", str(init), "--data", "train-1h", "--data-root", str(root), "--save-dir", str(save_dir),
            "--max-tokens", "80000", "--update-freq", "2", "--num-workers", "0", "--log-interval", "1",
            *map(str, extra)]


def log_lines(save_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(save_dir) / "log.jsonl").read_text().splitlines()]


def assert_same_checkpoint(a: Path, b: Path):
    a, b = torch_load(a), torch_load(b)
    assert sorted(a["model"]) == sorted(b["model"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    oa, ob = a["train_state"]["optimizer"]["state"], b["train_state"]["optimizer"]["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    for key in ("update", "epoch", "batch_offset"):
        assert a["train_state"][key] == b["train_state"][key], key


# ----------------------------------------------------------------------------------------------------------------
# Flags and schedule


def test_help_lists_every_flag_with_its_upstream_name(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--init", "--data", "--data-root", "--valid", "--save-dir", "--prune-rate", "--init-score",
                 "--fix-attn", "--trainable-proj", "--no-trainable-proj", "--finetune-weights", "--max-updates",
                 "--max-tokens", "--update-freq", "--lr", "--seed", "--validate-interval", "--save-interval",
                 "--num-workers", "--threads", "--apply-mask", "--no-apply-mask",
                 "--skip-bad", "--compile", "--amp", "--checkpoint-activations", "--trust-checkpoint", "--log-interval",
                 "--preset", "--mask-prob", "--mask-channel-prob", "--layerdrop", "--phase-ratio", "--final-lr-scale",
                 "--freeze-finetune-updates", "--max-sample-size", "--normalize", "--units", "--vocab", "--dropout",
                 "--trainable-post-extract-proj", "--score-scale", "--required-batch-size-multiple",
                 "--best-checkpoint-metric"):
        assert flag in out, flag
    assert "model.prune_rate" in out and "lr_scheduler.phase_ratio" in out  # help text names the fairseq option
    assert all(f.metadata["help"] for f in train_fields())


def train_fields():
    from dataclasses import fields
    return [f for f in fields(TrainConfig) if f.name not in ("route", "encoder")]


def test_one_table_maps_flags_to_the_model_configs():
    """Route options are RouteConfig's (names and defaults), never redefined; encoder flags set Wav2Vec2Config
    fields; the flat form (CLI names, as checkpoints store it) round-trips."""
    from dataclasses import fields
    own = {f.name for f in train_fields()}
    route_fields = {f.name: f.default for f in fields(RouteConfig)}
    model_fields = {f.name for f in fields(Wav2Vec2Config)}
    for name, flag in MODEL_FLAGS.items():
        assert name not in own and flag.field in (route_fields if flag.config is RouteConfig else model_fields), name
    assert not own & set(route_fields)  # TrainConfig does not redefine a RouteConfig option
    values = config_values(TrainConfig())
    assert {n: values[n] for n, f in MODEL_FLAGS.items() if f.config is RouteConfig} == \
        {n: route_fields[f.field] for n, f in MODEL_FLAGS.items() if f.config is RouteConfig}
    # base_1h.yaml with the README command line, written out by hand (fairseq names)
    assert {n: values[n] for n, f in MODEL_FLAGS.items() if f.config is Wav2Vec2Config} == dict(
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, dropout_input=0.0, final_dropout=0.0,
        layerdrop=0.1, apply_mask=True, mask_prob=0.65, mask_length=10, mask_channel_prob=0.25, mask_channel_length=64,
        checkpoint_activations=False)
    assert (values["prune_rate"], values["init_score"], values["fix_attn"], values["trainable_proj"]) == \
        (0.9, "weight_rank", True, True)
    cfg = config_from_values({**values, "mask_prob": 0.5, "trainable_post_extract_proj": True, "lr": 1e-3})
    assert cfg.encoder["mask_time_prob"] == 0.5 and cfg.route.trainable_feature_projection and cfg.lr == 1e-3
    assert config_values(cfg) == {**values, "mask_prob": 0.5, "trainable_post_extract_proj": True, "lr": 1e-3}


def test_preset_fills_recipe_and_explicit_flags_win(tmp_path):
    cfg, ckpt = parse_config(["--save-dir", str(tmp_path), "--preset", "10h", "--layerdrop", "0.2"])
    assert ckpt is None
    assert (cfg.max_updates, cfg.encoder["mask_feature_prob"], cfg.route.prune_rate) == (20000, 0.5, 0.7)
    assert cfg.encoder["layerdrop"] == 0.2
    cfg, _ = parse_config(["--save-dir", str(tmp_path), "--preset", "xlsr"])
    assert (cfg.normalize, cfg.encoder["mask_time_prob"], cfg.encoder["hidden_dropout"], cfg.route.prune_rate,
            cfg.best_metric) == ("true", 0.75, 0.0, 0.94, "uer")
    assert (cfg.save_interval, cfg.validate_interval) == (10000, 1000)  # xlsr/config/finetune.yaml
    cfg, _ = parse_config(["--save-dir", str(tmp_path), "--no-fix-attn", "--phase-ratio", "0.2", "0.3", "0.5"])
    assert cfg.route.fix_attn is False and cfg.phase_ratio == (0.2, 0.3, 0.5) and cfg.route.trainable_proj is True
    cfg, _ = parse_config(["--save-dir", str(tmp_path), "--data", "demo"])  # --data demo implies the demo preset
    assert (cfg.max_updates, cfg.lr, cfg.encoder["mask_time_prob"]) == (PRESETS["demo"]["max_updates"], 1e-2, 0.3)


def test_resume_keeps_the_saved_config_and_explicit_flags_win(tmp_path):
    saved = {**config_values(TrainConfig()), "lr": 1e-3, "mask_prob": 0.3, "seed": 7, "adam_betas": [0.9, 0.9]}
    torch.save({"train_state": {"config": saved}}, tmp_path / "checkpoint_last.pt")
    cfg, ckpt = parse_config(["--save-dir", str(tmp_path), "--lr", "2e-3"])
    assert ckpt is not None
    assert (cfg.lr, cfg.encoder["mask_time_prob"], cfg.seed, cfg.adam_betas) == (2e-3, 0.3, 7, (0.9, 0.9))


@pytest.mark.parametrize("units, name, expected", [("letter", "auto", "wer"), ("char", "auto", "uer"),
                                                   ("phone", "auto", "uer"), ("phone", "per", "per"),
                                                   ("letter", "cer", "cer")])
def test_best_metric_is_upstreams(units, name, expected):
    assert best_metric(name, units) == expected


def test_best_metric_per_needs_phones():
    with pytest.raises(train.S3RError, match="phone"):
        best_metric("per", "letter")


def test_tri_stage_schedule_follows_fairseq():
    cfg = TrainConfig(max_updates=1000, lr=1e-3, init_lr_scale=0.01, final_lr_scale=0.05)
    lr = lambda u: tri_stage_lr(u, cfg)  # noqa: E731  short alias for the asserts
    assert lr(0) == pytest.approx(1e-5) and lr(50) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert lr(100) == lr(499) == 1e-3  # hold: 0.4 of the updates
    assert lr(750) == pytest.approx(1e-3 * math.exp(math.log(0.05) / 2))  # halfway through the exponential decay
    assert lr(1000) == pytest.approx(5e-5) and lr(1200) == pytest.approx(5e-5)


STDLIB = set(sys.stdlib_module_names)


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_scripts_import_only_the_library(script):
    tree = ast.parse((REPO / script).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert all(n.level == 0 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert {m.split(".")[0] for m in imported} <= STDLIB | {"s3r", "torch"}, imported


@pytest.mark.parametrize("tool", sorted(p.name for p in (REPO / "tools").glob("*.py")))
def test_tools_import_no_script_and_edit_no_path(tool):
    source = (REPO / "tools" / tool).read_text()
    tree = ast.parse(source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m.split(".")[0] for m in imported} & {"train", "eval"}
    assert "sys.path" not in source


# ----------------------------------------------------------------------------------------------------------------
# The model for a run: one library call


def test_build_model_applies_the_recipe(tiny_init, corpus_root):
    cfg, _ = parse_config(["--init", str(tiny_init), "--data", "train-1h", "--save-dir", "/nonexistent",
                           "--dropout", "0.2", "--mask-prob", "0.5", "--prune-rate", "0.5", "--no-fix-attn"])
    corpus = resolve_corpus("train-1h", str(corpus_root))
    model, vocab, pretrained = build_model(cfg, corpus)
    c = model.config
    assert (c.hidden_dropout, c.mask_time_prob, c.mask_feature_prob, c.layerdrop) == (0.2, 0.5, 0.25, 0.1)
    assert vocab.symbols == Vocabulary.librispeech().symbols and c.vocab_size == len(vocab)  # corpus's letters
    assert model.route_config == cfg.route and pretrained == str(tiny_init)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("q_proj.scores") for n in trainable) and "lm_head.weight" in trainable
    assert not any(n.endswith(".weight") and not n.startswith("lm_head") for n in trainable)  # weights frozen
    state = load_pretrained(tiny_init).state_dict()
    key = "encoder.layers.0.feed_forward.intermediate_dense.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def test_build_model_keeps_a_head_for_the_same_vocabulary(tmp_path, corpus_root, fairseq_checkpoint):
    letters = Vocabulary.librispeech()
    init = fairseq_checkpoint(tmp_path / "ctc.pt", vocab_size=len(letters), seed=4)
    letters.save_fairseq_dict(str(tmp_path / "dict.ltr.txt"))
    cfg = TrainConfig(init=str(init), finetune_weights=True)
    model, vocab, pretrained = build_model(cfg, resolve_corpus("train-1h", str(corpus_root)))
    head = load_pretrained(init).state_dict()["lm_head.weight"]
    assert pretrained is None and torch.equal(model.state_dict()["lm_head.weight"], head)  # the finetuned head stays
    assert model.route_config is None and model.lm_head.weight.requires_grad
    build = TrainConfig(init=str(init), finetune_weights=True, vocab="build")  # other symbols: a fresh head
    model, vocab, _ = build_model(build, resolve_corpus("train-1h", str(corpus_root)))
    assert vocab.symbols != letters.symbols and model.lm_head.weight.shape[0] == len(vocab)
    assert float(model.lm_head.bias.detach().abs().max()) == 0.0  # fairseq's fresh head: zero bias (xavier weight)


# ----------------------------------------------------------------------------------------------------------------
# Training runs (in-process)


def test_resume_is_bit_identical(tiny_init, corpus_root, tmp_path):
    """3 updates, stop, 3 more == 6 straight: data order, dropout, layerdrop, masking, Adam and schedule all resume."""
    a, b = tmp_path / "a", tmp_path / "b"
    run = lambda d, *more: train.main(args(tiny_init, corpus_root, d, "--validate-interval", 2, "--max-tokens", 120000,  # noqa: E731
                                           "--update-freq", 4, *more))
    assert run(a, "--max-updates", 3, "--schedule-updates", 6) == 0
    assert torch_load(a / "checkpoint_last.pt")["train_state"]["update"] == 3
    assert run(a, "--max-updates", 6) == 0  # the same --save-dir resumes
    assert run(b, "--max-updates", 6) == 0
    assert_same_checkpoint(a / "checkpoint_last.pt", b / "checkpoint_last.pt")
    events = [line.get("event") for line in log_lines(a) if "event" in line]
    assert events == ["start", "resume"]
    ts = torch_load(b / "checkpoint_last.pt")["train_state"]
    assert ts["epoch"] == 1  # 17 batches of <= 7.5 s, 4 per update: update 5 ends epoch 0, update 6 starts epoch 1


def test_thread_count_and_torch_are_recorded_and_a_change_warns_on_resume(tiny_init, corpus_root, tmp_path, capsys):
    """CPU sums depend on the thread count: log.jsonl and train_state record it (and torch's version and CPU
    kernels); resuming with another count is allowed, with a one-line warning."""
    threads = torch.get_num_threads()
    try:
        common = ("--valid", "", "--max-tokens", 120000, "--update-freq", 4)
        assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 1, "--threads", 2, *common)) == 0
        assert torch.get_num_threads() == 2
        ts = torch_load(tmp_path / "checkpoint_last.pt")["train_state"]
        expected = {"threads": 2, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "world_size": 1}
        assert {k: ts[k] for k in expected} == expected
        capsys.readouterr()
        assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 2, "--threads", 1, *common)) == 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 2 and "--max-updates 1 -> 2, --threads 2 -> 1" in warnings[0], warnings  # the flags
        assert "with other threads 2 -> 1: not bit-identical" in warnings[1], warnings  # what the numbers depend on
        start, resume = [line for line in log_lines(tmp_path) if "event" in line]
        assert {k: start[k] for k in expected} == expected and {**expected, "threads": 1} == {k: resume[k]
                                                                                             for k in expected}
        assert torch_load(tmp_path / "checkpoint_last.pt")["train_state"]["update"] == 2  # the resume went on
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("apply_mask", [True, False], ids=["apply-mask", "no-apply-mask"])
@pytest.mark.parametrize("mode", [(), ("--finetune-weights",)], ids=["s3router", "finetune"])
def test_no_apply_mask_leaves_the_encoder_input_unmasked(tiny_init, corpus_root, tmp_path, monkeypatch, apply_mask,
                                                        mode):
    """fairseq's apply_mask=False: no time or channel masks in training, whatever --mask-prob says; the mask
    embedding then never trains. With it (the control) training frames do get masked."""
    seen = []  # per training forward: was the encoder's input the feature projection's output?

    def build_model(*a, **kw):
        model, vocab, pretrained = real(*a, **kw)
        projected = {}
        model.feature_projection.register_forward_hook(lambda m, i, out: projected.update(x=out))
        model.encoder.register_forward_pre_hook(
            lambda m, i: seen.append(torch.equal(i[0], projected["x"])) if m.training else None)
        return model, vocab, pretrained
    real = recipe.build_model  # train.py reaches it through recipe.build_for
    monkeypatch.setattr(recipe, "build_model", build_model)
    flag = "--apply-mask" if apply_mask else "--no-apply-mask"
    assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 2, "--valid", "", "--mask-prob", 0.65,
                           "--mask-channel-prob", 0.25, "--lr", 1e-2, flag, *mode)) == 0
    assert len(seen) >= 4 and (not any(seen) if apply_mask else all(seen)), seen
    ckpt = torch_load(tmp_path / "checkpoint_last.pt")
    assert ckpt["train_state"]["config"]["apply_mask"] is apply_mask
    assert load_pretrained(tmp_path / "checkpoint_last.pt").config.apply_spec_augment is apply_mask
    embed = ckpt["model"]["masked_spec_embed"]
    cfg, _ = parse_config(args(tiny_init, corpus_root, tmp_path / "x", *mode))
    torch.manual_seed(1)  # --seed 1: the run's fresh mask embedding, drawn as train.py draws it
    fresh = real(cfg, resolve_corpus("train-1h", str(corpus_root)))[0].masked_spec_embed.detach()
    assert torch.equal(embed, fresh) is not apply_mask  # trained by time masks only


def test_mask_checkpoint_reloads_with_its_masks(tiny_init, corpus_root, tmp_path):
    assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 2, "--prune-rate", 0.5,
                           "--no-fix-attn", "--init-score", "kaiming_uniform")) == 0
    ckpt = torch_load(tmp_path / "checkpoint_last.pt")
    # only what was trained (scores, head, mask embedding) and where the frozen weights came from
    assert all(k.endswith(".scores") or k.startswith("lm_head.") or k == "masked_spec_embed" for k in ckpt["model"])
    assert ckpt["pretrained"]["path"] == str(tiny_init.resolve())
    assert any(".attention.q_proj.scores" in k for k in ckpt["model"])
    model = load_pretrained(tmp_path / "checkpoint_last.pt")
    assert model.route_config.prune_rate == 0.5 and model.vocab is not None
    for name, mask in model.masks().items():
        scores = ckpt["model"][name.removesuffix("weight") + "scores"]
        assert int(mask.sum()) == round(0.5 * mask.numel())
        assert bool(scores.abs()[mask].min() >= scores.abs()[~mask].max())  # the kept ones have the largest |scores|
    best = [line for line in log_lines(tmp_path) if "valid" in line]
    assert best and "wer" in best[-1] and (tmp_path / "checkpoint_best.pt").is_file()


def test_checkpoint_with_trained_weights_still_names_its_pretrained_file(tiny_init, corpus_root, tmp_path):
    """co_train / trainable_pos change routable weights: the fingerprint must stay that of the file they came from."""
    assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 1, "--valid", "", "--co-train",
                           "--trainable-pos", "--trainable-post-extract-proj", "--lr", 1e-3)) == 0
    assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 2, "--valid", "")) == 0  # resumes
    ckpt = torch_load(tmp_path / "checkpoint_last.pt")
    model = load_pretrained(tmp_path / "checkpoint_last.pt")
    key = "encoder.layers.1.feed_forward.output_dense.weight"
    assert torch.equal(model.state_dict()[key], ckpt["model"][key])
    assert not torch.equal(model.state_dict()[key], load_pretrained(tiny_init).state_dict()[key])


def test_finetune_weights_trains_the_weights(tiny_init, corpus_root, tmp_path):
    assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 2, "--finetune-weights", "--valid", "",
                           "--lr", 1e-3)) == 0
    ckpt = torch_load(tmp_path / "checkpoint_last.pt")
    assert ckpt["pretrained"] is None and ckpt["route"] is None and not any(k.endswith("scores") for k in ckpt["model"])
    before, after = load_pretrained(tiny_init).state_dict(), ckpt["model"]
    key = "encoder.layers.0.feed_forward.intermediate_dense.weight"
    assert not torch.equal(before[key], after[key])
    conv = "feature_extractor.conv_layers.0.conv.weight"
    assert torch.equal(before[conv], after[conv])  # feature_grad_mult 0: the extractor stays frozen


def test_freeze_finetune_updates_trains_only_the_head(tiny_init, corpus_root, tmp_path):
    common = ("--max-updates", 2, "--valid", "", "--lr", 1e-3)
    assert train.main(args(tiny_init, corpus_root, tmp_path / "frozen", *common, "--freeze-finetune-updates", 2)) == 0
    assert train.main(args(tiny_init, corpus_root, tmp_path / "still", *common[:-2], "--lr", 0.0)) == 0
    frozen, still = (torch_load(tmp_path / d / "checkpoint_last.pt")["model"] for d in ("frozen", "still"))
    scores = [k for k in frozen if k.endswith(".scores")]
    assert scores and all(torch.equal(frozen[k], still[k]) for k in scores + ["masked_spec_embed"])
    assert not torch.equal(frozen["lm_head.weight"], still["lm_head.weight"])


def test_bad_audio_is_a_one_line_error_or_skipped(tiny_init, corpus_root, tmp_path, capsys):
    root = tmp_path / "corpus"
    shutil.copytree(corpus_root / "librispeech_finetuning", root / "librispeech_finetuning")
    victim = sorted((root / "librispeech_finetuning" / "1h" / "0").rglob("*.flac"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # the header still says how long it is; decoding runs short
    code = train.main(args(tiny_init, root, tmp_path / "run", "--max-updates", 20, "--valid", ""))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and victim.name in lines[0] and "Traceback" not in err
    code = train.main(args(tiny_init, root, tmp_path / "skip", "--max-updates", 20, "--valid", "", "--skip-bad"))
    assert code == 0
    assert log_lines(tmp_path / "skip")[-1]["skipped"] >= 1
    assert victim.name in capsys.readouterr().err  # named when skipped, not dropped silently


@pytest.mark.parametrize("case, named", [("init", "nope.pt"), ("root", "librispeech_finetuning"),
                                         ("valid", "test-other")])
def test_missing_files_are_one_line_errors(tiny_init, corpus_root, tmp_path, capsys, case, named):
    init, root, extra = tiny_init, corpus_root, []
    if case == "init":
        init = tmp_path / "nope.pt"
    elif case == "root":
        root = tmp_path / "empty"
        root.mkdir()
    else:
        extra = ["--valid", "test-other"]
    assert train.main(args(init, root, tmp_path / "r", *extra)) == 2
    errs = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errs) == 1 and errs[0].startswith("error:") and named in errs[0], errs


def test_best_is_chosen_at_save_points_only(tiny_init, corpus_root, tmp_path):
    """fairseq validates every validate_interval updates but considers checkpoint_best only when it saves."""
    assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 5, "--validate-interval", 1,
                           "--save-interval", 2, "--lr", 1e-2, "--best-metric", "cer")) == 0
    valid = [line for line in log_lines(tmp_path) if "valid" in line]
    assert [v["update"] for v in valid] == [1, 2, 3, 4, 5]
    at_saves = [v for v in valid if v["update"] in (2, 4, 5)]  # 5: the last update saves too
    best = None
    for v in valid:  # the logged best moves only at save points, to the best cer seen at one
        if v in at_saves and (best is None or v["cer"] < best):
            best = v["cer"]
        assert v["best"] == best, (v, best)
    ckpt = torch_load(tmp_path / "checkpoint_best.pt")["train_state"]
    assert ckpt["update"] in (2, 4, 5) and ckpt["best"] == best == min(v["cer"] for v in at_saves)


def test_batch_size_multiple_reaches_the_loader(tiny_init, corpus_root, tmp_path, monkeypatch):
    seen = []

    def make_loader(*a, **kw):
        seen.append(kw["required_batch_size_multiple"])
        return real(*a, **kw)
    real = train.make_loader
    monkeypatch.setattr(train, "make_loader", make_loader)
    assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 1,
                           "--required-batch-size-multiple", 3)) == 0
    assert seen == [3, 3]  # training and validation, as fairseq's batch_by_size


# ----------------------------------------------------------------------------------------------------------------
# Collapse to blanks: the blank rate of validation, and one warning


def test_blank_count_is_over_unpadded_frames(tiny_vocab):
    """Hand-counted: frames 0-3 of utterance 0 and 0-1 of utterance 1 are real; 2 + 2 of those 6 are blank."""
    best = torch.tensor([[0, 5, 0, 6], [0, 0, 5, 0]])  # the argmax units; utterance 1's last 2 frames are padding
    logits = torch.nn.functional.one_hot(best, len(tiny_vocab)).float()
    frames = [0, 0]
    hyps = train.counting_blanks(tiny_vocab, frames)(logits, torch.tensor([4, 2]))
    assert frames == [4, 6] and hyps == ["ab", ""]


def blank_biased(monkeypatch, bias: float):
    """build_for, with fairseq's blank_weight added to every frame's blank logit (a forced model)."""
    build_for = train.build_for

    def build(*a, **kw):
        model, vocab, pretrained = build_for(*a, **kw)
        model.config.blank_weight, model.config.blank_mode = bias, "add"
        return model, vocab, pretrained
    monkeypatch.setattr(train, "build_for", build)


@pytest.mark.parametrize("bias", [100.0, -100.0])
def test_collapse_to_blanks_is_logged_and_warned_once(tiny_init, corpus_root, tmp_path, monkeypatch, capsys, bias):
    """A model forced to the blank (blank logit +100) is all blank and every hypothesis empty: logged at every
    validation, warned once after the warm-up; one forced away from it (-100) has neither, and no warning."""
    blank_biased(monkeypatch, bias)
    assert train.main(args(tiny_init, corpus_root, tmp_path, "--max-updates", 4, "--validate-interval", 1,
                           "--phase-ratio", 0.5, 0.25, 0.25, "--validate-before")) == 0
    out = capsys.readouterr()
    valid = [line for line in log_lines(tmp_path) if "valid" in line]
    assert [v["update"] for v in valid] == [0, 1, 2, 3, 4]
    expected = 1.0 if bias > 0 else 0.0
    assert all(v["blank_rate"] == expected and v["empty"] == expected for v in valid), valid
    assert all(f"blank_rate {100 * expected:.2f} | empty {100 * expected:.2f}" in line
               for line in out.out.splitlines() if line.startswith("valid"))
    warnings = [line for line in out.err.splitlines() if line.startswith("warning:")]
    logged = [line for line in log_lines(tmp_path) if "warning" in line]
    if bias < 0:
        assert warnings == [] and logged == []
        return
    # the warm-up is updates 0 and 1 (int(4 * 0.5) = 2): the first collapsed validation after it is at update 2
    assert len(warnings) == 1 and "update 2:" in warnings[0] and "collapsed to blanks" in warnings[0], warnings
    assert all(flag in warnings[0] for flag in ("--lr", "--phase-ratio", "--prune-rate", "--max-updates"))
    assert [(w["update"], "warning: " + w["warning"]) for w in logged] == [(2, warnings[0])]


# ----------------------------------------------------------------------------------------------------------------
# Subprocesses: signals and kills


def start(cmd: list[str], out: Path) -> subprocess.Popen:
    """A subprocess whose stdout / stderr go to files (a full pipe would block the progress bar)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=open(out / "stdout", "w"), stderr=open(out / "stderr", "w"))
    proc.stdout_text = lambda: (out / "stdout").read_text()
    proc.stderr_text = lambda: (out / "stderr").read_text()
    return proc


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stderr_text()[-3000:]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tiny_init, corpus_root, tmp_path):
    proc = start([sys.executable, "train.py", *args(tiny_init, corpus_root, tmp_path / "run", "--max-updates", 10000,
                                                     "--valid", "")], tmp_path)
    log = tmp_path / "run" / "log.jsonl"
    wait_for(lambda: log.exists() and any("loss" in line for line in log.read_text().splitlines()), proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = proc.stderr_text()
    assert proc.returncode == 0, err
    assert "stopped by a signal" in err and "Traceback" not in err
    update = torch_load(tmp_path / "run" / "checkpoint_last.pt")["train_state"]["update"]
    assert 1 <= update < 10000 and log_lines(tmp_path / "run")[-1]["update"] == update


KILL_DURING_SAVE = """
import os, sys, time, torch
import train
real_save, calls = torch.save, []
def save(obj, f, *a, **kw):
    calls.append(1)
    if len(calls) == 2:  # the second checkpoint: write a part of it, then hang until killed
        f.write(b"half a checkpoint" * 1000); f.flush(); os.fsync(f.fileno())
        print("SAVING", flush=True)
        time.sleep(600)
    return real_save(obj, f, *a, **kw)
torch.save = save
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_during_save_keeps_the_previous_checkpoint(tiny_init, corpus_root, tmp_path):
    run = tmp_path / "run"
    proc = start([sys.executable, "-c", KILL_DURING_SAVE, *args(tiny_init, corpus_root, run, "--max-updates", 5,
                                                              "--save-interval", 1, "--valid", "")], tmp_path)
    wait_for(lambda: "SAVING" in proc.stdout_text(), proc)
    assert any(p.name.endswith(".tmp") for p in run.iterdir())  # the half-written temporary file
    proc.kill()
    proc.wait(timeout=30)
    assert torch_load(run / "checkpoint_last.pt")["train_state"]["update"] == 1
    assert load_pretrained(run / "checkpoint_last.pt").route_config is not None
    assert train.main(args(tiny_init, corpus_root, run, "--max-updates", 2, "--valid", "")) == 0  # resumes
    assert torch_load(run / "checkpoint_last.pt")["train_state"]["update"] == 2


# ----------------------------------------------------------------------------------------------------------------
# torchrun, 2 processes on CPU (gloo)


def torchrun(*train_args, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *train_args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def assert_clean(res: subprocess.CompletedProcess):
    assert res.returncode == 0, res.stderr[-3000:]
    for bad in ("Traceback", "terminate called", "Aborted", "core dumped", "error:"):
        assert bad not in res.stderr, res.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_two_processes_resume_and_reload(tiny_init, corpus_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--validate-interval", 3, "--num-workers", 1)
    assert_clean(torchrun(*args(tiny_init, corpus_root, a, "--max-updates", 3, "--schedule-updates", 6, *common)))
    assert_clean(torchrun(*args(tiny_init, corpus_root, a, "--max-updates", 6, *common)))
    assert_clean(torchrun(*args(tiny_init, corpus_root, b, "--max-updates", 6, *common)))
    assert_same_checkpoint(a / "checkpoint_last.pt", b / "checkpoint_last.pt")
    ckpt = torch_load(b / "checkpoint_last.pt")
    assert ckpt["train_state"]["world_size"] == 2 and len(ckpt["train_state"]["rng"]) == 2
    lines = log_lines(b)
    assert lines[0]["world_size"] == 2 and [line["update"] for line in lines if "valid" in line] == [3, 6]
    model = load_pretrained(b / "checkpoint_last.pt")
    assert model.route_config.prune_rate == 0.9 and model.route_config.fix_attn


@pytest.mark.slow
def test_torchrun_error_on_one_rank_stops_both(tiny_init, corpus_root, tmp_path):
    """A file that only one rank reads fails there: every process exits (non-zero), nothing hangs."""
    root = tmp_path / "corpus"
    shutil.copytree(corpus_root / "librispeech_finetuning", root / "librispeech_finetuning")
    victim = sorted((root / "librispeech_finetuning").rglob("*.flac"))[5]
    victim.write_bytes(victim.read_bytes()[:200])
    t0 = time.time()
    res = torchrun(*args(tiny_init, root, tmp_path / "run", "--max-updates", 50, "--valid", ""), timeout=180)
    assert res.returncode != 0 and time.time() - t0 < 150
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert any(victim.name in line for line in errors), res.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# Determinism: the same command, seed and thread count give the same bits


def tensors(obj, path: str = "") -> dict:
    """Every leaf of a checkpoint by its path (model, scores, head, optimizer state, RNG states, counters)."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in tensors(value, f"{path}/{key}").items()}
    if isinstance(obj, list | tuple):
        return {k: v for i, value in enumerate(obj) for k, v in tensors(value, f"{path}/{i}").items()}
    return {path: obj}


def differences(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]


@pytest.fixture(scope="module")
def fp16_init(tiny_init, tmp_path_factory) -> Path:
    """tiny_init stored in fp16, as the demo backbone and many fairseq checkpoints are: many |W| tie."""
    ckpt = torch_load(tiny_init)
    ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    path = tmp_path_factory.mktemp("fp16") / "wav2vec_tiny_fp16.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", [("--init-score", "weight_rank", "--no-fix-attn", "--lr", 1e-2),
                                  ("--finetune-weights", "--lr", 1e-3)], ids=["s3router", "finetune"])
def test_torchrun_reruns_are_bit_identical(fp16_init, corpus_root, tmp_path, mode):
    """Two processes, one thread each, DataLoader workers, layerdrop and SpecAugment, an epoch boundary and a
    validation: rerunning the command gives the same checkpoint bit for bit and the same validation; --seed 2 not."""
    state = torch_load(fp16_init)["model"]
    weights = next(v for k, v in state.items() if k.endswith("layers.0.fc1.weight"))
    assert weights.dtype == torch.float16 and weights.abs().unique().numel() < weights.numel()  # ties
    # 17 batches, about 9 per rank, 4 per update: update 3 starts the second epoch; a validation at update 2 and 4
    run = lambda d, *more: torchrun(*args(fp16_init, corpus_root, d, "--max-updates", 4, "--max-tokens", 120000,  # noqa: E731
                                          "--update-freq", 4, "--num-workers", 1, "--validate-interval", 2,
                                          "--layerdrop", 0.5, "--mask-prob", 0.65, "--mask-channel-prob", 0.25,
                                          *mode, *more))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, more in ((a, ()), (b, ()), (c, ("--seed", 2))):
        assert_clean(run(d, *more))
    ca, cb, cc = (torch_load(d / "checkpoint_last.pt") for d in (a, b, c))
    for ckpt in (ca, cb, cc):  # the runs did what the test is about: 2 processes, 1 thread each, into a second epoch
        ts = ckpt["train_state"]
        assert (ts["world_size"], ts["threads"], ts["update"], ts["epoch"]) == (2, 1, 4, 1)
        assert ts["config"].pop("save_dir")  # the one flag the runs differ in
    assert differences(tensors(ca), tensors(cb)) == []
    valid = [[line for line in log_lines(d) if "valid" in line] for d in (a, b)]
    assert [v["update"] for v in valid[0]] == [2, 4] and valid[0] == valid[1]
    ma, mb, mc = (load_pretrained(d / "checkpoint_last.pt").eval() for d in (a, b, c))
    if ma.route_config is not None:
        masks = ma.masks()
        assert masks and all(torch.equal(m, mb.masks()[k]) for k, m in masks.items())
        start = load_pretrained(fp16_init, prune_rate=0.9, init_score="weight_rank", fix_attn=False).masks()
        assert any(not torch.equal(m, start[k]) for k, m in masks.items())  # training moved the masks
        assert any(not torch.equal(m, mc.masks()[k]) for k, m in masks.items())  # the control
    ca["train_state"]["config"]["seed"] = 2
    changed = differences(tensors(ca), tensors(cc))
    assert any(k.startswith("/model/") for k in changed), changed  # the control: another seed, other weights
