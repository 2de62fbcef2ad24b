"""The feature→parameter table (the paper's φ) and the boolean-logic mapping that builds it."""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from jaxsurgery._src import compat, display
from jaxsurgery._src.core import features as feats
from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import TraceError, UnknownNameError
from jaxsurgery._src.core.interpreter import Context
from jaxsurgery._src.core.values import Val, const_vals

#: How a table was built: by the mask interpreter or by the gradient probe.
Method = Literal["boolean", "gradient"]


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureTable:
  """Which features touch which parameter elements, and which outputs depend on which features.

  Masks are stored bit-packed and compressed (size-1 along axes where they are
  constant); the accessors below expand them for inspection. Build one with
  :func:`dependency_table` (``method="boolean"``) or :func:`gradient_table`
  (``method="gradient"``).

  Attributes:
    features: feature names, in spec order.
    paths: parameter leaf paths (``keystr(path, simple=True, separator="/")``).
    shapes: parameter shape per path.
    dtypes: parameter dtype per path.
    packed: packed, compressed touch mask per path (``None``: touched by nothing).
    output_paths: output leaf paths.
    output_shapes: output shape per path.
    output_packed: packed forward mask per output path.
    spec: the resolved feature spec (feature positions in the inputs).
    method: ``"boolean"`` (the interpreter) or ``"gradient"`` (the probe).
    unknown_primitives: primitives that got the conservative dense rule.
    jaxpr: the traced program (``None`` once dropped, e.g. for pickling).
    param_treedef: the params' treedef.
    evidence: the probe's :class:`ProbeEvidence` (gradient tables only).
    output_spec: the resolved outputs spec (``outputs=`` of :func:`dependency_table`),
      or ``None`` when outputs have no names.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: x @ p["w"] + p["b"]
    >>> params = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
    >>> x = jax.ShapeDtypeStruct((5, 2), jnp.float32)
    >>> table = js.dependency_table(fn, params, x, js.Features(["hp", "mana"]))
    >>> table.paths, table.mask("w")[:, 0].tolist()      # kernel row i is touched by feature i
    (('b', 'w'), [[True, False], [False, True]])
    >>> table.feature_counts("b").tolist()              # the bias meets both features
    [3, 3]
  """

  features: tuple[str, ...]
  paths: tuple[str, ...]
  shapes: Mapping[str, tuple[int, ...]]
  dtypes: Mapping[str, Any]
  packed: Mapping[str, np.ndarray | None]
  output_paths: tuple[str, ...]
  output_shapes: Mapping[str, tuple[int, ...]]
  output_packed: Mapping[str, np.ndarray | None]
  spec: feats.ResolvedSpec | None = None
  method: Method = "boolean"
  unknown_primitives: tuple[str, ...] = ()
  jaxpr: Any = None
  param_treedef: Any = None
  evidence: Any = None  # gradient probe: what cross_check needs besides the masks (ProbeEvidence)
  output_spec: feats.ResolvedSpec | None = None
  strict: bool = False  # how the table was built: reach raises on unknown primitives too

  @property
  def output_features(self) -> tuple[str, ...]:
    """The output names, in outputs-spec order (``()`` when outputs have no names)."""
    return () if self.output_spec is None else self.output_spec.names

  def reach(self, path: str) -> np.ndarray:
    """Which named output positions each element of leaf ``path`` can influence.

    A sound over-approximation of the Jacobian sparsity of the named outputs with
    respect to the parameter, from a backward pass of masks over the output names.

    Args:
      path: a parameter leaf path.

    Returns:
      A dense bool array of shape ``shapes[path] + (len(output_features),)``.

    Raises:
      ValueError: the outputs have no names (pass ``outputs=`` to
        :func:`dependency_table`), or the traced program was dropped.
      UnknownPrimitiveError: the table was built with ``strict=True`` and the
        backward pass meets a primitive without a rule.
    """
    from jaxsurgery._src.core.reach import reach
    return reach(self, self._check_path(path))

  @property
  def num_features(self) -> int:
    """Number of features."""
    return len(self.features)

  def _check_path(self, path: str | None, outputs: bool = False) -> str:
    known = self.output_paths if outputs else self.paths
    if path is None and outputs and len(known) == 1:
      return known[0]
    if path not in known:
      what = "output" if outputs else "parameter"
      raise UnknownNameError(f"No {what} leaf {path!r} in this table. Known {what} paths: {list(known)}")
    return path

  def _feature_index(self, feature: str) -> int:
    try:
      return self.features.index(feature)
    except ValueError:
      raise UnknownNameError(f"No feature {feature!r} in this table. Features: {list(self.features)}") from None

  def mask(self, path: str) -> np.ndarray:
    """The touches of one parameter leaf, expanded.

    Args:
      path: a parameter path (one of :attr:`paths`).

    Returns:
      A bool array ``param.shape + (num_features,)``: element ``[..., k]`` is
      touched by feature ``k``.

    Raises:
      UnknownNameError: ``path`` is not a parameter of this table.
    """
    path = self._check_path(path)
    return M.unpack(self.packed[path], self.shapes[path], self.num_features)

  def output_mask(self, path: str | None = None) -> np.ndarray:
    """The forward mask of one output leaf, expanded.

    Args:
      path: an output path (one of :attr:`output_paths`); may be omitted when
        there is one output.

    Returns:
      A bool array ``output.shape + (num_features,)``: which features each
      output element depends on.
    """
    path = self._check_path(path, outputs=True)
    return M.unpack(self.output_packed[path], self.output_shapes[path], self.num_features)

  def lookup(self, feature: str) -> dict[str, np.ndarray]:
    """The paper's φ(feature): the parameter elements one feature touches.

    Args:
      feature: a feature name.

    Returns:
      ``{path: bool array of the parameter's shape}``.

    Raises:
      UnknownNameError: no such feature.
    """
    k = self._feature_index(feature)
    out = {}
    for path in self.paths:
      m = self.packed[path]
      shape = self.shapes[path]
      if m is None:
        out[path] = np.zeros(shape, bool)
      else:
        bit = (m[..., k // M.BITS] >> np.uint32(k % M.BITS)) & np.uint32(1)
        out[path] = np.broadcast_to(bit.astype(bool), shape).copy()
    return out

  def _compressed(self, path: str) -> tuple[np.ndarray | None, int]:
    """The leaf's packed mask (full rank, still compressed) and the size of its compressed axes."""
    path = self._check_path(path)
    m = self.packed[path]
    if m is None:
      return None, 0
    shape = self.shapes[path]
    m = M.lift(m, len(shape))
    return m, int(np.prod([s if c == 1 else 1 for s, c in zip(shape, m.shape[:-1])], dtype=np.int64))

  def feature_counts(self, path: str) -> np.ndarray:
    """Number of elements of leaf ``path`` touched by each feature (computed on compressed masks).

    Args:
      path: a parameter path.

    Returns:
      An int array ``(num_features,)``.
    """
    m, repeat = self._compressed(path)
    if m is None:
      return np.zeros(self.num_features, np.int64)
    dense = M.unpack(m, m.shape[:-1], self.num_features).reshape(-1, self.num_features)
    return dense.sum(axis=0).astype(np.int64) * repeat

  def touched_elements(self, path: str) -> int:
    """Number of elements of leaf ``path`` touched by at least one feature.

    Args:
      path: a parameter path.

    Returns:
      The count.
    """
    m, repeat = self._compressed(path)
    if m is None:
      return 0
    return int(np.any(m != 0, axis=-1).sum()) * repeat

  def summary(self, max_features: int = 6) -> str:
    """A readable summary: the features, and per parameter leaf the features touching it.

    Args:
      max_features: at most this many features per leaf.

    Returns:
      The text (also the table's ``repr``).
    """
    return display.table_summary(self, max_features)

  def __repr__(self) -> str:
    return self.summary()

  def _repr_html_(self) -> str:
    return display.table_html(self)

  def show(self, path: str, **kwargs: Any):
    """A heatmap of which features touch leaf ``path`` (and its ``reach`` once outputs have names).

    :func:`jaxsurgery.display.show_table` (``probe=``, ``check=``, ``axis=``...); needs the
    ``viz`` extra (matplotlib, imported here and nowhere in the core).

    Args:
      path: a leaf path of this table.
      **kwargs: passed to :func:`jaxsurgery.display.show_table`.

    Returns:
      A :class:`jaxsurgery.display.Picture`.
    """
    from jaxsurgery._src.display_viz import show_table
    return show_table(self, path, **kwargs)


def _abstract(tree, what: str):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for path, x in leaves:
    shape, dtype = feats.leaf_shape_dtype(x, what, feats.keystr(path))
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.ShapeDtypeStruct) else None
    out.append(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) if sharding is not None
               else jax.ShapeDtypeStruct(shape, dtype))
  return [feats.keystr(p) for p, _ in leaves], out, treedef


