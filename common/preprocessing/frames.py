"""Image preprocessing of ViT/DeiT, DINOv2 (BiT), CLIP and SigLIP checkpoints, in two stages.

    geometry(frames, settings.geometry)       uint8 [N, H, W, 3] RGB -> uint8 [N, 3, h, w]
                                              resize + centre crop: what the feature cache stores
    normalize(pixels, settings.normalization) uint8 [N, 3, h, w] -> float32 pixel_values
                                              rescale, mean, std: `PixelNormalizer`, inside the model

What transformers does (the PIL backend, `image_processing_backends.PilBackend`,
the one it uses without torchvision): per image, `PIL.Image.resize` of the
uint8 RGB image with the processor's filter (ViT: bilinear; DeiT, BiT, CLIP,
SigLIP: bicubic), to a fixed size or with the shorter side set to
`shortest_edge` (the longer one `int(edge * long / short)`); a centre crop
(top = (h - crop) // 2), zero-padded when the image is smaller than the
crop; then float64 x * rescale_factor cast to float32, and (x - mean) / std.

PIL resamples in two separable passes of fixed-point (22-bit) integer
weights with the support widened by the scale factor when shrinking
(antialiasing), rounding to uint8 after each pass. Pillow 13 runs the
vertical pass first when the height shrinks by more than twice the pixels
the width loses ((h - oh) > 2 (w - ow)), the horizontal one first otherwise;
the order shows where bicubic overshoots clip between the passes.

What this module does: the same two passes with torch's uint8 antialiased
interpolation (`F.interpolate(..., antialias=True)` on a channels-last uint8
batch, written after PIL's algorithm), one pass per call, in Pillow's order,
for the whole batch at once. torch quantises the weights to 14-16 bits where
PIL uses 22, so where PIL's sum lands within ~0.03 of a half grey level the
two round apart: 0.05-0.4 % of the values differ by one grey level, and a
few in a million by two where both passes err the same way (on the five real
clips of /work/shared/media/real: only DINOv2's 256-edge resize, 0.3-5 per
million; ViT, DeiT, CLIP, SigLIP never; results/preprocessing.json has the
benchmark's figures). The target of 1/255 is met except there. PIL's integer weights as dense
or sparse (CSR) float32 matmuls ran slower here than PIL itself, and torch's
float interpolation is 6-10x slower than its uint8 path and no closer. OpenCV is not used: cv2.resize does not widen the filter when
shrinking, and on chaplin.mp4's 360x640 frames INTER_CUBIC / INTER_LINEAR are
up to 42-89 grey levels from PIL (99th percentile 14-33), INTER_AREA up to 19.
transformers' torchvision backend (the *Fast processors, used when torchvision
is installed) resizes with torchvision and is not what this matches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgefed.common.preprocessing.settings import FrameGeometry, ImagePreprocessing, PixelNormalization, PreprocessingError


def geometry(frames: np.ndarray | torch.Tensor, settings: FrameGeometry) -> torch.Tensor:
    """uint8 [N, 3, h, w] (contiguous) of uint8 RGB frames [N, H, W, 3] (or one frame [H, W, 3])."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise PreprocessingError("frames", f"expected uint8 RGB frames [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    n, height, width, _ = x.shape
    if height == 0 or width == 0:
        raise PreprocessingError("frames", f"empty frames {tuple(x.shape)}")
    if n == 0:
        return torch.empty((0, 3, *settings.output_size(height, width)), dtype=torch.uint8)
    x = x.permute(0, 3, 1, 2)  # [N, 3, H, W], channels-last in memory: torch's uint8 resampling path
    out_h, out_w = settings.resized_size(height, width)
    if (out_h, out_w) != (height, width):
        x = _resize(x, out_h, out_w, settings.resample)
    if settings.crop is not None:
        x = _centre_crop(x, *settings.crop)
    return x.contiguous()


def _resize(x: torch.Tensor, out_h: int, out_w: int, resample: str) -> torch.Tensor:
    height, width = x.shape[-2:]
    vertical_first = out_h < height and (height - out_h) > 2 * (width - out_w)  # Pillow's pass order
    passes = [(out_h, width), (out_h, out_w)] if vertical_first else [(height, out_w), (out_h, out_w)]
    for size in passes:
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode=resample, antialias=True, align_corners=False)
    return x


def _centre_crop(x: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """transformers' center_crop: offset (size - crop) // 2; a side smaller than the crop is zero-padded around it."""
    height, width = x.shape[-2:]
    if height < crop_h or width < crop_w:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        # the image lands ceil(pad / 2) from the top/left
        x = F.pad(x, (pad_w - pad_w // 2, pad_w // 2, pad_h - pad_h // 2, pad_h // 2))
        height, width = x.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return x[..., top: top + crop_h, left: left + crop_w]


class PixelNormalizer(nn.Module):
    """uint8 [N, 3, h, w] -> float32 pixel_values: x * rescale_factor, then (x - mean) / std; exports to ONNX."""

    def __init__(self, settings: PixelNormalization) -> None:
        super().__init__()
        self.rescale_factor = settings.rescale_factor
        self.normalizes = settings.mean is not None
        self.register_buffer("mean", torch.tensor(settings.mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(settings.std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32)
        if self.rescale_factor is not None:
            x = x * self.rescale_factor
        if self.normalizes:
            x = (x - self.mean) / self.std
        return x


def normalize(pixels: torch.Tensor, settings: PixelNormalization) -> torch.Tensor:
    """float32 pixel_values of uint8 [N, 3, h, w] (what PixelNormalizer computes)."""
    return PixelNormalizer(settings)(pixels)


def pixel_values(frames: np.ndarray | torch.Tensor, settings: ImagePreprocessing) -> torch.Tensor:
    """Both stages: what the checkpoint's image processor gives for these RGB frames, [N, 3, h, w] float32."""
    return normalize(geometry(frames, settings.geometry), settings.normalization)
