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
from typing import overload

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
  if mask is None:
    return True
  if mask.size > _SMALL and mask.flags.c_contiguous:
    # masks that are not empty usually have a bit near the start: look there first
    flat = mask.reshape(-1)
    if flat[:_SMALL].any():
      return False
    return not flat[_SMALL:].any()
  return not mask.any()


def orr(*masks: Mask | None) -> Mask | None:
  """Broadcasting OR of masks that share a rank (``None`` entries are skipped)."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  out = present[0]
  for m in present[1:]:
    out = np.bitwise_or(out, m)
  return out


@overload
def compress(mask: Mask) -> Mask: ...
@overload
def compress(mask: None) -> None: ...
@overload
def compress(mask: Mask | None) -> Mask | None: ...
def compress(mask: Mask | None) -> Mask | None:
  """Shrinks axes along which the mask is constant to size 1 (cheap, exact)."""
  if mask is None:
    return None
  for ax in range(mask.ndim - 1):
    if mask.shape[ax] <= 1:
      continue
    idx = [slice(None)] * mask.ndim
    idx[ax] = slice(0, 1)
    first = mask[tuple(idx)]
    if mask.strides[ax] == 0:  # a broadcast view: constant by construction
      mask = first
      continue
    idx[ax] = slice(1, 2)  # cheap early exit: most non-constant axes differ at once
    if not np.array_equal(mask[tuple(idx)], first):
      continue
    if (mask == first).all():
      mask = first.copy()  # do not keep the large array alive through a view
  return mask


# numpy's ``ufunc.reduce`` is slow when few elements follow the reduced axis
# (W words of a few features): its inner loop is that short run. ORing the two
# halves of the axis instead (repeatedly) keeps long contiguous runs: 5-20x faster
# for 3 to 16 trailing elements, slower from ~64 on (measured crossover:
# trailing elements x min(axis size, 8) ~ 256).
_HALVE_BELOW = 256
_SMALL = 4096


def _or_axis(m: Mask, axis: int) -> Mask:
  """OR over one value axis, kept as size 1."""
  n = m.shape[axis]
  if n == 1:
    return m
  idx = [slice(None)] * m.ndim
  if m.strides[axis] == 0:  # broadcast: every entry along the axis is the same
    idx[axis] = slice(0, 1)
    return m[tuple(idx)]
  inner = 1
  for s in m.shape[axis + 1:]:
    inner *= s
  if inner * min(n, 8) >= _HALVE_BELOW or m.size <= _SMALL:
    return np.bitwise_or.reduce(m, axis=axis, keepdims=True)
  while n > 1:
    h = n // 2
    idx[axis] = slice(0, h)
    lo = m[tuple(idx)]
    idx[axis] = slice(n - h, n)
    r = np.bitwise_or(lo, m[tuple(idx)])
    if n % 2:  # fold the middle entry into the first
      idx[axis] = slice(h, h + 1)
      mid = m[tuple(idx)]
      idx[axis] = slice(0, 1)
      head = r[tuple(idx)]
      np.bitwise_or(head, mid, out=head)
    m, n = r, h
  return m


@overload
def reduce_or(mask: Mask, axes: Sequence[int], keepdims: bool = False) -> Mask: ...
@overload
def reduce_or(mask: None, axes: Sequence[int], keepdims: bool = False) -> None: ...
@overload
def reduce_or(mask: Mask | None, axes: Sequence[int], keepdims: bool = False) -> Mask | None: ...
def reduce_or(mask: Mask | None, axes: Sequence[int], keepdims: bool = False) -> Mask | None:
  """OR over value axes (never the packed axis)."""
  if mask is None:
    return None
  r = mask.ndim - 1
  axes = tuple(sorted(a % r for a in axes))
  big = [a for a in axes if mask.shape[a] > 1]
  if len(big) > 1 and all(mask.shape[a] == 1 for a in range(r) if a not in big):
    mask = reduce_all(mask).reshape((1,) * r + mask.shape[-1:])
  else:
    for a in big:
      mask = _or_axis(mask, a)
  if not keepdims:
    mask = mask.reshape(tuple(s for i, s in enumerate(mask.shape) if i not in axes))
  return mask


@overload
def reduce_all(mask: Mask) -> Mask: ...
@overload
def reduce_all(mask: None) -> None: ...
@overload
def reduce_all(mask: Mask | None) -> Mask | None: ...
def reduce_all(mask: Mask | None) -> Mask | None:
  """OR over every value axis: a (W,) mask."""
  if mask is None:
    return None
  W = mask.shape[-1]
  if any(st == 0 and n > 1 for st, n in zip(mask.strides[:-1], mask.shape[:-1])):
    # broadcast views: one copy of each replicated axis is enough (no materialising)
    mask = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.strides[:-1])]
  return _or_axis(mask.reshape(-1, W), 0).reshape(W)


def any_bits(mask: Mask) -> np.ndarray:
  """Bool ``value.shape' + (1,)``: whether each element's mask has a bit set."""
  W = mask.shape[-1]
  if W == 1:
    return mask != 0
  if W <= 8:  # np.any over a short last axis is as slow as a short-inner reduce
    acc = np.bitwise_or(mask[..., 0], mask[..., 1])
    for k in range(2, W):
      np.bitwise_or(acc, mask[..., k], out=acc)
    return (acc != 0)[..., None]
  return np.any(mask != 0, axis=-1, keepdims=True)


@overload
def lift(mask: Mask, ndim: int) -> Mask: ...
@overload
def lift(mask: None, ndim: int) -> None: ...
@overload
def lift(mask: Mask | None, ndim: int) -> Mask | None: ...
def lift(mask: Mask | None, ndim: int) -> Mask | None:
  """Left-pads a mask of lower rank with size-1 axes (numpy broadcasting rules)."""
  if mask is None or mask.ndim - 1 == ndim:
    return mask
  return mask.reshape((1,) * (ndim - mask.ndim + 1) + mask.shape)


@overload
def uniform(word_mask: Mask, ndim: int) -> Mask: ...
@overload
def uniform(word_mask: None, ndim: int) -> None: ...
@overload
def uniform(word_mask: Mask | None, ndim: int) -> Mask | None: ...
def uniform(word_mask: Mask | None, ndim: int) -> Mask | None:
  """A (W,) mask as a constant mask of rank ``ndim``."""
  if word_mask is None:
    return None
  return word_mask.reshape((1,) * ndim + word_mask.shape[-1:])


def broadcast_count(b, shape: Sequence[int]) -> int:
  """True elements of ``np.broadcast_to(b, shape)``, without materialising it."""
  b = np.asarray(b)
  b = b.reshape((1,) * (len(shape) - b.ndim) + b.shape)
  repeat = int(np.prod([n for n, m in zip(shape, b.shape) if m == 1], dtype=np.int64))
  return int(np.count_nonzero(b)) * repeat


@overload
def unbroadcast(mask: Mask, shape: Sequence[int]) -> Mask: ...
@overload
def unbroadcast(mask: None, shape: Sequence[int]) -> None: ...
@overload
def unbroadcast(mask: Mask | None, shape: Sequence[int]) -> Mask | None: ...
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
  free = ~any_bits(out_mask)
  if free.all():
    return touch
  if not free.any():
    return None
  return np.where(free, touch, WORD(0))
