"""Quantization with simulated integer arithmetic, calibrated on real or synthetic data.

Layers, bottom-up (lower modules never import higher ones):

- the core: ``config`` (schemes as data), ``integer`` (the integer model as plain data),
  ``quantizers`` (fake-quant ops on the integer grid), ``observers`` (range finders), ``fold`` (BN
  folding), ``modules`` (quantized layers and their registry), ``tracing`` and ``prepare`` (trace,
  fold, swap, place quantizers), ``packing`` and ``model`` (:class:`~hub_dfq.quant.model.QuantizedModel`
  and its integer state);
- the algorithms: ``calibrate``, ``reconstruct``, ``distill``, run through ``algorithms`` and
  described in ``registry`` (with the observers and presets), ``resume`` (saved progress);
- ``stages`` (the public prepare -> calibrate -> apply -> freeze), ``data`` (calibration sets) and ``api``
  (:func:`~hub_dfq.quant.api.quantize`, a recipe over the stages).

Nothing here imports the Hub layer (:mod:`hub_dfq.hub`) or the backends (:mod:`hub_dfq.backends`).
Nothing is re-exported either, so reading the registry (as ``hub-dfq --help`` does) does not import torch.
"""
