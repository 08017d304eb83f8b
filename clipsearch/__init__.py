"""clipsearch: CLIP, from scratch, for searching your photos.

``model, preprocess, tokenize = clipsearch.load(source)`` is the public entry point. Heavy modules
(torch, faiss) are imported lazily so that ``import clipsearch`` stays cheap on the query path.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(source: str, device: str = "cpu", **kwargs):
    """Load a CLIP model: returns ``(model, preprocess, tokenize)``.

    See :func:`clipsearch.checkpoints.load` for the accepted sources.
    """
    from clipsearch.checkpoints import load as _load

    return _load(source, device=device, **kwargs)
