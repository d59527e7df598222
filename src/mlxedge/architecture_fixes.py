"""Corrections to mlx-lm architecture classes, made here as subclasses (mlx-lm itself is never patched).

gemma3_text: mlx-lm's Gemma3Model takes the global-attention mask from `cache[sliding_window_pattern - 1]`,
assuming that layer exists and is global. A model with fewer layers than the pattern — e.g. 2 layers with the
default pattern of 6, which transformers writes as `layer_types` all "sliding_attention" — has no global
layer, and that index runs past the cache list (IndexError). The subclass pads the list it passes to the
pattern's length with None: zip() stops at the last real layer, so the padding only feeds the unused global
mask, and every layer gets exactly the cache and mask it had.
"""

from __future__ import annotations

import functools

from .architectures import import_architecture


def model_class(model_type: str, module):
    """The Model class to build for `model_type`: mlx-lm's own, or our subclass where one is needed."""
    return gemma3_text_model() if model_type == "gemma3_text" else module.Model


@functools.cache
def gemma3_text_model():
    base = import_architecture("gemma3_text").Model

    class Gemma3TextModel(base):
        """mlx-lm's gemma3_text Model, also for models with no global-attention layer."""

        def __call__(self, inputs, cache=None, input_embeddings=None):
            pattern = self.args.sliding_window_pattern
            if len(self.layers) < pattern:  # no layer is global: give the global-mask lookup a slot
                cache = list(cache) if cache is not None else [None] * len(self.layers)
                cache += [None] * (pattern - len(cache))
            return super().__call__(inputs, cache, input_embeddings)

    return Gemma3TextModel
