"""Where LoRA goes in an encoder, as exact module names, and the check that refuses targets that would go wrong.

peft has no default targets for these families, and its suffix matching is easy to get
wrong: a bare `out_proj` also hits SigLIP's pooling head, an `nn.MultiheadAttention`
whose forward reads `out_proj.weight` without calling the module, so LoRA there trains nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from edgefed.common.encoders.loading import LoadedEncoder
from edgefed.common.encoders.spec import EncoderCheckpointError


def lora_targets(
    loaded: LoadedEncoder, layers: int | None = None, *, prefix: str = "", projections: Sequence[str] | None = None
) -> list[str]:
    """Full module names for LoRA: the attention projections of all layers (`layers=None`) or of the last `layers`.

    Names are relative to the encoder with `prefix` in front ("video_encoder." when the
    encoder is an attribute of a bigger model: without it, peft's suffix matching would also
    hit a second encoder's layers of the same name). `projections` keeps only some of the
    spec's projections, by their last name ("q_proj", "v_proj"). Refuses `layers` outside
    1..num_layers (`EncoderCheckpointError`). The names are checked to exist.
    """
    total = loaded.num_layers
    if layers is not None and not 1 <= layers <= total:
        raise EncoderCheckpointError(loaded.source, f"lora-layers {layers} is outside 1..{total} (the encoder's layers)")
    chosen = _projections(loaded, projections)
    layer_names = loaded.spec.layer_names(loaded.config)[total - (layers or total):]
    names = [f"{prefix}{layer}.{p}" for layer in layer_names for p in chosen]
    matched = check_lora_targets(loaded, names, prefix=prefix, projections=projections)
    if sorted(matched) != sorted(names):
        raise EncoderCheckpointError(loaded.source, f"LoRA targets not in the encoder: {sorted(set(names) - set(matched))[:4]}")
    return names


def check_lora_targets(
    loaded: LoadedEncoder, targets: str | Sequence[str], *, prefix: str = "", projections: Sequence[str] | None = None
) -> list[str]:
    """The module names (with `prefix`) peft would give LoRA for `targets` (a list or a full-match regex).

    Refuses (`EncoderCheckpointError`) targets that match nothing, that hit an
    `nn.MultiheadAttention` or anything inside one, that hit a module other than a layer's
    attention projection, or that give a layer only some of its projections (every targeted
    layer gets all of `projections`, by default all of the spec's).
    """
    config = LoraConfig(target_modules=targets if isinstance(targets, str) else list(targets))
    modules = {f"{prefix}{name}": module for name, module in loaded.module.named_modules() if name}
    matched = [name for name in modules if check_target_module_exists(config, name)]
    if not matched:
        raise EncoderCheckpointError(loaded.source, f"LoRA targets {_show(targets)} match no module of the encoder")
    attention_pools = [name for name, module in modules.items() if isinstance(module, nn.MultiheadAttention)]
    inside = sorted(m for m in matched for pool in attention_pools if m == pool or m.startswith(pool + "."))
    if inside:
        raise EncoderCheckpointError(
            loaded.source,
            f"LoRA targets {_show(targets)} hit {inside} in an nn.MultiheadAttention, whose forward reads its out_proj weight "
            "directly instead of calling it: LoRA there would train nothing; name the layer projections in full",
        )
    chosen = _projections(loaded, projections)
    expected = [f"{prefix}{layer}" for layer in loaded.spec.layer_names(loaded.config)]
    per_layer: dict[str, set[str]] = {}
    strays = []
    for name in matched:
        layer, projection = _split(name, expected)
        if layer is None or projection not in chosen:
            strays.append(name)
        else:
            per_layer.setdefault(layer, set()).add(projection)
    if strays:
        raise EncoderCheckpointError(
            loaded.source, f"LoRA targets {_show(targets)} hit modules that are not attention projections {chosen}: {strays[:4]}"
        )
    partial = {layer: sorted(set(chosen) - got) for layer, got in per_layer.items() if set(chosen) - got}
    if partial:
        raise EncoderCheckpointError(
            loaded.source, f"LoRA targets {_show(targets)} miss projections of targeted layers: {partial}"
        )
    return matched


def _projections(loaded: LoadedEncoder, wanted: Sequence[str] | None) -> tuple[str, ...]:
    spec = loaded.spec
    if wanted is None:
        return spec.projections
    by_last = {p.rsplit(".", 1)[-1]: p for p in spec.projections}
    unknown = sorted(set(wanted) - set(by_last))
    if unknown or not wanted:
        raise EncoderCheckpointError(
            loaded.source, f"LoRA projections {list(wanted)} are not all among {spec.name}'s {sorted(by_last)}"
        )
    return tuple(p for last, p in by_last.items() if last in set(wanted))


def _split(name: str, layers: Sequence[str]) -> tuple[str | None, str]:
    """A module name -> (the layer it sits in, its name inside the layer); (None, name) outside every layer."""
    for layer in layers:
        if name.startswith(layer + "."):
            return layer, name[len(layer) + 1:]
    return None, name


def _show(targets: str | Sequence[str]) -> str:
    if isinstance(targets, str):
        return repr(targets)
    listed = list(targets)
    return repr(listed[:4] + (["..."] if len(listed) > 4 else []))
