"""Client side of Flower's SecAgg+ (synchronous mode only).

SecAgg+ lives in Flower's legacy API: its server workflow speaks FitIns /
FitRes and drives four stages through `secaggplus_mod`. Only the stage that
collects masked vectors reaches our training code, with a FitIns; we reply
with a FitRes whose parameters are the dense float delta. The mod masks and
quantizes it, so the codec and the envelope do not apply on this path: the
server learns only the sum.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

LEGACY_FIT_CONFIG = "fitins.config"


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Hand SecAgg+ protocol messages to Flower's mod; everything else passes straight through."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_legacy_fit(msg: Message) -> bool:
    return LEGACY_FIT_CONFIG in msg.content.config_records
