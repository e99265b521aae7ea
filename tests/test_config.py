"""The command line of train.py and eval.py: what a resumed run keeps, the demo preset, one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s3r.errors import ArgumentParser, ConfigError
from s3r.recipe import PRESETS, config_values, parse_config

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def save_run(save_dir, argv: list[str], update: int = 200):
    """checkpoint_last.pt as train.py leaves it after `argv` (its train_state's config and update)."""
    cfg, _ = parse_config(["--save-dir", str(save_dir), *argv])
    torch.save({"train_state": {"config": config_values(cfg), "update": update}}, save_dir / "checkpoint_last.pt")
    return cfg


def test_demo_run_resumed_without_its_lr_keeps_it(tmp_path, capsys):
    demo_ft = ["--data", "demo", "--finetune-weights", "--lr", "3e-3"]
    started = save_run(tmp_path, demo_ft)
    assert started.lr == 3e-3 and started.max_updates == PRESETS["demo"]["max_updates"]
    capsys.readouterr()
    cfg, ckpt = parse_config(["--save-dir", str(tmp_path), "--data", "demo", "--finetune-weights"])
    assert ckpt is not None and cfg == started  # nothing of the implicit demo preset is applied again
    assert capsys.readouterr().err == ""  # flags repeating the saved values are no change


def test_resume_with_a_changed_flag_applies_it_and_says_so_in_one_line(tmp_path, capsys):
    save_run(tmp_path, ["--prune-rate", "0.9", "--lr", "1e-3", "--max-updates", "100"])
    capsys.readouterr()
    cfg, _ = parse_config(["--save-dir", str(tmp_path), "--prune-rate", "0.7", "--lr", "1e-3", "--max-updates",
                           "300"])
    assert (cfg.route.prune_rate, cfg.lr, cfg.max_updates) == (0.7, 1e-3, 300)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: resuming ") and "(update 200)" in err[0]
    assert "--prune-rate 0.9 -> 0.7" in err[0] and "--max-updates 100 -> 300" in err[0] and "--lr" not in err[0]


def test_presets_never_override_a_resumed_run(tmp_path):
    started = save_run(tmp_path, ["--preset", "xlsr", "--mask-prob", "0.5"])
    assert started.encoder["mask_time_prob"] == 0.5 and started.route.prune_rate == 0.94
    cfg, _ = parse_config(["--save-dir", str(tmp_path), "--preset", "xlsr"])
    assert cfg == started  # the preset's mask_prob 0.75 does not come back
    with pytest.raises(ConfigError, match=r"--preset 10h: .* resumes a run started with --preset xlsr"):
        parse_config(["--save-dir", str(tmp_path), "--preset", "10h"])


def test_resume_reads_the_folder_it_was_found_in(tmp_path):
    (tmp_path / "old").mkdir()
    save_run(tmp_path / "old", ["--lr", "1e-3"])
    (tmp_path / "old").rename(tmp_path / "moved")
    cfg, ckpt = parse_config(["--save-dir", str(tmp_path / "moved")])
    assert ckpt is not None and cfg.save_dir == str(tmp_path / "moved") and cfg.lr == 1e-3


def test_argument_parser_refuses_abbreviations_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    p = ArgumentParser(prog="train.py")
    p.add_argument("--prune-rate", type=float)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--prune-rat", "0.9"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["train.py: error: unrecognized arguments: --prune-rat 0.9 "
                                                    "(see --help)"]
    monkeypatch.setenv("RANK", "1")  # torchrun's other ranks stay silent: rank 0 says it once
    with pytest.raises(SystemExit):
        p.parse_args(["--prune-rat", "0.9"])
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_torchrun_prints_a_configuration_error_once(tmp_path):
    """Every rank meets it; rank 0 says it (torchrun's own failure report follows, which s3r cannot change)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--save-dir", str(tmp_path), "--init", "missing.pt"]
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if "error:" in line and "torch.distributed" not in line]
    assert ours == ["error: checkpoint not found: missing.pt"], res.stderr[-3000:]


def test_a_finished_run_says_where_it_saved_and_how_to_evaluate(tiny_init, corpus_root, tmp_path, capsys):
    import train
    argv = ["--init", str(tiny_init), "--data", "train-1h", "--data-root", str(corpus_root), "--save-dir",
            str(tmp_path), "--max-tokens", "80000", "--num-workers", "0", "--max-updates", "1", "--update-freq", "1",
            "--save-interval", "1"]
    assert train.main(argv) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    best = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["train_state"]["best"]
    assert last == (f"saved {tmp_path}/checkpoint_best.pt (best wer {100 * best:.2f} on dev-other) and "
                    f"checkpoint_last.pt; evaluate: python eval.py --checkpoint {tmp_path}/checkpoint_best.pt "
                    f"--data dev-other --data-root {corpus_root}")
    assert train.main(argv) == 0  # again: nothing to do, said in one line, no progress bar
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].startswith("nothing to do: ") and "train:" not in err and "it/s" not in err


def test_demo_weight_finetuning_gets_its_own_lr_and_a_head_start(tmp_path):
    cfg, _ = parse_config(["--save-dir", str(tmp_path), "--data", "demo", "--finetune-weights"])
    assert (cfg.lr, cfg.freeze_finetune_updates, cfg.max_updates) == (3e-3, 50, 200)
    cfg, _ = parse_config(["--save-dir", str(tmp_path), "--data", "demo"])  # S3-Router: the scores' lr, no freezing
    assert (cfg.lr, cfg.freeze_finetune_updates) == (1e-2, 0)
    cfg, _ = parse_config(["--save-dir", str(tmp_path), "--preset", "1h", "--finetune-weights"])
    assert (cfg.lr, cfg.freeze_finetune_updates) == (5e-5, 0)  # upstream's presets are the same for both methods


def test_help_shows_the_demo_values_beside_the_defaults():
    from s3r.recipe import build_parser
    text = " ".join(build_parser().format_help().split())
    assert "optimization.max_update (default: 15000; demo: 200)" in text
    assert "optimization.lr (peak) (default: 5e-05; demo: 0.01; demo --finetune-weights: 0.003)" in text
    assert "only the head trains) for this many updates (default: 0; demo --finetune-weights: 50)" in text
    assert "--data demo (the default) applies the demo preset unless --preset is given" in text


@pytest.mark.parametrize("module, argv", [("s3r.routes", ["omp", "a.pt", "b.pt", "--prune-rat", "0.3"]),
                                          ("s3r.analysis", ["similarity", "a.route", "b.route", "--jso", "s.json"]),
                                          ("s3r.export", ["--dens", "d.pt", "c.pt"]),
                                          ("s3r.data", ["--data", "demo", "--chec"]),
                                          ("s3r.transcribe", ["m.bundle", "x.wav", "--jso", "o.json"])])
def test_library_command_lines_refuse_abbreviations_in_one_line(module, argv, capsys, monkeypatch):
    import importlib
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"python -m {module}"), err
    flag = next(a for a in argv if a in ("--prune-rat", "--jso", "--dens", "--chec"))  # or the real one is missing
    assert ("unrecognized arguments" in err[0] and flag in err[0]) or "are required" in err[0], err
