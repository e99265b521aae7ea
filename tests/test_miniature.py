"""tools/miniature.py's stages around the grid: the lr stage, the cell cache's keys, collapse accounting, the
similarity permutation test, the bundle with task routes and the claims table.

The grid's own cells (train.py + eval.py on the miniature corpus) are far too slow for a test: one real cell runs
here, on a tiny CommonVoice-layout corpus and the tiny fairseq checkpoint (2 updates); the stages' bookkeeping is
tested with cells whose numbers are set by hand.
"""
import json
import shutil
from pathlib import Path

import pytest

import tools.miniature as mini

TINY_RECIPE = ["--max-updates", "2", "--max-tokens", "80000", "--update-freq", "1", "--validate-interval", "1",
               "--save-interval", "1", "--num-workers", "0", "--units", "phone"]


@pytest.fixture
def results(tmp_path, monkeypatch):
    """bench/results (and the README the report writes the claims table into) redirected to a temporary folder; the
    methods start at the demo corpus's lrs, whatever lrs the committed results chose, and are set back after."""
    committed = mini.selected_lrs()
    mini.use_lrs(mini.DEMO_LRS)
    folder = tmp_path / "results"
    monkeypatch.setattr(mini, "RESULTS", folder)
    monkeypatch.setattr(mini, "README", tmp_path / "README.md")
    yield folder
    mini.use_lrs(committed)


# ----------------------------------------------------------------------------------------------------------------
# Learning rates


def test_methods_follow_their_familys_lr():
    m = mini.make_methods({"head": "3e-2", "ft": "3e-4", "s3r": "3e-3"})
    assert m["head"][-2:] == ["--lr", "3e-2"] and m["ft"][-2:] == ["--lr", "3e-4"]
    assert all(args[-2:] == ["--lr", "3e-3"] for name, args in m.items()
               if name.startswith("s3r-") and name != "s3r-0.9-lr1e-2")
    # the second-lr column is 3e-3 unless 3e-3 is the family's own; then 1e-2
    assert list(m)[-1] == "s3r-0.9-lr1e-2" and m["s3r-0.9-lr1e-2"][-1] == "1e-2"
    assert list(mini.make_methods(mini.DEMO_LRS))[-1] == "s3r-0.9-lr3e-3"
    assert mini.with_lr(["--prune-rate", "0.9", "--lr", "1e-2", "--x"], "3e-2") == ["--prune-rate", "0.9", "--lr",
                                                                                    "3e-2", "--x"]


def test_lr_stage_picks_the_lowest_mean_dev_per(tmp_path, monkeypatch, results):
    """Dev PERs set by hand per (family, lr, language); the choice is the lowest mean over the two languages, a family
    with a failed cell keeps its lr, and the grid's methods run at the chosen lrs afterwards."""
    dev = {("head", "3e-3"): (0.50, 0.40), ("head", "1e-2"): (0.30, 0.60), ("head", "3e-2"): (0.20, 0.60),
           ("ft", "3e-4"): (0.35, 0.36), ("ft", "1e-3"): (0.30, 0.50), ("ft", "3e-3"): (0.95, 0.99),
           ("s3r", "3e-3"): (0.25, 0.25)}  # s3r 1e-2 and 3e-2: failed runs
    calls = []

    def fake_cell(out, lang, method, seed, args, threads, init=None, tag="", split="test"):
        calls.append((lang, method, args, split))
        fam, lr = method.split("-", 2)[1:]
        if (fam, lr) not in dev:
            raise RuntimeError(f"train.py failed (exit 1); see {method}")
        return {"per": dev[fam, lr][["fr", "tt"].index(lang)], "train_cpu_s": 6.0}

    monkeypatch.setattr(mini, "train_cell", fake_cell)
    grid = {"head": ["3e-3", "1e-2", "3e-2"], "ft": ["3e-4", "1e-3", "3e-3"], "s3r": ["3e-3", "1e-2", "3e-2"]}
    res = mini.run_lr(tmp_path, ["fr", "tt"], 1, jobs=2, command="python -m tools.miniature --stage lr", grid=grid)
    # means: head 0.45 / 0.45 / 0.40, ft 0.355 / 0.40 / 0.97
    assert res["selected"] == {"head": "3e-2", "ft": "3e-4", "s3r": None}
    assert res["mean_dev_per"]["head"] == pytest.approx({"3e-3": 0.45, "1e-2": 0.45, "3e-2": 0.40})
    assert sorted(res["failed"]) == ["s3r 1e-2 fr", "s3r 1e-2 tt", "s3r 3e-2 fr", "s3r 3e-2 tt"]
    assert len(calls) == 18 and {c[3] for c in calls} == {"dev"} and {c[0] for c in calls} == {"fr", "tt"}
    by = {c[1]: c[2] for c in calls}
    assert by["lr-ft-3e-4"] == ["--finetune-weights", "--lr", "3e-4"]
    assert by["lr-s3r-3e-2"] == ["--prune-rate", "0.9", "--no-fix-attn", "--lr", "3e-2"]
    assert res["cpu_minutes"] == pytest.approx(14 * 6 / 60)  # the 14 cells that trained
    md = (results / "miniature_lr.md").read_text()
    assert "| head | 3e-2 | 20.0 | 60.0 | 40.0 | **chosen** |" in md and "s3r none (kept 1e-2)" in md
    assert "At the edge of its grid, so possibly not the best lr: head 3e-2, ft 3e-4." in md
    assert json.loads((results / "miniature_lr.json").read_text())["selected"] == res["selected"]
    mini.use_lrs(mini.selected_lrs())  # what main() does after the stage
    assert mini.METHODS["head"][-1] == "3e-2" and mini.METHODS["ft"][-1] == "3e-4"
    assert mini.METHODS["s3r-0.9"][-1] == "1e-2" and mini.FT_LR == "3e-4"  # s3r kept the demo corpus's lr
    with pytest.raises(SystemExit, match="es is reported by the grid"):
        mini.run_lr(tmp_path, ["fr", "es"], 1)


