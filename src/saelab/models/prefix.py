"""Skip the blocks that every pass over the same tokens computes identically.

A replacement at a hookpoint changes nothing upstream of it, so when one batch is run clean and then with several
replacements, the blocks before the earliest replaced site produce the same output every time. `SharedPrefix`
records that output in the clean pass and replays it in the others, so each replaced pass costs only the layers
from the hookpoint on (splicing at the middle layer costs half a forward, not a whole one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from saelab.errors import HookpointError
from saelab.models.hookpoints import blocks, complete_blocks_before


class SharedPrefix:
    """The blocks of `model` upstream of every one of `hookpoints`: recorded once, replayed in later passes.

    A block whose output is itself a hookpoint (`resid_post.L`) is skipped too: the replayed output still goes
    through the hooks registered on it. Replaying is only valid for a pass over the same input ids and attention
    mask as the recorded one, without gradients into the skipped blocks.
    """

    def __init__(self, model: nn.Module, hookpoints: Iterable[str]) -> None:
        n_skipped = min((complete_blocks_before(model, name) for name in hookpoints), default=0)
        self._skipped: list[nn.Module] = list(blocks(model)[:n_skipped])
        self._output: Any = None

    @property
    def n_skipped(self) -> int:
        return len(self._skipped)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """While active, the last skippable block's output is kept (replacing any earlier recording)."""
        self._output = None
        if not self._skipped:
            yield
            return

        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            self._output = output

        handle = self._skipped[-1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """While active, the skippable blocks do not compute: each returns the recorded output (the last one's, which
        is all the next block reads). Their own `forward` is restored on exit, an exception included."""
        if not self._skipped:
            yield
            return
        if self._output is None:
            raise HookpointError("SharedPrefix.replaying() before anything was recorded; run the clean pass inside "
                                 "recording() first")
        recorded = self._output

        def replay(*args: Any, **kwargs: Any) -> Any:
            return recorded

        previous = [block.__dict__.get("forward") for block in self._skipped]  # e.g. accelerate's dispatch hooks
        try:
            for block in self._skipped:
                block.forward = replay
            yield
        finally:
            for block, forward in zip(self._skipped, previous, strict=True):
                if forward is None:
                    block.__dict__.pop("forward", None)
                else:
                    block.forward = forward
