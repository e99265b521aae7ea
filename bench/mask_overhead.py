"""Cost of one S3-Router training step against one dense weight-finetuning step of the same model, same batch.

    python -m bench.mask_overhead                       # 4 layers of large width (1024 / 4096 / 16 heads), 4 x 4 s
    python -m bench.mask_overhead --layers 2 --reps 5   # quicker
    python -m bench.mask_overhead --device cuda --dtype bfloat16 --layers 24
    python -m bench.mask_overhead --profile             # also print where each step spends its time

dense   feature extractor frozen (fairseq feature_grad_mult 0), CTC loss, backward, Adam over every other weight.
route   prune_rate 0.9 with attention masked too (fix_attn off), Adam over the scores and the CTC head, then
        model.refresh_masks() (as train.py does). S3R_REFERENCE=1 times the plain reference (a fresh top-k per
        forward) instead of s3r/fast.py's mask cache.
Both models hold the same weights; SpecAugment and LayerDrop are off so every step does the same work. Steps are
interleaved (A B, then B A, ...) and the ratio is the median of the per-repetition ratios, which cancels most
of the drift of a shared machine. `select` is the time the routed step spends choosing its masks (all routed
layers, once per optimizer step, with last step's threshold as a hint); `select (no hint)` is the same selection
done from scratch with a full kthvalue, for comparison.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from s3r import RouteConfig, Wav2Vec2Config, Wav2Vec2ForCTC
from s3r.fast import kth_largest
from s3r.model import Routable, kept_count

SAMPLE_RATE = 16000


def build(args) -> Wav2Vec2ForCTC:
    cfg = Wav2Vec2Config(conv_dim=(args.conv_dim,) * 7, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, intermediate_size=args.ffn, feat_extract_norm="layer",
                         conv_bias=True, layer_norm_first=True, vocab_size=32, layerdrop=0.0, mask_time_prob=0.0)
    torch.manual_seed(0)
    return Wav2Vec2ForCTC(cfg)


def routed_layers(model) -> list[Routable]:
    return list(model.routed().values())


def make_step(model, params, batch, device, dtype):
    wav, lengths, targets, target_lengths = batch
    optimizer = torch.optim.Adam(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-8)
    layers = routed_layers(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> tuple[float, float]:
        """One optimizer step; returns (seconds for the whole step, seconds of it spent selecting masks)."""
        sync()
        t0 = time.perf_counter()
        for layer in layers:  # the forward would do this anyway; done first so that it can be timed alone
            layer.mask()
        sync()
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits, out_lengths = model(wav, lengths)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V)
        loss = F.ctc_loss(log_probs, targets, out_lengths, target_lengths, zero_infinity=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.refresh_masks()
        sync()
        return time.perf_counter() - t0, t1 - t0

    return step


def selection_from_scratch(model) -> float:
    t0 = time.perf_counter()
    for layer in routed_layers(model):
        a = layer.scores.detach().abs().flatten()
        k = kept_count(a.numel(), layer.prune_rate)
        threshold = kth_largest(a, k, None, 0.0)
        int((a >= threshold).sum())
    if layer.scores.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def profile(step, name: str, device, rows: int):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- {name}: top operators by self time ---")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--conv-dim", type=int, default=128,
                   help="channels of the 7 extractor convs (512 in the real models)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--prune-rate", type=float, default=0.9, help="fraction of each routed weight KEPT")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-rows", type=int, default=15)
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    dense, routed = build(args).to(device), build(args).to(device)
    dense.train().freeze_feature_encoder()
    routed.train().route(RouteConfig(prune_rate=args.prune_rate, init_score="kaiming_uniform", fix_attn=False))
    routed_state = routed.state_dict()
    assert all(torch.equal(v, routed_state[k]) for k, v in dense.state_dict().items()), "same weights in both"

    g = torch.Generator().manual_seed(1)
    S = int(args.seconds * SAMPLE_RATE)
    wav = torch.randn(args.batch, S, generator=g).to(device)
    lengths = torch.full((args.batch,), S, dtype=torch.long).to(device)
    L = max(1, int(args.seconds * 12))  # about 12 characters a second
    targets = torch.randint(1, 32, (args.batch, L), generator=g).to(device)
    target_lengths = torch.full((args.batch,), L, dtype=torch.long).to(device)
    batch = (wav, lengths, targets, target_lengths)

    dense_params = [p for p in dense.parameters() if p.requires_grad]
    routed_params = [p for p in routed.parameters() if p.requires_grad]
    n_scores = sum(m.scores.numel() for m in routed_layers(routed))
    print(f"model: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, {args.heads} heads; "
          f"batch {args.batch} x {args.seconds:g} s; device {device}, dtype {str(args.dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads")
    print(f"dense trains {sum(p.numel() for p in dense_params) / 1e6:.1f}M weights; route trains "
          f"{sum(p.numel() for p in routed_params) / 1e6:.1f}M ({n_scores / 1e6:.1f}M scores in "
          f"{len(routed_layers(routed))} layers, prune_rate {args.prune_rate})")

    steps = {"dense": make_step(dense, dense_params, batch, device, args.dtype),
             "route": make_step(routed, routed_params, batch, device, args.dtype)}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {"dense": [], "route": []}
    select = []
    for rep in range(args.reps):
        order = ["dense", "route"] if rep % 2 == 0 else ["route", "dense"]
        for name in order:
            total, sel = steps[name]()
            times[name].append(total)
            if name == "route":
                select.append(sel)
    scratch = [selection_from_scratch(routed) for _ in range(3)]

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(r / d for r, d in zip(times["route"], times["dense"], strict=True))
    print(f"\n{'step':<18}{'median ms':>10}{'min ms':>10}")
    for name in ("dense", "route"):
        print(f"{name:<18}{1e3 * med[name]:>10.1f}{1e3 * min(times[name]):>10.1f}")
    print(f"{'select':<18}{1e3 * statistics.median(select):>10.1f}{1e3 * min(select):>10.1f}")
    print(f"{'select (no hint)':<18}{1e3 * statistics.median(scratch):>10.1f}{1e3 * min(scratch):>10.1f}")
    print(f"\nroute / dense = {ratio:.3f} (median of {args.reps} interleaved pairs); "
          f"mask selection = {100 * statistics.median(select) / med['route']:.1f}% of the routed step")

    if args.profile:
        profile(steps["dense"], "dense step", device, args.profile_rows)
        profile(steps["route"], "route step", device, args.profile_rows)


if __name__ == "__main__":
    main()
