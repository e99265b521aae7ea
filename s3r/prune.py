"""Magnitude pruning with weight finetuning: PARP and IMP, the two baselines of S3-Router's pruning figure that
retrain the weights (application 3; the other two are `python -m s3r.routes omp` and S3-Router pruning, train.py).

PARP (Lai et al., NeurIPS 2021, "Prune, Adjust and Re-Prune"), in one finetuning run:
  1. prune: the initial mask keeps each tensor's `kept_count` largest |W| of the *pretrained* weights (the paper's
     MPI, task-agnostic), or of another checkpoint's (a finetuned or other-language model: `--parp-mask-from`);
  2. adjust: weight finetuning with the pruned weights zeroed in the forward pass while ALL weights, pruned ones
     included, receive gradients (`revive`), so a pruned weight that matters can grow;
  3. re-prune: every `--reprune-interval` updates (and after the last) the mask is re-selected by |W| at the target
     sparsity, so a grown weight is back in; the final mask is applied and stored as a dense checkpoint with zeros.
        python train.py --parp --prune-rate 0.3 --no-fix-attn --reprune-interval 50 ...   # -> checkpoint_pruned.pt
IMP (iterative magnitude pruning with rewinding, the lottery-ticket baseline of the PARP and S3-Router papers):
rounds of finetune -> prune the smallest |W| of the finetuned weights -> rewind the survivors to their pretrained
values; the kept fraction falls geometrically to `--prune-rate` in `--rounds` rounds (round 0 is dense).
        python -m s3r.prune imp PRETRAINED.pt OUT --prune-rate 0.3 --rounds 3 -- --data train-1h --data-root /data
Both reuse S3-Router's masked layers: a PARP mask is the layer's `scores` set to W (`weight_magnitude_with_scale`),
frozen, so the mask is the top-`kept_count` |W| exactly as upstream counts; only the selection moves, the
weights train. Per-weight masks only (no structured granularity).
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import load_pretrained, s3r_checkpoint, save_atomic
from .compact import fold_masks
from .config import RouteConfig
from .errors import ConfigError, S3RError
from .model import Wav2Vec2ForCTC, kept_count, topk_mask
from .text import Vocabulary

PARP_REPRUNE_INTERVAL = 50  # the PARP paper's n: updates between re-prunings
PRUNED_NAME = "checkpoint_pruned.pt"  # a PARP run's result: the final mask applied, a dense model with zeros
TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"


# ----------------------------------------------------------------------------------------------------------------
# PARP


def pruned_layers(model: Wav2Vec2ForCTC, route: RouteConfig) -> dict:
    """The layers magnitude pruning masks: those `route` routes (attention and FFN unless --fix-attn / --fix-fc)."""
    if route.route_granularity != "weight":
        raise ConfigError(f"PARP and IMP prune single weights: route granularity {route.route_granularity!r} is "
                          f"S3-Router's and OMP's only")
    return model.routable_layers(route)


@torch.no_grad()
def start_parp(model: Wav2Vec2ForCTC, route: RouteConfig, mask_from: Wav2Vec2ForCTC | None = None,
               revive: bool = True) -> Wav2Vec2ForCTC:
    """PARP's step 1 on a model set up for weight finetuning: each pruned layer's mask keeps the kept_count largest
    |W| of its weights (MPI), or of `mask_from`'s; `revive`: pruned weights still receive gradients (step 2)."""
    sources = pruned_layers(mask_from, route) if mask_from is not None else {}
    for name, module in pruned_layers(model, route).items():
        if mask_from is not None and name not in sources:
            raise ConfigError(f"--parp-mask-from: the checkpoint has no {name}")
        module.add_scores(route.prune_rate, "weight_magnitude_with_scale")  # scores = W: the mask is top-k |W|
        if mask_from is not None:
            other = sources[name].dense_weight()
            if other.shape != module.scores.shape:
                raise ConfigError(f"--parp-mask-from: {name} has shape {tuple(other.shape)}, the model "
                                  f"{tuple(module.scores.shape)}")
            module.scores.copy_(other)
        module.scores.requires_grad_(False)  # the selection is by |W| alone; the weights are what trains
        module.revive = revive
    model.route_config = replace(route, init_score="weight_magnitude_with_scale", score_scale=1.0, co_train=True)
    return model


