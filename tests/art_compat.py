"""ART's own code across versions: 0.5.23 (Python 3.12), which the tests run, and 0.5.18, which they ran before."""

from __future__ import annotations

import art.loss
import art.trajectories


def art_loss(inputs: dict, new_logprobs, ref_logprobs, config: dict):
    """`art.loss.loss_fn` on packed tensors: 0.5.23 takes them wrapped in `LossInputs`, 0.5.18 as a dict."""
    wrapper = getattr(art.loss, "LossInputs", None)
    packed = wrapper(inputs=inputs) if wrapper is not None else inputs
    return art.loss.loss_fn(packed, new_logprobs, ref_logprobs, None, config)


# A trajectory's additional history: `History` in 0.5.18, `LegacyHistory` in 0.5.23 (whose `History` is the base of
# its new protocol-native histories).
History = getattr(art.trajectories, "LegacyHistory", art.trajectories.History)
