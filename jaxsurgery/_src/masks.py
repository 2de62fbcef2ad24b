"""Bit-packed dependency masks.

A mask describes, for every element of a value, the set of features it depends
on. It is a numpy ``uint32`` array of shape ``value.shape' + (W,)``: the trailing
axis packs feature ``k`` into bit ``k % 32`` of word ``k // 32``. Every other
axis has either the value's size or size 1, meaning the mask is constant along
it (numpy broadcasting). ``None`` stands for the empty mask.

Parameter masks stay tiny this way: a (4096, 16384) kernel read by a constant
activation mask is touched as (4096, 1, W), never 67M entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WORD = np.uint32
BITS = 32

Mask = np.ndarray  # or None for the empty mask


def num_words(num_features: int) -> int:
  return max(1, -(-num_features // BITS))


def one_hot(ids: np.ndarray, W: int) -> np.ndarray:
  """Packed masks with exactly bit ``ids[i]`` set in row ``i``: shape (len(ids), W)."""
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  out = np.zeros((ids.size, W), WORD)
  out[np.arange(ids.size), ids // BITS] = (np.uint64(1) << (ids % BITS).astype(np.uint64)).astype(WORD)
  return out


def unpack(mask: Mask | None, shape: Sequence[int], num_features: int) -> np.ndarray:
  """Dense bool array of shape ``shape + (num_features,)``."""
  shape = tuple(shape)
  if mask is None:
    return np.zeros(shape + (num_features,), bool)
  m = np.broadcast_to(mask, shape + mask.shape[-1:])
  bits = np.unpackbits(np.ascontiguousarray(m).view(np.uint8), axis=-1, bitorder="little")
  return bits[..., :num_features].astype(bool)


def pack(dense: np.ndarray) -> np.ndarray:
  """Inverse of :func:`unpack`: bool (..., F) -> packed (..., W)."""
  F = dense.shape[-1]
  W = num_words(F)
  padded = np.zeros(dense.shape[:-1] + (W * BITS,), np.uint8)
  padded[..., :F] = dense
  return np.packbits(padded, axis=-1, bitorder="little").view(WORD)


def is_empty(mask: Mask | None) -> bool:
  return mask is None or not mask.any()


def orr(*masks: Mask | None) -> Mask | None:
  """Broadcasting OR of masks that share a rank (``None`` entries are skipped)."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  out = present[0]
  for m in present[1:]:
    out = np.bitwise_or(out, m)
  return out


def compress(mask: Mask | None) -> Mask | None:
  """Shrinks axes along which the mask is constant to size 1 (cheap, exact)."""
  if mask is None:
    return None
  for ax in range(mask.ndim - 1):
    if mask.shape[ax] > 1:
      first = mask.take([0], axis=ax)
      if (mask == first).all():
        mask = first
  return mask


def reduce_or(mask: Mask | None, axes: Sequence[int], keepdims: bool = False) -> Mask | None:
  """OR over value axes (never the packed axis)."""
  if mask is None:
    return None
  axes = tuple(sorted(a % (mask.ndim - 1) for a in axes))
  big = tuple(a for a in axes if mask.shape[a] > 1)
  if big:
    mask = np.bitwise_or.reduce(mask, axis=big, keepdims=True)
  if not keepdims:
    mask = mask.reshape(tuple(s for i, s in enumerate(mask.shape) if i not in axes))
  return mask


def reduce_all(mask: Mask | None) -> Mask | None:
  """OR over every value axis: a (W,) mask."""
  if mask is None:
    return None
  return np.bitwise_or.reduce(mask.reshape(-1, mask.shape[-1]), axis=0)


def lift(mask: Mask | None, ndim: int) -> Mask | None:
  """Left-pads a mask of lower rank with size-1 axes (numpy broadcasting rules)."""
  if mask is None or mask.ndim - 1 == ndim:
    return mask
  return mask.reshape((1,) * (ndim - mask.ndim + 1) + mask.shape)


def uniform(word_mask: Mask | None, ndim: int) -> Mask | None:
  """A (W,) mask as a constant mask of rank ``ndim``."""
  if word_mask is None:
    return None
  return word_mask.reshape((1,) * ndim + word_mask.shape[-1:])


def unbroadcast(mask: Mask | None, shape: Sequence[int]) -> Mask | None:
  """ORs a mask of a broadcast result back onto an operand of ``shape``."""
  if mask is None:
    return None
  shape = tuple(shape)
  lead = mask.ndim - 1 - len(shape)
  if lead > 0:
    mask = reduce_or(mask, range(lead))
  axes = [i for i, s in enumerate(shape) if s == 1 and mask.shape[i] > 1]
  if axes:
    mask = reduce_or(mask, axes, keepdims=True)
  return mask


def materialize(mask: Mask | None, shape: Sequence[int], W: int) -> np.ndarray:
  """Full-size (contiguous) mask of ``shape + (W,)``."""
  shape = tuple(shape)
  if mask is None:
    return np.zeros(shape + (W,), WORD)
  return np.ascontiguousarray(np.broadcast_to(mask, shape + (W,)))


def expand_axes(mask: Mask, shape: Sequence[int], axes: Sequence[int]) -> Mask:
  """Broadcasts the given value axes to their full size, leaving others compressed."""
  target = list(mask.shape)
  changed = False
  for a in axes:
    if target[a] != shape[a]:
      target[a] = shape[a]
      changed = True
  return np.broadcast_to(mask, tuple(target)) if changed else mask


def where_free(touch: Mask | None, out_mask: Mask | None) -> Mask | None:
  """Keeps ``touch`` only on elements whose ``out_mask`` is empty (provenance cut-off)."""
  if touch is None or out_mask is None:
    return touch
  free = ~np.any(out_mask != 0, axis=-1, keepdims=True)
  if free.all():
    return touch
  if not free.any():
    return None
  return np.where(free, touch, WORD(0))
