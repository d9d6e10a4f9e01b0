"""Server-side optimizers: how an aggregated delta moves the global adapter.

The aggregated client delta is a pseudo-gradient with the sign of a step
(Reddi et al., "Adaptive Federated Optimization", 2021). `sgd` is
global += lr * delta (lr 1.0 is FedAvg/FedBuff); `fedadam` keeps Adam moments of
the deltas on the server. Their state is checkpointed with every version.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from edgefed.common.config import ServerOptimizerName, check_choice
from edgefed.common.wire.codec import Adapter, decode, encode, flat_view, views_of


class ServerSGD:
    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def step(self, current: Adapter, delta: Adapter) -> Adapter:
        whole, step = flat_view(current), flat_view(delta)
        if whole is not None and step is not None and list(current) == list(delta):
            # both one buffer in the same order (the aggregator's global and its aggregate): one array operation
            with np.errstate(over="ignore", invalid="ignore"):  # the aggregator refuses a non-finite result
                return views_of(torch.from_numpy(whole.numpy() + np.float32(self.lr) * step.numpy()), current)
        return OrderedDict((n, v + self.lr * delta[n]) for n, v in current.items())

    def state_bytes(self) -> bytes:
        return b""

    def load_state_bytes(self, data: bytes) -> None:
        pass


class FedAdam:
    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: Adapter = OrderedDict()
        self.v: Adapter = OrderedDict()

    def step(self, current: Adapter, delta: Adapter) -> Adapter:
        out = OrderedDict()
        for name, value in current.items():
            d = delta[name]
            m = self.beta1 * self.m.get(name, torch.zeros_like(d)) + (1 - self.beta1) * d
            v = self.beta2 * self.v.get(name, torch.zeros_like(d)) + (1 - self.beta2) * d * d
            self.m[name], self.v[name] = m, v
            out[name] = value + self.lr * m / (v.sqrt() + self.tau)
        return out

    def state_bytes(self) -> bytes:
        if not self.m:
            return b""
        state = OrderedDict([*((f"m.{n}", t) for n, t in self.m.items()), *((f"v.{n}", t) for n, t in self.v.items())])
        return encode(state, "none")

    def load_state_bytes(self, data: bytes) -> None:
        self.m, self.v = OrderedDict(), OrderedDict()
        for key, tensor in (decode(data) if data else {}).items():
            kind, name = key.split(".", 1)
            (self.m if kind == "m" else self.v)[name] = tensor


ServerOptimizer = ServerSGD | FedAdam
# One class per name of `ServerOptimizerName` (tests/test_fedbuff.py keeps the two in step).
SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {"sgd": ServerSGD, "fedadam": FedAdam}


def make_server_optimizer(name: ServerOptimizerName, lr: float) -> ServerOptimizer:
    check_choice("server-optimizer", name, ServerOptimizerName)
    return SERVER_OPTIMIZERS[name](lr)
