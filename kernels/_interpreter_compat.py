"""The Triton 3.6 interpreter under numpy >= 2.4: loops over runtime bounds.

That interpreter holds every scalar (a program id, an integer argument, a scalar
load) as a one-element array and hands it to ``range()`` through ``int(array)``,
which numpy 2.4 refuses for an array with a dimension (triton-lang/triton#9171).
Every kernel that loops up to a runtime bound then fails in the interpreter,
whatever the kernel does: ``for i in range(0, n)`` over an ``int`` argument is
enough. Later Triton releases convert the array's single element instead; on an
interpreter that still has the old conversion, :func:`install` puts the same
conversion in its place. Compiled kernels never pass through this code.
"""

from __future__ import annotations

import inspect

_OLD_CONVERSION = "int(self.handle.data)"


def _index(self) -> int:
    return int(self.handle.data.squeeze())


def install() -> bool:
    """Give the interpreter's scalars the one-element ``__index__`` of later Triton
    releases when this Triton still converts them with ``int(array)``.

    Returns True when the conversion was replaced, False when it was not needed.
    """
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "fixes_scalar_index", False):
        return False
    try:
        source = inspect.getsource(patch_tensor)
    except (OSError, TypeError):
        return False
    if _OLD_CONVERSION not in source:
        return False

    def _patch_lang_tensor(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    _patch_lang_tensor.fixes_scalar_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
