"""Finding the layers to track, and reading their weights in one convention.

Every function in ``curvature/`` sees a layer's weight as ``[d_out, d_in]`` (``s = W a``). ``nn.Linear`` stores
it that way. GPT-2's ``Conv1D`` stores ``[d_in, d_out]`` and is recognised by duck typing (it has ``nf`` and a
2-D ``weight`` whose second dimension is ``nf``), so this package never imports transformers.
:func:`weight_matrix` is the single place where that layout is transposed.

Warning:
    A weight shared by two modules (tied embeddings, a module called twice per forward) breaks the K-FAC block
    assumption: :func:`resolve_modules` rejects tied weights, and the accumulator rejects repeated calls.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

REGEX_PREFIX = "re:"


def is_conv1d_like(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight as ``[d_in, d_out]`` like GPT-2's ``Conv1D``.

    Args:
        module: Any module.

    Returns:
        True for a module with an integer ``nf`` and a 2-D ``weight`` of shape ``[d_in, nf]``.
    """
    nf = getattr(module, "nf", None)
    weight = getattr(module, "weight", None)
    return (
        isinstance(nf, int)
        and isinstance(weight, Tensor)
        and weight.ndim == 2
        and weight.shape[1] == nf
        and not isinstance(module, nn.Linear)
    )


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a Conv1D-style linear layer."""
    return isinstance(module, nn.Linear) or is_conv1d_like(module)


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight of a linear layer as a ``[d_out, d_in]`` view that shares storage with the parameter.

    Writing into the returned tensor (``weight_matrix(m).copy_(W)``) writes the parameter, whatever its layout.

    Args:
        module: An ``nn.Linear`` or a Conv1D-style layer.

    Returns:
        The weight, shape ``[d_out, d_in]``.

    Raises:
        TypeError: If the module is neither.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d_like(module):
        return module.weight.t()  # Conv1D keeps [d_in, d_out]; this is the one transpose in the package.
    raise TypeError(
        f"{type(module).__name__} is not a linear layer: K-FAC here supports nn.Linear and Conv1D-style layers "
        "(weight [d_in, d_out] with an `nf` attribute). Track the Linear submodules instead."
    )


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear layer."""
    d_out, d_in = weight_matrix(module).shape
    return d_in, d_out


def find_modules(model: nn.Module, names: Iterable[str], hint: str) -> dict[str, nn.Module]:
    """The submodules of ``model`` with the given exact names (from ``named_modules()``), in that order.

    Args:
        model: The model.
        names: Exact module names.
        hint: The end of the error message: why the names may not fit and what to do.

    Returns:
        Module per name.

    Raises:
        ValueError: If a name is not a module of ``model``; the message lists the missing ones and ``hint``.
    """
    names = list(names)
    named = dict(model.named_modules())
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"Modules {missing} are not in the model: {hint}")
    return {n: named[n] for n in names}


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX) :], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _is_exact(pattern: str) -> bool:
    return not pattern.startswith(REGEX_PREFIX) and not any(c in pattern for c in "*?[")


def match_names(patterns: str | Sequence[str], names: Iterable[str]) -> dict[str, list[str]]:
    """Match names against patterns: exact names, fnmatch globs, or regexes prefixed with ``re:``.

    Args:
        patterns: One pattern or a sequence of them.
        names: Candidate names.

    Returns:
        For each pattern, the names it matches, in the order of ``names``.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    names = list(names)
    return {p: [n for n in names if (n == p if _is_exact(p) else _matches(p, n))] for p in patterns}


def _no_match_message(pattern: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(pattern, candidates, n=3, cutoff=0.5)
    hint = f" Close names: {close}." if close else ""
    sample = candidates[:6] + (["..."] if len(candidates) > 6 else [])
    return (
        f"Module pattern {pattern!r} matches no linear layer of the model.{hint} Linear layers look like {sample}; "
        "use exact names, globs such as 'model.layers.*.mlp.up_proj', or regexes prefixed with 're:'."
    )


def resolve_modules(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Names of the linear layers of ``model`` selected by ``patterns``, in ``named_modules()`` order.

    Globs and regexes select only the linear layers among the modules they match, so
    ``"model.layers.0.mlp.*"`` picks the three projections of a Llama MLP and skips its activation.

    Args:
        model: The model.
        patterns: Exact module names, fnmatch globs, or regexes prefixed with ``re:``.

    Returns:
        The selected module names.

    Raises:
        ValueError: If a pattern matches no linear layer, an exact name is not a linear layer, or a selected
            layer's weight is shared with another module (tied weights).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError("No modules given: name at least one linear layer (or a glob / 're:' pattern).")
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if is_linear_like(m)]
    selected: list[str] = []
    for pattern in patterns:
        if _is_exact(pattern):
            if pattern not in modules:
                raise ValueError(_no_match_message(pattern, linear))
            if not is_linear_like(modules[pattern]):
                weight_matrix(modules[pattern])  # raises TypeError with the explanation
            hits = [pattern]
        else:
            hits = match_names(pattern, linear)[pattern]
            if not hits:
                raise ValueError(_no_match_message(pattern, linear))
        selected.extend(h for h in hits if h not in selected)
    order = {n: i for i, n in enumerate(modules)}
    selected.sort(key=order.__getitem__)
    _check_untied(model, selected)
    return selected


def _check_untied(model: nn.Module, names: list[str]) -> None:
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor):
            owners.setdefault(id(weight), []).append(module_name)
    modules = dict(model.named_modules())
    for name in names:
        users = sorted(set(owners.get(id(modules[name].weight), [name])))
        if len(users) > 1:
            raise ValueError(
                f"The weight of {name!r} is shared with {[u for u in users if u != name]} (tied weights): its "
                "curvature block and any edit would mix both uses. Track untied layers (e.g. the MLP projections)."
            )
