"""The edge ClientApp: local LoRA training and local evaluation on the device's clips.

On `train` it decodes the global adapter it was sent, trains it on the node's
training split, and replies with the delta: compressed by the update codec
(with error feedback), sealed for the aggregator and signed with the device
key. On `evaluate` it scores the received adapter on the node's held-out
split or, when the instruction names a published model version, installs that
signed ONNX model from the model service and scores it (the deployed model). Clips become features through the edge media pipeline and its on-disk
cache, so only the first round decodes video.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from edgefed.common import logs
from edgefed.common.config import EdgefedConfig
from edgefed.common.evaluation import evaluate as evaluate_model
from edgefed.common.model.lora import checkpoint_dirs, get_adapter_state, installed_base_config, set_adapter_state
from edgefed.common.training import train_local_epochs
from edgefed.common.wire.capabilities import DEVICE_CORES, DEVICE_MEMORY_MB, capabilities_of
from edgefed.common.wire.codec import CodecSpec
from edgefed.common.wire.envelope import UpdateContext
from edgefed.common.wire.messages import (
    BASE_FINGERPRINT,
    BASE_VERSION,
    CONFIG,
    GLOBAL_VERSION,
    METRICS,
    MODEL_SERVICE,
    MODEL_VERSION,
    NODE,
    NUM_EXAMPLES,
    PAYLOAD,
    SERVER_ROUND,
    UPDATE,
    UPDATE_ID,
    config_from_message,
    global_adapter,
    run_config_of,
)
from edgefed.edge.held_adapter import HeldAdapter
from edgefed.edge.identity import NodeIdentity
from edgefed.edge.models.runtime import ModelRejected, ModelRuntime
from edgefed.edge.models.updater import ModelServiceUnavailable, ModelUpdater
from edgefed.edge.node_data import NodeData
from edgefed.edge.secure_aggregation import is_legacy_fit, secure_aggregation_mod
from edgefed.edge.training.device_model import DeviceModel, device_model
from edgefed.edge.update_sender import build_update, seal_update

log = logging.getLogger(__name__)
logs.configure_from_env()  # a deployed ClientApp runs in a process of its own per instruction

app = ClientApp(mods=[secure_aggregation_mod])

class BaseModelMismatch(RuntimeError):
    """This node's frozen base differs from the server's: its updates would be meaningless."""


def _model_for(cfg: EdgefedConfig, context: Context, cache_dir: Path | None, expected_fingerprint: str) -> DeviceModel:
    capabilities = capabilities_of(context.node_config)  # what an agent offers; a simulated device's class
    memory, cores = capabilities.get(DEVICE_MEMORY_MB), capabilities.get(DEVICE_CORES)
    held = device_model(cfg, memory, int(cores) if cores else None, cache_dir)  # raises DeviceTooSmall
    if expected_fingerprint and held.identity != expected_fingerprint:
        raise BaseModelMismatch(
            f"base model fingerprint {held.identity} != server's {expected_fingerprint}: "
            "check model-seed, the encoder checkpoints and the installed torch/transformers versions"
        )
    return held


def _local_base(cfg: EdgefedConfig, context: Context, record: Mapping, fingerprint: str) -> EdgefedConfig:
    """`cfg` with the encoder checkpoints this device installed from the model service (fetched and verified
    against the signed base manifest if missing or tampered with), for a base of checkpoint encoders."""
    video, audio = checkpoint_dirs(cfg)
    if video is None and audio is None:
        return cfg  # the built-in encoders: every node builds them from model-seed
    if MODEL_SERVICE not in record or not fingerprint:
        raise BaseModelMismatch("the run's base is made of encoder checkpoints, but the instruction names no model "
                                "service to fetch it from")
    identity = NodeIdentity.for_context(cfg, context)
    with identity.base_fetcher(cfg, str(record[MODEL_SERVICE])) as fetcher:
        folder = fetcher.ensure_base(fingerprint)
    return installed_base_config(cfg, folder)


def _node_and_model(cfg: EdgefedConfig, context: Context, record: Mapping,
                    fingerprint: str) -> tuple[EdgefedConfig, NodeData, DeviceModel]:
    """The config as this device runs it (its own base folders, its plan's batch and threads), its data, and the
    model on that base."""
    cfg = _local_base(cfg, context, record, fingerprint)
    node = NodeData.for_context(cfg, context)
    held = _model_for(cfg, context, node.cache_dir, fingerprint)
    cfg = held.training_config(cfg)
    torch.set_num_threads(cfg.client_threads)
    return cfg, node, held


def _setup(msg: Message, context: Context,
           held_adapter: HeldAdapter | None = None) -> tuple[EdgefedConfig, ConfigRecord, NodeData, DeviceModel, dict]:
    """Config, this node's data, and the model loaded with the received global adapter (whole, or a delta
    from what `held_adapter` holds)."""
    cfg, record = config_from_message(msg, context)
    base = held_adapter.receive(record) if held_adapter is not None else global_adapter(record)
    cfg, node, held = _node_and_model(cfg, context, record, str(record.get(BASE_FINGERPRINT, "")))
    set_adapter_state(held.model, base)
    return cfg, record, node, held, base


def _train_locally(cfg: EdgefedConfig, node: NodeData, held: DeviceModel, device_id: str, round_: int) -> tuple:
    """Train the loaded adapter on this node's split (from its prefix cache when the plan uses one);
    returns (result, seed, metrics)."""
    load_start = time.perf_counter()
    data, skipped = node.train_features()
    load_s = time.perf_counter() - load_start
    seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}|{device_id}|{round_}".encode()).digest()[:4], "little")
    result = train_local_epochs(held.model, data, cfg, seed=seed, forward=held.forward)
    metrics = {
        "num-examples": result.examples,
        "train-loss": result.loss,
        "train-seconds": result.seconds,
        "feature-seconds": load_s,
        "skipped-clips": skipped,
        **held.metrics(),
    }
    return result, seed, metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_legacy_fit(msg):
        return _train_for_secure_aggregation(msg, context)
    cfg, record = config_from_message(msg, context)
    identity = NodeIdentity.for_context(cfg, context)
    cfg, record, node, held, base = _setup(msg, context, identity.held_adapter())
    if MODEL_VERSION in record:  # the cloud announces its newest published model with the work
        try:
            _install_model(cfg, record, identity)
        except (ModelRejected, ModelServiceUnavailable) as err:  # training goes on with the old model
            log.warning("%s: announced model v%s not installed: %s", identity.device_id, record[MODEL_VERSION], err)
    round_ = int(record.get(SERVER_ROUND, 0))
    version = int(record.get(GLOBAL_VERSION, 0))
    result, seed, metrics = _train_locally(cfg, node, held, identity.device_id, round_)
    metrics.update(identity.capabilities)  # the aggregator sizes this device's next work from it

    encode_start = time.perf_counter()
    payload = build_update(get_adapter_state(held.model), base, CodecSpec.parse(cfg.update_codec),
                           identity.error_feedback(), torch.Generator().manual_seed(seed))
    if cfg.transport == "sealed":
        update = ConfigRecord({PAYLOAD: seal_update(payload, identity.credentials(), cfg.federation, version,
                                                     result.examples)})
    else:
        update = ConfigRecord({PAYLOAD: payload, NODE: identity.device_id, BASE_VERSION: version,
                               UPDATE_ID: UpdateContext.new_update_id(), NUM_EXAMPLES: result.examples})
    log.info("%s round %d: %d clips, loss %.4f, %.1f s, update %d bytes",
             identity.device_id, round_, result.examples, result.loss, result.seconds, len(update[PAYLOAD]))
    metrics["encode-seconds"] = time.perf_counter() - encode_start
    return Message(content=RecordDict({UPDATE: update, METRICS: MetricRecord(metrics)}), reply_to=msg)


def _train_for_secure_aggregation(msg: Message, context: Context) -> Message:
    """SecAgg+ (legacy FitIns in, FitRes out): reply with the dense float delta for masking."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    raw = dict(fitins.config)
    cfg = EdgefedConfig.from_run_config(run_config_of(raw))
    cfg, node, held = _node_and_model(cfg, context, raw, str(raw.get(BASE_FINGERPRINT, "")))
    names = list(get_adapter_state(held.model))
    base = OrderedDict(zip(names, (torch.from_numpy(a.copy()) for a in parameters_to_ndarrays(fitins.parameters))))
    set_adapter_state(held.model, base)
    identity = NodeIdentity.for_context(cfg, context)
    result, _, metrics = _train_locally(cfg, node, held, identity.device_id, int(raw.get(SERVER_ROUND, 0)))
    trained = get_adapter_state(held.model)
    delta = [(trained[n] - base[n]).numpy() for n in names]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), result.examples,
                    {k: v for k, v in metrics.items() if k != "num-examples"})
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if CONFIG in msg.content and MODEL_VERSION in msg.content[CONFIG]:
        return _evaluate_deployed(msg, context)
    cfg, _, node, held, _ = _setup(msg, context)
    heldout, _ = node.heldout_features()
    result = evaluate_model(held.model, heldout, cfg.eval_batch_size)
    metrics = MetricRecord({"num-examples": result.examples, "eval-loss": result.loss, "eval-accuracy": result.accuracy})
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)


