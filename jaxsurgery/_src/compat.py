"""The one place that knows how JAX versions spell primitive parameters.

Supported: JAX >= 0.7 (tested with 0.10). Known differences:
* "pjit" was renamed "jit" (0.7); both names are registered (``rules.control_flow.CALLS``).
* scan's ``num_consts``/``num_carry`` (every release up to 0.10 at least) are read
  from ``ft_in`` where a JAX version describes the scan's operands with a flat tree
  instead (seen in JAX development versions after 0.10; not in a tested release).
* custom_vjp's sub-jaxpr is ``call_jaxpr`` (newer) or ``fun_jaxpr`` (older
  ``custom_vjp_call_jaxpr``); remat is ``checkpoint``/``remat2``; linear_call's is
  ``callee``, custom_vmap_call's is ``call``.
* shard_map's ``jaxpr`` is an open Jaxpr (0.10), with ``in_specs``/``out_specs``;
  the rule reads only the body's local avals.
"""

from __future__ import annotations

import collections
import inspect
import weakref
from typing import Any, Protocol

import jax
from jax._src import core as jcore

from jaxsurgery._src.core.errors import NoSubJaxprError

Literal = jcore.Literal
DropVar = jcore.DropVar
Jaxpr = jcore.Jaxpr
ClosedJaxpr = jcore.ClosedJaxpr


class Eqn(Protocol):
  """What the analysis reads of a jaxpr eqn (a ``jax.core.JaxprEqn`` has all of it).

  ``invars[k].aval`` / ``outvars[k].aval`` have ``.shape`` and ``.dtype``;
  ``primitive.name`` names the primitive.
  """

  primitive: Any
  params: dict[str, Any]
  invars: list[Any]
  outvars: list[Any]
  effects: Any
  source_info: Any


_SUB_JAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr", "callee", "call")  # call: custom_vmap_call


def sub_jaxpr(params: dict[str, Any], primitive: str = "?") -> tuple[Any, list[Any]]:
  """The (open jaxpr, consts) that a call-like primitive evaluates.

  Raises:
    NoSubJaxprError: none of the known parameter names holds a jaxpr (a JAX
      version that spells the call's parameters differently).
  """
  for key in _SUB_JAXPR_KEYS:
    if isinstance(params.get(key), (Jaxpr, ClosedJaxpr)):
      return open_jaxpr(params[key])
  raise NoSubJaxprError(
      f"jaxsurgery cannot find the sub-jaxpr of the call-like primitive `{primitive}`: none of the "
      f"parameters {sorted(params)} is a jaxpr (it looks for {list(_SUB_JAXPR_KEYS)}). This JAX version "
      f"({jax.__version__}) spells the call differently. Register a rule for it with "
      f"`jaxsurgery.register_rule({primitive!r}, rule)` (see jaxsurgery.rules), or report the JAX version.")


def open_jaxpr(j: Any) -> tuple[Any, list[Any]]:
  """``(jaxpr, consts)`` of a closed or open jaxpr."""
  if isinstance(j, ClosedJaxpr):
    return j.jaxpr, list(j.consts)
  return j, []


def scan_counts(params: dict[str, Any]) -> tuple[int, int]:
  """(num_consts, num_carry) of a scan eqn."""
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  ft = params["ft_in"]  # newer JAX (see the module docstring): flat tree of (consts, carry, xs)
  counts = getattr(ft, "num_consts", None)
  if counts is not None:
    return ft.num_consts, ft.num_carry
  consts, carry, _ = ft
  return len(consts), len(carry)


