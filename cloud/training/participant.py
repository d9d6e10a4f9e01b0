"""The cloud trainer as a participant beside the aggregator.

    python -m edgefed.cloud.training.participant --features F --key-dir K --set state-store=redis://... --set federation=NAME

It follows the store's version events. For the newest global version (any
that arrive while it trains are skipped, not queued) it loads that adapter,
trains the adapter tensors for `trainer-participant-steps` steps on the
cloud's own features, and submits the delta exactly as a device does: encoded
with the update codec, sealed for the aggregator and signed with its own
enrolled key (device id `cloud-trainer`), appended to the same buffer. It
claims `trainer-update-weight` examples, so the aggregator weighs it like a
device of that size, with the usual staleness discount for the versions
published while it trained. The aggregator never waits for it: if this
process dies, the federation goes on without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from edgefed.cloud.state.store import store_for
from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet, load_features
from edgefed.common.keys import DEVICE_KEY, DeviceRegistry, init_keys, load_aggregator_public, load_device_key
from edgefed.common.model.lora import build_lora_model, get_adapter_state, set_adapter_state
from edgefed.common.processes import die_with_parent
from edgefed.common.run_dir import RunDir
from edgefed.common.training import sampled_batches, train_adapter
from edgefed.common.wire.codec import decode, encode
from edgefed.common.wire.envelope import UpdateContext, seal

log = logging.getLogger(__name__)

TRAINER_ID = "cloud-trainer"


def participate(cfg: EdgefedConfig, data: FeatureSet, key_dir: Path, aggregator_public: Path,
                stop: threading.Event, max_updates: int | None = None, emit=print) -> int:  # noqa: ANN001
    """Submit one update per newest version until `stop` (or `max_updates`); returns how many were sent."""
    store = store_for(cfg)
    signing_key, aggregator_key = load_device_key(key_dir), load_aggregator_public(aggregator_public)
    model = build_lora_model(cfg)
    sent, trained_on = 0, None
    try:
        while not stop.is_set() and (max_updates is None or sent < max_updates):
            latest = store.latest_version()
            if latest is None or latest == trained_on:
                for _ in store.watch_versions(timeout_s=1.0):
                    break
                continue
            record = store.load_version(latest)
            base = decode(record.adapter)
            set_adapter_state(model, base)
            start = time.perf_counter()
            batches = sampled_batches(data, cfg.trainer_participant_steps, cfg.batch_size, seed=cfg.seed * 7919 + latest)
            loss = train_adapter(model, [batches], cfg.training, freeze_lora_a=cfg.lora_aggregation == "ffa").loss
            trained = get_adapter_state(model)
            delta = {name: trained[name] - base[name] for name in trained}
            context = UpdateContext(cfg.federation, TRAINER_ID, latest, UpdateContext.new_update_id(),
                                    cfg.trainer_update_weight)
            sealed = seal(encode(delta, cfg.update_codec), context, aggregator_key, signing_key)
            store.append_update(sealed, {"received_at": time.time()})
            sent, trained_on = sent + 1, latest
            emit(json.dumps({"event": "update", "base_version": latest, "loss": round(loss, 5),
                             "train_s": round(time.perf_counter() - start, 3), "update_id": context.update_id,
                             "time": time.time()}))
            sys.stdout.flush()
    finally:
        store.close()
    return sent


def start_trainer_process(cfg: EdgefedConfig, run: RunDir) -> subprocess.Popen:
    """The cloud trainer beside the aggregator, as its own process (cloud/training/participant.py).

    It is enrolled like a device (its key under <keys>/devices/cloud-trainer,
    registered with the cloud), writes its events to `trainer.log` and its pid to
    `trainer.pid` in the run directory; the federation never waits for it.
    """
    keys = Path(cfg.keys_root)
    key_dir = keys / "devices" / TRAINER_ID
    if not (key_dir / f"{DEVICE_KEY}.key").exists():
        init_keys("edge", key_dir)
    registry = DeviceRegistry(keys / "cloud" / "registry.json")
    if TRAINER_ID not in registry:
        registry.register(TRAINER_ID, load_device_key(key_dir).public_key())
    run.path.mkdir(parents=True, exist_ok=True)
    log_file = open(run.path / "trainer.log", "w")  # noqa: SIM115 - the child owns it for its lifetime
    overrides = [a for k, v in cfg.to_run_config().items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.Popen([sys.executable, "-m", "edgefed.cloud.training.participant", "--features", cfg.cloud_trainer_features,
                             "--key-dir", str(key_dir), *overrides], stdout=log_file, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(cfg.client_threads)}, preexec_fn=die_with_parent)
    (run.path / "trainer.pid").write_text(f"{proc.pid}\n")
    log.info("cloud trainer started beside the aggregator (pid %d)", proc.pid)
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, required=True, help="the cloud's features (common/data/features.py)")
    parser.add_argument("--key-dir", type=Path, required=True, help=f"the trainer's enrolled key ({TRAINER_ID})")
    parser.add_argument("--aggregator-public-key", type=Path, default=None,
                        help="aggregator .pub or its folder (default: <keys-root>/cloud)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="run-config key=value")
    args = parser.parse_args(argv)
    cfg = EdgefedConfig().with_overrides(args.overrides)
    torch.set_num_threads(cfg.client_threads)
    aggregator = args.aggregator_public_key or Path(cfg.keys_root) / "cloud"
    participate(cfg, load_features(args.features), args.key_dir, aggregator, threading.Event())
    return 0


if __name__ == "__main__":
    sys.exit(main())