# ----------------------------------------------------------------------------------------------------------------
# One real cell: train.py + eval.py, and what its cache is keyed on


def run_in_process(cmd: list, log_path: Path, threads: int) -> float:
    """mini.run_logged's commands, run in this process (an interpreter start costs seconds on a loaded machine)."""
    import eval as s3r_eval
    import s3r.routes
    import train
    args = [str(c) for c in cmd[1:]]
    mains = {"train.py": train.main, "eval.py": s3r_eval.main}
    if args[0] in mains:
        code = mains[args[0]](args[1:])
    elif args[:2] == ["-m", "s3r.routes"]:
        code = s3r.routes.main(args[2:])
    else:
        raise AssertionError(f"not a command the miniature's tests run: {args}")
    if code:
        raise RuntimeError(f"{args[0]} failed (exit {code})")
    return 0.0


@pytest.fixture(scope="module")
def mini_out(tmp_path_factory, tiny_corpus, tiny_init):
    """A miniature output folder whose corpus is a tiny CommonVoice-layout French set (tone speech, 8 utterances:
    4 train, 2 dev, 2 test; phone sets closed as the corpus stage closes them), with one real cell: S3-Router 0.9
    trained 2 updates from the tiny checkpoint and scored on dev. Returns (folder, its result)."""
    out = tmp_path_factory.mktemp("miniature")
    cv = tiny_corpus("commonvoice", num=8, fresh=True, voice="tone", lang="fr", release=mini.RELEASE)
    shutil.move(cv, out / "corpus")
    mini.close_phone_set(out / "corpus" / mini.RELEASE / "fr")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mini, "RECIPE", TINY_RECIPE)
        mp.setattr(mini, "run_logged", run_in_process)
        result = mini.train_cell(out, "fr", "s3r-0.9", 1, CELL_ARGS, 1, init=tiny_init, split="dev")
    return out, result


CELL_ARGS = ["--prune-rate", "0.9", "--no-fix-attn", "--lr", "1e-2"]


