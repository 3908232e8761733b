"""The one context for running a model with hooks on named modules: frozen parameters, eval mode, clean exit.

Every pass of lightning_curv that reads what layers see (K-FAC collection, the per-example analyses) or that
runs a model with its state changed (greedy decoding, BalancedSubnet) goes through :class:`ModuleHooks`. It

* freezes every parameter (``requires_grad=False``) and restores each one's own flag afterwards;
* optionally puts the model in eval mode and restores the train/eval flag of every submodule afterwards (a
  model may arrive with mixed modes, e.g. frozen parts in eval);
* registers one forward hook per tracked module and removes them all on exit, errors included;
* checks that a tracked module runs once per forward (:meth:`ModuleHooks.new_forward` starts a forward);
* starts the backward pass at the tracked outputs: when the forward callback asks for the output gradient and
  the output does not require grad (parameters are frozen and the input is data), the output is replaced by a
  detached leaf that requires grad, so the backward stops at the lowest tracked module and computes no
  parameter gradient.

Written here rather than taken from a library: kronfluence and curvlinops hook modules the same way but own
the model wrapper and the loop, which the Lightning predict loop and the analyses need to keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_curv.curvature.modules import find_modules

#: Gradient callback: receives the gradient of the loss with respect to a tracked output, shape ``[..., d_out]``.
GradHook = Callable[[Tensor], None]

#: Forward callback ``(name, input, output)`` of a tracked module, with the module's first input ``[..., d_in]``
#: (the tensor object itself, not a detached copy) and its output ``[..., d_out]``. It returns a
#: :data:`GradHook` to receive that output's gradient, or None.
ForwardHook = Callable[[str, Tensor, Tensor], GradHook | None]


_AttachableT = TypeVar("_AttachableT", bound="Attachable")


class Attachable:
    """Context-manager protocol of objects with ``attach()`` and ``detach()``: attach on enter, detach on exit."""

    def attach(self) -> None:
        """Start the object's effect (subclasses override)."""

    def detach(self) -> None:
        """Undo :meth:`attach` (subclasses override)."""

    def __enter__(self: _AttachableT) -> _AttachableT:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


class ModuleHooks(Attachable):
    """Forward hooks on named modules of ``model``, with parameters frozen and modes restored on exit.

    Use it as a context manager (or call :meth:`attach` / :meth:`detach` from callback hooks)::

        with ModuleHooks(model, ["layers.0.mlp.up_proj"], on_forward, needs_grad=True) as hooks:
            for batch in batches:
                hooks.new_forward()
                loss(model(batch)).backward()

    With no module names it only freezes parameters and sets/restores modes.

    Args:
        model: The model; module names are relative to it.
        names: Names (from ``model.named_modules()``) of the tracked modules.
        on_forward: Called on every forward of a tracked module (see :data:`ForwardHook`).
        freeze: Set ``requires_grad=False`` on every parameter while attached.
        eval_mode: Put every submodule in eval mode while attached.
        needs_grad: Raise if a tracked module runs under ``no_grad``/``inference_mode``.
        purpose: What the pass is, for error messages (``"K-FAC collection"``).

    Raises:
        ValueError: If a name is not a module of ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str] = (),
        on_forward: ForwardHook | None = None,
        *,
        freeze: bool = True,
        eval_mode: bool = True,
        needs_grad: bool = False,
        purpose: str = "This pass",
    ) -> None:
        self.model = model
        self.modules = find_modules(
            model, names, "pass the backbone the names refer to (e.g. lit_module.model, not the LightningModule)."
        )
        self.names = list(self.modules)
        self.on_forward = on_forward
        self.freeze = freeze
        self.eval_mode = eval_mode
        self.needs_grad = needs_grad
        self.purpose = purpose
        self.attached = False
        self._handles: list[Any] = []
        self._flags: list[tuple[nn.Parameter, bool]] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        self._calls = dict.fromkeys(self.names, 0)

    def attach(self) -> None:
        """Freeze parameters, set eval mode and register the hooks (idempotent)."""
        if self.attached:
            return
        self.attached = True
        try:
            if self.freeze:
                self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
                for p, _ in self._flags:
                    p.requires_grad_(False)
            if self.eval_mode:
                self._modes = [(m, m.training) for m in self.model.modules()]
                self.model.eval()
            if self.on_forward is not None:
                for name, module in self.modules.items():
                    self._handles.append(module.register_forward_hook(self._make_hook(name)))
            self.new_forward()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook and restore ``requires_grad`` and the train/eval flag of every submodule."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._flags.clear()
        for module, training in self._modes:
            module.training = training
        self._modes.clear()
        self.attached = False

    def new_forward(self) -> None:
        """Start a new forward pass: every tracked module may run once again."""
        self._calls = dict.fromkeys(self.names, 0)

    def _make_hook(self, name: str):  # noqa: ANN202 - hook factory
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            self._calls[name] += 1
            if self._calls[name] > 1:
                raise RuntimeError(
                    f"Module {name!r} ran {self._calls[name]} times in one forward pass (shared weights or "
                    f"recomputation). {self.purpose} needs one call per forward: track modules that are called "
                    "once, and turn off gradient checkpointing for the pass."
                )
            if self.needs_grad and (not torch.is_grad_enabled() or torch.is_inference_mode_enabled()):
                raise RuntimeError(
                    f"{self.purpose} needs autograd, but the forward ran under no_grad/inference_mode. Run it "
                    "under torch.enable_grad() (Lightning: Trainer(inference_mode=False), never in "
                    "validation_step)."
                )
            grad_hook = self.on_forward(name, args[0], output)
            if grad_hook is None:
                return None
            replaced = None
            if not output.requires_grad:
                # Parameters are frozen, so the graph must start here: make this output a leaf.
                output = replaced = output.detach().requires_grad_(True)
            output.register_hook(grad_hook)
            return replaced

        return hook
