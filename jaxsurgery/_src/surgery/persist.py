"""Plans on disk: a reviewed surgery written once, applied to every checkpoint of a pool, in any process.

A saved plan is a directory::

  plan/
    manifest.json   # format and version, the report and both tables, field by field
    arrays.npz      # every array (index maps, zero masks, table masks), no pickle

Objects are written generically from their dataclass fields (``LeafPlan``,
``Report``, ``FeatureTable`` and what they hold), so fields added later are
saved without a change here; a loaded plan is rebuilt from the same fields and
applies identically. What cannot be written (a table's traced program, its
treedef, probe evidence) is left out and listed in the manifest: a loaded
plan remaps params and states, and prints its report, but cannot be
re-planned or verified without the models. The format has a version; a plan
of another version, a plan whose files were changed, or a directory that is
not a plan is refused with an error that says which.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxsurgery._src.core.errors import SurgeryError

FORMAT = "jaxsurgery.plan"
VERSION = 1
MANIFEST, ARRAYS = "manifest.json", "arrays.npz"
#: Table fields that hold traced programs or live objects: not written.
_TABLE_SKIP = ("jaxpr", "param_treedef", "evidence")


class PlanFormatError(SurgeryError):
  """A saved plan that cannot be read: another format version, changed files, or not a plan."""


# -- encoding ------------------------------------------------------------------------------

class _Unencodable(TypeError):
  pass


def _class_name(cls) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


class _Encoder:
  """Python values -> JSON-able values, with arrays set aside (by key) for the ``.npz``."""

  def __init__(self):
    self.arrays: dict[str, np.ndarray] = {}

  def array(self, x) -> dict:
    a = np.asarray(x)
    if a.dtype.hasobject:
      raise _Unencodable(f"an object array {a.shape}")
    key = f"a{len(self.arrays)}"
    self.arrays[key] = a
    return {"__array__": key}

  def __call__(self, x: Any) -> Any:
    if x is None or type(x) in (bool, int, str):
      return x
    if type(x) is float:
      return x if math.isfinite(x) else {"__float__": repr(x)}
    if isinstance(x, (np.ndarray, jax.Array)):
      return self.array(x)
    if isinstance(x, np.generic):
      return {"__scalar__": self(x.dtype), "value": self(x.item())}
    if isinstance(x, enum.Enum):
      return {"__enum__": _class_name(type(x)), "value": self(x.value)}
    if isinstance(x, str):   # a str subclass (AxisHow): rebuilt from its __getnewargs__
      args = x.__getnewargs__() if hasattr(x, "__getnewargs__") else (str(x),)
      return {"__str__": _class_name(type(x)), "args": [self(a) for a in args]}
    if isinstance(x, np.dtype) or _is_jax_dtype(x):
      return {"__dtype__": str(x)}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
      return self.dataclass(x)
    if isinstance(x, tuple):
      return {"__tuple__": [self(v) for v in x]}
    if isinstance(x, list):
      return [self(v) for v in x]
    if isinstance(x, (set, frozenset)):
      return {"__set__": [self(v) for v in sorted(x, key=repr)]}
    if isinstance(x, Mapping):
      return {"__dict__": [[self(k), self(v)] for k, v in x.items()]}
    raise _Unencodable(type(x).__name__)

  def dataclass(self, x, skip=()) -> dict:
    cls = type(x)
    if not cls.__module__.startswith("jaxsurgery."):
      raise _Unencodable(f"{cls.__qualname__} (not a jaxsurgery class)")
    fields = {f.name: self(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init and f.name not in skip}
    return {"__dataclass__": _class_name(cls), "fields": fields}


def _is_jax_dtype(x) -> bool:
  if isinstance(x, (type, str)) or not hasattr(x, "name"):
    return False
  try:
    return jax.dtypes.issubdtype(x, jax.dtypes.extended)
  except (TypeError, ValueError):
    return False


# -- decoding ------------------------------------------------------------------------------

def _resolve(name: str):
  """A class by ``module:qualname``, from jaxsurgery's own modules only (nothing else is imported)."""
  module, _, qualname = name.partition(":")
  if module != "jaxsurgery" and not module.startswith("jaxsurgery."):
    raise PlanFormatError(f"the plan names the class {name!r}, which is not a jaxsurgery class; it was not "
                          f"written by jaxsurgery.")
  try:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError) as e:
    raise PlanFormatError(f"the plan holds a {name!r}, which this version of jaxsurgery does not have "
                          f"({e}); load it with the version that wrote it.") from e
  return obj


def _dtype(name: str):
  if name.startswith("key<"):
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
      d = jax.eval_shape(lambda impl=impl: jax.random.key(0, impl=impl)).dtype
      if str(d) == name:
        return d
    raise PlanFormatError(f"unknown PRNG key dtype {name!r} in the plan.")
  return np.dtype(name)


