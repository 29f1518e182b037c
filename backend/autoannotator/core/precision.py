"""The numeric formats that serving forward passes may run in (``AUTOANNOTATOR_PRECISION``).

``auto`` lets the process pick by its hardware (``models.specialists.runtime.inference_dtype``)."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# What runs serving forward passes on a CPU (``AUTOANNOTATOR_RUNTIME``): torch, OpenVINO, or ``auto``
# (OpenVINO where it is installed); ``models.specialists.compiled`` applies it.
RUNTIMES = ("torch", "openvino", "auto")

# How OpenVINO holds a compiled model's weights (``AUTOANNOTATOR_OPENVINO_WEIGHTS``): int8 per output
# channel, computed in the inference precision (weight-only: activations are never quantized), or fp32.
OPENVINO_WEIGHTS = ("int8", "fp32")
