"""Sealed updates: every tamper, replay, wrong key and unknown device is refused with a reason."""

from __future__ import annotations

import stat
from collections import OrderedDict

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefed.cloud.aggregation.update_opener import RejectedUpdate, UpdateOpener, check_delta
from edgefed.cloud.aggregation.version_window import IssuedVersions
from edgefed.common.keys import DeviceRegistry, KeyMaterialError, init_keys, load_aggregator_key, load_device_key
from edgefed.common.wire.codec import encode
from edgefed.common.wire.envelope import EnvelopeError, UpdateContext, seal, verify_and_open

REFERENCE = OrderedDict(w=torch.zeros(16, 8), b=torch.zeros(8))
AGG = X25519PrivateKey.generate()
DEVICE = Ed25519PrivateKey.generate()


def _delta(scale=0.01):
    g = torch.Generator().manual_seed(0)
    return OrderedDict((n, torch.randn(v.shape, generator=g) * scale) for n, v in REFERENCE.items())


def _sealed(node="dev-1", base=0, run="fed", update_id=None, payload=None, device=DEVICE, agg_public=None,
            examples=10.0):
    context = UpdateContext(run, node, base, update_id or UpdateContext.new_update_id(), examples)
    return seal(payload if payload is not None else encode(_delta(), "int8+zstd"), context,
                agg_public or AGG.public_key(), device)


def _opener(tmp_path, versions=(0,), max_norm=50.0, clip=False):
    registry = DeviceRegistry(tmp_path / "registry.json")
    registry.register("dev-1", DEVICE.public_key())
    window = IssuedVersions()
    for version in versions:
        window.issue(version)
    return UpdateOpener("fed", AGG, registry, window, max_norm, clip)


def test_sealed_update_opens_to_the_same_delta(tmp_path):
    opened = _opener(tmp_path).open(_sealed(), REFERENCE)
    assert opened.context.node == "dev-1" and opened.context.base_version == 0
    assert torch.allclose(opened.delta["w"], _delta()["w"], atol=1e-3)


def _reason(tmp_path, data, opener=None):
    with pytest.raises(RejectedUpdate) as err:
        (opener or _opener(tmp_path)).open(data, REFERENCE)
    return err.value.reason


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_rejected(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("flip")
    sealed = bytearray(_sealed())
    pos = data.draw(st.integers(0, len(sealed) - 1))
    sealed[pos] ^= 1 << data.draw(st.integers(0, 7))
    reason = _reason(tmp, bytes(sealed))
    assert reason in {"bad-signature", "malformed", "decrypt-failed", "unknown-device", "wrong-run"}


def test_replay_is_rejected(tmp_path):
    opener = _opener(tmp_path)
    data = _sealed(update_id="abc123")
    opener.open(data, REFERENCE)
    assert _reason(tmp_path, data, opener) == "replayed"
    # a new update id with the same content is fine
    opener.open(_sealed(update_id="abc124"), REFERENCE)


def test_wrong_aggregator_key_is_rejected(tmp_path):
    other = X25519PrivateKey.generate()
    assert _reason(tmp_path, _sealed(agg_public=other.public_key())) == "decrypt-failed"


def test_unregistered_device_is_rejected(tmp_path):
    assert _reason(tmp_path, _sealed(node="stranger", device=Ed25519PrivateKey.generate())) == "unknown-device"


def test_registered_name_with_someone_elses_key_is_rejected(tmp_path):
    assert _reason(tmp_path, _sealed(node="dev-1", device=Ed25519PrivateKey.generate())) == "bad-signature"


def test_unknown_base_version_and_wrong_run_are_rejected(tmp_path):
    assert _reason(tmp_path, _sealed(base=7)) == "unknown-base-version"
    assert _reason(tmp_path, _sealed(run="other-fed")) == "wrong-run"


def test_garbage_payload_inside_a_valid_envelope_is_rejected(tmp_path):
    assert _reason(tmp_path, _sealed(payload=b"not a codec message")) == "bad-payload"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash_the_opener(tmp_path_factory, data):
    try:
        _opener(tmp_path_factory.mktemp("rand")).open(data, REFERENCE)
    except RejectedUpdate as err:
        assert err.reason


def test_envelope_header_cannot_be_moved_to_another_update():
    a = _sealed(update_id="a" * 32)
    b = _sealed(update_id="b" * 32)
    spliced = b[: len(b) - 64] + a[-64:]  # b's body with a's signature
    with pytest.raises(EnvelopeError):
        verify_and_open(spliced, AGG, DEVICE.public_key())


def test_sanity_gate_reasons():
    nan = _delta()
    nan["w"][0, 0] = float("nan")
    cases = {
        "non-finite": nan,
        "wrong-tensors": OrderedDict(w=torch.zeros(16, 8)),
        "wrong-shape": OrderedDict(w=torch.zeros(8, 16), b=torch.zeros(8)),
        "norm-too-large": _delta(scale=100.0),
    }
    for reason, delta in cases.items():
        with pytest.raises(RejectedUpdate) as err:
            check_delta(delta, REFERENCE, max_norm=5.0, clip=False, node="d")
        assert err.value.reason == reason
    clipped, norm, was_clipped = check_delta(_delta(scale=100.0), REFERENCE, max_norm=5.0, clip=True, node="d")
    assert was_clipped and norm > 5.0
    assert abs(sum(float(v.square().sum()) for v in clipped.values()) ** 0.5 - 5.0) < 1e-3


def test_keys_init_writes_private_keys_0600_and_refuses_to_overwrite(tmp_path):
    files = init_keys("edge", tmp_path / "dev")
    init_keys("cloud", tmp_path / "cloud")
    for path in [*files, tmp_path / "cloud" / "aggregator_x25519.key", tmp_path / "cloud" / "cloud_ed25519.key"]:
        if path.suffix == ".key":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
    load_device_key(tmp_path / "dev")
    load_aggregator_key(tmp_path / "cloud")
    with pytest.raises(KeyMaterialError, match="refusing"):
        init_keys("edge", tmp_path / "dev")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "device_ed25519.key").write_text("zz")
    with pytest.raises(KeyMaterialError):
        load_device_key(tmp_path / "bad")


