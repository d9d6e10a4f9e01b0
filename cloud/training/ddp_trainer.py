"""The cloud's own training: DistributedDataParallel over the cloud's clips (`edgefed cloud train`).

Launched under torchrun (one process per GPU, or CPU ranks with gloo):

    torchrun --nproc-per-node N -m edgefed.cli cloud train --features F --out DIR

- NCCL on GPUs, gloo on CPU; a single process without torchrun is world size 1.
- A DistributedSampler-style split of a seeded permutation per epoch: rank r
  takes every world-th clip, so the union of the ranks' micro-batches is the
  global batch a single process would take (same gradient, summed in another
  order).
- AdamW with linear warmup and cosine decay, gradient accumulation, gradient
  clipping; bf16 autocast and gradient checkpointing as options on GPU.
- Rank 0 writes `trainer_checkpoint.pt` atomically every
  `trainer-checkpoint-every` steps (model, optimizer, schedule, step); every
  rank resumes from it, and the data order depends only on (seed, step), so a
  resumed run continues the same loss curve.

The result is `checkpoint/`, a base checkpoint directory (common/model/base_checkpoint.py: each
encoder saved with `save_pretrained`, plus the projections, fusion and head), the warm-started
base a federation starts from with `base-checkpoint` (devices then fine-tune LoRA on a base that
already knows something, fetched from the model service like any checkpoint base). Rank 0 writes
it into a staging folder, loads it back and compares every tensor with the trained model before
moving it into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from edgefed.common.atomic import write_atomically
from edgefed.common.config import EdgefedConfig, TrainerSettings
from edgefed.common.data.features import FeatureSet
from edgefed.common.model.base_checkpoint import save_base_checkpoint
from edgefed.common.model.classifier import MultimodalClassifier, build_base_model

log = logging.getLogger(__name__)

CHECKPOINT = "trainer_checkpoint.pt"
BASE_CHECKPOINT = "checkpoint"
LOSS_LOG = "trainer.jsonl"


class TrainerConfigError(ValueError):
    """The trainer cannot run with these settings (batch split, world size, device)."""


@dataclass
class TrainSummary:
    steps: int
    world_size: int
    samples: int
    seconds: float
    samples_per_s: float
    final_loss: float
    device: str
    base_checkpoint: Path | None = None  # the written base checkpoint; None until the last step is done


@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    """From torchrun's environment; world size 1 without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(rank, world, local_rank, device)


