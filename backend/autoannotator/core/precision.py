"""The numeric formats that serving forward passes may run in (``AUTOANNOTATOR_PRECISION``).

``auto`` lets the process pick by its hardware (``models.specialists.runtime.inference_dtype``)."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
