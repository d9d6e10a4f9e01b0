"""Non-IID partitioning of a manifest across simulated clients.

Label skew follows Dirichlet(alpha) per label (Hsu et al. 2019): small alpha
gives each client a few dominant labels, large alpha approaches IID. Every
entry goes to exactly one client; each client's share is then split into a
train and a held-out part. A central held-out split is carved off first so the
server evaluates on clips no client has seen.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefed.common.data.clip_manifest import ManifestEntry, write_manifest


@dataclass
class ClientSplit:
    train: list[ManifestEntry]
    heldout: list[ManifestEntry]


@dataclass
class Partition:
    clients: list[ClientSplit]
    central: list[ManifestEntry]  # the server's held-out set

    def write(self, out_dir: str | Path) -> Path:
        """Write `client_<i>/{train,heldout}.jsonl` and `central/heldout.jsonl`; returns out_dir."""
        out = Path(out_dir)
        for i, split in enumerate(self.clients):
            write_manifest(out / f"client_{i}" / "train.jsonl", split.train)
            write_manifest(out / f"client_{i}" / "heldout.jsonl", split.heldout)
        write_manifest(out / "central" / "heldout.jsonl", self.central)
        return out


def stratified_split(
    entries: list[ManifestEntry], fraction: float, rng: np.random.Generator
) -> tuple[list[ManifestEntry], list[ManifestEntry]]:
    """(rest, held) with `fraction` of each label held out (at least one per label if it has two)."""
    by_label = _by_label(entries)
    rest, held = [], []
    for label in sorted(by_label):
        items = by_label[label]
        order = rng.permutation(len(items))
        n_held = int(round(fraction * len(items)))
        if fraction > 0 and len(items) >= 2:
            n_held = max(1, n_held)
        held += [items[j] for j in order[:n_held]]
        rest += [items[j] for j in order[n_held:]]
    return rest, held


def dirichlet_partition(
    entries: list[ManifestEntry],
    num_clients: int,
    alpha: float,
    seed: int,
    heldout_fraction: float = 0.2,
    central_fraction: float = 0.2,
    min_per_client: int = 4,
    max_tries: int = 100,
) -> Partition:
    """Split entries across clients with Dirichlet(alpha) label skew.

    Redraws (up to max_tries) until every client has at least `min_per_client`
    entries, so no simulated device is left with nothing to train on.
    """
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    rng = np.random.default_rng(seed)
    pool, central = stratified_split(entries, central_fraction, rng)
    if len(pool) < num_clients * min_per_client:
        raise ValueError(
            f"{len(pool)} clips cannot give {num_clients} clients {min_per_client} each; "
            "generate more clips or use fewer clients"
        )
    by_label = _by_label(pool)
    for _ in range(max_tries):
        shares: list[list[ManifestEntry]] = [[] for _ in range(num_clients)]
        for label in sorted(by_label):
            items = by_label[label]
            order = rng.permutation(len(items))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(items)).astype(int)
            for client, chunk in enumerate(np.split(order, cuts)):
                shares[client] += [items[j] for j in chunk]
        if min(len(s) for s in shares) >= min_per_client:
            break
    else:
        raise ValueError(
            f"no Dirichlet(alpha={alpha}) draw gave every client {min_per_client} clips in "
            f"{max_tries} tries; raise alpha or generate more clips"
        )
    clients = []
    for share in shares:
        order = rng.permutation(len(share))
        shuffled = [share[j] for j in order]
        n_held = max(1, int(round(heldout_fraction * len(shuffled))))
        clients.append(ClientSplit(train=shuffled[n_held:], heldout=shuffled[:n_held]))
    return Partition(clients=clients, central=central)


def label_skew(partition: Partition) -> float:
    """Mean total-variation distance between each client's label mix and the pooled mix (0 = IID)."""
    pooled: dict[str, int] = defaultdict(int)
    per_client = []
    for split in partition.clients:
        counts: dict[str, int] = defaultdict(int)
        for e in split.train + split.heldout:
            counts[e.label] += 1
            pooled[e.label] += 1
        per_client.append(counts)
    labels = sorted(pooled)
    total = sum(pooled.values())
    p = np.array([pooled[label] / total for label in labels])
    dists = []
    for counts in per_client:
        n = sum(counts.values())
        q = np.array([counts[label] / n for label in labels])
        dists.append(0.5 * np.abs(p - q).sum())
    return float(np.mean(dists))


def _by_label(entries: list[ManifestEntry]) -> dict[str, list[ManifestEntry]]:
    groups: dict[str, list[ManifestEntry]] = defaultdict(list)
    for e in entries:
        groups[e.label].append(e)
    return groups
