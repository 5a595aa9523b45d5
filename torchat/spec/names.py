"""Target names: `MODEL-QUANT[-DTYPE]-BACKEND`, parsed from the right against closed vocabularies.

The backend and the dtype are torchat.vocabulary's; the quant preset and the model are keys of the catalog,
passed in. The longest quant key whose remainder is an exact model key wins; there is no fuzzy matching. The
canonical name leaves the dtype out when it is the backend's default. Standard library only.
"""

from collections.abc import Collection
from typing import NamedTuple

from torchat.errors import TorchatError, unknown_key_error
from torchat.vocabulary import BACKENDS, Backend, Dtype

GRAMMAR = "MODEL-QUANT[-DTYPE]-BACKEND"


class TargetName(NamedTuple):
    model: str
    quant: str
    dtype: Dtype | None  # None: the name left it out (the backend's default)
    backend: Backend


def check_backend(token: str) -> Backend:
    if token not in list(Backend):
        raise unknown_key_error("backend", token, Backend)
    return Backend(token)


def check_dtype(token: str | None, backend: Backend) -> Dtype:
    """The dtype a target of `backend` runs in: `token`, or the backend's default; one the backend does not take
    is refused with the ones it does."""
    if token is None:
        return BACKENDS[backend].default_dtype
    if token not in list(Dtype):
        raise unknown_key_error("dtype", token, Dtype)
    taken = BACKENDS[backend].dtypes
    if token not in taken:
        raise TorchatError(f"backend {backend} does not take dtype {token}; choose one of: {', '.join(taken)}")
    return Dtype(token)


def canonical_name(model: str, quant: str, dtype: Dtype, backend: Backend) -> str:
    if dtype == BACKENDS[backend].default_dtype:
        return f"{model}-{quant}-{backend}"
    return f"{model}-{quant}-{dtype}-{backend}"


def split_target_name(name: str, models: Collection[str], quants: Collection[str]) -> TargetName:
    """The parts of a target name; an unknown part raises an error that lists the valid choices."""
    rest, _, backend = name.rpartition("-")
    backend = check_backend(backend)
    head, _, maybe_dtype = rest.rpartition("-")
    dtype = Dtype(maybe_dtype) if maybe_dtype in list(Dtype) else None
    rest = head if dtype else rest
    tokens = rest.split("-")
    if len(tokens) < 2:
        raise TorchatError(f"expected a model and a quant preset before the backend; models: "
                           f"{', '.join(sorted(models))}; quant presets: {', '.join(sorted(quants))}")
    for n in range(len(tokens) - 1, 0, -1):  # the longest quant key whose remainder is a model
        quant, model = "-".join(tokens[-n:]), "-".join(tokens[:-n])
        if quant in quants and model in models:
            return TargetName(model, quant, dtype, backend)
    known = [q for n in range(1, len(tokens)) if (q := "-".join(tokens[-n:])) in quants]
    if not known:
        raise unknown_key_error("quant preset", tokens[-1], quants)
    raise unknown_key_error("model", rest[:-len(known[-1]) - 1], models)
