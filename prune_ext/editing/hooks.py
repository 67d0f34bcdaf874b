"""Forward hooks: read a module's input or output at chosen positions, add to its output,
and stop a forward pass early once the last needed module has run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["StopForward", "add_to_output", "capture", "stop_after"]


class StopForward(Exception):
    """Raised by :func:`stop_after` to end a forward pass that has produced all it needs."""


def _main(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture(module: nn.Module, store: Callable[[torch.Tensor], None], *, output: bool = False) -> Iterator[None]:
    """Call ``store(tensor)`` with the module's first input (or its main output) on each forward."""
    if output:
        handle = module.register_forward_hook(lambda _m, _i, out: store(_main(out)))
    else:
        handle = module.register_forward_pre_hook(lambda _m, inputs: store(inputs[0]))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def add_to_output(module: nn.Module, make_delta: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's main output ``h`` by ``h + make_delta(h)`` (differentiably)."""

    def hook(_m: nn.Module, _i: Any, out: Any) -> Any:
        main = _main(out)
        new = main + make_delta(main).to(main.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Raise :class:`StopForward` once ``module`` has run; swallow it on exit."""

    def hook(_m: nn.Module, _i: Any, _o: Any) -> None:
        raise StopForward

    with ExitStack() as stack:
        handle = module.register_forward_hook(hook)
        stack.callback(handle.remove)
        try:
            yield
        except StopForward:
            pass