def reprune_due(update: int, interval: int, last: int) -> bool:
    """PARP re-prunes every `interval` updates and after the `last` one (0: never, the mask stays fixed)."""
    return interval > 0 and (update % interval == 0 or update >= last)


@torch.no_grad()
def reprune(model: Wav2Vec2ForCTC) -> int:
    """PARP's step 3: every mask re-selected as the kept_count largest |W| of the weights now (ties by position, as
    topk_mask). Returns how many weights came back into the masks (as many left them)."""
    revived = 0
    for module in model.routed().values():
        before = module.mask()
        module.scores.copy_(module.dense_weight())
        module._mask_cache.clear()
        revived += int((module.mask() & ~before).sum())
    return revived


def save_pruned(model: Wav2Vec2ForCTC, vocab: Vocabulary | None, path: str | Path) -> None:
    """The masks multiplied into a copy of the weights: a dense s3r checkpoint with real zeros (eval.py, export)."""
    save_atomic(s3r_checkpoint(fold_masks(copy.deepcopy(model)), vocab), path)


# ----------------------------------------------------------------------------------------------------------------
# IMP


def imp_schedule(prune_rate: float, rounds: int) -> list[float]:
    """The kept fraction after each of `rounds` prunings: prune_rate ** (r / rounds), so each pruning removes the
    same fraction of what is left and the last reaches `prune_rate`."""
    if rounds < 1 or not 0.0 < prune_rate <= 1.0:
        raise ConfigError(f"IMP needs --rounds >= 1 and --prune-rate in (0, 1], not {rounds} and {prune_rate}")
    return [prune_rate ** (r / rounds) for r in range(1, rounds + 1)]


@torch.no_grad()
def prune_and_rewind(finetuned: Wav2Vec2ForCTC, pretrained: Wav2Vec2ForCTC, route: RouteConfig,
                     prune_rate: float) -> Wav2Vec2ForCTC:
    """`pretrained`, in place, with each pruned layer keeping only the kept_count(numel, prune_rate) weights that are
    largest in |W| in `finetuned`, at their pretrained values (rewinding); the others become 0."""
    theirs = pruned_layers(finetuned, route)
    for name, module in pruned_layers(pretrained, route).items():
        if not hasattr(module, "weight") or name not in theirs:
            raise ConfigError(f"IMP cannot prune {name} (a weight-normed convolution, or not in the finetuned model)")
        w = theirs[name].dense_weight()
        if w.shape != module.weight.shape:
            raise ConfigError(f"IMP: {name} has shape {tuple(w.shape)} in the finetuned model, "
                              f"{tuple(module.weight.shape)} in the pretrained one")
        module.weight.mul_(topk_mask(w.abs(), kept_count(w.numel(), prune_rate)))
    return pretrained


def load_dense(path: str | Path, trust_checkpoint: bool = False) -> Wav2Vec2ForCTC:
    """Any checkpoint as a plain model (a routed one with its masks multiplied in)."""
    model = load_pretrained(path, trust_checkpoint=trust_checkpoint)
    return fold_masks(model) if model.route_config is not None else model


IMP_OWN_FLAGS = ("--init", "--save-dir", "--parp", "--no-parp", "--prune-rate", "--reprune-interval", "--fix-attn",
                 "--no-fix-attn", "--finetune-weights", "--no-finetune-weights", "--parp-mask-from")