def bind(eqn, args: list[Any]) -> list[Any]:
  """Evaluates one eqn on concrete arguments (constant folding)."""
  bound = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bound, tuple):  # JAX < 0.8: (subfuns, params)
    subfuns, params = bound
  else:
    subfuns, params = [], bound
  with eqn.ctx.manager if hasattr(eqn, "ctx") else _null():
    out = eqn.primitive.bind(*subfuns, *args, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def jax_version() -> tuple[int, ...]:
  return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


# -- tracing -------------------------------------------------------------------
#
# ``jax.make_jaxpr(fn)`` goes through ``jax.jit(fn).trace``: it builds a jit
# wrapper, parses jit options, resolves shardings and builds debug info on every
# call, which costs ~0.2 ms on small models (a third of the trace of the asdex
# benchmark models). We call the tracer underneath it directly
# (``pe.trace_to_jaxpr_dynamic``, the same function jit uses; the jaxprs are
# identical) and fall back to ``jax.make_jaxpr`` if these internals move.
#
# Traces are cached per function object, like jit's own cache (which we bypass):
# the key is the function (weakly held: the entry dies with it; a bound method
# by its instance and function), the argument tree, the avals and JAX's trace
# context (x64, promotion mode, ...). Like ``jax.jit``, a cached trace is reused
# for the same function object, so a function whose behaviour changes through
# mutable global state must be a new object (or call ``clear_trace_cache()``).

_TRACE_CACHE_SIZE = 32


def _fast_trace_api():
  try:
    from jax._src import api_util
    from jax._src import config as jconfig
    from jax._src import linear_util as lu
    from jax._src.interpreters import partial_eval as pe
    names = list(inspect.signature(pe.trace_to_jaxpr_dynamic).parameters)
    if names[:2] != ["fun", "in_avals"]:
      return None
    for f in (api_util.flatten_fun_nokwargs, api_util.fun_sourceinfo, jcore.shaped_abstractify,
              jconfig.trace_context, jcore.trace_state_clean, lu.wrap_init):
      if not callable(f):
        return None
    if tuple(lu.DebugInfo._fields[:4]) != ("traced_for", "func_src_info", "arg_names",
                                           "result_paths"):
      return None
    jcore.initial_result_paths  # noqa: B018  (must exist)
    return api_util, jconfig, lu, pe
  except Exception:  # any of these internals missing or renamed: use make_jaxpr
    return None


_FAST = _fast_trace_api()


class WeakLRU:
  """A small LRU keyed weakly by a function object (a bound method by its instance) plus a rest.

  The rest is any hashable; an entry dies with its function or when evicted. Shared
  by the trace cache here and the probe's compiled functions.
  """

  def __init__(self, maxsize: int):
    self.maxsize = maxsize
    self.entries: collections.OrderedDict = collections.OrderedDict()  # key -> (ref, value)
    self.hits = 0
    self.misses = 0

  @staticmethod
  def _target(fn):
    """(object whose lifetime bounds the entry, identity part of the key), or None."""
    ident: tuple
    if inspect.ismethod(fn):  # a new bound-method object per attribute access
      target, ident = fn.__self__, (id(fn.__self__), fn.__func__)
    else:
      target, ident = fn, (id(fn),)
    try:
      hash(ident)
      weakref.ref(target)
    except TypeError:
      return None
    return target, ident

  def key(self, fn, rest):
    t = self._target(fn)
    return None if t is None else (t[0], t[1] + rest)

  def get(self, tk):
    target, key = tk
    hit = self.entries.get(key)
    if hit is None or hit[0]() is not target:
      self.misses += 1
      return None
    try:
      self.entries.move_to_end(key)
    except KeyError:  # dropped meanwhile (another thread)
      pass
    self.hits += 1
    return hit[1]

  def put(self, tk, value) -> None:
    target, key = tk
    entries = self.entries

    def drop(_, key=key):
      entries.pop(key, None)
    entries[key] = (weakref.ref(target, drop), value)
    while len(entries) > self.maxsize:
      entries.popitem(last=False)

  def get_or_build(self, fn, rest, build):
    tk = self.key(fn, rest)
    if tk is None:
      self.misses += 1
      return build()
    value = self.get(tk)
    if value is None:
      value = build()
      self.put(tk, value)
    return value

  def clear(self) -> None:
    self.entries.clear()


def conv_vjp_lhs_padding(*args: Any) -> Any:
  """The input padding of a conv's transpose (JAX's private helper, used by reach's windowed OR).

  Raises whatever the helper raises (or ImportError where it moved): callers fall back to a
  coarser sound rule.
  """
  from jax._src.lax.convolution import _conv_general_vjp_lhs_padding
  return _conv_general_vjp_lhs_padding(*args)


def source_line(eqn) -> str:
  """``file.py:line (function)`` where the user's code made ``eqn``, or ``""``."""
  try:
    from jax._src import source_info_util
    s = source_info_util.summarize(eqn.source_info)
  except Exception:  # pragma: no cover - private API
    return ""
  if not s or s.startswith("<unknown"):
    return ""
  head, sep, tail = s.partition(":")
  return head.rsplit("/", 1)[-1] + sep + tail  # file name, not the full path


_TRACES = WeakLRU(_TRACE_CACHE_SIZE)


def clear_trace_cache() -> None:
  """Forgets every cached trace (see the note above)."""
  _TRACES.clear()


def trace_jaxpr(fn, args: tuple, arg_names: tuple[str, ...] | None = None
                ) -> tuple[ClosedJaxpr, Any]:
  """``jax.make_jaxpr(fn, return_shape=True)(*args)`` for abstract ``args``, cached per ``fn``.

  ``arg_names`` (one per flat argument leaf) name the arguments in JAX's error
  messages; building them from the function's signature (as jit does) costs more
  than the rest of the setup.
  """
  if _FAST is None:
    return jax.make_jaxpr(fn, return_shape=True)(*args)
  api_util, jconfig, lu, pe = _FAST
  flat, in_tree = jax.tree_util.tree_flatten(args)
  avals = tuple(jcore.shaped_abstractify(x) for x in flat)
  top = jcore.trace_state_clean()  # inside another trace, jaxprs may close over tracers
  tk = _TRACES.key(fn, (in_tree, avals, jconfig.trace_context())) if top else None
  if tk is not None:
    hit = _TRACES.get(tk)
    if hit is not None:
      return hit
  if arg_names is not None and len(arg_names) != len(flat):
    arg_names = None
  dbg = lu.DebugInfo("jaxsurgery", api_util.fun_sourceinfo(fn), arg_names,
                     jcore.initial_result_paths)
  wrapped, out_tree = api_util.flatten_fun_nokwargs(lu.wrap_init(fn, debug_info=dbg), in_tree)
  res = pe.trace_to_jaxpr_dynamic(wrapped, list(avals))
  if not (isinstance(res, tuple) and len(res) == 3 and isinstance(res[0], Jaxpr)):
    return jax.make_jaxpr(fn, return_shape=True)(*args)  # the internal API changed shape
  jaxpr, out_avals, consts = res
  closed = ClosedJaxpr(jaxpr, consts)
  out_shape = jax.tree_util.tree_unflatten(out_tree(), [
      jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
      if isinstance(a, jcore.ShapedArray) else a for a in out_avals])
  if tk is not None:
    _TRACES.put(tk, (closed, out_shape))
  return closed, out_shape
