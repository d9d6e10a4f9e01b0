"""Update codec: round trips, error feedback, and a decoder that never crashes on bad bytes."""

from __future__ import annotations

import math
import struct
from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefed.common.wire.codec import CodecError, CodecSpec, decode, decode_flat, decode_spec, encode, flat_values
from edgefed.edge.error_feedback import ErrorFeedback
from edgefed.edge.update_sender import build_update


def _tensors(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        [("a.lora_A", torch.randn(8, 192, generator=g) * 0.02), ("a.lora_B", torch.randn(192, 8, generator=g) * 0.01),
         ("head.bias", torch.randn(4, generator=g)), ("empty", torch.zeros(0, 3)), ("scalar", torch.tensor(0.5))]
    )


@pytest.mark.parametrize("spec", ["none", "zstd"])
def test_lossless_codecs_are_exact(spec):
    x = _tensors()
    y = decode(encode(x, spec))
    assert list(y) == list(x)
    assert all(torch.equal(x[n], y[n]) for n in x)


@pytest.mark.parametrize("spec", ["fp16", "fp16+zstd", "int8", "int8b64", "int8s", "int8sb32+zstd"])
def test_lossy_codecs_stay_within_the_quantizer_bound(spec):
    x = _tensors()
    y = decode(encode(x, spec, torch.Generator().manual_seed(0)))
    parsed = CodecSpec.parse(spec)
    for name in x:
        assert y[name].shape == x[name].shape and y[name].dtype == torch.float32
        if x[name].numel() == 0:
            continue
        if parsed.quant == "fp16":
            assert torch.allclose(y[name], x[name], rtol=1e-3, atol=1e-6)
        else:
            # one step of a 127-level grid scaled to the block max (stochastic: a full step)
            step = x[name].abs().max() / 127
            assert (y[name] - x[name]).abs().max() <= step * (1.0 if parsed.stochastic else 0.5) + 1e-7


def test_topk_keeps_exactly_the_largest_values():
    x = OrderedDict(w=torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 2.0, 0.3, -0.4, 0.01]))
    y = decode(encode(x, "topk0.3"))["w"]
    assert torch.equal(y, torch.tensor([0, -5.0, 0, 3.0, 0, 0, 2.0, 0, 0, 0]))


def test_stochastic_rounding_is_unbiased():
    """0.3 is not on the int8 grid: rounding to nearest is off by a constant, stochastic rounding on average is not."""
    x = OrderedDict(w=torch.full((20001,), 0.3))
    x["w"][0] = 1.0  # fixes the scale at 1/127
    stochastic = decode(encode(x, "int8sb20001", torch.Generator().manual_seed(0)))["w"][1:]
    nearest = decode(encode(x, "int8b20001"))["w"][1:]
    assert abs(float(nearest.mean()) - 0.3) > 5e-4
    assert abs(float(stochastic.mean()) - 0.3) < 1e-4


def test_spec_round_trips_and_is_in_the_header():
    for spec in ["none", "fp16", "int8", "int8b64", "int8s", "topk0.05+int8+zstd", "topk0.1+fp16"]:
        assert str(CodecSpec.parse(spec)) == spec
        assert decode_spec(encode(_tensors(), spec)) == spec


@pytest.mark.parametrize("bad", ["int7", "topk2", "topk0", "gzip", "int8b4"])
def test_bad_spec_is_a_codec_error(bad):
    with pytest.raises(CodecError):
        CodecSpec.parse(bad)