# --- an attacker who holds a device key: signed envelopes with the worst contents -------------------

def _forge(header: dict | bytes, ciphertext: bytes = b"\0" * 32, device=DEVICE, nonce: bytes = b"\0" * 12) -> bytes:
    """A version-2 envelope with any header and ciphertext, signed with a real device key."""
    import json
    import struct

    from edgefed.common.wire.envelope import MAGIC, VERSION

    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = b"".join([MAGIC, bytes([VERSION]), struct.pack("<H", len(head)), head, nonce,
                     struct.pack("<I", len(ciphertext)), ciphertext])
    return body + device.sign(body)


def _codec_message(tensors: list[dict], payload: bytes, spec: str = "none") -> bytes:
    """Codec bytes with any header (names, shapes, dtypes) and any payload."""
    import json
    import struct

    from edgefed.common.wire.codec import MAGIC, VERSION

    head = json.dumps({"tensors": tensors}).encode()
    return b"".join([MAGIC, bytes([VERSION]), struct.pack("<H", len(spec)), spec.encode(),
                     struct.pack("<I", len(head)), head, payload])


@pytest.mark.parametrize("examples", [1e9, -99.999, float("nan"), float("inf"), 0.0, -0.0])
def test_the_weight_a_device_claims_is_signed_and_bounded(tmp_path, examples):
    assert _reason(tmp_path, _sealed(examples=examples)) == "bad-weight"
    assert _opener(tmp_path).open(_sealed(examples=100_000.0), REFERENCE).context.num_examples == 100_000.0


def test_the_weight_cannot_be_changed_without_breaking_the_signature(tmp_path):
    sealed = _sealed(examples=10.0)
    assert b'"examples":10.0' in sealed
    forged = sealed.replace(b'"examples":10.0', b'"examples":99.0')
    assert _reason(tmp_path, forged) == "bad-signature"


@pytest.mark.parametrize("epk", ["00" * 32, "01" + "00" * 31, "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"])
def test_a_low_order_ephemeral_key_is_a_typed_rejection(tmp_path, epk):
    header = {"run": "fed", "node": "dev-1", "base": 0, "update": "u" * 32, "examples": 10, "epk": epk}
    assert _reason(tmp_path, _forge(header)) == "bad-key"