def lr_at(step: int, trainer: TrainerSettings) -> float:
    """Linear warmup to trainer-learning-rate, then cosine decay to 0 at trainer-steps."""
    if step < trainer.trainer_warmup_steps:
        return trainer.trainer_learning_rate * (step + 1) / trainer.trainer_warmup_steps
    span = max(trainer.trainer_steps - trainer.trainer_warmup_steps, 1)
    progress = min((step - trainer.trainer_warmup_steps) / span, 1.0)
    return trainer.trainer_learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batch_indices(n: int, step: int, micro: int, accum: int, per_rank: int, world: int, rank: int,
                        seed: int) -> torch.Tensor:
    """Clip indices of one rank's `micro`-th micro-batch at `step`; a pure function of its arguments.

    The global batch of a step is `per_rank * world * accumulation` consecutive
    entries of the epoch's permutation; rank r takes every world-th of them.
    """
    global_batch = per_rank * world
    batches_per_epoch = n // global_batch
    if batches_per_epoch == 0:
        raise TrainerConfigError(f"{n} clips are fewer than one global micro-batch ({global_batch})")
    slot = step * accum + micro
    epoch, within = divmod(slot, batches_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    block = order[within * global_batch:(within + 1) * global_batch]
    return block[rank::world]


def build_model(cfg: EdgefedConfig) -> MultimodalClassifier:
    model = build_base_model(cfg)
    for param in model.parameters():
        param.requires_grad_(True)
    return model.train()


def train(cfg: EdgefedConfig, data: FeatureSet, out_dir: str | Path, stop_after: int | None = None
          ) -> tuple[TrainSummary, MultimodalClassifier]:
    """Pretrain the whole base model on `data` for `trainer-steps` optimizer steps (resuming if possible).

    Returns the summary and this rank's model (identical on every rank).

    `stop_after`: leave after this many steps of this call (checkpointed), as a
    preempted job would; the next call resumes on the same curve."""
    out_dir = Path(out_dir)
    trainer = cfg.trainer
    ranks = _init_distributed()
    per_rank, accum = _split_batch(trainer, ranks.world)
    if (cfg.trainer_bf16 or cfg.trainer_grad_checkpointing) and ranks.device.type != "cuda":
        log.warning("trainer-bf16 / trainer-grad-checkpointing apply on GPU only; ignored on CPU")
    model = build_model(cfg).to(ranks.device)
    if cfg.trainer_grad_checkpointing and ranks.device.type == "cuda":
        for encoder in (model.video_encoder, model.audio_encoder):
            encoder.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.trainer_learning_rate,
                                  weight_decay=cfg.trainer_weight_decay)
    start_step = _resume(out_dir / CHECKPOINT, model, optimizer, ranks)
    ddp = DistributedDataParallel(model) if ranks.world > 1 else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.trainer_bf16 and ranks.device.type == "cuda"
                else contextlib.nullcontext())
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start_step:
            log.info("resuming at step %d of %d", start_step, cfg.trainer_steps)
    loss_value, samples, started = float("nan"), 0, time.perf_counter()
    end = cfg.trainer_steps if stop_after is None else min(cfg.trainer_steps, start_step + stop_after)
    for step in range(start_step, end):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, trainer)
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=ranks.device)
        for micro in range(accum):
            index = micro_batch_indices(len(data), step, micro, accum, per_rank, ranks.world, ranks.rank, cfg.seed)
            batch = data.subset(index)
            sync = micro == accum - 1 or ranks.world == 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
                logits = ddp(*(t.to(ranks.device) for t in (batch.frames, batch.frame_mask, batch.audio,
                                                              batch.audio_mask)))
                loss = F.cross_entropy(logits.float(), batch.labels.to(ranks.device)) / accum
            loss.backward()
            step_loss += loss.detach()
            samples += len(index) * ranks.world
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if ranks.world > 1:
            dist.all_reduce(step_loss)
            step_loss /= ranks.world
        loss_value = float(step_loss)
        if ranks.main:
            _append(out_dir / LOSS_LOG, {"step": step + 1, "loss": loss_value, "lr": lr_at(step, trainer),
                                         "wall_s": round(time.perf_counter() - started, 3)})
        done = step + 1
        if done % cfg.trainer_checkpoint_every == 0 or done in (cfg.trainer_steps, end):
            _checkpoint(out_dir, model, optimizer, done, ranks)
    seconds = time.perf_counter() - started
    finished = end == cfg.trainer_steps
    if ranks.main and finished:
        write_base_checkpoint(cfg, model, out_dir / BASE_CHECKPOINT)
    if ranks.world > 1:
        dist.barrier()
    summary = TrainSummary(end - start_step, ranks.world, samples, seconds,
                           samples / seconds if seconds else 0.0, loss_value, ranks.device.type,
                           out_dir / BASE_CHECKPOINT if finished else None)
    return summary, model


def write_base_checkpoint(cfg: EdgefedConfig, model: MultimodalClassifier, target: Path) -> None:
    """`model` as the base checkpoint `target`, replacing an older one only once the new one is known good:
    written into a staging folder, loaded back as a federation will load it (`base-checkpoint`), every
    tensor compared with the trained model's, then moved into place."""
    staged = target.with_name(f".{target.name}-{secrets.token_hex(4)}")
    try:
        save_base_checkpoint(model, staged)
        reloaded = build_base_model(cfg.replace(base_checkpoint=str(staged))).state_dict()
        trained = model.state_dict()
        differ = sorted(set(trained) ^ set(reloaded)) or [
            name for name, tensor in trained.items() if not torch.equal(tensor.detach().cpu(), reloaded[name])]
        if differ:
            raise RuntimeError(f"the base checkpoint written to {staged} does not load back to the trained model: "
                               f"{differ[:3]} differ")
        if target.exists():
            aside = target.with_name(f".{target.name}-replaced-{secrets.token_hex(4)}")
            target.rename(aside)
            shutil.rmtree(aside)
        staged.rename(target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _split_batch(trainer: TrainerSettings, world: int) -> tuple[int, int]:
    """(clips per rank per micro-batch, micro-batches per step) for the global trainer-batch-size."""
    accum = trainer.trainer_grad_accum
    if trainer.trainer_batch_size % (world * accum):
        raise TrainerConfigError(f"trainer-batch-size {trainer.trainer_batch_size} is not divisible by "
                                 f"world size {world} x trainer-grad-accum {accum}")
    return trainer.trainer_batch_size // (world * accum), accum


def _checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, ranks: _Dist) -> None:
    if ranks.main:
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
        write_atomically(out_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))
    if ranks.world > 1:
        dist.barrier()  # nobody runs ahead of a checkpoint it might resume from


def _resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ranks: _Dist) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, map_location=ranks.device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")

