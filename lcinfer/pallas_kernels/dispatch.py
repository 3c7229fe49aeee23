"""A small implementation dispatcher in the style of tokamax's `implementation=` argument.

Each op name (e.g. "flash_attention") has an ordered table of implementations ("triton", "xla").
`call(op, implementations, *args, interpret=..., **kwargs)` tries them in order; an implementation
that cannot serve the call raises NotImplementedError (or `Unsupported`) with a reason, and the next
one is tried. If none serves it, `DispatchError` lists every reason. Other exceptions (bad shapes,
bad arguments: ValueError) propagate at once: a call that is wrong for every implementation should
not be hidden by a fallback.

    call("flash_attention", None, q, k, v, scale=0.125)          # every registered, in order
    call("flash_attention", ("triton",), q, k, v, scale=0.125)    # the kernel or an error
"""

from __future__ import annotations

from typing import Callable, Sequence

_IMPLS: dict[str, dict[str, Callable]] = {}


class Unsupported(NotImplementedError, ValueError):
  """An implementation cannot serve this call (a reason, not a bug). Caught by `call`."""


class DispatchError(NotImplementedError):
  """No implementation could serve the call; the message lists each one's reason."""

  def __init__(self, op: str, reasons: list[tuple[str, str]]):
    self.op = op
    self.reasons = reasons
    lines = "; ".join(f"{name}: {why}" for name, why in reasons)
    super().__init__(f"no implementation of {op!r} could run this call ({lines})")


def register(op: str, name: str, fn: Callable | None = None, *, first: bool = False):
  """Register `fn` as implementation `name` of `op`, appended to the default order (first=True: put
  before the others, for a faster kernel that serves fewer calls). Decorator-able."""
  def deco(f):
    table = _IMPLS.setdefault(op, {})
    if name in table:
      raise ValueError(f"implementation {name!r} of {op!r} is already registered")
    table[name] = f
    if first:
      _IMPLS[op] = {name: f, **{k: v for k, v in table.items() if k != name}}
    return f
  return deco if fn is None else deco(fn)


def triton_only(**knobs) -> None:
  """For a non-Triton implementation: `call` passes one set of keywords to every implementation, so
  a Triton knob that is set (not None) means the call is meant for the Triton kernel: Unsupported,
  and the next implementation is tried. Knobs are named parameters, so a misspelt one is a
  TypeError instead of being ignored."""
  given = sorted(k for k, v in knobs.items() if v is not None)
  if given:
    raise Unsupported(f"Triton-only options {given}")


FALLBACK = "xla"  # the pure-jnp reference: always able to run, so always tried last by default


def _default_order(table) -> tuple[str, ...]:
  return tuple(n for n in table if n != FALLBACK) + ((FALLBACK,) if FALLBACK in table else ())


def implementations(op: str) -> tuple[str, ...]:
  """Registered implementation names of `op`, in default order (registration order, "xla" last)."""
  if op not in _IMPLS:
    raise KeyError(f"unknown op {op!r}; registered: {', '.join(sorted(_IMPLS))}")
  return _default_order(_IMPLS[op])


def call_order(op: str, impls: Sequence[str] | str | None) -> tuple[str, ...]:
  """The implementation names `call` tries for `impls`, in order (None: the default order)."""
  if isinstance(impls, str):
    return (impls,)
  return implementations(op) if impls is None else tuple(impls)


def call(op: str, impls: Sequence[str] | str | None, *args, interpret: bool = False, **kwargs):
  """Run the first implementation of `op` (in `impls` order, or the default order: registration
  order with the "xla" reference last) that serves the call; `interpret` is passed to every one."""
  table = _IMPLS.get(op)
  if table is None:
    raise KeyError(f"unknown op {op!r}; registered: {', '.join(sorted(_IMPLS))}")
  order = call_order(op, impls)
  if not order:
    raise ValueError(f"empty implementation list for {op!r}; registered: {', '.join(table)}")
  reasons: list[tuple[str, str]] = []
  for name in order:
    fn = table.get(name)
    if fn is None:
      reasons.append((name, f"not registered (registered: {', '.join(table)})"))
      continue
    try:
      return fn(*args, interpret=interpret, **kwargs)
    except NotImplementedError as e:  # Unsupported included; DispatchError of a nested call too
      reasons.append((name, str(e) or type(e).__name__))
  raise DispatchError(op, reasons)
