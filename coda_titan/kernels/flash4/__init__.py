"""FlashAttention-4 (``flash-attn-4``, CuTe DSL) on CODA's packed layouts.

Imported only when the ``flash4`` attention runs; ``flash_attn`` itself is
imported on the first kernel call, so CPU machines never need the package.
"""