class _Decoder:
  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = arrays

  def __call__(self, x: Any) -> Any:
    if isinstance(x, list):
      return [self(v) for v in x]
    if not isinstance(x, dict):
      return x
    (tag, *_) = x
    if tag == "__array__":
      return np.array(self.arrays[x["__array__"]])
    if tag == "__float__":
      return float(x["__float__"])
    if tag == "__scalar__":
      return self(x["__scalar__"]).type(self(x["value"]))
    if tag == "__dtype__":
      return _dtype(x["__dtype__"])
    if tag == "__enum__":
      return _resolve(x["__enum__"])(self(x["value"]))
    if tag == "__str__":
      return _resolve(x["__str__"])(*[self(a) for a in x["args"]])
    if tag == "__tuple__":
      return tuple(self(v) for v in x["__tuple__"])
    if tag == "__set__":
      return frozenset(self(v) for v in x["__set__"])
    if tag == "__dict__":
      return {_hashable(self(k)): self(v) for k, v in x["__dict__"]}
    if tag == "__dataclass__":
      return self.dataclass(x)
    raise PlanFormatError(f"unknown entry {tag!r} in the plan's manifest.")

  def dataclass(self, x, extra: Mapping[str, Any] | None = None):
    cls = _resolve(x["__dataclass__"])
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(x["fields"]) - set(known))
    if unknown:
      raise PlanFormatError(f"the plan's {cls.__qualname__} has fields {unknown} that this version of jaxsurgery "
                            f"does not know; load it with the version that wrote it (or a newer one).")
    values = {k: self(v) for k, v in x["fields"].items()}
    values.update(extra or {})
    missing = [n for n, f in known.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
      raise PlanFormatError(f"the plan's {cls.__qualname__} lacks the fields {missing} that this version of "
                            f"jaxsurgery needs; re-save the plan with this version.")
    return cls(**values)


def _hashable(k):
  return tuple(k) if isinstance(k, list) else k


# -- tables ----------------------------------------------------------------------------------

def _encode_table(enc: _Encoder, table, dropped: dict[str, str], name: str) -> dict:
  skip = [f for f in _TABLE_SKIP if getattr(table, f, None) is not None]
  for field in skip:
    dropped[f"{name}.{field}"] = "not written (a traced program / live object)"
  try:
    out = enc.dataclass(table, skip=skip)
  except _Unencodable:   # one field cannot be written: leave it out, say so
    fields = {}
    for f in dataclasses.fields(table):
      if not f.init or f.name in skip:
        continue
      try:
        fields[f.name] = enc(getattr(table, f.name))
      except _Unencodable as e:
        dropped[f"{name}.{f.name}"] = f"not written: {e}"
    out = {"__dataclass__": _class_name(type(table)), "fields": fields}
  return out


# -- files ------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
  return buf.getvalue()


def plan_id(manifest: Mapping[str, Any]) -> str:
  """A short fingerprint of what a plan does (its report and tables, and its arrays' checksum)."""
  body = {k: manifest[k] for k in ("report", "old_table", "new_table", "arrays_sha256")}
  return _sha256(json.dumps(body, sort_keys=True).encode())[:16]


def save(surgery, path, *, overwrite: bool = False) -> str:
  """Writes a plan to a directory (a JSON manifest and an ``.npz`` of arrays; no pickle).

  The directory appears complete or not at all (it is written next to
  ``path`` and renamed into place).

  Args:
    surgery: the :class:`~jaxsurgery.Surgery` to write.
    path: the directory to create.
    overwrite: replace an existing plan at ``path``.

  Returns:
    The plan's id (a fingerprint of what it does, recorded by the command line
    in every checkpoint it writes).

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, jaxsurgery as js
    >>> from jaxsurgery._src.surgery import persist
    >>> fn = lambda p, x: x @ p["w"]
    >>> table = lambda n, names: js.dependency_table(fn, {"w": jnp.ones((n, 2))}, jnp.ones((1, n)), js.Features(names))
    >>> surgery = js.plan(table(2, ["a", "b"]), table(3, ["a", "new", "b"]))
    >>> path = os.path.join(tempfile.mkdtemp(), "plan")
    >>> _ = persist.save(surgery, path)
    >>> loaded = persist.load(path)
    >>> loaded({"w": jnp.ones((2, 2))}, {"w": jnp.zeros((3, 2))})["w"].tolist()
    [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
  """
  path = os.fspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace the plan there, or another path.")
  manifest, arrays = _manifest(surgery)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".plan-", dir=parent)
  try:
    with open(os.path.join(tmp, ARRAYS), "wb") as f:
      f.write(arrays)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    _replace_dir(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest["plan_id"]


def _manifest(surgery) -> tuple[dict, bytes]:
  from jaxsurgery import __version__
  enc, dropped = _Encoder(), dict[str, str]()
  try:
    report = enc(surgery.report)
  except _Unencodable as e:
    raise SurgeryError(f"The plan's report holds a {e}, which cannot be written; this is a jaxsurgery bug "
                       f"(report it with the plan's code).") from e
  manifest = {"format": FORMAT, "version": VERSION, "jaxsurgery": __version__, "report": report,
              "old_table": _encode_table(enc, surgery.old_table, dropped, "old_table"),
              "new_table": _encode_table(enc, surgery.new_table, dropped, "new_table")}
  arrays = _npz_bytes(enc.arrays)
  manifest["arrays_sha256"] = _sha256(arrays)
  manifest["dropped"] = dropped
  manifest["plan_id"] = plan_id(manifest)
  return manifest, arrays


def _replace_dir(tmp: str, path: str) -> None:
  if not os.path.exists(path):
    os.rename(tmp, path)
    return
  old = tmp + ".old"
  os.rename(path, old)
  os.rename(tmp, path)
  shutil.rmtree(old, ignore_errors=True)


def read_manifest(path) -> dict:
  """The manifest of a saved plan, checked: format, version and the arrays' checksum.

  Args:
    path: the plan's directory.

  Returns:
    The manifest (a dict; ``manifest["plan_id"]`` is the plan's id).

  Raises:
    PlanFormatError: not a plan, another format version, or changed files.
    FileNotFoundError: no directory at ``path``.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No saved plan at {path!r}: expected a directory written by Surgery.save.")
  where = os.path.join(path, MANIFEST)
  try:
    with open(where) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise PlanFormatError(f"{path!r} is not a saved plan: it has no {MANIFEST}.") from None
  except json.JSONDecodeError as e:
    raise PlanFormatError(f"{where!r} is not valid JSON ({e}): the plan is corrupt; save it again.") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise PlanFormatError(f"{where!r} is not a jaxsurgery plan manifest (format {manifest.get('format')!r}).")
  if manifest.get("version") != VERSION:
    raise PlanFormatError(
        f"The plan at {path!r} has format version {manifest.get('version')!r} (written by jaxsurgery "
        f"{manifest.get('jaxsurgery')}); this jaxsurgery reads version {VERSION}. Load it with the jaxsurgery "
        f"that wrote it, or plan again from the models and save it with this one.")
  return manifest


def load(path):
  """Reads a plan written by :func:`save` (``Surgery.save``): it applies as the saved one did.

  Args:
    path: the plan's directory.

  Returns:
    A :class:`~jaxsurgery.Surgery` with the saved report and tables (without
    their traced programs: it remaps params and training states, it cannot be
    re-planned or verified).

  Raises:
    PlanFormatError: not a plan, another format version, changed or corrupt
      files, or fields this version does not know.
    FileNotFoundError: no directory at ``path``.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, jaxsurgery as js
    >>> from jaxsurgery._src.surgery import persist
    >>> fn = lambda p, x: x @ p["w"]
    >>> table = lambda n, names: js.dependency_table(fn, {"w": jnp.ones((n, 2))}, jnp.ones((1, n)), js.Features(names))
    >>> path = os.path.join(tempfile.mkdtemp(), "plan")
    >>> _ = persist.save(js.plan(table(2, ["a", "b"]), table(3, ["b", "new", "a"])), path)
    >>> persist.load(path).report.added
    ('new',)
  """
  from jaxsurgery._src.surgery.remap import Surgery
  manifest = read_manifest(path)
  arrays_path = os.path.join(os.fspath(path), ARRAYS)
  try:
    with open(arrays_path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise PlanFormatError(f"The plan at {os.fspath(path)!r} has no {ARRAYS}: it is incomplete; save it "
                          f"again.") from None
  if _sha256(data) != manifest.get("arrays_sha256"):
    raise PlanFormatError(f"{arrays_path!r} does not match the checksum in the manifest: the plan's files were "
                          f"changed or are corrupt; save the plan again.")
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    dec = _Decoder({k: z[k] for k in z.files})
  report = dec(manifest["report"])
  old_table, new_table = (dec.dataclass(manifest[t]) for t in ("old_table", "new_table"))
  surgery = Surgery(old_table, new_table, report)
  surgery.plan_id = manifest["plan_id"]  # type: ignore[attr-defined]
  return surgery



def fingerprint(surgery) -> str:
  """The id :func:`save` would record for this plan (the saved id for a loaded plan)."""
  saved = getattr(surgery, "plan_id", None)
  return saved if saved else _manifest(surgery)[0]["plan_id"]