def _shape_forms(shape) -> tuple[str, ...]:
  """Ways an error message may spell ``shape``: ``(2, 3)``, ``[2,3]``, ``(2,3)``."""
  shape = tuple(int(s) for s in shape)
  if not shape:
    return ()
  return (str(shape), "[" + ",".join(map(str, shape)) + "]", "(" + ",".join(map(str, shape)) + ")")


def _describe(paths, leaves, message: str = "") -> str:
  lines = []
  for p, l in zip(paths, leaves):
    dtype = l.dtype.name if isinstance(l.dtype, np.dtype) else str(l.dtype)
    hit = any(form in message for form in _shape_forms(l.shape))
    lines.append(f"    {p or '<root>'}: {tuple(l.shape)} {dtype}"
                 + ("   <-- shape appears in the error" if hit else ""))
  return "\n".join(lines) if lines else "    (none)"


def _user_frame(exc: BaseException) -> str | None:
  """The innermost traceback frame outside jax, flax and jaxsurgery (where ``fn`` failed)."""
  skip = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
  for mod in ("jax", "flax"):
    skip.append(os.path.dirname(os.path.abspath(__import__(mod).__file__ or "")))
  frames = [f for f in traceback.extract_tb(exc.__traceback__)
            if not any(os.path.abspath(f.filename).startswith(d + os.sep) for d in skip)]
  if not frames:
    return None
  f = frames[-1]
  return f"{f.filename}:{f.lineno} in {f.name}" + (f": {f.line.strip()}" if f.line else "")


