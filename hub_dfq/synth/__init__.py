"""Synthetic calibration data from the model itself ("The Knowledge Within", Haroush et al., CVPR 2020).

``registry`` describes the methods (``gaussian``, ``inception``, ``bns``, ``bns+i``, and any registered
from outside) and the BN losses; ``objectives`` holds what the built-in methods minimise; ``generator``
runs the optimisation loop for one batch; ``bns`` computes the BN-statistics loss during the forward
pass; ``writer``, ``card`` and ``publish`` make and push the Hub dataset folder; ``api`` has
:func:`~hub_dfq.synth.api.synthesize`. Nothing is re-exported here, so reading the registry (as
``hub-dfq --help`` does) does not import torch.
"""
