"""Benchmark: device training at real size, with the frozen-prefix cache and with a quantized frozen base.

    python benchmarks/bench_edge_training.py --json results/edge_training.json [--threads 2]

The base is ViT-B/16 at 224 + AST-base at 1024 x 128 (random weights, written with save_pretrained
by bench_encoders.make_checkpoint, as that benchmark does), the default model otherwise (4 keyframes,
fusion width 192, LoRA r 8 on every attention projection of the targeted layers), `--batch` clips a
step, the same `--threads` on every side of each comparison. Inputs are random clips of the model's
input shapes (the cost of a step does not depend on what the pixels show).

1. Cache (LoRA on the last 2 of 12 layers per encoder, then on all 12; `lora-layers` 2 and 0):
   full_clips_per_s    train_adapter on the full forward/backward as a device without the cache runs
                       it: every step runs both encoders from the pixels and the fbank, the frozen
                       layers without autograd, the last layer on the tokens the readout reads
                       (MultimodalClassifier.forward_split; after one warm-up step)
   hf_forward_clips_per_s
                       the same with the model's own forward (transformers' full last layer)
   cached_clips_per_s  the same steps from edge/training/prefix_cache.py, once the cache holds the clips
                       (what every epoch after a clip's first, and every later round, costs): the
                       top of full_clips_per_s without the prefix
   cache_speedup       cached / full clips per second
   cache_fill_s_per_clip
                       computing and writing one clip's states (its first epoch)
   cache_mb_per_clip   the cache folder's bytes / clips (float16 hidden states entering the split)
   cache_logit_max_err max |logits| difference, cached (float16) vs the full forward, eval mode,
                       over all the clips
   Top-level fields are those of LoRA on the last 2 layers; "lora_all_layers" holds the same fields
   with LoRA on all 12 (the split is then at layer 0: only the embeddings are cached).

2. Base precision (LoRA on the last 2 layers, the full forward), each in a fresh process:
   {fp32,int8,nf4}_base_rss_mb
                       resident memory (VmRSS) the base adds: after building the LoRA model on the
                       checkpoints, quantizing it (common/model/base_precision.py) and one no-grad
                       forward of one clip (so every weight has been read) and glibc's malloc_trim
                       (the forward's freed activations are not the base's), minus before building,
                       with everything imported; int8_/nf4_base_rss_ratio: over fp32's
   {fp32,int8,nf4}_step_s
                       seconds a training step of `--batch` clips takes (after a warm-up step)
   {fp32,int8,nf4}_train_peak_rss_mb
                       the process's peak resident memory (VmHWM) over those steps, minus the same
                       baseline (the base plus the activations of a batch)

3. Accuracy on the warm-started task (the default small model): `edgefed cloud train` pretrains the
   base on the cloud's own clips (as bench_global_trainer does), then the default federation runs
   from that base checkpoint for `--versions` versions with `base-precision` fp32, int8 and nf4 on
   every device, for each of `--seeds` (same data and clients): precision_final_accuracy
   {precision: [per seed]}, precision_mean_final_accuracy, int8_/nf4_accuracy_drop_points (fp32's
   mean minus theirs, in points).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_encoders import make_checkpoint  # noqa: E402
from bench_global_trainer import CLOUD_SEED, torchrun_train  # noqa: E402

from edgefed.common.config import EdgefedConfig  # noqa: E402
from edgefed.common.data.features import FeatureSet  # noqa: E402
from edgefed.common.model.base_precision import quantize_frozen_base, trim_allocator  # noqa: E402
from edgefed.common.model.inputs import model_inputs  # noqa: E402
from edgefed.common.model.lora import build_lora_model, classifier_of  # noqa: E402
from edgefed.common.training import train_adapter  # noqa: E402
from edgefed.edge.training.prefix_cache import PrefixCache  # noqa: E402

CLASSES = 4
PRECISIONS = ("fp32", "int8", "nf4")


def random_clips(cfg: EdgefedConfig, n: int, seed: int = 0) -> FeatureSet:
    shapes = model_inputs(cfg).shapes()
    g = torch.Generator().manual_seed(seed)
    return FeatureSet(
        frames=torch.randint(0, 256, (n, *shapes["frames"]), dtype=torch.uint8, generator=g),
        frame_mask=torch.ones(n, *shapes["frame_mask"], dtype=torch.bool),
        audio=torch.randn(n, *shapes["audio"], generator=g).half(),
        audio_mask=torch.ones(n, *shapes["audio_mask"], dtype=torch.bool),
        labels=torch.randint(0, CLASSES, (n,), generator=g),
    )


def _config(checkpoints: dict[str, Path], lora_layers: int, args: argparse.Namespace) -> EdgefedConfig:
    return EdgefedConfig(video_encoder=str(checkpoints["vit"]), audio_encoder=str(checkpoints["ast"]),
                         lora_layers=lora_layers, labels=",".join(f"class{c}" for c in range(CLASSES)),
                         client_threads=args.threads, batch_size=args.batch)


def _clips_per_s(model, data: FeatureSet, cfg: EdgefedConfig, steps: int, forward=None) -> float:
    batches = list(data.batches(cfg.batch_size, torch.Generator().manual_seed(0)))
    timed = [batches[i % len(batches)] for i in range(steps)]
    result = train_adapter(model, [timed], cfg.training, forward=forward)
    return result.examples / result.seconds


def measure_cache(checkpoints: dict[str, Path], lora_layers: int, work: Path, args: argparse.Namespace) -> dict:
    cfg = _config(checkpoints, lora_layers, args)
    model = build_lora_model(cfg)
    classifier = classifier_of(model)
    starts = classifier.prefix_starts(lora_layers)
    data = random_clips(cfg, args.clips)
    cache = PrefixCache(work / f"prefix-{lora_layers}", 1 << 40, "bench", starts)
    forward = lambda batch: cache.forward(classifier, batch)  # noqa: E731

    split = lambda b: classifier.forward_split(b.frames, b.frame_mask, b.audio, b.audio_mask, starts)  # noqa: E731
    train_adapter(model, [list(data.batches(cfg.batch_size))[:1]], cfg.training)  # warm-up step, HF forward
    hf_full = _clips_per_s(model, data, cfg, args.steps)
    train_adapter(model, [list(data.batches(cfg.batch_size))[:1]], cfg.training, forward=split)  # warm-up, full
    full = _clips_per_s(model, data, cfg, args.steps, split)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in data.batches(cfg.batch_size):
            cache.states(classifier, batch)
    fill_s = (time.perf_counter() - start) / len(data)
    train_adapter(model, [list(data.batches(cfg.batch_size))[:1]], cfg.training, forward=forward)  # warm-up, cached
    cached = _clips_per_s(model, data, cfg, args.steps, forward)
    assert cache.misses == len(data), "every timed cached step must read its states from the cache"

    model.eval()
    errors = []
    with torch.no_grad():
        for batch in data.batches(cfg.batch_size):
            full_logits = model(batch.frames, batch.frame_mask, batch.audio, batch.audio_mask)
            errors.append(float((cache.forward(classifier, batch) - full_logits).abs().max()))
    out = {"lora_layers": lora_layers or "all", "prefix_starts": list(starts), "full_clips_per_s": round(full, 4),
           "hf_forward_clips_per_s": round(hf_full, 4),
           "cached_clips_per_s": round(cached, 4), "cache_speedup": round(cached / full, 3),
           "cache_fill_s_per_clip": round(fill_s, 3), "cache_mb_per_clip": round(cache.bytes_on_disk / len(data) / 1e6, 3),
           "cache_logit_max_err": max(errors), "steps": args.steps, "batch": cfg.batch_size}
    gc.collect()
    return out


def _status_mb(field: str) -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields[field].split()[0]) / 1024


def measure_precision(checkpoints: dict[str, Path], precision: str, args: argparse.Namespace) -> dict:
    """In this (fresh) process: the base's resident memory at `precision`, and a training step's time."""
    from transformers import ASTModel, ViTModel  # noqa: F401 - their modules load before the baseline

    cfg = _config(checkpoints, 2, args)
    data = random_clips(cfg, args.batch * 2)
    trim_allocator()
    before = _status_mb("VmRSS")
    model = build_lora_model(cfg)
    quantize_frozen_base(model, precision)
    model.eval()
    with torch.no_grad():
        one = data.subset([0])
        model(one.frames, one.frame_mask, one.audio, one.audio_mask)  # every weight read once
    trim_allocator()  # the forward's freed activations: not the base's (both sides alike)
    base_rss = _status_mb("VmRSS") - before
    batches = list(data.batches(cfg.batch_size))
    train_adapter(model, [batches[:1]], cfg.training)  # warm-up
    result = train_adapter(model, [[batches[i % len(batches)] for i in range(args.steps)]], cfg.training)
    peak = _status_mb("VmHWM") - before  # this process's peak (ru_maxrss would carry the parent's over exec)
    return {"runtime_rss_mb": round(before, 1), f"{precision}_base_rss_mb": round(base_rss, 1), f"{precision}_step_s": round(result.seconds / result.steps, 3),
            f"{precision}_train_peak_rss_mb": round(peak, 1)}


def precision_in_child(checkpoints: dict[str, Path], precision: str, work: Path, args: argparse.Namespace) -> dict:
    out = work / f"precision-{precision}.json"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json", str(out), "--child", precision,
                    "--vit", str(checkpoints["vit"]), "--ast", str(checkpoints["ast"]), "--threads", str(args.threads),
                    "--batch", str(args.batch), "--steps", str(args.steps)], check=True)
    return json.loads(out.read_text())


def federations(args: argparse.Namespace) -> dict:
    """The default federation from a warm-started base at each device precision, per seed."""
    from edgefed.cloud.training.ddp_trainer import BASE_CHECKPOINT
    from edgefed.commands.data import DEFAULT_CLIENTS, DEFAULT_CLIPS
    from edgefed.common.run_dir import new_run_id
    from edgefed.simulations.prepare import prepare
    from edgefed.simulations.runner import run_federation
    from edgefed.simulations.synthetic import SyntheticSpec, generate

    cfg = EdgefedConfig()
    out_dir = args.out
    cloud_manifest = generate(out_dir / "datasets" / f"cloud-n{DEFAULT_CLIPS}-s{CLOUD_SEED}",
                              SyntheticSpec(num_clips=DEFAULT_CLIPS, seed=CLOUD_SEED))
    extract_dir = out_dir / "cloud-features"
    features = extract_dir / "features.safetensors"
    if not features.exists():
        torchrun_train(1, extract_dir, ["--manifest", str(cloud_manifest), "--cache", str(out_dir / "cache")],
                       ["trainer-steps=1"], os.cpu_count() or 2)
    pretrain = out_dir / f"pretrain-{new_run_id()}"
    torchrun_train(1, pretrain, ["--features", str(features)], [f"trainer-steps={args.pretrain_steps}"],
                   os.cpu_count() or 2)
    data = prepare(out_dir / "fed-data", cfg, DEFAULT_CLIENTS, alpha=1.0,
                   synthetic=SyntheticSpec(num_clips=DEFAULT_CLIPS, seed=cfg.seed),
                   synthetic_dir=out_dir / "datasets" / f"synthetic-n{DEFAULT_CLIPS}-s{cfg.seed}")
    accuracy: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for seed in range(args.seeds):
        for precision in PRECISIONS:
            run_cfg = cfg.replace(out_dir=str(out_dir), run_id=f"{precision}-s{seed}-{new_run_id()}",
                                  data_dir=str(data.layout.root), min_clients=DEFAULT_CLIENTS, seed=seed,
                                  max_versions=args.versions, base_checkpoint=str((pretrain / BASE_CHECKPOINT).resolve()),
                                  base_precision=precision, export_every=0)
            summary = run_federation(run_cfg, DEFAULT_CLIENTS).read_json("summary.json")
            accuracy[precision].append(summary["final_accuracy"])
            print(f"seed {seed} {precision}: final accuracy {summary['final_accuracy']}", flush=True)
    mean = {p: round(sum(v) / len(v), 4) for p, v in accuracy.items()}
    return {"precision_final_accuracy": accuracy, "precision_mean_final_accuracy": mean,
            **{f"{p}_accuracy_drop_points": round(100 * (mean["fp32"] - mean[p]), 2) for p in PRECISIONS[1:]},
            "federation": {"versions": args.versions, "seeds": args.seeds, "pretrain_steps": args.pretrain_steps,
                           "clients": DEFAULT_CLIENTS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, every side")
    parser.add_argument("--batch", type=int, default=4, help="clips per training step")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per side (after a warm-up step)")
    parser.add_argument("--clips", type=int, default=8, help="distinct clips the steps draw from")
    parser.add_argument("--versions", type=int, default=8, help="versions of each federation (part 3)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of each federation (part 3)")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="cloud pretraining steps of the warm base")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-edge-training"), help="part 3's runs")
    parser.add_argument("--parts", default="cache,precision,federation",
                        help="a subset re-measures those parts and keeps the other parts' fields of --json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--vit", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ast", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.child:
        args.json.write_text(json.dumps(measure_precision({"vit": args.vit, "ast": args.ast}, args.child, args)))
        return
    parts = set(args.parts.split(","))
    out: dict = {}
    if parts != {"cache", "precision", "federation"} and args.json.exists():
        out = json.loads(args.json.read_text())
    out.update({"threads": args.threads, "load_average_1min_before": round(os.getloadavg()[0], 2)})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-edge-training-") as tmp:
        work = Path(tmp)
        if parts & {"cache", "precision"}:
            print("writing random ViT-B/16 and AST-base checkpoints ...", flush=True)
            checkpoints = {family: make_checkpoint(family, work / family) for family in ("vit", "ast")}
        if "cache" in parts:
            last2 = measure_cache(checkpoints, 2, work, args)
            print(f"LoRA on the last 2 layers: {last2}", flush=True)
            out.update(last2)
            out["lora_all_layers"] = measure_cache(checkpoints, 0, work, args)
            print(f"LoRA on all layers: {out['lora_all_layers']}", flush=True)
        if "precision" in parts:
            for precision in PRECISIONS:
                out.update(precision_in_child(checkpoints, precision, work, args))
                print({k: v for k, v in out.items() if k.startswith(precision)}, flush=True)
            for precision in PRECISIONS[1:]:
                out[f"{precision}_base_rss_ratio"] = round(out[f"{precision}_base_rss_mb"] / out["fp32_base_rss_mb"], 3)
    if "federation" in parts:
        out.update(federations(args))
    out["wall_s"] = round(time.perf_counter() - started, 1)
    out["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.json}", flush=True)


if __name__ == "__main__":
    main()
