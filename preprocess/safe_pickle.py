"""Load a pickle of numpy arrays and plain containers, and nothing else.

A pickle is a program: loading one calls whatever globals it names (``os.system``
included), so a downloaded feature pickle (CMU-MOSEI's) is never given to
:func:`pickle.load`. :class:`ArrayUnpickler` resolves only the globals that rebuild numpy
arrays, dtypes and scalars, and plain containers; any other global is refused before it
is called, in one sentence, so a hostile pickle runs nothing.
"""

from __future__ import annotations

import codecs
import collections
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ccat.errors import UserError

_ARRAY = np.zeros(1)
_RECONSTRUCT = _ARRAY.__reduce__()[0]  # numpy's array rebuilder, under whichever module name
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = _ARRAY.__reduce_ex__(5)[0]  # protocol 5's out-of-band array rebuilder
LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it (bytes written as latin-1 text),
    refusing any other codec: a codec name is a lookup the pickle would otherwise choose."""
    if not isinstance(text, str) or encoding.lower() not in LATIN1:
        raise UnsafePickleError(f"asks for _codecs.encode with codec {encoding!r}")
    return codecs.encode(text, "latin1")


# (module, name) -> what it resolves to; numpy 2 renamed numpy.core to numpy._core, and
# pickles written by either name are read
ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _SCALAR for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class UnsafePickleError(UserError, ValueError):
    """A pickle names a global that is not an array rebuilder or a plain container."""


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler whose globals are :data:`ALLOWED` only; persistent ids are refused too
    (the base class refuses them)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafePickleError(f"asks to load {module}.{name}, which is not a numpy "
                                    "array part or a plain container")
        return allowed


def load_arrays(path: Path) -> Any:
    """The object pickled in ``path``, rebuilt from numpy arrays and plain containers only;
    any other global is an :class:`UnsafePickleError` naming the file, raised before the
    global is called; a damaged pickle is one sentence naming the file."""
    try:
        with path.open("rb") as file:
            return ArrayUnpickler(file, encoding="latin1").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path} {err}: refusing to unpickle it, since a pickle can "
                                "run any code it names; use the pickle of the published "
                                "release, or rewrite it with numpy arrays in dicts") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as err:
        raise UnsafePickleError(f"{path} is not a readable pickle ({type(err).__name__}: "
                                f"{err}); download it again") from None