def test_error_feedback_sum_of_sent_tracks_sum_of_true_deltas(tmp_path):
    """With error feedback, what was sent over many rounds adds up to what was meant (residual bounded)."""
    spec = CodecSpec.parse("topk0.05+int8+zstd")
    g = torch.Generator().manual_seed(1)
    base = OrderedDict(w=torch.zeros(64, 64), b=torch.zeros(64))
    with_ef = ErrorFeedback(tmp_path / "residual.safetensors")
    true_sum = OrderedDict((n, torch.zeros_like(v)) for n, v in base.items())
    sent_ef = OrderedDict((n, torch.zeros_like(v)) for n, v in base.items())
    sent_plain = OrderedDict((n, torch.zeros_like(v)) for n, v in base.items())
    for _ in range(60):
        delta = OrderedDict((n, torch.randn(v.shape, generator=g) * 0.01 + 0.002) for n, v in base.items())
        trained = OrderedDict((n, base[n] + delta[n]) for n in base)
        got = decode(build_update(trained, base, spec, with_ef))
        plain = decode(encode(delta, spec))
        for n in base:
            true_sum[n] += delta[n]
            sent_ef[n] += got[n]
            sent_plain[n] += plain[n]
    err_ef = sum((true_sum[n] - sent_ef[n]).norm() for n in base)
    err_plain = sum((true_sum[n] - sent_plain[n]).norm() for n in base)
    assert err_ef < 0.2 * err_plain
    # the gap is exactly the residual still held on the device
    assert torch.allclose(true_sum["w"] - sent_ef["w"], with_ef.residual["w"], atol=1e-4)
    # and it survives a restart of the device
    assert torch.equal(ErrorFeedback(tmp_path / "residual.safetensors").residual["w"], with_ef.residual["w"])


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 6, 10, 50, -1])
def test_truncated_messages_are_codec_errors(cut):
    data = encode(_tensors(), "topk0.1+int8+zstd")
    with pytest.raises(CodecError):
        decode(data[:cut] if cut >= 0 else data[:-1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        decode(data)
    except CodecError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["none", "fp16", "int8", "topk0.1+int8+zstd", "int8+zstd"]), st.data())
def test_mutated_messages_decode_or_raise_codec_error(spec, data):
    """Flip, insert or delete bytes of a valid message: the decoder returns tensors or a CodecError, nothing else."""
    message = bytearray(encode(_tensors(), spec))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(message) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            message[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "insert":
            message.insert(pos, data.draw(st.integers(0, 255)))
        elif len(message) > 1:
            del message[pos]
    try:
        out = decode(bytes(message))
    except CodecError:
        return
    assert all(isinstance(v, torch.Tensor) for v in out.values())


_SPECS = st.builds(lambda quant, block, topk, zstd: "+".join(
    s for s in [f"topk{topk}" if topk else "", quant + (f"b{block}" if quant.startswith("int8") and block else ""),
                "zstd" if zstd else ""] if s) or "none",
    st.sampled_from(["none", "fp16", "int8", "int8s"]), st.sampled_from([0, 8, 64]), st.sampled_from([0, 0.01, 0.5, 1.0]),
    st.booleans())
_SHAPES = st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_SPECS, shapes=_SHAPES)
def test_the_size_bound_never_refuses_an_honest_update(spec, shapes):
    """Decoding against the expected shapes caps decompression at their size: never below what encode writes."""
    g = torch.Generator().manual_seed(0)
    tensors = OrderedDict((f"t{i}", torch.randn(shape, generator=g)) for i, shape in enumerate(shapes))
    out = decode(encode(tensors, spec), expect={n: tuple(t.shape) for n, t in tensors.items()})
    assert {n: tuple(t.shape) for n, t in out.items()} == {n: tuple(t.shape) for n, t in tensors.items()}


def test_a_header_for_other_tensors_is_refused_before_the_payload_is_read():
    data = encode(_tensors(), "int8+zstd")
    expect = {n: tuple(t.shape) for n, t in _tensors().items()}
    wrong_name = dict(expect, other=expect.pop(next(iter(expect))))
    with pytest.raises(CodecError) as err:
        decode(data, expect=wrong_name)
    assert err.value.reason == "wrong-tensors"
    first = next(iter(expect))
    with pytest.raises(CodecError) as err:
        decode(data, expect={**{n: tuple(t.shape) for n, t in _tensors().items()}, first: (1, 2, 3)})
    assert err.value.reason == "wrong-shape"


@pytest.mark.parametrize("spec", ["topk0.3+int8", "topk0.05+int8b8+zstd", "topk1.0+int8"])
def test_sparse_int8_keeps_the_topk_positions_and_values_within_the_quantizer_bound(spec):
    """The default codec's decoder works on the whole update at once: shapes of any size (bitmaps padded to a
    byte, empty tensors, one value) land where the plain top-k puts them."""
    g = torch.Generator().manual_seed(3)
    x = OrderedDict((f"t{i}", torch.randn(shape, generator=g))
                    for i, shape in enumerate([(7, 13), (0, 5), (1,), (8, 64), (3,), (13, 3), (64, 8)]))
    sparse = decode(encode(x, spec.replace("+int8b8", "").replace("+int8", "").replace("+zstd", "")))
    y = decode(encode(x, spec))
    for name in x:
        assert torch.all(y[name][sparse[name] == 0] == 0), name  # nothing where top-k kept nothing
        if x[name].numel():
            assert (y[name] - sparse[name]).abs().max() <= x[name].abs().max() / 127 * 0.5 + 1e-7, name


