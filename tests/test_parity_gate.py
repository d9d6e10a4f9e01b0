"""The parity gate refuses only what the held-out clips show to be worse than parity-min-agreement."""

from __future__ import annotations

import math

import pytest

from edgefed.cloud.publishing.parity_gate import allowed_disagreements, parity_refusal


def _refused_at_the_bound(clips: int, min_agreement: float, confidence: float) -> float:
    """How often a model whose true agreement is exactly `min_agreement` is refused: P(X > allowed)."""
    p, allowed = 1.0 - min_agreement, allowed_disagreements(clips, min_agreement, confidence)
    return sum(math.comb(clips, d) * p**d * (1 - p) ** (clips - d) for d in range(allowed + 1, clips + 1))


@pytest.mark.parametrize("min_agreement", [0.9, 0.99, 0.999])
def test_a_model_at_the_bound_is_refused_at_most_one_time_in_twenty_and_one_more_disagreement_would_be(min_agreement):
    for clips in range(1, 513):
        assert _refused_at_the_bound(clips, min_agreement, 0.95) <= 0.05 + 1e-12, clips
        allowed = allowed_disagreements(clips, min_agreement, 0.95)
        if allowed < clips:  # the bound is the tightest: one disagreement less allowed would refuse more often
            p = 1.0 - min_agreement
            tail = sum(math.comb(clips, d) * p**d * (1 - p) ** (clips - d) for d in range(allowed, clips + 1))
            assert tail > 0.05, clips


def test_one_disagreement_in_80_clips_no_longer_refuses_a_version_but_a_broken_model_still_is():
    """The default run's central set is 80 clips: one disagreement (98.75%) was refused at 0.99."""
    assert parity_refusal(1, 80, 0.99, 0.95) is None and parity_refusal(2, 80, 0.99, 0.95) is None
    reason = parity_refusal(3, 80, 0.99, 0.95)
    assert reason is not None and "3 of 80 held-out clips disagree; at most 2" in reason
    assert parity_refusal(60, 80, 0.99, 0.95) is not None


def test_confidence_zero_is_the_plain_observed_share():
    assert allowed_disagreements(80, 0.99, 0.0) == 0 and allowed_disagreements(100, 0.99, 0.0) == 1
    assert parity_refusal(1, 80, 0.99, 0.0) is not None
