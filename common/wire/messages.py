"""What travels in Flower Messages between the ServerApp and the ClientApp.

A train or evaluate instruction carries one ConfigRecord, "config": the
resolved run config plus the per-instruction fields below, among them the
global adapter (exactly the trainable tensors) encoded with the downlink codec.
A train reply carries "update" (the encoded delta, sealed and signed unless
the run is in plain mode) and "metrics"; an evaluate reply only "metrics".

The whole run config travels with every instruction, so a client needs no
local copy of pyproject.toml to build the same model and train the same way:
Flower's simulation engine hands ClientApps an empty run config when it is
started from Python rather than from `flwr run`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from edgefed.common.config import EdgefedConfig
from edgefed.common.wire.codec import Adapter, decode

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
UPDATE = "update"

# Per-instruction fields beside the run config.
SERVER_ROUND = "server-round"
BASE_FINGERPRINT = "base-fingerprint"
GLOBAL_ADAPTER = "global-adapter"  # bytes, downlink codec
GLOBAL_VERSION = "global-version"  # int, the version clients compute deltas against
# instead of GLOBAL_ADAPTER: the difference from the adapter the device holds (common/wire/downlink.py)
DOWNLINK_DELTA = "downlink-delta"  # bytes, downlink delta codec
DOWNLINK_BASE = "downlink-base"  # sha256 of the held adapter the delta applies to
DOWNLINK_HASH = "downlink-hash"  # sha256 of the adapter it makes

# Fields of the "update" record of a train reply.
PAYLOAD = "payload"  # sealed envelope, or (plain mode) codec bytes
# plain mode only (debugging): the context a sealed envelope carries inside, in the clear
NODE = "node"
UPDATE_ID = "update-id"
BASE_VERSION = "base-version"
NUM_EXAMPLES = "num-examples"
PLAIN_FIELDS = {NODE: "plain-node", BASE_VERSION: "plain-base-version", UPDATE_ID: "plain-update-id",
                NUM_EXAMPLES: "plain-num-examples"}

# evaluate instructions for the deployed model
MODEL_SERVICE = "model-service"  # host:port of the model distribution service
MODEL_VERSION = "model-version"  # int, the published version to install and score

_EXTRA_KEYS = (SERVER_ROUND, BASE_FINGERPRINT, GLOBAL_ADAPTER, GLOBAL_VERSION, DOWNLINK_DELTA, DOWNLINK_BASE,
               DOWNLINK_HASH, MODEL_SERVICE, MODEL_VERSION)


def instruction_config(cfg: EdgefedConfig, base_fingerprint: str) -> ConfigRecord:
    return ConfigRecord({**cfg.to_run_config(), BASE_FINGERPRINT: base_fingerprint})


def run_config_of(record: Mapping[str, object]) -> dict[str, object]:
    """An instruction's run-config entries: its record without the per-task keys (round, fingerprint, adapter, ...)."""
    return {k: v for k, v in dict(record).items() if k not in _EXTRA_KEYS}


def config_from_message(msg: Message, context: Context) -> tuple[EdgefedConfig, ConfigRecord]:
    """The run config this instruction was issued under, and its raw record."""
    record = msg.content[CONFIG]
    run_config = run_config_of(record)
    # Keys the server did not send fall back to the node's own run config.
    merged = {**{k: v for k, v in context.run_config.items() if k not in _EXTRA_KEYS}, **run_config}
    return EdgefedConfig.from_run_config(merged), record


def global_adapter(record: ConfigRecord) -> Adapter:
    """Decode the global adapter an instruction carries."""
    return decode(bytes(record[GLOBAL_ADAPTER]))


def plain_meta(update: ConfigRecord) -> dict[str, object]:
    """Plain mode: the clear-text context of an update record, as the buffered meta the opener reads."""
    return {meta_key: update[field] for field, meta_key in PLAIN_FIELDS.items() if field in update}


def adapter_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state.items()))


def record_to_adapter(record: ArrayRecord) -> Adapter:
    return record.to_torch_state_dict()