class ParamLeaves(NamedTuple):
  """The flattened parameters of a traced function."""

  paths: list[str]                       # keystr paths, in flattening order
  leaves: list[jax.ShapeDtypeStruct]     # abstract leaves
  treedef: Any                           # the params' treedef


class Traced(NamedTuple):
  """``fn(params, inputs)`` traced from abstract shapes (see :func:`trace`)."""

  closed: compat.ClosedJaxpr
  out_shape: Any                         # pytree of ShapeDtypeStruct
  params: ParamLeaves


def trace(fn: Callable, params: Any, inputs: Any) -> Traced:
  """Traces ``fn(params, inputs)`` to a closed jaxpr from abstract shapes (nothing is allocated)."""
  ppaths, pleaves, pdef = _abstract(params, "params")
  ipaths, ileaves, idef = _abstract(inputs, "inputs")
  aparams = jax.tree_util.tree_unflatten(pdef, pleaves)
  ainputs = jax.tree_util.tree_unflatten(idef, ileaves)
  try:
    closed, out_shape = compat.trace_jaxpr(
        fn, (aparams, ainputs), tuple(f"params/{p}" if p else "params" for p in ppaths)
        + tuple(f"inputs/{p}" if p else "inputs" for p in ipaths))
  except Exception as e:
    msg = str(e)
    where = _user_frame(e)
    raise TraceError(
        f"fn(params, inputs) failed to trace: {type(e).__name__}: {msg}\n"
        + (f"  It failed at {where}\n" if where else "")
        + f"  It was called with abstract arrays of these shapes (leaf path: shape dtype):\n"
        f"  params:\n{_describe(ppaths, pleaves, msg)}\n"
        f"  inputs:\n{_describe(ipaths, ileaves, msg)}\n"
        f"  Check that `fn` takes (params, inputs) in that order and that these shapes are the ones "
        f"the model expects.") from e
  return Traced(closed, out_shape, ParamLeaves(ppaths, pleaves, pdef))


def output_layout(out_shape: Any) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
  """Output leaf paths and shapes of a traced function's output tree."""
  out_leaves = jax.tree_util.tree_flatten_with_path(out_shape)[0]
  opaths = tuple(feats.keystr(p) for p, _ in out_leaves)
  return opaths, {p: tuple(l.shape) for p, (_, l) in zip(opaths, out_leaves)}


