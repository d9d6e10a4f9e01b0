from collections import Counter

import pytest

from edgefed.common.data.clip_manifest import ManifestEntry, read_manifest
from edgefed.simulations.partition import dirichlet_partition, label_skew


def _entries(n_per_label=50, labels=("a", "b", "c", "d")):
    return [ManifestEntry(f"{lab}_{i}.mp4", lab, "/data") for lab in labels for i in range(n_per_label)]


def _all(partition):
    out = list(partition.central)
    for split in partition.clients:
        out += split.train + split.heldout
    return out


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_every_entry_assigned_exactly_once(alpha):
    entries = _entries()
    partition = dirichlet_partition(entries, num_clients=5, alpha=alpha, seed=3)
    assigned = Counter(e.video for e in _all(partition))
    assert set(assigned) == {e.video for e in entries}
    assert set(assigned.values()) == {1}
    assert all(split.train and split.heldout for split in partition.clients)


def test_central_split_is_stratified():
    partition = dirichlet_partition(_entries(), num_clients=3, alpha=1.0, seed=0, central_fraction=0.2)
    assert Counter(e.label for e in partition.central) == {"a": 10, "b": 10, "c": 10, "d": 10}


def test_alpha_controls_label_skew():
    entries = _entries(100)
    skew = {
        alpha: sum(label_skew(dirichlet_partition(entries, 6, alpha, seed=s)) for s in range(5)) / 5
        for alpha in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1  # near IID
    assert skew[0.1] > 0.4  # a few dominant labels per client


def test_same_seed_same_partition():
    a = dirichlet_partition(_entries(), 4, 0.5, seed=11)
    b = dirichlet_partition(_entries(), 4, 0.5, seed=11)
    assert [[e.video for e in s.train] for s in a.clients] == [[e.video for e in s.train] for s in b.clients]


def test_too_few_clips_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(_entries(2), num_clients=10, alpha=1.0, seed=0)


def test_written_partition_reads_back(tmp_path):
    partition = dirichlet_partition(_entries(), 3, 1.0, seed=0)
    partition.write(tmp_path)
    back = read_manifest(tmp_path / "client_1" / "train.jsonl")
    assert [(e.path.name, e.label) for e in back] == [(e.path.name, e.label) for e in partition.clients[1].train]
