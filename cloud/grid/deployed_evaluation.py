"""The deployed model's federated accuracy: every connected device installs a published model and scores it.

This is the accuracy devices get from the quantized ONNX model they run, not
from the PyTorch adapter they train: each device fetches the version from
the model service (verifying its signed manifest) and evaluates it on its own
held-out clips; the replies are combined example-weighted.
"""

from __future__ import annotations

import logging
import random

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from edgefed.common.wire.messages import CONFIG, METRICS, MODEL_SERVICE, MODEL_VERSION

log = logging.getLogger(__name__)


def evaluate_deployed(grid: Grid, version: int, service_address: str, base_config: ConfigRecord,
                      ttl_s: float, sample: int = 0, seed: int = 0) -> dict[str, object]:
    """Each connected device (or `sample` of them, drawn with `seed`) installs `version` from `service_address`
    and scores it on its held-out clips."""
    nodes = sample_nodes(sorted(grid.get_node_ids()), sample, seed, version)
    messages = deployed_messages(nodes, version, service_address, base_config, ttl_s)
    return combine_deployed(list(grid.send_and_receive(messages, timeout=ttl_s)), version, len(nodes))


def sample_nodes(nodes: list[int], sample: int, seed: int, version: int) -> list[int]:
    """`sample` of `nodes` (all for 0 or more than there are), the same draw for the same seed and version."""
    if 0 < sample < len(nodes):
        return random.Random(f"{seed}|{version}").sample(sorted(nodes), sample)
    return list(nodes)


def deployed_messages(nodes: list[int], version: int, service_address: str, base_config: ConfigRecord,
                      ttl_s: float) -> list[Message]:
    """An evaluate instruction per node: install `version` from the model service and score it."""
    messages = []
    for node in nodes:
        config = ConfigRecord(dict(base_config))
        config[MODEL_SERVICE] = service_address
        config[MODEL_VERSION] = version
        messages.append(Message(content=RecordDict({CONFIG: config}), message_type="evaluate",
                                dst_node_id=node, ttl=ttl_s))
    return messages


def combine_deployed(replies: list[Message], version: int, sent: int) -> dict[str, object]:
    """The devices' replies, combined example-weighted; `sent` instructions went out."""
    examples, correct, loss_sum, installed, errors = 0, 0.0, 0.0, 0, []
    for reply in replies:
        if reply.has_error():
            errors.append(reply.error.reason)
            continue
        metrics = reply.content[METRICS]
        n = int(metrics["num-examples"])
        examples += n
        correct += float(metrics["eval-accuracy"]) * n
        loss_sum += float(metrics["eval-loss"]) * n
        installed += int(int(metrics.get("deployed-version", 0)) == version)
    for reason in errors:
        log.warning("deployed-model evaluation failed on a device: %s", reason)
    return {
        "federated_accuracy": correct / examples if examples else None,
        "federated_loss": loss_sum / examples if examples else None,
        "federated_examples": examples,
        "devices": sent,
        "devices_installed": installed,
        "device_errors": len(errors) + sent - len(replies),
    }