def run_imp(pretrained: str | Path, out: str | Path, prune_rate: float, rounds: int, train_args: list[str],
            fix_attn: bool = False, finetuned: str | Path | None = None, launcher: list[str] | None = None) -> Path:
    """Run IMP's rounds, each a train.py run in OUT/round<r> (round 0 dense, unless `finetuned` stands in for it);
    a finished round (its checkpoint_pruned.pt) is skipped, an interrupted one resumed. Returns the last result."""
    out = Path(out)
    schedule = [1.0] + imp_schedule(prune_rate, rounds)
    if own := [a for a in train_args if a.split("=")[0] in IMP_OWN_FLAGS]:
        raise S3RError(f"s3r.prune imp sets {own[0]} itself (per round); leave it out of the train.py arguments")
    plan = {"pretrained": str(Path(pretrained).resolve()), "prune_rate": prune_rate, "rounds": rounds,
            "schedule": schedule, "fix_attn": fix_attn, "train_args": list(train_args),
            "finetuned": str(Path(finetuned).resolve()) if finetuned else None}
    plan_path = out / "imp.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if changed := [k for k in plan if old.get(k) != plan[k]]:
            raise S3RError(f"{out} holds an IMP run with another {changed[0]} ({old.get(changed[0])!r}); use a new "
                           f"folder")
    out.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan, indent=1) + "\n")
    route = RouteConfig(prune_rate=prune_rate, fix_attn=fix_attn)
    launcher = launcher or [sys.executable]
    result = Path(finetuned) if finetuned else None
    for r, keep in enumerate(schedule):
        folder = out / f"round{r}"
        if r == 0 and finetuned:
            continue
        if r == 0:
            init = Path(pretrained)
        else:
            init = folder / "init.pt"
            if not init.exists():  # pretrained weights, survivors of the last round's finetuned ones kept
                model = prune_and_rewind(load_dense(result), load_pretrained(pretrained), route, keep)
                save_atomic(s3r_checkpoint(model), init)
        if not (folder / PRUNED_NAME).exists():
            cmd = [*launcher, str(TRAIN_PY), *train_args, "--init", str(init), "--save-dir", str(folder), "--parp",
                   "--prune-rate", repr(keep), "--reprune-interval", "0", "--fix-attn" if fix_attn else "--no-fix-attn"]
            print(f"IMP round {r}/{rounds}: keep {keep:.4f} of each tensor ({100 * (1 - keep):.1f}% sparsity)\n  "
                  + shlex.join(cmd), flush=True)
            code = subprocess.run(cmd).returncode
            if code != 0:
                raise S3RError(f"IMP round {r}: train.py exited with {code}; the same command resumes")
        result = folder / PRUNED_NAME
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m s3r.prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("imp", help="iterative magnitude pruning with rewinding: train.py per round, resumable",
                       usage="python -m s3r.prune imp PRETRAINED OUT --prune-rate P [--rounds N] -- TRAIN_ARGS...")
    c.add_argument("pretrained", help="the pretrained checkpoint every round rewinds to (train.py --init)")
    c.add_argument("out", help="a folder: imp.json and round0 ... roundN, one train.py --save-dir each")
    c.add_argument("--prune-rate", type=float, required=True, help="fraction of each tensor KEPT at the end (0.3 = "
                   "70%% sparsity)")
    c.add_argument("--rounds", type=int, default=3, help="prunings to reach it, geometrically (default: 3); the "
                   "cost is rounds + 1 finetunings (rounds with --finetuned)")
    c.add_argument("--fix-attn", action="store_true", help="prune the FFN only (default: attention and FFN, as OMP)")
    c.add_argument("--finetuned", help="a weight-finetuned checkpoint of PRETRAINED (e.g. pruning step 1's) as "
                   "round 0, instead of training one")
    c.add_argument("--launcher", default="", help="what runs train.py, e.g. 'torchrun --standalone "
                   "--nproc_per_node=2' (default: this python)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)  # after --: train.py's arguments for every round
    a, train_args = p.parse_args(argv[:split]), argv[split + 1:]
    try:
        result = run_imp(a.pretrained, a.out, a.prune_rate, a.rounds, train_args, a.fix_attn, a.finetuned,
                         shlex.split(a.launcher) or None)
    except (S3RError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"IMP done: {result} keeps {a.prune_rate} of every {'FFN' if a.fix_attn else 'attention and FFN'} tensor")


if __name__ == "__main__":
    main()