@pytest.mark.parametrize("spec", ["none", "fp16+zstd", "int8b64", "topk0.3", "topk0.3+int8+zstd", "topk0.05+int8b8"])
def test_the_flat_decode_is_the_decode_and_a_sparse_update_carries_only_its_kept_values(spec):
    """What the aggregator checks and folds (`decode_flat`) is what `decode` returns, value for value; the
    default codec's update holds only the kept values and their positions, never a dense copy."""
    data = encode(_tensors(), spec)
    tensors, flat = decode(data), decode_flat(data)
    assert list(flat) == list(tensors) and all(torch.equal(flat[n], tensors[n]) for n in tensors)
    assert torch.equal(flat.dense(), flat_values(tensors))
    parsed = CodecSpec.parse(spec)
    if parsed.topk and parsed.quant == "int8":
        kept = sum(max(1, math.ceil(parsed.topk * t.numel())) for t in _tensors().values() if t.numel())
        assert flat.positions is not None and len(flat.positions) == len(flat.kept) == kept
        assert torch.equal(torch.from_numpy(flat.kept), flat.dense()[torch.from_numpy(flat.positions)])
    else:
        assert flat.positions is None and len(flat.kept) == flat.size


def _respecified(message: bytes, spec: str) -> bytes:
    """`message` with its header's codec spec replaced (the tensors and payload kept)."""
    (old_len,) = struct.unpack_from("<H", message, 4)
    return message[:4] + struct.pack("<H", len(spec)) + spec.encode() + message[6 + old_len:]


def test_a_sparse_update_keeping_other_counts_than_the_encoder_decodes_the_same():
    """Every tensor of an honest update keeps what the encoder keeps, and the decoder reads it from where those
    counts put its parts; counts that differ (a valid message all the same) are read tensor by tensor."""
    many = encode(_tensors(), "topk0.5+int8")
    as_fewer = _respecified(many, "topk0.1+int8")  # the header says 10%, each tensor's count says 50%
    assert all(torch.equal(a, b) for a, b in zip(decode(as_fewer).values(), decode(many).values()))
    tampered = bytearray(as_fewer)
    tampered[-1] ^= 0xFF  # a kept value changed: decodes, to another value
    assert not torch.equal(flat_values(decode(bytes(tampered))), flat_values(decode(many)))


def test_a_bit_set_in_a_bitmaps_padding_is_not_a_position():
    """A tensor of 5 values has 3 padding bits in its bitmap's byte: one set there moves nothing."""
    x = OrderedDict(w=torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05]), v=torch.tensor([1.0, 2.0]))
    message = encode(x, "topk0.4+int8")
    bitmap_at = len(message) - (4 + 1 + 4 + 2) - (4 + 1 + 4 + 1) + 4  # w's part, then v's end the message
    assert message[bitmap_at] == 0b01010000  # -5.0 and 3.0 kept
    padded = bytearray(message)
    padded[bitmap_at] |= 0b00000001
    assert all(torch.equal(a, b) for a, b in zip(decode(bytes(padded)).values(), decode(message).values()))


def test_a_residual_another_process_replaced_is_read_anew(tmp_path):
    """Two processes serve one device in turn (a simulation's Ray actors): each carries on from the residual
    the other left, not from the one it kept in memory."""
    from edgefed.common.lru import Lru

    actors = [Lru(4), Lru(4)]

    def feedback(actor: int) -> ErrorFeedback:
        return actors[actor].get("device", lambda: ErrorFeedback(tmp_path / "residual.safetensors"),
                                 valid=ErrorFeedback.is_current)

    x = OrderedDict(w=torch.tensor([1.0, 0.5]))
    feedback(0).update(x, OrderedDict(w=torch.tensor([1.0, 0.0])))  # left 0.5 behind
    feedback(1).update(x, OrderedDict(w=torch.tensor([0.0, 0.5])))  # then another process left 1.0 behind
    assert torch.equal(feedback(0).compensate(OrderedDict(w=torch.zeros(2)))["w"], torch.tensor([1.0, 0.0]))
