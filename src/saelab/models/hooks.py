"""Read and rewrite hookpoint activations during a forward pass.

- `capture` reads activations and, by default, aborts the forward pass as soon as the last requested one is
  recorded: blocks after the deepest hookpoint and the LM head never run (harvesting a middle layer costs a
  fraction of a full forward).
- `spliced` replaces activations by a function of them (an SAE reconstruction, zeros, a patch) while active,
  gradients included.
- `forward_with` runs the full model with replacements and also returns chosen activations.

Every hook is removed in a `finally`, so an exception inside a forward pass or a replacement leaves the model clean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from saelab.errors import HookpointError
from saelab.models.hookpoints import HookSite, resolve_hookpoint

Replacement = Callable[[Tensor], Tensor]


class _StopForward(Exception):
    """Raised from the hook that records the last requested activation, to skip the rest of the forward pass."""


class _Edit(NamedTuple):
    replace: Replacement | None
    record: bool


def _editor(site: HookSite, edit: _Edit, record: dict[str, Tensor], n_record: int, stop: bool) -> Replacement:
    def apply(act: Tensor) -> Tensor:
        if edit.replace is not None:
            new = edit.replace(act)
            if not isinstance(new, Tensor) or new.shape != act.shape:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise HookpointError(
                    f"the replacement for {site.name} returned {got} but the activation has shape "
                    f"{tuple(act.shape)}; return a tensor of the same shape (check the SAE's d_in and hookpoint)"
                )
            act = new.to(act)  # dtype and device of the site
        if edit.record:
            record[site.name] = act
            if stop and len(record) == n_record:
                raise _StopForward
        return act

    return apply


def _register(site: HookSite, apply: Replacement) -> RemovableHandle:
    """Input sites rewrite the first positional argument (or `hidden_states=`); output sites handle the tensor or
    tuple outputs that different transformers versions return."""
    if site.io == "input":

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}

        return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (apply(output[0]), *output[1:])
        return apply(output)

    return site.module.register_forward_hook(hook)


@contextlib.contextmanager
def _hooked(
    model: nn.Module, edits: Mapping[str, _Edit], record: dict[str, Tensor], stop_when_recorded: bool = False
) -> Iterator[None]:
    sites = [resolve_hookpoint(model, name) for name in edits]  # resolve all first: a bad name installs nothing
    n_record = sum(edit.record for edit in edits.values())
    handles: list[RemovableHandle] = []
    try:
        for site in sites:
            apply = _editor(site, edits[site.name], record, n_record, stop_when_recorded)
            handles.append(_register(site, apply))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Any:
    device = next(model.parameters()).device
    mask = None if attention_mask is None else attention_mask.to(device)
    return model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)


def _check_recorded(names: Sequence[str], record: Mapping[str, Tensor]) -> None:
    missing = [name for name in names if name not in record]
    if missing:
        raise HookpointError(
            f"hookpoints {missing} were never reached in the forward pass; this model skips those modules, "
            "so pick hookpoints from list_hookpoints(model) that its forward pass uses"
        )


def capture(
    model: nn.Module,
    input_ids: Tensor,
    hookpoints: Sequence[str],
    attention_mask: Tensor | None = None,
    stop_early: bool = True,
) -> dict[str, Tensor]:
    """One forward pass without gradients; returns `{name: [B, T, d]}` detached activations.

    With `stop_early` the pass is aborted inside the hook that records the last activation, so nothing after the
    deepest hookpoint is computed; the values are identical to a full pass because the model is causal in depth.
    """
    names = list(dict.fromkeys(hookpoints))
    if not names:
        raise HookpointError("capture() got no hookpoints; pass at least one name from list_hookpoints(model)")
    record: dict[str, Tensor] = {}
    edits = {name: _Edit(replace=None, record=True) for name in names}
    hooks = _hooked(model, edits, record, stop_when_recorded=stop_early)
    with torch.no_grad(), hooks, contextlib.suppress(_StopForward):
        _run(model, input_ids, attention_mask)
    _check_recorded(names, record)
    return {name: record[name].detach() for name in names}


@contextlib.contextmanager
def spliced(model: nn.Module, replacements: Mapping[str, Replacement]) -> Iterator[nn.Module]:
    """While active, each hookpoint's activation is replaced by `fn(activation)` (same shape; moved back to the
    activation's dtype and device).

    Replacements are differentiable: gradients flow through `fn` to its parameters and to earlier layers.
    """
    edits = {name: _Edit(replace=fn, record=False) for name, fn in replacements.items()}
    with _hooked(model, edits, record={}):
        yield model


def forward_with(
    model: nn.Module,
    input_ids: Tensor,
    replacements: Mapping[str, Replacement] | None = None,
    capture: Sequence[str] = (),
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Full forward pass with replacements; returns `(logits [B, T, vocab], {name: activation})`.

    A captured activation is the one the rest of the model saw, i.e. AFTER the replacement at that same hookpoint
    (before any replacement at a later one). Gradient mode is the caller's: captured tensors stay in the autograd
    graph (and carry forward-mode tangents), so detach them before storing.
    """
    edits = {name: _Edit(replace=fn, record=False) for name, fn in (replacements or {}).items()}
    for name in capture:
        edits[name] = _Edit(replace=edits[name].replace if name in edits else None, record=True)
    record: dict[str, Tensor] = {}
    with _hooked(model, edits, record):
        output = _run(model, input_ids, attention_mask)
    _check_recorded(list(capture), record)
    return output.logits, {name: record[name] for name in capture}
