"""The parity gate's rule: how many disagreements with PyTorch FP32 a quantized model may show on n clips.

The gate compares the published (quantized) model's argmax with the FP32
model's on up to 512 held-out clips. Asking for an observed agreement of at
least `parity-min-agreement` (0.99) treats a sample as the truth: on 80 clips
one disagreement is 98.75%, and a model that truly agrees 99.5% of the time
shows one or more in a third of the draws. So the gate tests instead: it
refuses a model only when its disagreements are too many for a model whose
true agreement is `parity-min-agreement`, at confidence `parity-confidence`
(0.95): d disagreements on n clips are refused when

    P(X >= d | X ~ Binomial(n, 1 - parity-min-agreement)) < 1 - parity-confidence

A model exactly at the bound is then refused in at most 5% of exports, and
one truly worse is refused more often the more clips the gate sees. The
bound, for 0.99 at 0.95: 0 disagreements allowed up to 5 clips, 1 up to 35,
2 up to 82, 3 up to 137, 8 on 400, 9 on 512. With parity-confidence = 0 the
rule is the plain observed share (agreement >= parity-min-agreement)."""

from __future__ import annotations

import math


def allowed_disagreements(clips: int, min_agreement: float, confidence: float) -> int:
    """The most disagreements on `clips` clips the gate lets through."""
    if clips <= 0:
        return 0
    if confidence <= 0.0:
        return math.floor(clips * (1.0 - min_agreement) + 1e-9)
    p = 1.0 - min_agreement
    if p <= 0.0:
        return 0
    tail = 1.0  # P(X >= d), from d = 0 up
    for d in range(clips + 1):
        if tail < 1.0 - confidence:
            return d - 1
        tail -= math.comb(clips, d) * p**d * (1.0 - p) ** (clips - d)
    return clips


def parity_refusal(disagreements: int, clips: int, min_agreement: float, confidence: float) -> str | None:
    """Why the gate refuses `disagreements` on `clips` clips (None: it does not)."""
    allowed = allowed_disagreements(clips, min_agreement, confidence)
    if disagreements <= allowed:
        return None
    agreement = 1.0 - disagreements / clips
    return (f"argmax agreement with PyTorch FP32 {agreement:.4f} ({disagreements} of {clips} held-out clips disagree; "
            f"at most {allowed} are consistent with parity-min-agreement {min_agreement} at parity-confidence "
            f"{confidence})")
