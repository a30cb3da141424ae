"""Synthetic calibration data from the model itself ("The Knowledge Within", Haroush et al., CVPR 2020).

Methods: ``gaussian`` (noise baseline), ``inception`` (class logits under image priors), ``bns``
(BatchNorm statistics, KL or L2) and ``bns+i`` (BNS plus class targets). The output is a Hub dataset
folder; :func:`synthesize` writes it and returns the ``datasets.Dataset``.
"""

from .api import cache_dir, generate_folder, load_folder, shard_seed, synthesize, synthesize_folder, weights_sha256
from .card import render_card
from .config import LOSSES, METHODS, Priors, SynthConfig
from .methods import BatchGenerator, BatchResult, check_model_supports
from .publish import push_dataset_folder

__all__ = [
    "LOSSES",
    "METHODS",
    "BatchGenerator",
    "BatchResult",
    "Priors",
    "SynthConfig",
    "cache_dir",
    "check_model_supports",
    "generate_folder",
    "load_folder",
    "push_dataset_folder",
    "render_card",
    "shard_seed",
    "synthesize",
    "synthesize_folder",
    "weights_sha256",
]
