"""Update codec: compress a dict of tensors into a versioned binary message, and back.

A codec is named by a short spec, stages joined by `+`:

    none                 float32 as is
    fp16                 half precision
    int8                 8-bit, one float32 scale per row (dense 2-D and up) or per 256 values
    int8b64              8-bit, one scale per block of 64 values
    int8s                8-bit with stochastic rounding (unbiased); combines with bNN
    topk0.05             keep the 5% largest-magnitude values (positions as a bitmap)
    zstd                 lossless zstandard over the whole payload

e.g. `topk0.05+int8+zstd`. Wire format, version 1 (all integers little-endian):

    b"EFC" u8:version  u16:len spec  u32:len header(JSON: names, shapes, dtypes)  payload

Every decoder path checks lengths and counts before it allocates or reads, and
raises `CodecError` on bad bytes: never an uncaught exception, never a silent
wrong answer. Decoded tensors are float32.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import zstandard

# Named tensors in a fixed order: an adapter state, or a delta of one (what the codec carries).
Adapter = OrderedDict[str, torch.Tensor]

MAGIC = b"EFC"
VERSION = 1
MAX_ELEMENTS = 1 << 28  # refuse headers that promise absurd sizes (256 M values)
MAX_DECOMPRESSED = 1 << 31
MAX_DIMS = 8
MAX_DIM = 1 << 31
_DTYPES = {"float32", "float16", "bfloat16"}


class CodecError(ValueError):
    """Bytes that are not a valid update of this codec, or an invalid codec spec.

    `reason` is a short stable code for metrics: `bad-payload`, or, when the
    header does not describe the expected tensors, `wrong-tensors` / `wrong-shape`."""

    def __init__(self, message: str, reason: str = "bad-payload") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CodecSpec:
    quant: str = "none"  # none | fp16 | int8
    block: int = 0  # int8: values per scale; 0 = per row (256 for 1-D and sparse values)
    stochastic: bool = False
    topk: float = 0.0  # fraction kept; 0 = dense
    zstd: bool = False

    @classmethod
    def parse(cls, spec: str) -> CodecSpec:
        quant, block, stochastic, topk, zstd = "none", 0, False, 0.0, False
        for stage in spec.strip().lower().split("+"):
            if stage == "none":
                continue
            if stage == "fp16":
                quant = "fp16"
            elif m := re.fullmatch(r"int8(s?)(?:b(\d+))?(s?)", stage):
                quant, stochastic = "int8", bool(m.group(1) or m.group(3))
                block = int(m.group(2) or 0)
                if m.group(2) is not None and not 8 <= block <= 1 << 20:
                    raise CodecError(f"int8 block must be 8..1048576, got {block}")
            elif m := re.fullmatch(r"topk(0?\.\d+|1(?:\.0*)?)", stage):
                topk = float(m.group(1))
                if not 0.0 < topk <= 1.0:
                    raise CodecError(f"topk fraction must be in (0, 1], got {topk}")
            elif stage == "zstd":
                zstd = True
            else:
                raise CodecError(f"unknown codec stage {stage!r} in {spec!r} (none, fp16, int8[s][bN], topkF, zstd)")
        return cls(quant, block, stochastic, topk, zstd)

    def __str__(self) -> str:
        stages = []
        if self.topk:
            stages.append(f"topk{self.topk:g}")
        if self.quant == "int8":
            stages.append("int8" + ("s" if self.stochastic else "") + (f"b{self.block}" if self.block else ""))
        elif self.quant == "fp16":
            stages.append("fp16")
        if self.zstd:
            stages.append("zstd")
        return "+".join(stages) or "none"

    @property
    def lossless(self) -> bool:
        return self.quant == "none" and not self.topk


def encode(
    tensors: dict[str, torch.Tensor], spec: CodecSpec | str, generator: torch.Generator | None = None
) -> bytes:
    """Compress float tensors (names in order) into one message."""
    spec = CodecSpec.parse(spec) if isinstance(spec, str) else spec
    header = {"tensors": []}
    chunks: list[bytes] = []
    for name, tensor in tensors.items():
        values = tensor.detach().to(torch.float32).contiguous().reshape(-1).numpy()
        dtype = str(tensor.dtype).replace("torch.", "")
        if dtype not in _DTYPES:
            raise CodecError(f"{name}: cannot encode dtype {dtype}")
        header["tensors"].append({"name": name, "shape": list(tensor.shape), "dtype": dtype})
        rows = tensor.shape[0] if tensor.dim() >= 2 else 1
        chunks.append(_encode_values(values, rows, spec, generator))
    payload = b"".join(chunks)
    if spec.zstd:
        payload = zstandard.ZstdCompressor(level=3).compress(payload)
    spec_bytes = str(spec).encode()
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, bytes([VERSION]), struct.pack("<H", len(spec_bytes)), spec_bytes,
                     struct.pack("<I", len(head)), head, payload])


def decode(data: bytes, expect: Mapping[str, tuple[int, ...]] | None = None) -> Adapter:
    """Inverse of `encode` (up to the quantizer's error). Raises CodecError on any bad input.

    With `expect` (name -> shape, e.g. the global adapter's), a header naming
    other tensors or shapes is refused before anything is decompressed or
    allocated, and decompression stops at the size those shapes can take."""
    return decode_flat(data, expect).adapter()


def decode_flat(data: bytes, expect: Mapping[str, tuple[int, ...]] | None = None) -> FlatDelta:
    """`decode`, as one flat vector: a top-k update keeps only its kept positions and values (what the
    aggregator checks and folds, in time proportional to what the update carries)."""
    reader = _Reader(bytes(data))
    if reader.take(3) != MAGIC:
        raise CodecError("not an edgefed update (bad magic)")
    version = reader.take(1)[0]
    if version != VERSION:
        raise CodecError(f"unsupported update format version {version} (this build reads {VERSION})")
    (spec_len,) = struct.unpack("<H", reader.take(2))
    try:
        spec = CodecSpec.parse(reader.take(spec_len).decode("ascii"))
    except UnicodeDecodeError:
        raise CodecError("codec spec is not ASCII") from None
    (head_len,) = struct.unpack("<I", reader.take(4))
    header = _parse_header(reader.take(head_len), spec)
    if expect is not None:
        _check_expected(header.entries, expect)
    payload = reader.rest()
    if spec.zstd:
        try:
            # a frame that would inflate past what the header's tensors can take is a bomb: stop there
            payload = zstandard.ZstdDecompressor().decompress(payload,
                                                              max_output_size=min(header.limit, MAX_DECOMPRESSED))
        except zstandard.ZstdError as err:
            raise CodecError(f"zstd stage failed: {err}") from None
    if len(payload) > header.limit:
        raise CodecError(f"{len(payload)} payload bytes, more than the header's tensors can take ({header.limit})")
    names, shapes = header.names, header.shapes
    if spec.topk and spec.quant == "int8":
        positions, kept = _decode_sparse_int8(payload, header, spec)
        return FlatDelta(names, shapes, kept, positions, header.total)
    flat = np.empty(header.total, dtype=np.float32)
    body = _Reader(payload)
    offset = 0
    for (name, shape, _), n in zip(header.entries, header.sizes):
        rows = shape[0] if len(shape) >= 2 else 1
        flat[offset: offset + n] = _decode_values(body, n, rows, spec, name)
        offset += n
    if body.remaining:
        raise CodecError(f"{body.remaining} trailing bytes after the last tensor")
    return FlatDelta(names, shapes, flat, size=header.total)


HeaderEntries = tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype) per tensor, in order
_CACHED_HEADER_BYTES = 1 << 16  # a real adapter's header is a few KB; a larger one is parsed, never kept


class _Header(NamedTuple):
    entries: HeaderEntries
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]  # values per tensor
    total: int
    limit: int  # the most payload bytes these tensors can take in this codec


def _parse_header(head: bytes, spec: CodecSpec) -> _Header:
    """Every update of a federation has the same header bytes: small headers are parsed once."""
    if len(head) <= _CACHED_HEADER_BYTES:
        return _parse_small_header(head, spec)
    return _parse_header_bytes(head, spec)


def _parse_header_bytes(head: bytes, spec: CodecSpec) -> _Header:
    try:
        header = json.loads(head)
        entries = tuple((str(t["name"]), tuple(int(d) for d in t["shape"]), str(t["dtype"]))
                        for t in header["tensors"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise CodecError("malformed update header") from None
    for name, shape, dtype in entries:
        if dtype not in _DTYPES or len(shape) > MAX_DIMS or any(not 0 <= d < MAX_DIM for d in shape):
            raise CodecError(f"{name}: bad dtype or shape in header")
    sizes = tuple(math.prod(shape) for _, shape, _ in entries)
    if sum(sizes) > MAX_ELEMENTS:
        raise CodecError(f"header promises {sum(sizes)} values, more than the limit {MAX_ELEMENTS}")
    if len({name for name, _, _ in entries}) != len(entries):
        raise CodecError("duplicate tensor names in header")
    limit = sum(_max_encoded_bytes(n, shape, spec) for (_, shape, _), n in zip(entries, sizes))
    return _Header(entries, tuple(e[0] for e in entries), tuple(e[1] for e in entries), sizes, sum(sizes), limit)


_parse_small_header = functools.lru_cache(maxsize=64)(_parse_header_bytes)


class FlatDelta(Mapping[str, torch.Tensor]):
    """A decoded update as one flat float32 vector, its tensors one after the other in `names` order.

    Dense codecs carry every value (`positions` None); top-k codecs carry only the kept values and their
    (ascending) positions in the vector, and the rest is zero. The checks and the fold read `kept` and
    `positions` only; as a mapping it gives each tensor, a view of the dense vector made on first use."""

    def __init__(self, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], kept: np.ndarray,
                 positions: np.ndarray | None = None, size: int | None = None) -> None:
        self.names, self.shapes = names, shapes
        self.kept = kept  # float32: every value (dense) or the kept ones
        self.positions = positions  # int64 ascending, one per kept value; None when dense
        self.size = sum(math.prod(s) for s in shapes) if size is None else size  # values in all
        self._dense: torch.Tensor | None = None
        self._views: Adapter | None = None

    def dense(self) -> torch.Tensor:
        """Every value, as one 1-D float32 tensor (the kept ones in place, zeros elsewhere)."""
        if self._dense is None:
            if self.positions is None:
                flat = self.kept
            else:
                flat = np.zeros(self.size, dtype=np.float32)
                flat[self.positions] = self.kept
            self._dense = torch.from_numpy(flat)
        return self._dense

    def adapter(self) -> Adapter:
        """The named tensors, views of one buffer (`flat_view` gives it back whole)."""
        whole, out, offset = self.dense(), OrderedDict(), 0
        for name, shape in zip(self.names, self.shapes):
            n = math.prod(shape)
            out[name] = whole[offset: offset + n].view(shape)
            offset += n
        return out

    def scaled(self, factor: float) -> FlatDelta:
        return FlatDelta(self.names, self.shapes, (self.kept * np.float32(factor)).astype(np.float32),
                         self.positions, self.size)

    def add_to(self, total: np.ndarray, weight: float) -> None:
        """total += weight * self, touching only the values this update carries (positions are unique). A sum
        that overflows is left non-finite for the aggregator's check, without a warning."""
        with np.errstate(over="ignore", invalid="ignore"):
            if self.positions is None:
                total += np.float32(weight) * self.kept
            else:
                total[self.positions] += np.float32(weight) * self.kept

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._views is None:
            self._views = self.adapter()
        return self._views[name]

    def __iter__(self):  # noqa: ANN204
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _decode_sparse_int8(payload: bytes, header: _Header, spec: CodecSpec) -> tuple[np.ndarray, np.ndarray]:
    """The default codec's tensors (kept-position bitmap, then int8 values with a float32 scale per block), all
    at once: where their parts lie, then a few whole-update array operations on the kept values alone.
    Returns (positions in the whole update, values); the same values and the same refusals as `_decode_values`."""
    body = np.frombuffer(payload, dtype=np.uint8)
    block = spec.block or 256  # kept values are one row
    usual = _encoder_sections(header.sizes, spec.topk, block)
    if len(body) == usual.length and np.array_equal(body[usual.count_bytes].view("<u4").ravel(), usual.nonempty_kept):
        # every tensor keeps what the encoder keeps (every honest update): its parts lie where they always do
        bitmap, scale_bytes, value_bytes = body[usual.bitmap_bytes], body[usual.scale_bytes], body[usual.value_bytes]
        kept = usual.kept
    else:
        bitmap, scale_bytes, value_bytes, kept = _walk_sparse_sections(payload, body, header.entries, header.sizes,
                                                                       block)
    if not bitmap.size:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    layout = _sparse_layout(header.sizes, kept, block)
    # the set bits of all bitmaps (each padded to a byte), ascending: only the non-zero bytes are unpacked
    # (numpy finds non-zeros fastest in a bool view)
    nonzero_bytes = np.flatnonzero(bitmap.view(bool))
    bits = np.flatnonzero(np.unpackbits(bitmap[nonzero_bytes]).view(bool))
    padded = nonzero_bytes[bits >> 3] * 8 + (bits & 7)
    # each tensor's bits are a run of `padded`; a bit in a bitmap's last-byte padding is not a position
    first = np.searchsorted(padded, layout.padded_starts)
    counts = np.searchsorted(padded, layout.padded_starts + layout.sizes) - first  # kept positions per tensor
    if counts.sum() != len(padded):
        padded = np.concatenate([padded[a: a + c] for a, c in zip(first, counts)])
    wrong = np.flatnonzero(counts != layout.nonempty_kept)
    if len(wrong):
        i = layout.nonempty[wrong[0]]
        raise CodecError(f"{header.names[i]}: position bitmap holds {int(counts[wrong[0]])} values, "
                         f"header says {kept[i]}")
    positions = padded - np.repeat(layout.padded_starts - layout.starts, counts)
    scale = scale_bytes.view("<f4")
    q = value_bytes.view(np.int8)
    with np.errstate(over="ignore", invalid="ignore"):  # a tampered scale may overflow: the gate sees inf
        return positions, (q * scale[layout.scale_of_value]).astype(np.float32, copy=False)


def _walk_sparse_sections(payload: bytes, body: np.ndarray, entries: HeaderEntries, sizes: tuple[int, ...],
                          block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """The bitmaps, scale bytes and value bytes of a top-k+int8 payload, each tensor's count read and checked
    in turn (any count); the kept count of each tensor."""
    masks, scales, values, kept = [], [], [], []
    pos = 0
    for (name, _, _), n in zip(entries, sizes):
        if n == 0:
            kept.append(0)
            continue
        if pos + 4 > len(body):
            raise CodecError(f"truncated update: needed 4 bytes at offset {pos}, {len(body) - pos} left")
        (k,) = struct.unpack_from("<I", payload, pos)
        if k > n:
            raise CodecError(f"{name}: {k} kept values for {n} elements")
        n_blocks = -(-k // block) if k else 0
        mask_at, scales_at = pos + 4, pos + 4 + (n + 7) // 8
        values_at = scales_at + 4 * n_blocks
        end = values_at + k
        if end > len(body):
            raise CodecError(f"truncated update: {name} needs {end - pos} bytes at offset {pos}, {len(body) - pos} left")
        masks.append(body[mask_at:scales_at])
        scales.append(body[scales_at:values_at])
        values.append(body[values_at:end])
        kept.append(k)
        pos = end
    if pos != len(body):
        raise CodecError(f"{len(body) - pos} trailing bytes after the last tensor")
    empty = np.zeros(0, dtype=np.uint8)
    return (np.concatenate(masks) if masks else empty, np.concatenate(scales) if scales else empty,
            np.concatenate(values) if values else empty, tuple(kept))


@dataclass(frozen=True)
class _Sections:
    """Where each tensor's parts lie in a top-k+int8 payload whose every tensor keeps what the encoder keeps."""

    length: int  # payload bytes
    kept: tuple[int, ...]  # per tensor (0 for an empty one)
    nonempty_kept: np.ndarray  # u32, per non-empty tensor
    count_bytes: np.ndarray  # [T, 4]: the bytes of each non-empty tensor's count
    bitmap_bytes: np.ndarray  # indices of every bitmap byte, in order
    scale_bytes: np.ndarray
    value_bytes: np.ndarray


@functools.lru_cache(maxsize=16)
def _encoder_sections(sizes: tuple[int, ...], topk: float, block: int) -> _Sections:
    kept, counts_at, bitmap, scales, values = [], [], [], [], []
    pos = 0
    for n in sizes:
        k = max(1, math.ceil(topk * n)) if n else 0  # as `_encode_values` keeps
        kept.append(k)
        if not n:
            continue
        counts_at.append(pos)
        n_blocks = -(-k // block)
        mask_at, scales_at = pos + 4, pos + 4 + (n + 7) // 8
        values_at = scales_at + 4 * n_blocks
        bitmap.append(np.arange(mask_at, scales_at))
        scales.append(np.arange(scales_at, values_at))
        values.append(np.arange(values_at, values_at + k))
        pos = values_at + k
    empty = np.zeros(0, dtype=np.int64)
    return _Sections(pos, tuple(kept), np.array([k for k in kept if k], dtype="<u4"),
                     np.array(counts_at, dtype=np.int64).reshape(-1, 1) + np.arange(4),
                     np.concatenate(bitmap) if bitmap else empty, np.concatenate(scales) if scales else empty,
                     np.concatenate(values) if values else empty)


def flat_view(adapter: Adapter) -> torch.Tensor | None:
    """All of `adapter`'s values as one 1-D float32 view, when its tensors lie one after the other in one buffer
    (as `decode` returns them); else None."""
    tensors = list(adapter.values())
    if not tensors or tensors[0].dtype != torch.float32:
        return None
    storage, start = tensors[0].untyped_storage(), tensors[0].storage_offset()
    total = 0
    for t in tensors:
        if (t.dtype != torch.float32 or not t.is_contiguous() or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() != start + total):
            return None
        total += t.numel()
    return torch.empty(0, dtype=torch.float32).set_(storage, start, (total,))


def views_of(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Adapter:
    """`like`'s names and shapes over the 1-D `flat` (their values one after the other): the inverse of
    `flat_view`."""
    out, offset = OrderedDict(), 0
    for name, tensor in like.items():
        n = tensor.numel()
        out[name] = flat[offset: offset + n].view(tensor.shape)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"{flat.numel()} values for tensors of {offset}")
    return out


def flat_values(adapter: Adapter) -> torch.Tensor:
    """`flat_view`, or a flattened copy of tensors that do not share one buffer."""
    view = flat_view(adapter)
    return view if view is not None else torch.cat([t.reshape(-1).float() for t in adapter.values()])


@dataclass(frozen=True)
class _SparseLayout:
    padded_starts: np.ndarray  # where each non-empty tensor's bitmap starts among the unpacked bits
    sizes: np.ndarray  # each non-empty tensor's values
    starts: np.ndarray  # where each non-empty tensor's values start in the whole update
    nonempty: np.ndarray  # tensor index of each non-empty tensor
    nonempty_kept: np.ndarray  # its kept count
    scale_of_value: np.ndarray  # for each kept value (all tensors), the index of its block's scale


@functools.lru_cache(maxsize=16)
def _sparse_layout(sizes: tuple[int, ...], kept: tuple[int, ...], block: int) -> _SparseLayout:
    """Index arrays for one adapter's shapes and kept counts (the same for every update of a federation)."""
    nonempty = np.array([i for i, n in enumerate(sizes) if n], dtype=np.int64)
    n = np.array([sizes[i] for i in nonempty], dtype=np.int64)
    padded_starts = np.concatenate([[0], np.cumsum((n + 7) // 8 * 8)[:-1]])
    all_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    k = np.array([kept[i] for i in nonempty], dtype=np.int64)
    block_counts = -(-k // block)
    first_scale = np.concatenate([[0], np.cumsum(block_counts)[:-1]])
    tensor_of_value = np.repeat(np.arange(len(k)), k)
    within = np.arange(int(k.sum())) - np.repeat(np.concatenate([[0], np.cumsum(k)[:-1]]), k)
    scale_of_value = first_scale[tensor_of_value] + within // block
    return _SparseLayout(padded_starts, n, all_starts[nonempty], nonempty, k, scale_of_value)


def _check_expected(entries: HeaderEntries, expect: Mapping[str, tuple[int, ...]]) -> None:
    names = [name for name, _, _ in entries]
    if set(names) != set(expect):
        missing, extra = sorted(set(expect) - set(names)), sorted(set(names) - set(expect))
        raise CodecError(f"missing {missing[:2]}, unexpected {extra[:2]}", "wrong-tensors")
    for name, shape, _ in entries:
        if tuple(shape) != tuple(expect[name]):
            raise CodecError(f"{name}: {tuple(shape)} != {tuple(expect[name])}", "wrong-shape")


def _max_encoded_bytes(n: int, shape: tuple[int, ...], spec: CodecSpec) -> int:
    """The most bytes one tensor of n values can take in this codec (topk may keep all of them)."""
    rows = shape[0] if len(shape) >= 2 else 1
    size = _quantized_bytes(n, rows, spec)
    if spec.topk and n:
        size = 4 + (n + 7) // 8 + _quantized_bytes(n, 1, spec)
    return size


def _quantized_bytes(n: int, rows: int, spec: CodecSpec) -> int:
    if spec.quant == "none":
        return 4 * n
    if spec.quant == "fp16":
        return 2 * n
    return 0 if n == 0 else n + 4 * -(-n // _blocks(n, rows, spec))


def decode_spec(data: bytes) -> str:
    """The codec spec a message was encoded with (header only)."""
    reader = _Reader(bytes(data[:1024]))
    if reader.take(3) != MAGIC or reader.take(1)[0] != VERSION:
        raise CodecError("not an edgefed update")
    (spec_len,) = struct.unpack("<H", reader.take(2))
    return reader.take(spec_len).decode("ascii", errors="replace")


# --- stages ---------------------------------------------------------------


def _encode_values(values: np.ndarray, rows: int, spec: CodecSpec, generator: torch.Generator | None) -> bytes:
    parts = []
    n = values.size
    if spec.topk and n:
        k = max(1, int(math.ceil(spec.topk * n)))
        if k < n:
            keep = np.argpartition(np.abs(values), n - k)[n - k :]
            keep.sort()
        else:
            keep = np.arange(n)
        mask = np.zeros(n, dtype=bool)
        mask[keep] = True
        parts += [struct.pack("<I", k), np.packbits(mask).tobytes()]
        values, rows = values[keep], 1
    parts.append(_quantize(values, rows, spec, generator))
    return b"".join(parts)


def _decode_values(body: _Reader, n: int, rows: int, spec: CodecSpec, name: str) -> np.ndarray:
    if spec.topk and n:
        (k,) = struct.unpack("<I", body.take(4))
        if k > n:
            raise CodecError(f"{name}: {k} kept values for {n} elements")
        mask = np.unpackbits(np.frombuffer(body.take((n + 7) // 8), dtype=np.uint8), count=n).astype(bool)
        if int(mask.sum()) != k:
            raise CodecError(f"{name}: position bitmap holds {int(mask.sum())} values, header says {k}")
        kept = _dequantize(body, k, 1, spec, name)
        values = np.zeros(n, dtype=np.float32)
        values[mask] = kept
        return values
    return _dequantize(body, n, rows, spec, name)


def _blocks(n: int, rows: int, spec: CodecSpec) -> int:
    """Values per scale."""
    if spec.block:
        return spec.block
    return n // rows if rows > 1 and n % rows == 0 else 256


def _quantize(values: np.ndarray, rows: int, spec: CodecSpec, generator: torch.Generator | None) -> bytes:
    if spec.quant == "none":
        return values.astype("<f4").tobytes()
    if spec.quant == "fp16":
        return values.astype("<f2").tobytes()
    n = values.size
    if n == 0:
        return b""
    block = _blocks(n, rows, spec)
    padded = np.zeros(-(-n // block) * block, dtype=np.float32)
    padded[:n] = values
    grid = padded.reshape(-1, block)
    scales = np.abs(grid).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    scaled = grid / scales[:, None]
    if spec.stochastic:
        noise = torch.rand(scaled.shape, generator=generator).numpy()
        q = np.floor(scaled + noise)
    else:
        q = np.rint(scaled)
    q = np.clip(q, -127, 127).astype(np.int8).reshape(-1)[:n]
    return scales.astype("<f4").tobytes() + q.tobytes()


def _dequantize(body: _Reader, n: int, rows: int, spec: CodecSpec, name: str) -> np.ndarray:
    if spec.quant == "none":
        values = np.frombuffer(body.take(4 * n), dtype="<f4")
    elif spec.quant == "fp16":
        values = np.frombuffer(body.take(2 * n), dtype="<f2")
    else:
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        block = _blocks(n, rows, spec)
        n_blocks = -(-n // block)
        scales = np.frombuffer(body.take(4 * n_blocks), dtype="<f4")
        q = np.frombuffer(body.take(n), dtype=np.int8).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # a tampered scale may overflow: the gate sees inf
            values = q * np.repeat(scales, block)[:n]
    # Non-finite values pass through faithfully: rejecting them is the
    # aggregator's sanity gate's job, with its own reason.
    return values.astype(np.float32)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(f"truncated update: needed {n} bytes at offset {self.pos}, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos
