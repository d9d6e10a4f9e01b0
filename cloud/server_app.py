"""The cloud ServerApp: federated training of the adapter tensors.

`mode = async` (the default): buffered, staleness-aware FedBuff on Flower's
Grid with durable state (cloud/grid/fedbuff_loop.py); one JSON line per published
version. `mode = sync`: FedAvg rounds over the clients' updates (sealed and
compressed by default; Flower's SecAgg+ as an option) with the clients' own
held-out evaluation; one line per round. Both evaluate each new global adapter
on the server's held-out features and export, quantize, sign and serve the
model every `export-every` versions (cloud/publishing/rollout.py). At the end the final
model is published, every device installs it and scores it (the deployed
model's federated accuracy), and the final adapter, the merged model and
`summary.json` are written into `runs/<run-id>/`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from edgefed.cloud.aggregation.update_opener import opener_for
from edgefed.cloud.aggregation.version_window import IssuedVersions
from edgefed.cloud.grid.deployed_evaluation import evaluate_deployed
from edgefed.cloud.grid.fedbuff_loop import LoopHooks, run_fedbuff
from edgefed.cloud.grid.sealed_fedavg import SealedFedAvg
from edgefed.cloud.grid.secagg_plus import run_secaggplus
from edgefed.cloud.metrics.prometheus import FederationMetrics
from edgefed.cloud.metrics.recorder import RoundRecorder, finite
from edgefed.cloud.publishing.rollout import ModelRollout
from edgefed.common import logs
from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet, load_features
from edgefed.common.data.layout import DataLayout
from edgefed.common.evaluation import evaluate
from edgefed.common.model.lora import base_identity, build_lora_model, get_adapter_state, merge_adapter, set_adapter_state
from edgefed.common.run_dir import RunDir
from edgefed.common.wire.codec import Adapter
from edgefed.common.wire.messages import adapter_to_record, instruction_config, record_to_adapter

log = logging.getLogger(__name__)

app = ServerApp()


@dataclass
class _Parts:
    recorder: RoundRecorder
    rollout: ModelRollout
    metrics: FederationMetrics | None
    hooks: LoopHooks

    def close(self) -> None:
        self.rollout.close()
        if self.metrics is not None:
            self.metrics.close()


def _connect(cfg: EdgefedConfig, run: RunDir, model: torch.nn.Module, fingerprint: str) -> _Parts:
    """Build the cloud's parts for one run and connect them; the only place they are wired to each other.

    metrics.jsonl lines and export outcomes feed Prometheus (when `metrics-port` is set); each new
    global version goes to the exporter; every instruction announces the newest published model; the
    async loop's live state (clients in flight, buffer depth) feeds Prometheus's gauges; the async loop has
    each newly published model scored on devices."""
    metrics = _start_metrics(cfg, run)
    recorder = RoundRecorder(cfg, run, model, _central_features(cfg),
                             on_line=metrics.observe_version if metrics else None)
    rollout = ModelRollout(cfg, run, recorder.central, fingerprint,
                           on_export=metrics.observe_export if metrics else None)
    hooks = LoopHooks(on_version=rollout.on_version, announcement=rollout.announcement,
                      live_gauges=metrics.set_live if metrics else None, published=rollout.take_published,
                      model_service=lambda: rollout.service_address, drain_publishing=rollout.background.drain)
    return _Parts(recorder, rollout, metrics, hooks)


@app.main()
def main(grid: Grid, context: Context) -> None:
    logs.configure_from_env()  # under a SuperLink this is its own process
    cfg = EdgefedConfig.from_run_config(context.run_config)
    run = RunDir.for_config(cfg)
    run.write_config(cfg)
    torch.manual_seed(cfg.seed)
    model = build_lora_model(cfg)
    fingerprint = base_identity(cfg, model)
    parts = _connect(cfg, run, model, fingerprint)
    recorder = parts.recorder
    initial_accuracy, initial_loss = recorder.central_eval()
    log.info("start: central accuracy %.4f (loss %.4f)", initial_accuracy, initial_loss)
    try:
        if cfg.mode == "async":
            final = run_fedbuff(grid, cfg, get_adapter_state(model), fingerprint, recorder, run, parts.hooks)
        elif cfg.secure_aggregation == "secaggplus":
            final = run_secaggplus(grid, context, cfg, get_adapter_state(model), fingerprint, recorder,
                                   parts.hooks.announcement)
        else:
            final = _run_sealed_fedavg(grid, cfg, run, model, recorder, parts.rollout)
        wall_s = time.perf_counter() - recorder.start
        deployed = _deploy(grid, cfg, parts.rollout, _last_version(run), final, fingerprint)
    finally:
        parts.close()
    _finish(cfg, run, model, final, recorder.central, (initial_accuracy, initial_loss), wall_s, deployed)


def _start_metrics(cfg: EdgefedConfig, run: RunDir) -> FederationMetrics | None:
    """Prometheus metrics on `metrics-port` (a resumed federation's totals include what its files hold)."""
    if not cfg.metrics_port:
        return None
    metrics = FederationMetrics(cfg.federation)
    metrics.replay(run)
    metrics.serve(cfg.metrics_port, cfg.metrics_bind)
    log.info("Prometheus metrics on %s:%d", cfg.metrics_bind, cfg.metrics_port)
    return metrics


def _deploy(grid: Grid, cfg: EdgefedConfig, rollout: ModelRollout, version: int,
            final: dict[str, torch.Tensor], fingerprint: str) -> dict[str, object]:
    """Publish the final model and have every device install and score it."""
    outcome = rollout.publish_final(version, final)
    if outcome is None:
        reasons = [o.reason for o in rollout.outcomes if not o.published]
        log.warning("no model was published: %s", reasons[-1] if reasons else "no export ran")
        return {"published": False, "reason": reasons[-1] if reasons else "no export ran"}
    on_devices = evaluate_deployed(grid, outcome.version, rollout.service_address,
                                   instruction_config(cfg, fingerprint), cfg.message_ttl_s,
                                   sample=cfg.deployed_eval_devices, seed=cfg.seed)
    log.info("deployed model v%d (%s, %.2f MB): federated accuracy %s on %d devices",
             outcome.version, outcome.quantization, outcome.size_bytes / 1e6,
             on_devices["federated_accuracy"], on_devices["devices_installed"])
    return {
        "published": True, "version": outcome.version, "quantization": outcome.quantization,
        "size_bytes": outcome.size_bytes, "size_mb": round(outcome.size_bytes / 1e6, 3),
        "fp32_size_bytes": outcome.fp32_size_bytes, "argmax_agreement": outcome.argmax_agreement,
        "heldout_accuracy": outcome.heldout_accuracy, **on_devices,
        "exports": len(rollout.outcomes), "exports_refused": sum(not o.published for o in rollout.outcomes),
    }


def _run_sealed_fedavg(
    grid: Grid, cfg: EdgefedConfig, run: RunDir, model: torch.nn.Module, recorder: RoundRecorder, rollout: ModelRollout
) -> Adapter:
    versions = IssuedVersions(run.path / "sync_taken_updates.txt")
    strategy = SealedFedAvg(
        opener=opener_for(cfg, versions),
        versions=versions,
        downlink_codec=cfg.downlink_codec,
        lora_aggregation=cfg.lora_aggregation,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.min_clients,
    )

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # evaluated before any client was contacted
        adapter = record_to_adapter(arrays)
        stats = strategy.round_stats
        metrics = recorder.record(server_round, adapter, {**stats, "version": strategy.version},
                                  extra={"devices": stats["devices"], "bytes_up_by_device": dict(stats["bytes_up_by_device"])})
        strategy.reset_round()
        rollout.on_version(server_round, adapter)
        return metrics

    config = instruction_config(cfg, base_identity(cfg, model))
    config.update(rollout.announcement())  # where a shipped base is fetched from
    result = strategy.start(
        grid=grid,
        initial_arrays=adapter_to_record(get_adapter_state(model)),
        num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout_s,
        train_config=config,
        evaluate_config=copy.deepcopy(config),
        evaluate_fn=after_round,
    )
    return record_to_adapter(result.arrays)


def _central_features(cfg: EdgefedConfig) -> FeatureSet | None:
    if not cfg.data_dir:
        log.warning("data-dir is empty: no central evaluation")
        return None
    path = DataLayout(Path(cfg.data_dir)).central_features
    if not path.exists():
        log.warning("%s missing: no central evaluation (run `edgefed prepare` first)", path)
        return None
    return load_features(path)


def _finish(
    cfg: EdgefedConfig,
    run: RunDir,
    model: torch.nn.Module,
    final: dict[str, torch.Tensor],
    central: FeatureSet | None,
    initial: tuple[float, float],
    wall_s: float,
    deployed: dict[str, object],
) -> None:
    set_adapter_state(model, final)
    adapter = get_adapter_state(model)
    run.save_tensors("adapter_final.safetensors", adapter)
    summary: dict[str, object] = {
        "mode": cfg.mode,
        "rounds": cfg.num_rounds if cfg.mode == "sync" else None,
        "versions": _last_version(run),
        "wall_s": round(wall_s, 3),
        "initial_accuracy": finite(initial[0]),
        "initial_loss": finite(initial[1]),
        "adapter_tensors": len(adapter),
        "adapter_bytes": sum(t.numel() * t.element_size() for t in adapter.values()),
        "deployed_model": deployed,
    }
    if central is not None:
        fused = evaluate(model, central, cfg.eval_batch_size)
        summary.update(
            final_accuracy=fused.accuracy,
            final_loss=fused.loss,
            video_only_accuracy=evaluate(model, central.masked(audio=False), cfg.eval_batch_size).accuracy,
            audio_only_accuracy=evaluate(model, central.masked(video=False), cfg.eval_batch_size).accuracy,
            chance_accuracy=1.0 / cfg.num_classes,
            heldout_examples=fused.examples,
        )
    merged = merge_adapter(model)
    run.save_tensors("model_merged.safetensors", merged.state_dict())
    run.write_json("summary.json", summary)
    log.info("run finished: %s", summary)


def _last_version(run: RunDir) -> int:
    records = run.read_metrics()
    return int(records[-1]["version"]) if records else 0
