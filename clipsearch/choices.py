"""The names a user picks from on the command line (``--backend``, ``--index-kind``), defined once.

Light on purpose: the CLI builds its options and ``--help`` from these without importing numpy,
torch or onnxruntime; :mod:`clipsearch.backends` and :mod:`clipsearch.vectors` map the same names
to what they build, and refuse any other.
"""

from __future__ import annotations

# Image-tower backends a user can force by name on any machine (clipsearch.backends builds them).
IMAGE_BACKENDS = ("torch-fp32", "torch-bf16", "torch-int8", "onnx-fp32", "onnx-int8")
# Backends that only pay off on a GPU: ``auto`` measures them there; the library can force them.
GPU_IMAGE_BACKENDS = ("torch-fp16",)
# Vector index kinds (clipsearch.vectors); ``auto`` picks one by the library's size.
INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
