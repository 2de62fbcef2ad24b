"""Gradient mapping (the paper's second method) and the cross-check against the boolean table."""

from __future__ import annotations


def gradient_table(fn, params, inputs, features, *, key, base=None, draws=2, chunk_size=None,
                   progress=None):
  raise NotImplementedError("being written")


class CrossCheck:
  pass


def cross_check(table, probe):
  raise NotImplementedError("being written")
