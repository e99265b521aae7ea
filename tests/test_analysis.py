"""Mask similarity, correlations and sparsity (s3r/analysis.py) on hand-made masks and the tiny trained routes."""
import contextlib
import io
import json
import math
import re
import sys

import pytest
import torch

from s3r import load_pretrained, topk_mask
from s3r.analysis import compare, pearson, read_reference, similarity, spearman
from s3r.routes import RouteError


def test_similarity_on_hand_made_masks():
    a = torch.zeros(1000, dtype=torch.bool)
    a[:300] = True
    b = ~a
    s = similarity(a, a)
    assert s["cosine"] == 1.0 and s["iou"] == 1.0 and s["pruned_cosine"] == 1.0
    assert similarity(a, b)["cosine"] == 0.0 and similarity(a, b)["iou"] == 0.0
    assert s["cosine_random"] == pytest.approx(0.3)  # sqrt(d * d)


def test_similarity_counted_by_hand():
    """10 weights; a keeps 0-5, b keeps 3-8: both keep 3 (3, 4, 5); both drop 1 (9)."""
    a, b = torch.zeros(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)
    a[:6], b[3:9] = True, True
    s = similarity(a, b)
    assert s["cosine"] == pytest.approx(3 / 6) and s["iou"] == pytest.approx(3 / 9)
    assert s["pruned_cosine"] == pytest.approx(1 / 4) and s["pruned_iou"] == pytest.approx(1 / 7)
    assert s["cosine_random"] == pytest.approx(3.6 / 6)  # E|a∧b| = 6 * 6 / 10


def test_similarity_of_random_masks():
    torch.manual_seed(0)
    d = 0.6
    x, y = topk_mask(torch.rand(200_000), 120_000), topk_mask(torch.rand(200_000), 120_000)
    r = similarity(x, y)
    assert r["cosine"] == pytest.approx(d, abs=0.005) and r["cosine_random"] == pytest.approx(d)
    assert r["iou"] == pytest.approx(d * d / (2 * d - d * d), abs=0.005)
    assert r["pruned_cosine"] == pytest.approx(1 - d, abs=0.005)
    a = torch.zeros(1000, dtype=torch.bool)
    a[:300] = True
    both = compare({"l1": x, "l2": a}, {"l1": y, "l2": a, "l3": a})
    assert both["only_in_b"] == ["l3"] and both["layers"]["l2"]["cosine"] == 1.0
    assert 0 < both["overall"]["cosine_random"] < 1
    with pytest.raises(RouteError, match="no tensor in common"):
        compare({"l1": x}, {"l2": y})


@pytest.mark.parametrize("x,y,want", [
    ([1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 5.0, 7.0, 9.0, 11.0], 1.0),
    ([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], 0.5),  # by hand: sxy = 1, sxx = syy = 2
    ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], -1.0),
])
def test_pearson(x, y, want):
    assert pearson(x, y) == pytest.approx(want)


@pytest.mark.parametrize("x,y,want", [
    ([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 8.0, 27.0, 64.0, 125.0], 1.0),
    ([1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 4.0, 2.0, 1.0], -0.9746794),  # scipy.stats.spearmanr (ties averaged)
])
def test_spearman(x, y, want):
    assert spearman(x, y) == pytest.approx(want, abs=1e-6)


REFERENCE = {"names": ["a", "b", "c"], "matrix": [[1, 0.2, 0.5], [0.2, 1, 0.9], [0.5, 0.9, 1]]}


@pytest.mark.parametrize("content", [REFERENCE, {"a|b": 0.2, "a|c": 0.5, "b|c": 0.9}], ids=["matrix", "pairs"])
def test_read_reference(tmp_path, content):
    (tmp_path / "r.json").write_text(json.dumps(content))
    ref = read_reference(tmp_path / "r.json")
    assert ref == {frozenset("ab"): 0.2, frozenset("ac"): 0.5, frozenset("bc"): 0.9}