def assemble(spec: feats.ResolvedSpec, traced: Traced, packed: Mapping[str, np.ndarray | None],
             output_packed: Sequence[np.ndarray | None], *, method: Method, **extra: Any) -> FeatureTable:
  """The :class:`FeatureTable` of ``traced`` with these parameter and output masks.

  Shared by :func:`dependency_table` and the gradient probe. ``output_packed``
  holds one mask per output leaf, in flattening order.
  """
  ppaths, pleaves, pdef = traced.params
  opaths, oshapes = output_layout(traced.out_shape)
  return FeatureTable(
      features=spec.names, paths=tuple(ppaths), shapes={p: tuple(l.shape) for p, l in zip(ppaths, pleaves)},
      dtypes={p: l.dtype for p, l in zip(ppaths, pleaves)}, packed=dict(packed),
      output_paths=opaths, output_shapes=oshapes, output_packed=dict(zip(opaths, output_packed)),
      spec=spec, method=method, jaxpr=traced.closed, param_treedef=pdef, **extra)


def dependency_table(fn: Callable, params: Any, inputs: Any, features: Any, *, outputs: Any = None,
                     strict: bool = False) -> FeatureTable:
  """Builds the feature→parameter table by interpreting ``fn``'s jaxpr with dependency masks.

  This is the paper's "boolean logic mapping". A parameter element is touched
  by feature ``f`` when it takes part in an operation together with a value
  that depends on ``f`` (see docs/design.md for the exact relation).

  Args:
    fn: a pure function ``fn(params, inputs) -> outputs``.
    params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (nothing is allocated).
    inputs: a pytree of arrays or ``jax.ShapeDtypeStruct``.
    features: a feature spec matching ``inputs`` (or a prefix): leaves are
      :class:`Features`, a ``str`` or ``None``.
    outputs: an outputs spec over ``fn``'s output tree (or a prefix), with the
      same leaf types: ``Features(names, axis)`` names the positions along an
      output axis (actions, classes, tokens), a ``str`` names a whole leaf. Output
      names are a namespace of their own. The planner then aligns output axes by
      name (see docs/surgery.md) and :meth:`FeatureTable.reach` is available.
    strict: raise on primitives without a rule instead of warning and using the
      conservative dense rule.

  Returns:
    A :class:`FeatureTable`.

  Raises:
    FeatureSpecError: ``features`` does not fit ``inputs``, or ``outputs`` does not
      fit the output tree (wrong structure, axis or count, duplicate names).
    TraceError: ``fn`` fails to trace with these shapes.
    UnknownPrimitiveError: with ``strict=True``, a primitive without a rule.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> params = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32)}
    >>> x = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    >>> table = js.dependency_table(fn, params, x, js.Features(["a", "b", "c"]))
    >>> table.lookup("b")["w"].tolist()    # row 1 of the kernel reads feature "b"
    [[False, False, False, False], [True, True, True, True], [False, False, False, False]]
  """
  spec = feats.resolve(features, inputs)
  traced = trace(fn, params, inputs)
  closed, out_shape, (ppaths, pleaves, _) = traced
  output_spec = None if outputs is None else feats.resolve(outputs, out_shape, side="outputs")
  shapes = [tuple(l.shape) for l in pleaves]
  ctx = Context(spec.num_features, shapes, strict)
  args = [Val(s, l.dtype, pull=ctx.param_pull(i)) for i, (s, l) in enumerate(zip(shapes, pleaves))]
  args += [Val(l.shape, l.dtype, mask=m) for l, m in zip(spec.leaves, spec.input_masks())]
  outs = ctx.run(closed.jaxpr, const_vals(closed.consts), args)
  opaths, oshapes = output_layout(out_shape)
  opacked = [None if M.is_empty(v.mask) else M.compress(M.lift(v.mask, len(oshapes[p])))
             for p, v in zip(opaths, outs)]
  return assemble(spec, traced, {p: None if M.is_empty(t) else t for p, t in zip(ppaths, ctx.param_touch)},
                  opacked, method="boolean", unknown_primitives=tuple(sorted(ctx.unknown)),
                  output_spec=output_spec, strict=strict)
