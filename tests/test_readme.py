"""The README's code, as a reader pastes it: every ```python block runs (in order, one namespace, from a folder
holding the files the blocks name), and every train.py / eval.py command line it shows parses.

A block that names a file of its own (a checkpoint, a route) needs that file made by `readme_files` below, from the
demo backbone: small stand-ins with the README's names.
"""
import re
import shlex
from pathlib import Path

import pytest
import torch

import eval as s3r_eval
from s3r import load_pretrained
from s3r.checkpoint import s3r_checkpoint, save_atomic
from s3r.recipe import DEMO_BACKBONE, build_parser
from s3r.route_format import RouteError
from s3r.routes import export_route, load_bundle, make_bundle
from s3r.text import Vocabulary

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_files(folder: Path) -> None:
    """The files the README's Python names: s3r/ (the repository's, as in a clone), the pretrained checkpoint
    `xlsr2_300m.pt` (the demo backbone), routes nl/zh/es learned on it, and `langs.bundle` of them."""
    (folder / "s3r").symlink_to(REPO / "s3r")
    (folder / "xlsr2_300m.pt").write_bytes(DEMO_BACKBONE.read_bytes())
    vocab = Vocabulary.from_fairseq_dict(str(DEMO_BACKBONE.parent / "dict.phn.txt"))
    for seed, lang in enumerate(("nl", "zh", "es")):
        torch.manual_seed(seed)
        model = load_pretrained(folder / "xlsr2_300m.pt", prune_rate=0.9, init_score="kaiming_uniform",
                                vocab_size=len(vocab))
        model.vocab = vocab
        save_atomic(s3r_checkpoint(model, pretrained=str(folder / "xlsr2_300m.pt")), folder / f"{lang}.pt")
        export_route(folder / f"{lang}.pt", folder / f"{lang}.route")
    routes = {lang: folder / f"{lang}.route" for lang in ("nl", "zh", "es")}
    save_atomic(make_bundle(folder / "xlsr2_300m.pt", routes), folder / "langs.bundle")


def test_the_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    readme_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102  the README's own code
    out, out_lengths = namespace["out"], namespace["out_lengths"]  # the first block: hidden states of 2 files
    assert out.shape[:2] == (2, int(out_lengths.max())) and out_lengths[0] != out_lengths[1]
    logits = namespace["logits"]  # the bundle's "zh" route: its head's logits
    assert logits.shape[-1] == len(namespace["bundle"].routes["zh"]["vocab"]["symbols"])


def test_a_bundle_without_a_route_refuses_to_run(tmp_path):
    readme_files(tmp_path)
    bundle = load_bundle(tmp_path / "langs.bundle")
    with pytest.raises(RouteError, match=r"call \.use\(name\) first \(it has nl, zh, es\)"):
        bundle.model(torch.zeros(1, 16000))


def commands(script: str) -> list[list[str]]:
    """The arguments of every `script` command line in the README (continuation lines joined, up to a comment,
    a pipe or the next command)."""
    text = README.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        for m in re.finditer(rf"(?:^|[\s`]){re.escape(script)}\s+([^`#|&;]*)", line):
            found.append(shlex.split(m.group(1)))
    return found


def test_every_train_and_eval_command_line_parses():
    train_cmds, eval_cmds = commands("train.py"), commands("eval.py")
    assert len(train_cmds) >= 10 and len(eval_cmds) >= 5
    parser = build_parser()
    for argv in train_cmds:
        if "--help" not in argv:
            parser.parse_args([a for a in argv if a != "..."])  # exits (a test failure) on an unknown flag
    for argv in eval_cmds:
        try:
            s3r_eval.main([*argv, "--help"])
        except SystemExit as e:  # --help exits 0 after parsing everything before it; a bad flag exits 2
            assert e.code == 0, argv


@pytest.mark.slow
def test_the_quick_start_loop_trains_then_evaluates_as_printed(tmp_path, monkeypatch, capsys):
    """The Quick start's training command (cut to 2 updates, 1 process) ends by printing the README's eval command,
    which then runs as written from the same folder."""
    import train
    monkeypatch.chdir(tmp_path)
    quick = commands("train.py")[0]
    assert quick == ["--prune-rate", "0.9", "--data", "demo"]
    assert train.main([*quick, "--max-updates", "2", "--validate-interval", "2", "--save-interval", "2",
                       "--no-validate-before", "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    evaluate = commands("eval.py")[0]
    assert evaluate == ["--checkpoint", "checkpoints/checkpoint_best.pt", "--data", "demo-test"]
    assert printed.startswith("saved checkpoints/checkpoint_best.pt (best uer ") and printed.endswith(
        "evaluate: python eval.py " + " ".join(evaluate))
    assert s3r_eval.main(evaluate) == 0
    assert capsys.readouterr().out.startswith("demo-test: WER ")