def test_read_reference_refuses_other_files(tmp_path):
    (tmp_path / "r.json").write_text("[1, 2")
    with pytest.raises(RouteError, match=r"r\.json: not a reference similarity file"):
        read_reference(tmp_path / "r.json")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def cli(*args):
    """Run `python -m s3r.analysis ARGS` in this process: (exit code, stdout, stderr)."""
    from s3r import analysis

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            analysis.main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_cli_similarity_with_reference_and_plot(route_files, tmp_path):
    from s3r.checkpoint import save_atomic
    from s3r.routes import omp, route_from_model

    save_atomic(route_from_model(omp(load_pretrained(route_files / "a.pt"), 0.3)), tmp_path / "c.route")
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(REFERENCE))
    code, out, err = cli("similarity", route_files / "a.route", route_files / "b.pt", tmp_path / "c.route", "--json",
                         tmp_path / "sim.json", "--plot", tmp_path / "sim.png", "--reference", ref)
    assert code == 0, err
    sim = json.loads((tmp_path / "sim.json").read_text())
    assert [(p["a"], p["b"]) for p in sim["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert "pearson" in sim["reference"]["cosine"] and "a vs b: cosine" in out
    assert (tmp_path / "sim.png").stat().st_size > 1000


def test_cli_sparsity_of_a_route(route_files):
    code, out, err = cli("sparsity", route_files / "a.route")
    route = torch.load(route_files / "a.route", weights_only=True)
    n = sum(math.prod(e["shape"]) for e in route["layers"].values())
    kept = sum(e["kept"] for e in route["layers"].values())
    assert code == 0, err
    assert out.splitlines()[-1].split() == ["total", f"{n:,}", f"{1 - kept / n:.4f}"]


@pytest.mark.parametrize("args", [["similarity", "{d}/a.route", "--json", "{t}/s.json"],
                                  ["similarity", "{d}/a.route", "{d}/b.route", "--json", "{t}/s.json",
                                   "--reference", "{t}/none.json"],
                                  ["similarity", "{d}/a.route", "{d}/a.route", "--json", "{t}/s.json"],
                                  ["sparsity", "{t}/missing.pt"]],
                         ids=["one-route", "missing-reference", "same-name", "missing-file"])
def test_cli_errors_are_one_line(route_files, tmp_path, args):
    code, out, err = cli(*(a.format(d=route_files, t=tmp_path) for a in args))
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, (args, err)


def test_plot_without_matplotlib(route_files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = cli("similarity", route_files / "a.route", route_files / "b.route", "--json",
                         tmp_path / "s.json", "--plot", tmp_path / "s.png")
    assert code == 2 and "needs matplotlib" in err


def test_the_plot_names_layers_and_shows_the_random_baseline(route_files, tmp_path):
    from s3r.analysis import plot_similarity, run_similarity, short_name
    assert short_name("encoder.layers.11.feed_forward.intermediate_dense.weight") == "11 fc1"
    assert short_name("encoder.layers.0.attention.out_proj.weight") == "0 out"
    result = run_similarity({"a": str(route_files / "a.route"), "b": str(route_files / "b.route")},
                            tmp_path / "s.json")
    layers = list(result["pairs"][0]["layers"])
    fig = plot_similarity(result)
    for ax, key in zip(fig.axes, ("cosine", "pruned_cosine"), strict=True):
        assert [t.get_text() for t in ax.get_xticklabels()] == [short_name(t) for t in layers]
        assert all(re.fullmatch(r"\d+ (q|k|v|out|fc1|fc2)", t.get_text()) for t in ax.get_xticklabels())
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a vs b", "random masks, same densities"]
        solid, dashed = ax.get_lines()[:2]  # the pair, then its random baseline, value for value from the JSON
        assert list(solid.get_ydata()) == [result["pairs"][0]["layers"][t][key] for t in layers]
        assert list(dashed.get_ydata()) == [result["pairs"][0]["layers"][t][f"{key}_random"] for t in layers]
        assert dashed.get_linestyle() == "--"
        low, high = ax.get_ylim()  # the scale reaches 1 (identical masks): no zoom onto the noise around chance
        assert high >= 1.0 and low <= min(min(solid.get_ydata()), min(dashed.get_ydata()))