def test_a_cell_is_cached_by_backbone_recipe_lr_corpus_and_threads(mini_out, tiny_init, tmp_path, monkeypatch):
    out, r = mini_out
    monkeypatch.setattr(mini, "RECIPE", TINY_RECIPE)
    cell = out / "cells" / "fr" / "s3r-0.9-s1"
    scored = json.loads((cell / "dev.json").read_text())
    assert r["split"] == "dev" and r["per"] == scored["per"] and r["dev_utterances"] == scored["utterances"] >= 1
    assert r["threads"] == 1 and r["recipe"] == TINY_RECIPE + CELL_ARGS and not (cell / "test.json").exists()
    valid = [v for line in (cell / "log.jsonl").read_text().splitlines() if "per" in (v := json.loads(line))]
    assert [v["update"] for v in valid] == [1, 2] and all(0 <= v["blank_rate"] <= 1 for v in valid)

    trained = []
    monkeypatch.setattr(mini, "run_logged", lambda cmd, *a: trained.append(cmd) or 0.0)
    assert mini.train_cell(out, "fr", "s3r-0.9", 1, CELL_ARGS, 1, init=tiny_init, split="dev") == r
    assert trained == []  # same backbone, recipe, lr, split and threads: cached
    other = tmp_path / "other.pt"
    other.write_bytes(tiny_init.read_bytes() + b"\0")  # another backbone file (never loaded here)
    shutil.copytree(cell, tmp_path / "cell")
    remade = {"train": "fr-train", "valid": "fr-dev", "dev": "fr-dev", "root": mini.corpus_root(out),
              "corpus": '{"maker": "another"}'}  # the same data names over a corpus made otherwise (a task's)
    changes = (dict(threads=2), dict(args=mini.with_lr(CELL_ARGS, "3e-3")), dict(split="test"), dict(init=other),
               dict(data=remade))
    for changed in changes:
        call = dict(args=CELL_ARGS, threads=1, split="dev", init=tiny_init, data=None) | changed
        with pytest.raises(FileNotFoundError):  # run_logged trained nothing: no checkpoint to evaluate
            mini.train_cell(out, "fr", "s3r-0.9", 1, call["args"], call["threads"], init=call["init"],
                            split=call["split"], data=call["data"])
        assert [c[1] for c in trained] == ["train.py", "eval.py"], changed  # recomputed: train.py ran again
        assert not (cell / "result.json").exists()
        trained.clear()
        shutil.rmtree(cell, ignore_errors=True)
        shutil.copytree(tmp_path / "cell", cell)


# ----------------------------------------------------------------------------------------------------------------
# Collapsed runs: counted, investigated, reported


