"""LoRA-aware aggregation of client deltas.

Averaging LoRA's A and B separately is not averaging the updates they stand
for: mean(B_i) @ mean(A_i) != mean(B_i @ A_i). Three modes (`lora-aggregation`):

- `fedavg`: per-tensor weighted mean of the deltas (the usual, inexact for LoRA).
- `ffa`: FFA-LoRA (Sun et al., 2024). A stays frozen at its shared
  initialisation on every trainer (common/training.py) and only B is trained, so
  mean(B_i) @ A == mean(B_i @ A) exactly. The server also drops any A delta.
- `svd`: aggregate the products: each update's B_i A_i minus its base's B A is
  averaged into the global product, which is refactored to rank r by a
  truncated SVD (the best rank-r approximation, Eckart-Young), split
  symmetrically as B = U sqrt(S), A = sqrt(S) V^T.

Tensors that are not LoRA factors (fusion, head) are always averaged per tensor.
The result is an aggregated delta for the server optimizer to apply.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from edgefed.common.config import LoraAggregationMode, check_choice
import numpy as np

from edgefed.common.wire.codec import Adapter, FlatDelta, flat_values


@dataclass
class WeightedDelta:
    delta: FlatDelta | dict[str, torch.Tensor]
    weight: float  # already includes examples and staleness; the weights need not sum to 1
    base: dict[str, torch.Tensor]  # the global adapter the client started from (used by svd)


def lora_pairs(names: list[str]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (lora_A name, lora_B name) for every LoRA-adapted module."""
    pairs: dict[str, tuple[str, str]] = {}
    for name in names:
        if ".lora_A." in name:
            b_name = name.replace(".lora_A.", ".lora_B.")
            if b_name in names:
                pairs[name.split(".lora_A.")[0]] = (name, b_name)
    return pairs


def aggregate(current: dict[str, torch.Tensor], updates: list[WeightedDelta], mode: LoraAggregationMode) -> Adapter:
    """The aggregated delta to apply to `current` (the newest global adapter)."""
    check_choice("lora-aggregation", mode, LoraAggregationMode)
    if not updates:
        raise ValueError("nothing to aggregate")
    names = list(current)
    sizes = [current[n].numel() for n in names]
    # the weighted sum of whole updates, flattened: one array operation an update rather than two a tensor,
    # over only the values a sparse update carries
    total = np.zeros(sum(sizes), dtype=np.float32)
    for u in updates:
        if isinstance(u.delta, FlatDelta) and list(u.delta.names) == names:
            u.delta.add_to(total, u.weight)
        else:
            total += np.float32(u.weight) * flat_values(OrderedDict((n, u.delta[n]) for n in names)).numpy()
    pieces = torch.from_numpy(total).split(sizes)
    out = OrderedDict((n, piece.view(current[n].shape)) for n, piece in zip(names, pieces))
    if mode == "fedavg":
        return out
    for a_name, b_name in lora_pairs(list(current)).values():
        if mode == "ffa":
            out[a_name] = torch.zeros_like(current[a_name])
        else:
            out[a_name], out[b_name] = _svd_pair(current, updates, a_name, b_name)
    return out


def _svd_pair(
    current: dict[str, torch.Tensor], updates: list[WeightedDelta], a_name: str, b_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = current[a_name].double(), current[b_name].double()
    product = b @ a
    for u in updates:
        base_a, base_b = u.base[a_name].double(), u.base[b_name].double()
        trained = (base_b + u.delta[b_name].double()) @ (base_a + u.delta[a_name].double())
        product += u.weight * (trained - base_b @ base_a)
    new_b, new_a = refactor(product, rank=a.shape[0])
    return (new_a - a).to(current[a_name].dtype), (new_b - b).to(current[b_name].dtype)


def refactor(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-r approximation of `product`."""
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]
