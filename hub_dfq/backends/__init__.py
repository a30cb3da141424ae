"""Inference backends: run a quantized model with real integer kernels.

``registry`` describes them (name, file written into checkpoints, export and load functions); ``onnx``
is the ONNX Runtime backend. A backend reads the integer model only through the public integer-state
API of :class:`~hub_dfq.quant.model.QuantizedModel` (``integer_layers``, ``activation_grids``, ``lower``).
"""