def write_cell(out: Path, lang: str, name: str, per: float, valid=(), loss=(), warned=None, args=("--lr", "3e-3")):
    """A finished grid cell as train_cell leaves it: result.json and (unless `valid` is empty) train.py's log.jsonl
    lines: (update, per, blank_rate, empty) per validation, (update, loss) per log line, a collapse warning."""
    cell = out / "cells" / lang / name
    cell.mkdir(parents=True)
    method, seed = name.rsplit("-s", 1)
    (cell / "result.json").write_text(json.dumps({
        "lang": lang, "method": method, "seed": int(seed), "per": per, "train_cpu_s": 60.0, "args": list(args),
        "backbone_sha256": mini.file_sha256(mini.BACKBONE), "checkpoint": f"cells/{lang}/{name}/checkpoint_best.pt"}))
    lines = [{"event": "start", "update": 0, "config": {"valid": "x"}}]
    lines += [{"update": u, "loss": v, "lr": 1e-3} for u, v in loss]
    lines += [{"valid": f"{lang}-dev", "update": u, "per": p, "blank_rate": b, "empty": e} for u, p, b, e in valid]
    lines += [{"update": warned, "warning": "collapsed"}] if warned else []
    if valid:
        (cell / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def collapsed_grid(tmp_path):
    """nl: ft seed 1 collapsed (PER 95%, blank-only, warned at 100) and rerun (lower lr fine, longer warm-up not);
    head seed 1 blank-only at its last validation though its best checkpoint scored 50%; the other two fine (head
    seed 2 from before the blank rate was logged)."""
    out = tmp_path / "out"
    write_cell(out, "nl", "ft-s1", 0.95, valid=[(100, 0.99, 1.0, 1.0), (200, 1.0, 1.0, 1.0)],
               loss=[(10, 250.0), (200, 180.0)], warned=100)
    write_cell(out, "nl", "ft-s2", 0.30, valid=[(100, 0.5, 0.7, 0.0), (200, 0.3, 0.6, 0.0)], loss=[(10, 240.0)])
    write_cell(out, "nl", "head-s1", 0.50, valid=[(100, 0.5, 0.8, 0.0), (200, 1.0, 0.995, 0.9)], loss=[(10, 9.0)])
    write_cell(out, "nl", "head-s2", 0.20)
    write_cell(out, "nl", "ft-lowlr-s1", 0.40, valid=[(200, 0.4, 0.7, 0.0)], args=("--lr", "1e-3"))
    write_cell(out, "nl", "ft-warmup-s1", 0.97, valid=[(200, 1.0, 1.0, 1.0)])
    return out


def test_collapsed_runs_are_found_and_trained_again(collapsed_grid, monkeypatch):
    calls = []
    monkeypatch.setattr(mini, "train_cell", lambda out, lang, m, seed, args, threads, tag="": calls.append(
        (lang, m, seed, tag, args)))
    mini.use_lrs(mini.DEMO_LRS)
    found = mini.run_collapse(collapsed_grid, ["nl"], ["head", "ft"], [1, 2], jobs=2)
    assert found == [{"lang": "nl", "method": "head", "seed": 1}, {"lang": "nl", "method": "ft", "seed": 1}]
    by = {(m, tag): args for _, m, _, tag, args in calls}
    assert len(calls) == 4 and by["ft", "-lowlr"] == ["--finetune-weights", "--lr", "1e-3"]  # 3e-3, one step down
    assert by["head", "-lowlr"][-2:] == ["--lr", "3e-3"]  # 1e-2, one step down
    assert by["ft", "-warmup"] == ["--finetune-weights", "--lr", "3e-3", "--phase-ratio", "0.3", "0.2", "0.5"]


def test_report_counts_and_explains_collapsed_runs(collapsed_grid, results):
    import argparse
    mini.use_lrs(mini.DEMO_LRS)
    a = argparse.Namespace(langs=["nl"], methods=["head", "ft"], seeds=[1, 2], curve_rates=mini.CURVE_RATES)
    mini.report(collapsed_grid, a)
    md = (results / "miniature.md").read_text()
    assert "| nl | 35.0 ±15.0† | 62.5 ±32.5† |" in md
    assert "| runs that collapsed (†) | 1 of 2 | 1 of 2 |" in md
    assert ("| nl | ft | 1 | 95.0 | 100: 99 / 100, 200: 100 / 100 | 100% | 250.0 (10), 180.0 (200) | 100 | 40.0, lr "
            "1e-3 | 97.0 (collapsed) |") in md
    assert "| nl | head | 1 | 50.0 | 100: 50 / 80, 200: 100 / 100 | 90% | 9.0 (10) | - | not run | not run |" in md
    assert "The lower lr removed the collapse in 1 of 1 runs." in md
    assert "The longer warm-up removed the collapse in 0 of 1 runs." in md
    summary = json.loads((results / "miniature.json").read_text())
    assert [(r["method"], r["seed"]) for r in summary["collapsed"]] == [("ft", 1), ("head", 1)]
    assert "Status: 4 of 4 application-1 cells finished" in md
    mini.report(collapsed_grid, argparse.Namespace(**{**vars(a), "methods": ["ft"], "seeds": [1]}))
    assert "Status: 1 of 1 application-1 cells finished" in (results / "miniature.md").read_text()  # ft seed 1 only


# ----------------------------------------------------------------------------------------------------------------
# Mask similarity: permutation p-values, and which lr is robust


def fake_similarity(ref: dict, masks: dict, method="s3r-0.9", lr="1e-2", control=None) -> dict:
    """s3r.analysis similarity's JSON for hand-set pair values: `ref` and `masks` map "A|B" to a similarity."""
    pairs = [{"a": k.split("|")[0], "b": k.split("|")[1],
              "overall": {"cosine": v, "pruned_cosine": v / 2, "cosine_random": 0.1, "pruned_cosine_random": 0.05}}
             for k, v in masks.items()]
    return {"method": method, "lr": lr, "names": sorted({n for k in masks for n in k.split("|")}), "pairs": pairs,
            "reference": {"pairs": [k.split("|") for k in ref], "values": list(ref.values())},
            "seed_control": control}


def test_permutation_p_values_by_hand():
    """3 languages: relabelling them permutes the 3 pair values in all 6 ways. Masks ordered as the reference:
    r = 1, reached by the identity only (p = 1/6); masks (1, 3, 2): r = 0.5, reached by 3 of the 6 orders
    (1,3,2), (1,2,3) and (2,3,1) (p = 1/2)."""
    ref = {"A|B": 1.0, "A|C": 2.0, "B|C": 3.0}
    t = mini.permutation_test(fake_similarity(ref, {"A|B": 1.0, "A|C": 2.0, "B|C": 3.0}), "cosine")
    assert (t["pearson"], t["pearson_p"], t["spearman_p"], t["permutations"], t["exact"]) == (1.0, 1 / 6, 1 / 6, 6,
                                                                                              True)
    t = mini.permutation_test(fake_similarity(ref, {"A|B": 1.0, "A|C": 3.0, "B|C": 2.0}), "cosine")
    assert t["pearson"] == pytest.approx(0.5) and t["pearson_p"] == t["spearman_p"] == 0.5
    # more orders than permutations: that many at random, the identity first (r = 1 is reached by it alone)
    names = [f"L{i}" for i in range(5)]
    ref = {f"{a}|{b}": float(i * 7 % 11) for i, (a, b) in enumerate((a, b) for j, a in enumerate(names)
                                                                    for b in names[j + 1:])}
    t = mini.permutation_test(fake_similarity(ref, dict(ref)), "cosine", permutations=50)
    assert not t["exact"] and t["permutations"] == 50 and 1 / 50 <= t["pearson_p"] < 0.2


def test_report_says_which_lr_is_robust(tmp_path, results):
    import argparse
    import itertools
    names = ["A", "B", "C", "D", "E"]
    keys = [f"{a}|{b}" for a, b in itertools.combinations(names, 2)]
    ref = {k: float(i) for i, k in enumerate(keys)}
    good = fake_similarity(ref, {k: 0.1 + 0.01 * i for i, k in enumerate(keys)}, "s3r-0.9-lr3e-3", "3e-3",
                           {"same_language_two_seeds": 0.16, "two_languages_same_seed": 0.14})
    flat = fake_similarity(ref, {k: 0.1 + 0.01 * (i * 3 % 10) for i, k in enumerate(keys)}, "s3r-0.9", "1e-2",
                           {"same_language_two_seeds": 0.13, "two_languages_same_seed": 0.12})
    out = tmp_path / "out"
    out.mkdir()
    mini.use_lrs(mini.DEMO_LRS)
    for sim in (flat, good):
        sim["permutation"] = {k: mini.permutation_test(sim, k) for k in ("cosine", "pruned_cosine")}
        (out / f"similarity-{sim['method']}.json").write_text(json.dumps(sim))
    mini.report(out, argparse.Namespace(langs=["nl"], methods=["head"], seeds=[1], curve_rates=mini.CURVE_RATES))
    md = (results / "miniature.md").read_text()
    # the masks ordered as the reference: r = 1, reached by the 120 relabellings' identity only
    assert "| s3r-0.9-lr3e-3 | 3e-3 | cosine, kept sets (upstream's measure) | 0.1450 | 0.1000 | 1.00 (0.008) | " \
           "1.00 (0.008) |  |  |" in md
    assert "- s3r-0.9-lr3e-3 (lr 3e-3): robust." in md
    assert "- s3r-0.9 (lr 1e-2): not robust (p >= 0.05)." in md
    summary = json.loads((results / "miniature.json").read_text())
    assert {s["method"]: s["permutation"]["cosine"]["pearson_p"] for s in summary["similarity"]}["s3r-0.9-lr3e-3"] \
        == 1 / 120


# ----------------------------------------------------------------------------------------------------------------
# Application 2: language and task routes in one bundle


@pytest.mark.slow
def test_bundle_serves_language_and_task_routes_as_their_checkpoints(mini_out, tiny_init, tmp_path, monkeypatch,
                                                                     results):
    """A French CTC route and a language-ID route (tone speech, 6 languages x 4 clips), each trained 2 updates with
    its ft counterpart; eval.py on the bundle scores each route's test split exactly as on its own checkpoint."""
    out = tmp_path / "out"
    shutil.copytree(mini_out[0] / "corpus", out / "corpus")
    monkeypatch.setattr(mini, "RECIPE", TINY_RECIPE)
    monkeypatch.setattr(mini, "TASK_RECIPE", [x for x in TINY_RECIPE if x not in ("--units", "phone")])
    monkeypatch.setattr(mini, "TASKS", {"lid": ("languages", {"per_class": 4}, ("lid/train.tsv", "lid/valid.tsv",
                                                                                 "lid/test.tsv"))})
    monkeypatch.setattr(mini, "TASK_TONE", True)
    monkeypatch.setattr(mini, "BACKBONE", tiny_init)
    monkeypatch.setattr(mini, "run_logged", run_in_process)
    mini.use_lrs(mini.DEMO_LRS)
    for method in ("s3r-0.9", "ft"):  # here, not in run_bundle's threads: train.py in-process wants the main thread
        mini.train_cell(out, "fr", method, 1, mini.METHODS[method], 1)
        mini.task_cell(out, "lid", method, 1, 1)
    res = mini.run_bundle(out, ["fr"], tasks=("lid",))
    assert res["languages"] == ["fr"] and res["tasks"] == ["lid"]
    served = res["served"]
    fr = json.loads((out / "cells" / "fr" / "s3r-0.9-s1" / "test.json").read_text())
    lid = json.loads((out / "cells" / "task-lid" / "s3r-0.9-s1" / "test.json").read_text())
    assert (served["fr"]["metric"], served["fr"]["checkpoint"]) == ("per", fr["per"])
    assert (served["lid"]["metric"], served["lid"]["checkpoint"]) == ("accuracy", lid["accuracy"])
    assert lid["utterances"] == 6 and "accuracy" in json.loads((out / "bundle" / "served-lid.json").read_text())
    assert res["majority"] == {"lid": 1 / 6}  # 6 languages, one test clip each
    assert served["fr"]["equal"] and served["lid"]["equal"], served
    assert res["bundle_bytes"] == (out / "bundle" / "all.bundle").stat().st_size
    assert res["separate_finetuned_bytes"] == sum((out / "bundle" / f"{n}.ft.pt").stat().st_size for n in ("fr", "lid"))
    assert "lid" in (out / "bundle" / "info.txt").read_text()
    monkeypatch.setattr(mini, "run_logged", lambda *a: pytest.fail("nothing changed: nothing to run"))
    assert mini.run_bundle(out, ["fr"], tasks=("lid",)) == res
    md = "\n".join(mini.bundle_md(res))
    assert "1 languages (fr) and 1 tasks (lid" in md and "2 of 2 routes score exactly" in md
    assert "(always answering the most frequent class: lid 16.7%)" in md


# ----------------------------------------------------------------------------------------------------------------
# Application 3: the pruning curve's rows


def test_curve_rows_read_each_points_test_score_from_its_cell(mini_out, tmp_path):
    """The dense ft cell, a PARP cell and an IMP cell (whose checkpoint lies in its last round's folder, its test
    score in the cell's): each row carries its own cell's test PER; every point is the same checkpoint here, an
    S3-Router route keeping 90% of each attention and FFN matrix, so every sparsity is ~10% (top-k rounding)."""
    out = tmp_path / "out"
    routed = mini_out[0] / mini_out[1]["checkpoint"]
    for name, ckpt, per in (("ft-s1", "checkpoint_best.pt", 0.30), ("parp-0.5-s1", "checkpoint_best.pt", 0.25),
                            ("imp-0.5-s1", "round3/checkpoint_best.pt", 0.20), ("ft-more-s1", "checkpoint_best.pt",
                                                                                0.28),
                            ("imp1-0.5-s1", "round1/checkpoint_best.pt", 0.22)):
        cell = out / "cells" / "fr" / name
        (cell / ckpt).parent.mkdir(parents=True)
        shutil.copyfile(routed, cell / ckpt)
        (cell / "test.json").write_text(json.dumps({"per": per}))
        (cell / "result.json").write_text(json.dumps({"per": per, "checkpoint": f"cells/fr/{name}/{ckpt}"}))
    curve = mini.curve_rows(out, "fr", 1, [0.5])
    assert [(r["kind"], r["prune_rate"], r["per"]) for r in curve["rows"]] == [
        ("dense", 1.0, 0.30), ("parp", 0.5, 0.25), ("imp", 0.5, 0.20)]
    assert all(r["sparsity"] == pytest.approx(0.1, abs=0.002) for r in curve["rows"])
    assert curve["rows"][2]["checkpoint"] == "cells/fr/imp-0.5-s1/round3/checkpoint_best.pt"
    assert [(c["kind"], c["prune_rate"], c["per"]) for c in curve["controls"]] == [  # imp1 at max and min rate: once
        ("ft-more", 1.0, 0.28), ("imp1", 0.5, 0.22)]


# ----------------------------------------------------------------------------------------------------------------
# The claims table


def test_claims_from_hand_set_results():
    mean = {"es": {"head": 0.10, "ft": 0.20, "s3r-0.9": 0.12, "s3r-0.9-fa": 0.08},
            "nl": {"head": 0.12, "ft": 0.15, "s3r-0.9": 0.18, "s3r-0.9-fa": 0.16}}
    served = {"es": {"kind": "language", "metric": "per", "checkpoint": 0.08, "bundle": 0.08, "equal": True,
                     "finetuned": 0.20},
              "ks": {"kind": "task", "metric": "accuracy", "checkpoint": 0.90, "bundle": 0.90, "equal": True,
                     "finetuned": 0.95},
              "lid": {"kind": "task", "metric": "accuracy", "checkpoint": 0.80, "bundle": 0.80, "equal": True,
                      "finetuned": 0.805}}
    bundle = {"served": served, "file_change_percent": -60.0, "arithmetic": {"fp32": {"change_percent": -65.0}},
              "method": "s3r-0.9", "seed": 1, "task_seeds": {"ks": {"s3r-0.9": {"1": 0.90, "2": 0.96},
                                                                   "ft": {"1": 0.95, "2": 0.95, "3": 0.10}}}}
    row = lambda kind, rate, per: {"kind": kind, "prune_rate": rate, "per": per, "granularity": "weight"}  # noqa: E731
    curve = {"lang": "es", "rows": [row("dense", 1.0, 0.05), row("prune", 0.7, 0.05), row("omp", 0.7, 0.055),
                                    row("parp", 0.7, 0.045), row("prune", 0.3, 0.06), row("omp", 0.3, 0.20),
                                    row("imp", 0.3, 0.03)],
             "controls": [{"method": "finetuned + 200 updates (dense)", "kind": "ft-more", "prune_rate": 1.0,
                           "per": 0.04}, {"method": "IMP, 1 round", "kind": "imp1", "prune_rate": 0.3, "per": 0.07}]}
    good = fake_similarity({"A|B": 1.0, "A|C": 2.0, "B|C": 3.0}, {"A|B": 1.0, "A|C": 2.0, "B|C": 3.0}, lr="3e-3",
                           control={"same_language_two_seeds": 0.2, "two_languages_same_seed": 0.1})
    rows = {r["claim"][:2]: r for r in mini.claim_rows(mean, bundle, curve, [good])}
    # 1: s3r-0.9-fa beats ft on es (8 < 20), loses on nl (16 > 15); mean 12.0 < 17.5: neither every language nor
    # behind on average
    assert rows["1."]["verdict"] == "unclear"
    assert rows["1."]["loses"] == ["nl: ft 15.0 vs 16.0", "nl: head only 12.0 vs 16.0"]
    assert "s3r-0.9-fa 12.0, s3r-0.9 15.0, ft 17.5, head only 11.0" in rows["1."]["evidence"]
    assert rows["2."]["verdict"] == "holds" and "-60.0% bytes" in rows["2."]["evidence"]
    # 3: at 0.7 PARP is 0.5 points ahead (comparable), at 0.3 IMP 3 points ahead: 1 of 4 comparisons lost, but the
    # only one with IMP, so IMP is better at most of its sparsities
    assert rows["3."]["verdict"] == "does not hold" and rows["3."]["loses"] == ["IMP at 70% sparsity by 3.0 points"]
    assert rows["3."]["evidence"].startswith("IMP better at most sparsities; es, 2 sparsities:")
    curve_omp = {**curve, "rows": [r for r in curve["rows"] if r["kind"] != "imp"] + [row("omp", 0.2, 0.10),
                                                                                       row("prune", 0.2, 0.25)]}
    three = mini.claim_rows(mean, bundle, curve_omp, [good])[2]  # behind OMP at 1 of its 3 sparsities: unclear
    assert three["verdict"] == "unclear" and three["loses"] == ["OMP at 80% sparsity by 15.0 points"]
    assert rows["3."]["evidence"].endswith("; control, finetuned + 200 updates (dense): 4.0; control, IMP, 1 round at "
                                           "70%: 7.0")
    # 4: one route set, r = 1 but with 3 languages p = 1/6: not significant
    assert rows["4."]["verdict"] == "does not hold" and "p 0.167" in rows["4."]["evidence"]
    # multitask: ks 2 points behind ft over seeds 1-2 (93 vs 95; ft's seed 3 has no route to pair), lid (the bundle's
    # seed only) 0.5 behind (comparable): 1 of 2 lost
    assert rows["Mu"]["verdict"] == "unclear" and rows["Mu"]["loses"] == ["ks: ft 95.0% vs 93.0%"]
    assert rows["Mu"]["evidence"].startswith("ks accuracy 93.0% (ft 95.0%), lid accuracy 80.0% (ft 80.5%) (test, mean "
                                             "of 2 seeds)")
    fp32 = {"change_percent": -65.0, "shared_plus_routes_bytes": 1, "dense_models_bytes": 2}
    md = "\n".join(mini.bundle_md({**bundle, "languages": ["es"], "tasks": ["ks", "lid"], "bundle_bytes": 1,
                                   "separate_finetuned_bytes": 2, "arithmetic": {"fp32": fp32},
                                   "served": {n: {**v, "route_bytes": 1, "finetuned_bytes": 2}
                                              for n, v in served.items()}}))
    assert "| ks | 90.0 / 95.0 | 96.0 / 95.0 | 93.0 / 95.0 |" in md and "| lid | 80.0 / 80.5 | - | 80.0 / 80.5 |" in md
    assert [r["verdict"] for r in mini.claim_rows({}, None, None, [])] == ["not run"] * 5
    # twice the updates: ft overtakes s3r-0.9 on es (5 < 7), the one budget language: 1 does not hold
    budget = {"es": {"ft": {200: 0.20, 400: 0.05}, "s3r-0.9": {200: 0.12, 400: 0.07}}}
    one = mini.claim_rows(mean, bundle, curve, [good], budget)[0]
    assert one["verdict"] == "does not hold" and one["loses"][-1] == "es at 400 updates: ft 5.0 vs s3r-0.9 7.0"
    fine = {"es": {"ft": {200: 0.20, 400: 0.10}, "s3r-0.9": {200: 0.08, 400: 0.05}}}
    all_win = {lg: {"head": 0.3, "ft": 0.20, "s3r-0.9": 0.10, "s3r-0.9-fa": 0.10} for lg in ("es", "nl")}
    assert mini.claim_rows(all_win, None, None, [], fine)[0]["verdict"] == "holds"
    assert mini.claim_rows(all_win, None, None, [], {**fine, **{"nl": budget["es"]}})[0]["verdict"] == "unclear"
    assert one["evidence"].endswith("; es seed 1, 200 -> 400 updates: ft 20.0 -> 5.0, s3r-0.9 12.0 -> 7.0")


def test_the_budget_stage_doubles_the_updates_of_the_grid_cells(tmp_path, monkeypatch, results):
    calls = []
    monkeypatch.setattr(mini, "train_cell", lambda out, lang, m, seed, args, threads, tag="": calls.append(
        (lang, m, seed, tag, args)))
    mini.run_budget(tmp_path, jobs=2, langs=["es"], methods=["ft", "s3r-0.9"])
    assert sorted(calls) == [("es", "ft", 1, "-u400", ["--finetune-weights", "--lr", "3e-3", "--max-updates", "400"]),
                             ("es", "s3r-0.9", 1, "-u400", ["--prune-rate", "0.9", "--no-fix-attn", "--lr", "1e-2",
                                                            "--max-updates", "400"])]
    write_cell(tmp_path, "es", "ft-s1", 0.30)
    write_cell(tmp_path, "es", "ft-u400-s1", 0.20)
    write_cell(tmp_path, "es", "s3r-0.9-u400-s1", 0.25)  # no 200-update cell: not a row
    assert mini.budget_rows(tmp_path, ["es"], ["ft", "s3r-0.9"]) == {"es": {"ft": {200: 0.30, 400: 0.20}}}
    assert "| es | 30.0 -> 20.0 |" in "\n".join(mini.budget_md(mini.budget_rows(tmp_path, ["es"], ["ft"])))


def test_report_writes_the_claims_table_into_the_readme(collapsed_grid, results):
    import argparse
    readme = results.parent / "README.md"
    readme.write_text(f"# x\n\nbefore\n{mini.CLAIMS_START}\nold\n{mini.CLAIMS_END}\n\nafter\n")
    mini.use_lrs(mini.DEMO_LRS)
    mini.report(collapsed_grid, argparse.Namespace(langs=["nl"], methods=["head", "ft"], seeds=[1, 2],
                                                   curve_rates=mini.CURVE_RATES))
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{mini.CLAIMS_END}\n\nafter\n") and "old" not in text
    block = text.split(mini.CLAIMS_START)[1].split(mini.CLAIMS_END)[0]
    assert block.count("**not run**") == 5  # nl has no s3r cells, nothing else ran
    assert block.strip().endswith("(bench/results/miniature.md); not run: its cells have not finished.")
    md = (results / "miniature.md").read_text()
    assert md.index("## The paper's claims here") < md.index("## Application 1") and block.strip() in md


def test_the_command_line_runs_the_report_stage(tmp_path, tiny_init, results, monkeypatch):
    """`--stage report` on an empty output folder: every method at the current lrs, nothing finished, every claim
    "not run"; an unknown method or a missing backbone is a one-line error."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(mini, "BACKBONE", mini.BACKBONE)  # main() sets it: restored after the test
    mini.main(["--stage", "report", "--out", str(out), "--backbone", str(tiny_init)])
    md = (results / "miniature.md").read_text()
    assert md.count("**not run**") == 5 and f"0 of {6 * len(mini.METHODS) * 2} application-1 cells" in md
    assert f"Backbone: `{tiny_init}` (sha256 {mini.file_sha256(tiny_init)[:12]})." in md
    assert f"`python -m tools.miniature --backbone {tiny_init}`" in md
    with pytest.raises(SystemExit, match="--methods s3r-0.8: not a method"):
        mini.main(["--stage", "report", "--out", str(out), "--backbone", str(tiny_init), "--methods", "s3r-0.8"])
    with pytest.raises(SystemExit, match="--backbone nope.pt: no such file"):
        mini.main(["--stage", "grid", "--out", str(out), "--backbone", "nope.pt"])
