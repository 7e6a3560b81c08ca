"""A numpy MLX affine dequantizer written from MLX's documented format (no moestream code): per group of
`group_size` consecutive input elements, w = scale * q + bias; q packed little-endian into uint32 words, element j
of a word at bits [bits*j, bits*j + bits) (lowest first). Computed in f32: the product is rounded to f32, then the
bias is added and rounded (no fused multiply-add)."""

import numpy as np


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """[..., n_words] uint32 -> [..., n_words * 32 / bits] integer codes (as uint32)."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    q = (words[..., :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(*words.shape[:-1], words.shape[-1] * per)


def dequantize(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    q = unpack(words, bits).astype(np.float32)
    cols = q.shape[-1]
    assert scales.shape == biases.shape == (*q.shape[:-1], cols // group_size), (q.shape, scales.shape)
    g = q.reshape(*q.shape[:-1], cols // group_size, group_size)
    s = scales.astype(np.float32)[..., None]
    b = biases.astype(np.float32)[..., None]
    prod = (s * g).astype(np.float32)
    return (prod + b).astype(np.float32).reshape(q.shape)