@pytest.mark.parametrize("shape", [[2**64, 0], [2**31, 0], [0, 2**40], [-1, 4], [1] * 9, ["x", 1], [1.5, 2]])
def test_an_absurd_shape_header_is_a_typed_rejection(tmp_path, shape):
    tensors = [{"name": "w", "shape": shape, "dtype": "float32"}, {"name": "b", "shape": [8], "dtype": "float32"}]
    reason = _reason(tmp_path, _sealed(payload=_codec_message(tensors, b"\0" * 32)))
    assert reason in {"bad-payload", "wrong-shape"}


def _zstd_bomb(inflated_bytes: int) -> bytes:
    import zstandard

    chunk = b"\0" * (1 << 24)
    compressor = zstandard.ZstdCompressor(level=19).compressobj()
    parts = [compressor.compress(chunk) for _ in range(inflated_bytes // len(chunk))]
    return b"".join(parts) + compressor.flush()


@pytest.mark.parametrize("tensors", [
    [{"name": "w", "shape": [16, 8], "dtype": "float32"}, {"name": "b", "shape": [8], "dtype": "float32"}],  # right
    [{"name": "w", "shape": [8192, 8192], "dtype": "float32"}, {"name": "b", "shape": [8], "dtype": "float32"}],
])
def test_a_decompression_bomb_is_refused_before_it_is_inflated(tmp_path, tensors):
    """A small signed envelope whose zstd stage would inflate to 512 MiB costs almost nothing to refuse."""
    import tracemalloc

    bomb = _sealed(payload=_codec_message(tensors, _zstd_bomb(512 << 20), spec="zstd"))
    assert len(bomb) < 64 << 10
    opener = _opener(tmp_path)
    tracemalloc.start()
    try:
        reason = _reason(tmp_path, bomb, opener)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason in {"bad-payload", "wrong-shape"}
    assert peak < 16 << 20, f"refusing the bomb allocated {peak / 2**20:.0f} MiB"


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(header=st.fixed_dictionaries(
    {"run": st.one_of(st.just("fed"), _JSON), "node": st.just("dev-1"), "base": st.one_of(st.just(0), _JSON),
     "update": st.one_of(st.text(max_size=40), _JSON), "examples": st.one_of(st.floats(), _JSON),
     "epk": st.one_of(st.binary(min_size=32, max_size=32).map(bytes.hex), _JSON)}),
    ciphertext=st.binary(max_size=200))
def test_signed_envelopes_with_any_header_are_typed_rejections(tmp_path_factory, header, ciphertext):
    """Whatever a key holder signs, the gate answers with a RejectedUpdate and a reason, never anything else."""
    try:
        _opener(tmp_path_factory.mktemp("fuzz")).open(_forge(header, ciphertext), REFERENCE)
    except RejectedUpdate as err:
        assert err.reason


_DIMS = st.lists(st.one_of(st.integers(-2, 20), st.integers(-2**70, 2**70), _JSON), max_size=4)


@settings(max_examples=300, deadline=None)
@given(tensors=st.lists(st.fixed_dictionaries({"name": st.sampled_from(["w", "b", "x"]) | _JSON, "shape": _DIMS,
                                               "dtype": st.sampled_from(["float32", "float16", "int8"]) | _JSON}),
                        max_size=3) | _JSON,
       spec=st.sampled_from(["none", "fp16", "int8", "topk0.5+int8", "zstd", "int8+zstd", "bogus"]),
       payload=st.binary(max_size=600))
def test_sealed_codec_messages_with_any_header_are_typed_rejections(tmp_path_factory, tensors, spec, payload):
    """A valid seal around any codec header and payload: a typed rejection, or a delta of the right tensors."""
    import json
    import struct

    from edgefed.common.wire.codec import MAGIC, VERSION

    head = json.dumps({"tensors": tensors}).encode()
    message = b"".join([MAGIC, bytes([VERSION]), struct.pack("<H", len(spec)), spec.encode(),
                        struct.pack("<I", len(head)), head, payload])
    try:
        opened = _opener(tmp_path_factory.mktemp("fuzz")).open(_sealed(payload=message), REFERENCE)
    except RejectedUpdate as err:
        assert err.reason
    else:
        assert {n: tuple(t.shape) for n, t in opened.delta.items()} == {n: tuple(t.shape) for n, t in REFERENCE.items()}
