"""Load a fitted estimator from a joblib, pickle or skops file.

joblib and pickle files are Python pickles: loading one RUNS CODE from it, with the
rights of whoever loads it. Only convert files you made or trust. The skops format
(``.skops``) does not run code: it refuses any type it was not told to trust, and the
converter trusts only types from scikit-learn, numpy and scipy unless told more.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.wire.errors import ConversionError

UNPICKLE_WARNING = (
    "joblib and pickle files run code when they are loaded: only convert files you trust "
    "(the .skops format does not)"
)
# skops names types by module path; these packages only hold data containers and
# estimators, never code that a file could make run on load.
_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.", "builtins.", "collections.")


def load_estimator(path: Path, *, trust: Iterable[str] = ()) -> Any:
    """The object in ``path``; fails with one line for missing, unreadable or non-models."""
    if not path.exists():
        raise ConversionError(f"model: {path} does not exist")
    if not path.is_file():
        raise ConversionError(f"model: {path} is not a file")
    obj = _load_skops(path, set(trust)) if path.suffix == ".skops" else _load_pickle(path)
    if not (hasattr(obj, "fit") and hasattr(obj, "get_params")):
        raise ConversionError(
            f"model: {path} holds a {type(obj).__module__}.{type(obj).__qualname__}, "
            "not a scikit-learn estimator or Pipeline"
        )
    return obj


def _load_pickle(path: Path) -> Any:
    import joblib

    try:
        return joblib.load(path)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ConversionError(
            f"model: {path} is not a joblib or pickle file ({type(e).__name__}: {e})"
        ) from None
    except (ImportError, AttributeError) as e:
        raise ConversionError(
            f"model: {path} needs code that is not installed here ({e}); install the "
            "packages the model was trained with"
        ) from None


def _load_skops(path: Path, trust: set[str]) -> Any:
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(file=path)
        unknown = [t for t in untrusted if not t.startswith(_TRUSTED_PREFIXES) and t not in trust]
        if unknown:
            raise ConversionError(
                f"model: {path} holds types that are not trusted: {', '.join(unknown)}; "
                "pass --trust TYPE for each one you trust"
            )
        return skops.io.load(path, trusted=untrusted)
    except ConversionError:
        raise
    except Exception as e:  # skops raises zipfile/json/its own errors for a bad file
        raise ConversionError(
            f"model: {path} is not a readable skops file ({type(e).__name__}: {e})"
        ) from None
