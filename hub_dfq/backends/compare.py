"""The runtime check every backend shares: does the engine's integer model follow the simulated one?

The simulated :class:`~hub_dfq.quant.model.QuantizedModel` is the reference: an engine that accumulates in
integers and requantizes once may differ from its float32 sums by one step of an activation grid where a
value sits on a rounding boundary, so logits agree closely but not bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from ..evaluation import evaluate_accuracy
from ..quant.model import QuantizedModel

__all__ = ["EngineClassifier", "compare_logits"]


class EngineClassifier:
    """What a backend's ``load`` returns: called on a normalised NCHW batch, it gives logits."""

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - each engine has its own
        raise NotImplementedError

    @staticmethod
    def engine_input(pixel_values: torch.Tensor):
        """The batch as the contiguous float32 numpy array engines take."""
        return pixel_values.detach().to(torch.float32).cpu().contiguous().numpy()

    def evaluate(self, model: Any, data: Any, **kwargs: Any) -> dict[str, float | int]:
        """Accuracy on a labelled dataset, with ``model``'s preprocessing (see :func:`hub_dfq.evaluate_accuracy`)."""
        return evaluate_accuracy(getattr(model, "model", model), data, forward=self, **kwargs)


@torch.no_grad()
def compare_logits(qmodel: QuantizedModel, classifier: Any, inputs: torch.Tensor, *,
                   batch_size: int = 64) -> dict[str, float]:
    """How closely an engine's integer model (``classifier``) follows the simulated one on ``inputs``.

    Returns:
        ``top1_agreement`` (fraction of equal argmax), ``max_abs_logit_diff``, ``mean_abs_logit_diff`` and ``n``.
    """
    agree, total, max_diff, sum_diff, count = 0, 0, 0.0, 0.0, 0
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        ref, got = qmodel(batch), classifier(batch)
        diff = (ref - got).abs()
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(batch)
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.sum())
        count += diff.numel()
    return {"top1_agreement": agree / max(total, 1), "max_abs_logit_diff": max_diff,
            "mean_abs_logit_diff": sum_diff / max(count, 1), "n": total}
