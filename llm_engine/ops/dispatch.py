"""The registry of op implementations and the one place that chooses among them.

Each op (``rms_norm``, ``paged_attention``, ...) lists its named implementations
(``triton``, ``cpp``, ``onednn``, ``sdpa``, ``reference``, ...) in preference order,
each with an eligibility check. A call first reduces its inputs to a *signature*: a
small tuple of the facts the checks read (the op's name, the tensors' device and
dtype, whether a gradient is wanted, a few shape and layout facts). The choice for a
signature is made once and cached, so a call costs that tuple and one dict lookup.

Choices can be forced per op, by name:

- for the process, from ``LLM_ENGINE_BACKENDS="rms_norm=reference,attention_varlen=sdpa"``
  (read on first use) or :func:`set_backends` (the CLI's ``--backend op=impl``);
  ``LLM_ENGINE_BACKEND=triton`` is a shorthand for "Triton in every op that has it",
  ``LLM_ENGINE_BACKEND=torch`` for "never Triton";
- for a block of code, in this thread or task only: ``with ops.use(rms_norm="cpp"): ...``.

An unknown op or implementation name is a ``ValueError`` listing the valid ones; a
forced implementation that cannot take a call's inputs is a ``ValueError`` at that
call, saying why and which implementations could.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

SHORTHANDS = ("torch", "triton")

Signature = tuple


def tensor_facts(op: str, *tensors: torch.Tensor | None) -> tuple[str, str, torch.dtype | None, bool]:
    """The start of every signature: ``(op, device, dtype, grad)`` of ``tensors``.

    ``device``: the device type shared by all of them (``"cpu"``, ``"cuda"``), else
    ``"mixed"``; ``dtype``: their common dtype, else None; ``grad``: whether autograd is
    on and any of them requires a gradient. ``None`` entries (absent optionals) are
    skipped. A plain loop: this runs for every op of every layer.
    """
    first = tensors[0]
    device = "cpu" if first.is_cpu else first.device.type  # is_cpu builds no device object
    dtype, grad = first.dtype, False
    grad_on = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.dtype is not dtype:
            dtype = None
        if t.is_cpu != (device == "cpu"):
            device = "mixed"
        if grad_on and t.requires_grad:
            grad = True
    return op, device, dtype, grad


_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.float64: "fp64"}


def _dtype_name(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype) or str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Needs:
    """An eligibility check over a signature; calling it gives None when eligible, else
    the reason in words.

    ``devices``: device types taken (None: any); ``device_ok``: a check of the device
    type that replaces ``devices`` (its words in ``device_text``); ``dtypes``: dtypes
    taken (None: any, mixed included); ``grad``: whether a wanted gradient is supported;
    ``facts``: names of the op's facts that must hold.
    """

    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    grad: bool = True
    facts: tuple[str, ...] = ()
    device_ok: Callable[[str], bool] | None = None
    device_text: str = ""

    def describe(self, op: Op, facts: bool = True) -> str:
        """What the check asks for, in words (the ``backends`` table's note)."""
        parts = []
        if self.dtypes is not None:
            parts.append("/".join(_dtype_name(d) for d in self.dtypes))
        if self.device_text:
            parts.append(self.device_text)
        elif self.devices is not None:
            parts.append("/".join(d.upper() for d in self.devices) + " tensors")
        text = " ".join(parts) or "any tensors"
        if not self.grad:
            text += " without grad"
        if facts:
            text += "".join(f"; {op.facts[name]}" for name in self.facts)
        return text

    def why_not(self, op: Op, sig: Signature) -> str | None:
        _, device, dtype, grad = sig[:4]
        ok = self.device_ok(device) if self.device_ok is not None else (
            self.devices is None or device in self.devices)
        if (not ok or (self.dtypes is not None and dtype not in self.dtypes)
                or (grad and not self.grad)):
            got = f"{device} {'mixed dtypes' if dtype is None else _dtype_name(dtype)}"
            return f"needs {self.describe(op, facts=False)}, got {got}{' with grad' if grad else ''}"
        for name in self.facts:
            if not sig[op.fact_index[name]]:
                return f"needs {op.facts[name]}"
        return None


@dataclass(frozen=True)
class Impl:
    """One named implementation of an op.

    ``fn`` takes the op's arguments; ``needs`` says which inputs it can take; ``auto``:
    the default choice takes it only where this holds of the signature (Triton runs CPU
    tensors under the interpreter when forced, but is never the default there)."""

    name: str
    fn: Callable
    needs: Needs
    summary: str
    auto: Callable[[Signature], bool] | None = None


class Op:
    """An op: its implementations in preference order, and the signature of a call.

    ``signature(*args, **kwargs)``: the call's signature, starting with
    :func:`tensor_facts` and followed by one bool per entry of ``facts``
    (name -> what it means, in words, for error messages).
    """

    def __init__(self, name: str, signature: Callable[..., Signature],
                 facts: Mapping[str, str] | None = None, summary: str = "") -> None:
        self.name = name
        self.signature = signature
        self.facts = dict(facts or {})
        self.fact_index = {f: 4 + i for i, f in enumerate(self.facts)}
        self.summary = summary
        self.impls: dict[str, Impl] = {}

    def register(self, name: str, fn: Callable, needs: Needs, summary: str, *,
                 auto: Callable[[Signature], bool] | None = None,
                 before: str | None = None) -> Impl:
        """Add an implementation, last in preference order or just ``before`` another."""
        if name in self.impls:
            raise ValueError(f"{self.name} already has an implementation named {name!r}")
        unknown = [f for f in needs.facts if f not in self.facts]
        if unknown:
            raise ValueError(f"{self.name} has no facts {unknown}; it has {list(self.facts)}")
        impl = Impl(name, fn, needs, summary, auto)
        if before is None:
            self.impls[name] = impl
        else:
            self._check_impl(before)
            items = list(self.impls.items())
            at = [n for n, _ in items].index(before)
            self.impls = dict(items[:at] + [(name, impl)] + items[at:])
        _REGISTRY.changed()
        return impl

    def _check_impl(self, name: str) -> Impl:
        impl = self.impls.get(name)
        if impl is None:
            raise ValueError(f"{self.name} has no implementation {name!r}; "
                             f"choose from {', '.join(self.impls)}")
        return impl

    def eligibility(self, sig: Signature) -> dict[str, str | None]:
        """Each implementation's reason it cannot take ``sig`` (None: it can)."""
        return {n: impl.needs.why_not(self, sig) for n, impl in self.impls.items()}

    def choose(self, sig: Signature, settings: Settings) -> Impl:
        """The implementation for ``sig`` under ``settings`` (uncached)."""
        forced = settings.forced.get(self.name)
        if forced is None and settings.shorthand == "triton" and "triton" in self.impls:
            forced = "triton"
        if forced is not None:
            impl = self._check_impl(forced)
            why = impl.needs.why_not(self, sig)
            if why is not None:
                ok = [n for n, r in self.eligibility(sig).items() if r is None]
                raise ValueError(f"{self.name}={forced} cannot take these inputs: {why}; "
                                 f"eligible here: {', '.join(ok) or 'none'}")
            return impl
        for impl in self.impls.values():
            if settings.shorthand == "torch" and impl.name == "triton":
                continue
            if impl.needs.why_not(self, sig) is None and (impl.auto is None or impl.auto(sig)):
                return impl
        reasons = "; ".join(f"{n}: {r}" for n, r in self.eligibility(sig).items())
        raise ValueError(f"{self.name}: no implementation takes these inputs ({reasons})")

    def pick(self, *args, **kwargs) -> Callable:
        """The implementation function for these arguments (call it with them): the
        cached choice for their signature under the settings in force."""
        sig = self.signature(*args, **kwargs)
        settings = _context.get(None) or _process or _load_process()
        impl = settings.cache.get(sig)
        if impl is None:
            impl = settings.cache[sig] = self.choose(sig, settings)
        return impl.fn


@dataclass(frozen=True)
class Settings:
    """Forced choices (op -> implementation) and the global shorthand, with the cache of
    choices made under them."""

    forced: Mapping[str, str]
    shorthand: str | None = None
    cache: dict = field(default_factory=dict, compare=False, repr=False)


class Registry:
    """Every op and its implementations; what ``ops.registry()`` returns."""

    def __init__(self) -> None:
        self.ops: dict[str, Op] = {}

    def add(self, op: Op) -> Op:
        if op.name in self.ops:
            raise ValueError(f"op {op.name!r} is already registered")
        self.ops[op.name] = op
        return op

    def changed(self) -> None:
        """Drop cached choices (an implementation was added)."""
        global _process
        if _process is not None:
            _process = Settings(_process.forced, _process.shorthand)

    def op(self, name: str) -> Op:
        op = self.ops.get(name)
        if op is None:
            raise ValueError(f"unknown op {name!r}; ops: {', '.join(self.ops)}")
        return op

    def validate(self, choices: Mapping[str, str]) -> dict[str, str]:
        """``choices`` checked: every op and implementation name exists."""
        for op_name, impl in choices.items():
            self.op(op_name)._check_impl(impl)
        return dict(choices)

    def parse(self, text: str, what: str = "backends") -> dict[str, str]:
        """``"rms_norm=cpp,attention_varlen=sdpa"`` -> ``{"rms_norm": "cpp", ...}``, checked."""
        out: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            op_name, sep, impl = (s.strip() for s in item.partition("="))
            if not sep or not op_name or not impl:
                raise ValueError(f"{what}: expected op=impl[,op=impl...], got {text!r}")
            out[op_name] = impl
        return self.validate(out)

    def settings(self) -> Settings:
        """The settings in force here (a ``use`` block's, else the process's)."""
        return _context.get(None) or _process or _load_process()

    def choose(self, op: str, *args, **kwargs) -> str:
        """The name of the implementation a call of ``op`` with these arguments runs."""
        o = self.op(op)
        return o.choose(o.signature(*args, **kwargs), self.settings()).name

    def eligible(self, op: str, *args, **kwargs) -> dict[str, str | None]:
        """For each implementation of ``op``: None if it can take these arguments, else why not."""
        o = self.op(op)
        return o.eligibility(o.signature(*args, **kwargs))

    def implementation(self, op: str, name: str) -> Callable:
        """Implementation ``name`` of ``op`` as a function (no eligibility check)."""
        return self.op(op)._check_impl(name).fn


_REGISTRY = Registry()
_context: contextvars.ContextVar[Settings] = contextvars.ContextVar("llm_engine_ops_backends")
_process: Settings | None = None


def registry() -> Registry:
    """The registry: ``.ops`` (name -> :class:`Op`, each with ``.impls``), ``choose``,
    ``eligible``, ``implementation``."""
    return _REGISTRY


def _shorthand(value: str | None, what: str) -> str | None:
    if value in (None, ""):
        return None
    if value not in SHORTHANDS:
        raise ValueError(f"{what} must be one of {SHORTHANDS}, got {value!r}")
    return value


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """The process settings that ``LLM_ENGINE_BACKENDS`` and ``LLM_ENGINE_BACKEND`` ask for."""
    return Settings(_REGISTRY.parse(env.get("LLM_ENGINE_BACKENDS", ""), "LLM_ENGINE_BACKENDS"),
                    _shorthand(env.get("LLM_ENGINE_BACKEND"), "LLM_ENGINE_BACKEND"))


def _load_process() -> Settings:
    global _process
    if _process is None:
        _process = settings_from_env(os.environ)
    return _process


def set_backends(choices: Mapping[str, str] | str = (), shorthand: str | None = None) -> None:
    """Force implementations for the whole process, on top of the environment's choices:
    ``choices`` as a mapping or ``"op=impl,..."``; ``shorthand`` ``"triton"`` or ``"torch"``
    (None: keep the current one)."""
    current = _load_process()
    parsed = (_REGISTRY.parse(choices) if isinstance(choices, str)
              else _REGISTRY.validate(choices))
    global _process
    _process = Settings({**current.forced, **parsed},
                        _shorthand(shorthand, "shorthand") or current.shorthand)


@contextlib.contextmanager
def use(shorthand: str | None = None, /, **choices: str) -> Iterator[None]:
    """Force implementations inside a ``with`` block, in this thread (or async task)
    only, on top of the choices in force: ``with ops.use(rms_norm="cpp"): ...``;
    ``ops.use("torch")`` / ``ops.use("triton")`` is the global shorthand."""
    current = _REGISTRY.settings()
    settings = Settings({**current.forced, **_REGISTRY.validate(choices)},
                        _shorthand(shorthand, "shorthand") or current.shorthand)
    token = _context.set(settings)
    try:
        yield
    finally:
        _context.reset(token)