def _evaluate_deployed(msg: Message, context: Context) -> Message:
    """Install the named published model from the model service, then score that ONNX model.

    This is the accuracy the device gets: the quantized model it runs, not
    the PyTorch adapter it trains.
    """
    cfg, record = config_from_message(msg, context)
    identity = NodeIdentity.for_context(cfg, context)
    runtime = _install_model(cfg, record, identity)
    heldout, _ = NodeData.for_context(cfg, context).heldout_features()
    version, result = runtime.evaluate(heldout, cfg.eval_batch_size)
    metrics = MetricRecord({"num-examples": result.examples, "eval-loss": result.loss, "eval-accuracy": result.accuracy,
                            "deployed-version": version, "model-bytes": runtime.active.size_bytes})
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)


def _install_model(cfg: EdgefedConfig, record: ConfigRecord, identity: NodeIdentity) -> ModelRuntime:
    """Bring the device's model to the version the record names (verified; a no-op if installed).

    Only a model of the run's federation newer than what the device holds is installed (edge/models/runtime.py)."""
    runtime = identity.model_runtime(cfg)
    if runtime.version == int(record[MODEL_VERSION]):
        return runtime
    updater = ModelUpdater(runtime, str(record[MODEL_SERVICE]), identity.request_signer(), identity.ca_cert(cfg))
    try:
        updater.sync(int(record[MODEL_VERSION]))
    finally:
        updater.close()
    return runtime
