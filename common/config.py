"""One typed config object for a run, and the narrow views its parts take.

Flower hands both apps a flat run config (`[tool.flwr.app.config]` in
pyproject.toml, fused with `--run-config` overrides). `EdgefedConfig` is that
dictionary with types, defaults, help text and validation, built once at the
edge of each app and passed down. Keys are the field names with `-` for `_`
(`local-epochs` <-> `local_epochs`).

The fields are declared once, in small groups (`FeatureSettings`,
`FedBuffSettings`, `TrainerSettings`, ...): each group is a frozen dataclass
that checks its own fields, and `EdgefedConfig` is all of them together, flat.
A part takes the group it uses, cut out of the run config with
`FeatureSettings.of(cfg)` (or the shortcut properties such as `cfg.features`),
and can be built on its own with its defaults (`FeatureSettings(image_size=64)`).
Closed choices are `Literal` types; `choices(...)` lists them for checks and
error messages, so each list of valid names is written once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args


class ConfigError(ValueError):
    """A run config key is unknown, has the wrong type, or an invalid value."""


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors peft's field(metadata={"help"})
    return field(default=default, metadata={"help": help})


# --- closed choices ----------------------------------------------------------------
Mode = Literal["async", "sync"]
ServerOptimizerName = Literal["sgd", "fedadam"]
LoraAggregationMode = Literal["fedavg", "ffa", "svd"]
Transport = Literal["sealed", "plain"]
SecureAggregation = Literal["none", "secaggplus"]
BasePrecisionName = Literal["auto", "fp32", "int8", "nf4"]
ExportQuantization = Literal["int8", "int4"]
ShotDetectorName = Literal["cuts", "content", "adaptive", "fade"]  # combinable with "+", e.g. content+fade
KeyframeSelectorName = Literal["sharpest", "even"]
STATE_STORE_SCHEMES = ("memory://", "redis://", "rediss://", "unix://")


def choices(kind: Any) -> tuple[str, ...]:
    """The names a `Literal` type admits, in declaration order."""
    return get_args(kind)


def check_choice(key: str, value: str, kind: Any) -> None:
    """ConfigError naming the key and the valid names, unless `value` is one of them."""
    valid = choices(kind)
    if value not in valid:
        raise ConfigError(f"{key} must be {' or '.join(valid) if len(valid) < 3 else 'one of ' + ', '.join(valid)}, "
                          f"got {value!r}")


FEDERATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

SettingsT = TypeVar("SettingsT", bound="_Settings")


@dataclass(frozen=True)
class _Settings:
    """A group of run-config fields: checked when built; `of(cfg)` cuts it out of a whole run config."""

    def __post_init__(self) -> None:
        type(self)._check(self)

    def _check(self) -> None:
        """Raise ConfigError for a bad value of this group's own fields."""

    @classmethod
    def of(cls: type[SettingsT], cfg: _Settings) -> SettingsT:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _require(self, predicate: Any, names: tuple[str, ...], rule: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not predicate(value):
                raise ConfigError(f"{key_of(name)} must be {rule}, got {value}")

    def _positive(self, *names: str) -> None:
        self._require(lambda v: v > 0, names, "> 0")

    def _non_negative(self, *names: str) -> None:
        self._require(lambda v: v >= 0, names, ">= 0")


@dataclass(frozen=True)
class RunSettings(_Settings):
    """Where a run lives and what it classifies."""

    run_id: str = _f("", "Run directory name under out_dir; empty: a timestamped id.")
    out_dir: str = _f("runs", "Where run directories are written.")
    data_dir: str = _f("", "Prepared data (manifest, partitions, central held-out features).")
    labels: str = _f(
        "stripes_hum,stripes_chirp,rings_hum,rings_chirp",
        "Comma-separated class names; their order fixes the class indices.",
    )
    seed: int = _f(0, "Seed for data generation, partitioning, sampling and shuffling.")

    @property
    def label_names(self) -> list[str]:
        return [s.strip() for s in self.labels.split(",") if s.strip()]

    def _check(self) -> None:
        names = self.label_names
        if len(names) < 2:
            raise ConfigError(f"labels needs at least two classes, got {self.labels!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"labels has duplicates: {self.labels!r}")


@dataclass(frozen=True)
class RoundSettings(_Settings):
    """The federation and its synchronous rounds (mode = sync)."""

    federation: str = _f("edgefed", "Federation name: bound into every sealed update and keys the cloud's state.")
    mode: Mode = _f("async", "async (buffered FedBuff on Flower's Grid, the default) or sync (FedAvg rounds).")
    num_rounds: int = _f(20, "Synchronous FedAvg rounds.")
    fraction_train: float = _f(1.0, "Fraction of connected nodes sampled per round.")
    min_clients: int = _f(4, "Nodes that must be connected before a round starts.")
    round_timeout_s: float = _f(3600.0, "Seconds a round waits for replies before going on without them.")

    def _check(self) -> None:
        # it names Redis keys (and their Cluster hash tag), run directories and what updates are sealed for
        if not FEDERATION_NAME.fullmatch(self.federation):
            raise ConfigError(f"federation must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter "
                              f"or digit), got {self.federation!r}")
        check_choice("mode", self.mode, Mode)
        self._positive("num_rounds", "min_clients", "round_timeout_s")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")


@dataclass(frozen=True)
class FedBuffSettings(_Settings):
    """Asynchronous buffered aggregation (mode = async): the aggregator and its loop."""

    state_store: str = _f("memory://", "Aggregator state: memory:// (in-process) or redis://host:port/db (durable).")
    state_store_password_file: str = _f("", "File holding the Redis password (mode 0600); keeps the secret out of state-store URLs, logs and run configs.")
    max_versions: int = _f(40, "Stop after publishing this many global versions.")
    target_accuracy: float = _f(0.0, "Stop once the central held-out accuracy reaches this (0: never).")
    wall_budget_s: float = _f(0.0, "Stop after this many seconds of wall time (0: no budget).")
    concurrency: int = _f(0, "Clients kept training at all times (0: every connected node).")
    buffer_size: int = _f(2, "Updates buffered before they are aggregated into a new version.")
    staleness_weight: str = _f("poly0.5", "Staleness discount: polyA = 1/(1+s)^A, constant, or hingeA:B.")
    max_staleness: int = _f(32, "Updates based on a version more than this many versions old are rejected.")
    server_optimizer: ServerOptimizerName = _f("sgd", "sgd (global += lr * aggregate) or fedadam.")
    server_learning_rate: float = _f(1.0, "Server learning rate (1.0 with sgd is plain FedBuff / FedAvg).")
    message_ttl_s: float = _f(900.0, "Seconds a training instruction lives; a client slower than this is replaced.")
    eval_every: int = _f(1, "Evaluate the global model centrally every this many versions.")
    lora_aggregation: LoraAggregationMode = _f(
        "fedavg", "fedavg (per tensor), ffa (A frozen, exact) or svd (products, rank r).")
    device_profile: str = _f("uniform", "Simulated device heterogeneity (simulations/device_profiles.py).")
    device_memory: str = _f("", "Simulation: memory (MB) a simulated device class offers, as class=MB pairs "
                                "(`low-end=1536,mid-range=3072`); a class not named keeps its profile's budget.")

    def _check(self) -> None:
        parse_device_memory(self.device_memory)  # a malformed value raises ConfigError here
        self._positive("max_versions", "buffer_size", "message_ttl_s", "eval_every", "server_learning_rate")
        self._non_negative("concurrency", "max_staleness", "wall_budget_s")
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise ConfigError(f"target-accuracy must be in [0, 1], got {self.target_accuracy}")
        check_choice("server-optimizer", self.server_optimizer, ServerOptimizerName)
        check_choice("lora-aggregation", self.lora_aggregation, LoraAggregationMode)
        if not self.state_store.startswith(STATE_STORE_SCHEMES):
            raise ConfigError(f"state-store must be memory:// or redis://host:port/db, got {self.state_store!r}")


@dataclass(frozen=True)
class TransportSettings(_Settings):
    """Updates on the wire: codecs, sealing, the aggregator's sanity bounds, SecAgg+."""

    transport: Transport = _f("sealed", "sealed (signed + encrypted, the default) or plain (debugging only).")
    update_codec: str = _f("topk0.05+int8+zstd", "Codec of client updates (see common/wire/codec.py).")
    downlink_codec: str = _f("fp16", "Codec of the global adapter sent to clients.")
    downlink_delta_codec: str = _f("topk0.1+int8+zstd", "Async mode: codec of the difference from the adapter a device "
                                   "holds, sent instead of the whole (error-fed back; empty: always the whole adapter).")
    downlink_views_mb: int = _f(512, "Async mode: memory for the adapters the cloud remembers devices hold, 4 bytes a "
                                "parameter each (past it, the least recent get the whole adapter next time).")
    key_dir: str = _f("", "Key material; empty: <data-dir>/keys (cloud/ and devices/<id>/ below it).")
    max_update_norm: float = _f(50.0, "Updates with a larger L2 norm are rejected (0: no bound).")
    max_update_examples: float = _f(100000.0, "The most examples a device may claim for one update (its signed weight); more is rejected.")
    clip_update_norm: bool = _f(False, "Scale over-large updates down to max-update-norm instead of rejecting.")
    secure_aggregation: SecureAggregation = _f(
        "none", "none, or secaggplus: Flower's SecAgg+ (sync mode; dense float deltas, no codec or sealing)."
    )
    secagg_clipping_range: float = _f(1.0, "SecAgg+: delta values are clipped to +-this before quantization.")
    secagg_quantization_range: int = _f(4194304, "SecAgg+: quantization levels over the clipping range.")

    def _check(self) -> None:
        # Imported here: the codec module loads torch, which the CLI should not pay for at every start.
        from edgefed.common.wire.codec import CodecError, CodecSpec

        check_choice("transport", self.transport, Transport)
        check_choice("secure-aggregation", self.secure_aggregation, SecureAggregation)
        self._non_negative("max_update_norm")
        self._positive("max_update_examples")
        self._positive("downlink_views_mb")
        for name in ("update_codec", "downlink_codec", *(["downlink_delta_codec"] if self.downlink_delta_codec else [])):
            try:
                CodecSpec.parse(getattr(self, name))
            except CodecError as err:
                raise ConfigError(f"{key_of(name)}: {err}") from None


@dataclass(frozen=True)
class PublishSettings(_Settings):
    """Published models: ONNX export, quantization, the parity gate, the model service."""

    export_every: int = _f(10, "Export, quantize, sign and push the global model every this many versions (0: only the final one).")
    export_quantization: ExportQuantization = _f("int8", "Published model weights: int8 (dynamic quantization) or int4 (weight-only).")
    parity_min_agreement: float = _f(0.99, "Publish unless the held-out clips show the quantized model's argmax agrees with PyTorch FP32 less often than this.")
    parity_confidence: float = _f(0.95, "Confidence the parity gate needs to refuse (a binomial test; 0: the observed share decides).")
    model_service: str = _f("127.0.0.1:0", "host:port the model distribution service binds (port 0: any free port).")
    model_service_public: str = _f("", "host:port devices are told to reach the model service at (empty: the bound address).")
    serve_models: bool = _f(True, "The ServerApp serves published models itself (false under `edgefed cloud serve`, whose service does).")
    deployed_eval_devices: int = _f(0, "Devices that install and score the deployed model (a sample, seeded; 0: every connected one).")
    published_eval_devices: int = _f(2, "Async mode: devices that install and score each model published during the run "
                                     "(a seeded sample; 0: none); a `deployed` line in metrics.jsonl each.")

    def _check(self) -> None:
        self._non_negative("export_every", "deployed_eval_devices", "published_eval_devices")
        check_choice("export-quantization", self.export_quantization, ExportQuantization)
        if not 0.0 < self.parity_min_agreement <= 1.0:
            raise ConfigError(f"parity-min-agreement must be in (0, 1], got {self.parity_min_agreement}")
        if not 0.0 <= self.parity_confidence < 1.0:
            raise ConfigError(f"parity-confidence must be in [0, 1), got {self.parity_confidence}")
        _check_address("model_service", self.model_service)
        if self.model_service_public:
            _check_address("model_service_public", self.model_service_public)


@dataclass(frozen=True)
class FleetSettings(_Settings):
    """A real fleet under `edgefed cloud serve`: the SuperLink, TLS, node authentication, metrics."""

    tls_dir: str = _f("", "Fleet TLS (`edgefed certs`): server.crt/server.key for SuperLink and the model service, ca.crt for devices; empty: no TLS (simulation only).")
    superlink: str = _f("127.0.0.1:9093", "SuperLink address: `edgefed cloud serve` binds it; devices and the Flower CLI connect to it.")
    node_auth: bool = _f(True, "SuperNode authentication: only node keys enrolled with `edgefed cloud enrol` may connect.")
    metrics_port: int = _f(0, "Prometheus metrics of the aggregator on this port (0: off; `edgefed cloud serve` uses 9400).")
    metrics_bind: str = _f("127.0.0.1", "Address the Prometheus endpoint binds (0.0.0.0 inside a container, where a scraper reaches it).")

    def _check(self) -> None:
        self._non_negative("metrics_port")
        _check_address("superlink", self.superlink)


@dataclass(frozen=True)
class TrainerSettings(_Settings):
    """The cloud's own training: the DDP global trainer, and its updates beside the aggregator."""

    trainer_steps: int = _f(200, "Optimizer steps of the cloud trainer.")
    trainer_batch_size: int = _f(16, "Global batch of the cloud trainer (over all ranks and accumulation steps).")
    trainer_grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.")
    trainer_learning_rate: float = _f(5e-4, "Peak AdamW learning rate (after linear warmup, cosine decay to 0).")
    trainer_warmup_steps: int = _f(20, "Linear warmup steps.")
    trainer_weight_decay: float = _f(0.01, "AdamW weight decay of the cloud trainer.")
    trainer_checkpoint_every: int = _f(50, "Rank 0 writes a resumable checkpoint every this many steps.")
    trainer_bf16: bool = _f(False, "bf16 autocast (GPU only).")
    trainer_grad_checkpointing: bool = _f(False, "Gradient checkpointing in both encoders (GPU only).")
    cloud_trainer_features: str = _f("", "Cloud clips' features: the simulation runs the cloud trainer beside the aggregator (async, redis:// state store).")
    trainer_participant_steps: int = _f(20, "Beside the aggregator: adapter training steps per global version it joins.")
    trainer_update_weight: float = _f(100.0, "Beside the aggregator: examples the trainer's update counts as (its FedBuff weight).")

    def _check(self) -> None:
        self._positive("trainer_steps", "trainer_batch_size", "trainer_grad_accum", "trainer_learning_rate",
                       "trainer_warmup_steps", "trainer_checkpoint_every", "trainer_participant_steps",
                       "trainer_update_weight")


@dataclass(frozen=True)
class LocalTrainingSettings(_Settings):
    """Adapter training on a device (and by the cloud trainer beside the aggregator), and evaluation."""

    local_epochs: int = _f(2, "Passes over the local training split per round.")
    batch_size: int = _f(8, "Clips per local training step.")
    learning_rate: float = _f(2e-3, "AdamW learning rate for LoRA, fusion and head.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    client_threads: int = _f(1, "torch intra-op threads per client process.")
    eval_batch_size: int = _f(64, "Clips per evaluation step.")

    def _check(self) -> None:
        self._positive("local_epochs", "batch_size", "learning_rate", "client_threads", "eval_batch_size")


@dataclass(frozen=True)
class DeviceTrainingSettings(_Settings):
    """How a device fits its training into its memory (edge/training/plan.py): the frozen base's precision,
    the frozen-prefix cache, and the headroom kept free."""

    base_precision: BasePrecisionName = _f(
        "auto", "Frozen base on a device: fp32, int8 (weight-only) or nf4 (4-bit); auto: fp32 when the device's "
                "memory holds it, else the first of int8, nf4 that fits.")
    prefix_cache_mb: int = _f(2048, "Disk bound of a device's frozen-prefix cache (MB; least recently used evicted); "
                                    "used when lora-layers > 0. 0: off.")
    memory_headroom: float = _f(0.15, "Fraction of a device's memory left free by its training plan.")

    def _check(self) -> None:
        check_choice("base-precision", self.base_precision, BasePrecisionName)
        self._non_negative("prefix_cache_mb")
        if not 0.0 <= self.memory_headroom < 1.0:
            raise ConfigError(f"memory-headroom must be in [0, 1), got {self.memory_headroom}")


@dataclass(frozen=True)
class FeatureSettings(_Settings):
    """What a device extracts from a clip. They key the feature cache, and a published model names them:
    a device must extract exactly these."""

    num_keyframes: int = _f(4, "Keyframes per clip fed to the video encoder.")
    image_size: int = _f(112, "Square keyframe side in pixels (letterboxed).")
    sample_rate: int = _f(16000, "Audio is resampled to this rate, mono.")
    n_mels: int = _f(64, "Mel bands of the log-mel features.")
    audio_frames: int = _f(256, "10 ms log-mel frames per audio window (one window per keyframe).")
    keyframes_per_shot: int = _f(2, "Keyframes picked per detected shot.")
    max_keyframes: int = _f(16, "Keyframe budget per video (spread over it when exceeded).")
    shot_detector: str = _f("cuts", "Shot detector: cuts (hard cuts and fades through black, robust on real "
                                    "footage), or the simpler content, adaptive, optionally +fade.")
    cut_ratio: float = _f(4.0, "Cuts detector: how many times its neighbours' change a frame's change must be.")
    shot_threshold: float = _f(20.0, "Content detector: mean Y/U/V change (0-255) that marks a cut.")
    min_shot_frames: int = _f(15, "Shortest shot in frames; closer cuts are ignored.")
    keyframe_selector: KeyframeSelectorName = _f("sharpest", "Which frames represent a shot: sharpest or even.")

    @property
    def shot_detectors(self) -> list[str]:
        """The detectors `shot-detector` combines (`content+fade` -> content, fade)."""
        return self.shot_detector.split("+")

    def _check(self) -> None:
        self._positive("num_keyframes", "image_size", "sample_rate", "n_mels", "audio_frames", "keyframes_per_shot",
                       "max_keyframes", "min_shot_frames", "cut_ratio")
        if not set(self.shot_detectors) <= set(choices(ShotDetectorName)):
            raise ConfigError(f"shot-detector must combine {', '.join(choices(ShotDetectorName))}; "
                              f"got {self.shot_detector!r}")
        check_choice("keyframe-selector", self.keyframe_selector, KeyframeSelectorName)


@dataclass(frozen=True)
class MediaLimits(_Settings):
    """What a device agrees to decode from an untrusted file; a file past any limit fails with a clear reason."""

    max_media_pixels: int = _f(3840 * 2160, "Largest frame (width x height) decoded; larger video is refused.")
    max_media_duration_s: float = _f(3 * 3600.0, "Longest clip (container or stream duration) decoded.")
    max_media_frames: int = _f(500_000, "Most video frames decoded from one file.")
    max_media_seconds: float = _f(600.0, "Wall time allowed to extract one file.")

    def _check(self) -> None:
        self._positive("max_media_pixels", "max_media_duration_s", "max_media_frames", "max_media_seconds")


@dataclass(frozen=True)
class ModelSettings(_Settings):
    """The shared frozen base and its LoRA adapter (the input sizes come from FeatureSettings)."""

    model_seed: int = _f(1234, "Seed of the shared frozen base model (same on every node).")
    video_encoder: str = _f("tiny", "Frame encoder: `tiny` (built in, random weights from `model-seed`) or a local "
                                    "Hugging Face checkpoint directory (vit, deit, dinov2, clip, siglip).")
    audio_encoder: str = _f("tiny", "Audio encoder: `tiny` or a local Hugging Face checkpoint directory "
                                    "(audio-spectrogram-transformer, whisper, wav2vec2, hubert).")
    lora_layers: int = _f(0, "LoRA on the last N transformer layers of each encoder; 0: on all of them.")
    base_checkpoint: str = _f("", "Base checkpoint directory written by `edgefed cloud train` (<out>/checkpoint: both "
                                  "encoders, projections, fusion and head), a warm start shipped to devices like any "
                                  "checkpoint base; the other model settings stay those it was trained with. Empty: "
                                  "the base of video-encoder / audio-encoder.")
    patch_size: int = _f(16, "Patch side for both the ViT and the AST-style encoder.")
    hidden_size: int = _f(192, "Width of both encoders and the fusion layer.")
    num_layers: int = _f(4, "Transformer layers per encoder.")
    num_heads: int = _f(3, "Attention heads per layer.")
    intermediate_size: int = _f(768, "MLP width inside each transformer layer.")
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch.")
    lora_targets: str = _f(
        "all", "Attention projections given LoRA in each targeted layer, by their last name (`q_proj,v_proj`); "
               "`all`: every projection of the family's attention (q/k/v/o_proj, or out_proj for CLIP, SigLIP, "
               "Whisper, wav2vec2 and HuBERT)."
    )

    @property
    def lora_target_modules(self) -> list[str] | None:
        """The projections by last name; None: all of them."""
        if self.lora_targets.strip() == "all":
            return None
        return [s.strip() for s in self.lora_targets.split(",") if s.strip()]

    def _check(self) -> None:
        self._positive("patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "lora_r",
                       "lora_alpha")
        if self.lora_layers < 0:
            raise ConfigError(f"lora-layers must be 0 (all layers) or a positive count, got {self.lora_layers}")
        for key, value in (("video-encoder", self.video_encoder), ("audio-encoder", self.audio_encoder)):
            if not value.strip():
                raise ConfigError(f"{key} is empty: give `tiny` or a local checkpoint directory")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden-size ({self.hidden_size}) must be divisible by num-heads ({self.num_heads})"
            )
        if self.lora_target_modules == []:
            raise ConfigError("lora-targets is empty: name projections (q_proj,v_proj) or give `all`")


# The groups, in the order their fields appear in the flat run config.
SETTINGS_GROUPS: tuple[type[_Settings], ...] = (
    RunSettings, RoundSettings, FedBuffSettings, TransportSettings, PublishSettings, FleetSettings,
    TrainerSettings, LocalTrainingSettings, DeviceTrainingSettings, FeatureSettings, MediaLimits, ModelSettings,
)


@dataclass(frozen=True)
class EdgefedConfig(ModelSettings, MediaLimits, FeatureSettings, DeviceTrainingSettings, LocalTrainingSettings,
                    TrainerSettings, FleetSettings,
                    PublishSettings, TransportSettings, FedBuffSettings, RoundSettings, RunSettings):
    """Every setting of a run: the groups above, flat. Each field has a default and one line of help."""

    def __post_init__(self) -> None:
        for group in SETTINGS_GROUPS:
            group._check(self)
        # --- rules that span groups ---
        for name, side in (("image-size", self.image_size), ("n-mels", self.n_mels),
                           ("audio-frames", self.audio_frames)):
            if side % self.patch_size:
                raise ConfigError(f"{name} ({side}) must be a multiple of patch-size ({self.patch_size})")
        if self.mode == "async" and self.secure_aggregation != "none":
            raise ConfigError("secure-aggregation (SecAgg+) needs synchronous rounds: set mode=sync")
        if self.cloud_trainer_features and (self.mode != "async" or self.state_store.startswith("memory://")):
            raise ConfigError("cloud-trainer-features needs mode=async and a shared state store (state-store=redis://...)")

    # --- the views the parts take --------------------------------------------------
    @property
    def features(self) -> FeatureSettings:
        return FeatureSettings.of(self)

    @property
    def training(self) -> LocalTrainingSettings:
        return LocalTrainingSettings.of(self)

    @property
    def device_training(self) -> DeviceTrainingSettings:
        return DeviceTrainingSettings.of(self)

    @property
    def fedbuff(self) -> FedBuffSettings:
        return FedBuffSettings.of(self)

    @property
    def trainer(self) -> TrainerSettings:
        return TrainerSettings.of(self)

    @property
    def media_limits(self) -> MediaLimits:
        return MediaLimits.of(self)

    # --- derived views -----------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def feature_config(self) -> dict[str, int | float | str]:
        """The settings a feature extractor must match (they key the feature cache; a model's manifest names them).

        With a checkpoint encoder they include the fingerprint of its preprocessing (common/model/inputs.py)."""
        if self.video_encoder == "tiny" and self.audio_encoder == "tiny":
            return self.features.as_dict()
        from edgefed.common.model.inputs import model_inputs  # reads the checkpoints' preprocessor configs

        return {**self.features.as_dict(), **model_inputs(self).feature_config()}

    # --- conversion ----------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> EdgefedConfig:
        """Build from a Flower run config (kebab-case keys). Unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown run-config key {key!r}")
            values[name] = _coerce(key, raw, type(known[name].default))
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> EdgefedConfig:
        """A TOML file of run-config keys (`key = value`, kebab-case), e.g. deploy/cloud.toml."""
        path = Path(path)
        values = read_toml(path, "config file")
        nested = [k for k, v in values.items() if isinstance(v, dict)]
        if nested:
            raise ConfigError(f"{path}: expected flat run-config keys, found tables {nested}")
        return cls.from_run_config(values)

    def to_run_config(self) -> dict[str, Any]:
        """Flat kebab-case mapping, the inverse of `from_run_config`."""
        return {key_of(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> EdgefedConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, pairs: list[str]) -> EdgefedConfig:
        """Apply `key=value` strings (CLI `--set`); values are parsed by the field's type."""
        merged = self.to_run_config()
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"--set expects key=value, got {pair!r}")
            key, value = pair.split("=", 1)
            key = key.strip().replace("_", "-")
            if key not in merged:
                raise ConfigError(f"unknown run-config key {key!r}")
            merged[key] = value.strip()
        return EdgefedConfig.from_run_config(merged)

    @property
    def keys_root(self) -> str:
        return self.key_dir or (f"{self.data_dir}/keys" if self.data_dir else "keys")

    def fingerprint(self, names: list[str]) -> str:
        """Short hash of the named fields (used to check that both sides agree)."""
        payload = json.dumps({n: getattr(self, n) for n in sorted(names)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def parse_device_memory(text: str) -> dict[str, float]:
    """`device-memory` (`low-end=1536,mid-range=3072`) as {device class: MB}."""
    out: dict[str, float] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = (part.strip() for part in pair.partition("="))
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"device-memory expects class=MB pairs, got {pair!r}") from None
        if not name or out[name] <= 0:
            raise ConfigError(f"device-memory expects class=MB pairs with MB > 0, got {pair!r}")
    return out


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's table, or a ConfigError naming the file (`what`: "config file", "agent config")."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: unreadable {what} ({err})") from None


def redact_url(url: str) -> str:
    """A URL fit to show: `redis://user:secret@host` -> `redis://user:***@host`."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def key_of(field_name: str) -> str:
    return field_name.replace("_", "-")


def _coerce(key: str, raw: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, str):
                if raw.lower() in ("1", "true", "yes", "on"):
                    return True
                if raw.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(raw)
            return bool(raw)
        if kind is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"run-config key {key!r} expects {kind.__name__}, got {raw!r}") from None


def _check_address(name: str, value: str) -> None:
    if ":" not in value:
        raise ConfigError(f"{key_of(name)} must be host:port, got {value!r}")


# Everything the model's construction reads: its own group, the input sizes and the classes.
MODEL_FIELDS = [f.name for f in fields(ModelSettings)] + [
    "labels", "num_keyframes", "image_size", "n_mels", "audio_frames",
]
