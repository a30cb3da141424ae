"""Make ``AutoModelForImageClassification.from_pretrained`` load hub-dfq checkpoints.

Importing :mod:`hub_dfq` registers the ``hub_dfq`` quantization method with transformers. For a
checkpoint whose ``config.json`` says ``quant_method: hub_dfq``, transformers builds the float
architecture; this quantizer then rebuilds the quantized graph from the checkpoint (the same code
path as :func:`hub_dfq.from_pretrained`) and routes the model's ``forward`` through it, so logits are
bit-identical to the model that was saved.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention
from transformers.quantizers.auto import (
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CheckpointError
from .adapter import QUANT_METHOD

logger = logging.getLogger(__name__)

__all__ = ["HubDfqConfig", "HubDfqQuantizer"]


@register_quantization_config(QUANT_METHOD)
class HubDfqConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a hub-dfq checkpoint, kept verbatim."""

    def __init__(self, **kwargs: Any):
        self.__dict__.update(kwargs)
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _quantized_forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                       output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs: Any):
    logits = self.hub_dfq_graph(pixel_values)
    loss = self.loss_function(labels, logits, self.config) if labels is not None else None
    return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


@register_quantizer(QUANT_METHOD)
class HubDfqQuantizer(HfQuantizer):
    """Loads pre-quantized hub-dfq checkpoints; it cannot quantize a float model itself."""

    requires_calibration = True

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] = []

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return torch.float32  # the integer grid is defined in float32

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        self.checkpoint_files = list(checkpoint_files or [])
        # The checkpoint holds integers for a folded graph, not the float weights transformers expects;
        # everything is loaded after, so the usual missing/unexpected key warnings do not apply.
        model._keys_to_ignore_on_load_unexpected = {r".*"}
        model._keys_to_ignore_on_load_missing = {r".*"}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        # why: this module is imported while transformers itself is still importing (see hub_dfq.plugins);
        # the graph code (and timm, through the adapters) is loaded only when a checkpoint is
        from ..models.transformers_adapter import LogitsModule
        from ..quant.config import QuantConfig
        from ..quant.model import rebuild_module
        from .checkpoint import WEIGHTS_NAME, read_tensors

        files = [f for f in self.checkpoint_files if Path(f).name == WEIGHTS_NAME] or self.checkpoint_files
        if not files:
            raise CheckpointError("transformers found no model.safetensors for this hub-dfq checkpoint")
        tensors = read_tensors(Path(files[0]))
        qc = self.quantization_config.to_dict()
        example = torch.zeros(1, *qc["input_size"])
        graph, _ = rebuild_module(LogitsModule(model), QuantConfig.from_dict(qc["config"]), tensors, example)
        model.hub_dfq_graph = graph
        model.forward = types.MethodType(_quantized_forward, model)
        model.eval()
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return False  # save with hub_dfq.save_pretrained, which writes the integer format

    @property
    def is_trainable(self) -> bool:
        return False
