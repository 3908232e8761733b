"""Example-tied dropout: train with per-example "memorization" channels, drop them at test time.

Maini, Mozer, Sedghi, Lipton, Kolter, Zhang, *Can Neural Network Memorization Be Localized?* (ICML 2023). In
each chosen layer, a fixed share ``p_fixed`` of the hidden channels ("generalization" channels) is active for
every example; of the remaining "memorization" channels, each training example activates its own fixed subset,
a fraction ``p_mem`` of them, chosen deterministically from the example's dataset ``index``. Examples that can
only be fit by memorizing end up stored in their private channels, so dropping all memorization channels at
test time removes most memorization while the generalization channels keep the shared behaviour.

Here it is applied to the hidden channels of ViT MLPs (the input of timm's ``blocks.*.mlp.fc2``, i.e. after
the activation), as a forward pre-hook that multiplies the hidden activations ``[B, ..., d_hidden]`` by a
channel mask:

* ``"train"`` mode: fixed channels ``[0, n_fixed)`` plus the example's ``n_mem`` memorization channels are 1,
  the rest 0 (needs the batch's ``index``);
* ``"drop"`` mode (test time): only the fixed channels, multiplied by ``(n_fixed + n_mem) / n_fixed`` when
  ``rescale`` is on (matching the number of active channels in training, like the authors' code; off: 1);
* ``"average"`` mode: fixed channels 1, memorization channels scaled by their training keep rate
  ``n_mem / (d - n_fixed)`` (the expectation over examples: the model *with* its memorization channels, for a
  before/after comparison);
* ``"auto"`` (default): ``"train"`` while the hooked layer is in training mode, ``"drop"`` in eval mode, so a
  LightningModule needs no extra switching.

Counts: ``n_fixed = round(p_fixed · d)`` and ``n_mem = round(p_mem · (d - n_fixed))`` (half up); each example
activates exactly ``n_mem`` channels (the authors draw Bernoulli(``p_mem``) per channel, which gives the same
fraction in expectation). The subset of example ``i`` in layer ``L`` is the first ``n_mem`` entries of a
permutation drawn from a CPU generator seeded by ``(seed, L, i)``, so it does not depend on batching, devices
or epochs, and different layers get different subsets.

Usage in a training loop::

    etd = ExampleTiedDropout.install(vit, "blocks.*.mlp", p_fixed=0.2, p_mem=0.1, seed=0)
    for batch in loader:                      # batches carry `index` [B]
        with etd.indices(batch["index"]):
            loss = F.cross_entropy(vit(batch["pixel_values"]), batch["labels"])
    vit.eval()                                # "auto" mode now drops the memorization channels
    etd.remove()                              # only when the hooks are no longer wanted

With a LightningModule (its backbone in ``.model``, its ``forward`` taking the batch dict), wire it from
outside; the module needs no knowledge of it::

    etd_model = untrained_copy(lit_vit)       # same architecture, fresh weights
    add_example_tied_dropout(etd_model, p_fixed=0.8, p_mem=0.1, seed=0)
    trainer.fit(etd_model, datamodule=dm)     # training forwards use each batch's `index`
    trainer.validate(etd_model, datamodule=dm)  # eval mode: memorization channels dropped

Warning:
    The hooks hold no parameters and are not saved with a checkpoint: install them again (same arguments)
    after loading a model trained with example-tied dropout; without them it silently runs with every channel
    on, memorization channels included. A forward in ``"train"`` mode without indices raises.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_curv.curvature import is_linear_like, weight_matrix
from lightning_curv.curvature.modules import match_names
from lightning_curv.utils import name_seed, row_seed

DropoutMode = Literal["auto", "train", "drop", "average"]
DROPOUT_MODES: tuple[str, ...] = ("auto", "train", "drop", "average")

#: timm MLP blocks: the hidden channels are the input of this child.
OUTPUT_PROJECTION = "fc2"


def _count(p: float, n: int) -> int:
    return int(math.floor(p * n + 0.5))


def _check_fractions(p_fixed: float, p_mem: float) -> None:
    if not 0 < p_fixed <= 1:
        raise ValueError(f"p_fixed must be in (0, 1], got {p_fixed!r}.")
    if not 0 <= p_mem <= 1:
        raise ValueError(f"p_mem must be in [0, 1], got {p_mem!r}.")


def resolve_hidden_layers(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Linear layers whose input channels are the hidden channels of the matched MLPs.

    Args:
        model: The model.
        patterns: Names, fnmatch globs or ``re:`` regexes of MLP blocks (their ``fc2`` child is used, e.g.
            timm ``"blocks.*.mlp"``) or of linear layers directly (their input channels are used).

    Returns:
        Names of the linear layers, in ``named_modules()`` order.

    Raises:
        ValueError: If a pattern matches no MLP block with an ``fc2`` or linear layer.
    """
    modules = dict(model.named_modules())
    selected: list[str] = []
    for pattern, hits in match_names(patterns, list(modules)).items():
        found = []
        for name in hits:
            projection = getattr(modules[name], OUTPUT_PROJECTION, None)
            if isinstance(projection, nn.Module) and is_linear_like(projection):
                found.append(f"{name}.{OUTPUT_PROJECTION}" if name else OUTPUT_PROJECTION)
            elif is_linear_like(modules[name]):
                found.append(name)
        if not found:
            raise ValueError(
                f"Pattern {pattern!r} matches no MLP block with an `{OUTPUT_PROJECTION}` layer and no linear "
                "layer (timm ViTs: 'blocks.*.mlp' or 'blocks.0.mlp')."
            )
        selected.extend(n for n in found if n not in selected)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(selected, key=order.__getitem__)


class ExampleTiedDropout:
    """Example-tied dropout hooks on the hidden channels of chosen MLP layers (see the module docstring).

    Build it with :meth:`install`. It is not an ``nn.Module``: it adds no parameters or buffers to the model.

    Args:
        model: The model to hook.
        modules: MLP blocks or linear layers (see :func:`resolve_hidden_layers`).
        p_fixed: Fraction of each layer's hidden channels that are always on, in (0, 1].
        p_mem: Fraction of the remaining (memorization) channels each example activates in training, in
            [0, 1].
        seed: Seed of the per-example channel subsets.
        rescale: In ``"drop"`` mode, multiply the fixed channels by ``(n_fixed + n_mem) / n_fixed``.
        mode: Initial mode (see :data:`DropoutMode`).

    Attributes:
        layers: Names of the hooked linear layers.
        p_fixed: As given.
        p_mem: As given.
        seed: As given.
        rescale: As given.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: str | Sequence[str],
        *,
        p_fixed: float = 0.2,
        p_mem: float = 0.1,
        seed: int = 0,
        rescale: bool = True,
        mode: DropoutMode = "auto",
    ) -> None:
        _check_fractions(p_fixed, p_mem)
        self.p_fixed, self.p_mem = float(p_fixed), float(p_mem)
        self.seed, self.rescale = int(seed), bool(rescale)
        self.mode = mode
        self.layers = resolve_hidden_layers(model, modules)
        named = dict(model.named_modules())
        self._modules = {name: named[name] for name in self.layers}
        self._index: Tensor | None = None
        for name in self.layers:
            d = self.num_channels(name)
            if self.num_fixed(name) < 1:
                raise ValueError(f"p_fixed={p_fixed} leaves no fixed channel among the {d} of {name!r}.")
        self._handles: list[RemovableHandle] = []
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        except Exception:
            self.remove()
            raise

    @classmethod
    def install(
        cls,
        model: nn.Module,
        modules: str | Sequence[str],
        p_fixed: float = 0.2,
        p_mem: float = 0.1,
        seed: int = 0,
        *,
        rescale: bool = True,
        mode: DropoutMode = "auto",
    ) -> ExampleTiedDropout:
        """Hook ``model`` and return the controller (same arguments as the class)."""
        return cls(model, modules, p_fixed=p_fixed, p_mem=p_mem, seed=seed, rescale=rescale, mode=mode)

    # ------------------------------------------------------------------ state
    @property
    def mode(self) -> DropoutMode:
        """Current mode; ``"auto"`` follows each hooked layer's ``training`` flag."""
        return self._mode

    @mode.setter
    def mode(self, value: DropoutMode) -> None:
        if value not in DROPOUT_MODES:
            raise ValueError(f"mode must be one of {DROPOUT_MODES}, got {value!r}.")
        self._mode = value

    def set_indices(self, index: Tensor | None) -> None:
        """Set the dataset indices of the rows of the next forward passes (None clears them).

        Args:
            index: Dataset index per row, shape ``[B]``. Call it before every training forward, or use
                :meth:`indices`, which clears them afterwards so no stale indices are reused.
        """
        if index is not None and index.ndim != 1:
            raise ValueError(f"index must have shape [B], got {tuple(index.shape)}.")
        self._index = index

    @contextmanager
    def indices(self, index: Tensor) -> Iterator[ExampleTiedDropout]:
        """Context in which forward passes use the per-example channels of ``index`` (shape ``[B]``)."""
        previous = self._index
        self.set_indices(index)
        try:
            yield self
        finally:
            self._index = previous

    def remove(self) -> None:
        """Remove the hooks (idempotent); the model is unchanged afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ExampleTiedDropout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ channels
    def num_channels(self, layer: str) -> int:
        """Hidden channels ``d`` of ``layer`` (its input features)."""
        return weight_matrix(self._modules[layer]).shape[1]

    def num_fixed(self, layer: str) -> int:
        """``n_fixed = round(p_fixed · d)``."""
        return _count(self.p_fixed, self.num_channels(layer))

    def num_mem(self, layer: str) -> int:
        """``n_mem = round(p_mem · (d - n_fixed))``: memorization channels each example activates."""
        return _count(self.p_mem, self.num_channels(layer) - self.num_fixed(layer))

    def fixed_channels(self, layer: str) -> Tensor:
        """The always-on channels ``[0, n_fixed)``, shape ``[n_fixed]``."""
        return torch.arange(self.num_fixed(layer))

    def memorization_channels(self, layer: str, index: Tensor) -> Tensor:
        """Memorization channels of each example in training mode.

        Args:
            layer: A hooked layer name.
            index: Dataset indices, shape ``[B]``.

        Returns:
            Sorted channel ids of shape ``[B, n_mem]`` (long, CPU), all in ``[n_fixed, d)``.
        """
        d, n_fixed, n_mem = self.num_channels(layer), self.num_fixed(layer), self.num_mem(layer)
        layer_seed = name_seed(self.seed, layer)
        rows = []
        for i in index.tolist():
            generator = torch.Generator().manual_seed(row_seed(layer_seed, int(i)))
            rows.append(torch.randperm(d - n_fixed, generator=generator)[:n_mem].sort().values + n_fixed)
        if not rows:
            return torch.empty(0, n_mem, dtype=torch.long)
        return torch.stack(rows)

    def channel_mask(
        self, layer: str, mode: Literal["train", "drop", "average"], index: Tensor | None = None
    ) -> Tensor:
        """Multiplier of the hidden channels of ``layer``.

        Args:
            layer: A hooked layer name.
            mode: ``"train"``, ``"drop"`` or ``"average"`` (see the module docstring).
            index: Dataset indices ``[B]``; required for ``"train"``.

        Returns:
            Float32 CPU tensor of shape ``[B, d]`` for ``"train"``, ``[1, d]`` otherwise.
        """
        d, n_fixed, n_mem = self.num_channels(layer), self.num_fixed(layer), self.num_mem(layer)
        if mode == "train":
            if index is None:
                raise RuntimeError(
                    f"Example-tied dropout on {layer!r} is in training mode but has no batch indices: wrap "
                    "the forward in `with etd.indices(batch['index']):` (or call set_indices), or put the "
                    "model in eval mode."
                )
            mask = torch.zeros(index.shape[0], d)
            mask[:, :n_fixed] = 1
            mask.scatter_(1, self.memorization_channels(layer, index), 1.0)
            return mask
        mask = torch.zeros(1, d)
        if mode == "drop":
            mask[:, :n_fixed] = (n_fixed + n_mem) / n_fixed if self.rescale else 1.0
        elif mode == "average":
            mask[:, :n_fixed] = 1
            mask[:, n_fixed:] = n_mem / (d - n_fixed) if d > n_fixed else 0.0
        else:
            raise ValueError(f"channel_mask needs mode 'train', 'drop' or 'average', got {mode!r}.")
        return mask

    def _hook(self, layer: str) -> Callable[[nn.Module, tuple], tuple]:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # [B, ..., d]
            mode = self._mode if self._mode != "auto" else ("train" if module.training else "drop")
            index = self._index if mode == "train" else None
            if index is not None and index.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"{index.shape[0]} batch indices for a batch of {x.shape[0]} rows in {layer!r}: set the "
                    "indices of the current batch."
                )
            mask = self.channel_mask(layer, mode, index).to(x.device, x.dtype)
            mask = mask.view(mask.shape[0], *([1] * (x.ndim - 2)), mask.shape[1])  # [B or 1, 1.., d]
            return (x * mask, *args[1:])

        return hook


class ExampleTiedDropoutTraining:
    """Example-tied dropout wired into a LightningModule from outside (see :func:`add_example_tied_dropout`).

    Two hooks on the module: a forward pre-hook installs :class:`ExampleTiedDropout` on the backbone at the
    first forward (the backbone is built in ``configure_model``, inside ``fit``) and, in training mode, hands it
    the batch's ``index``; a forward hook clears the indices afterwards.

    Args:
        module: The LightningModule (or any module whose ``forward`` takes a batch dict with ``index``).
        modules: MLP blocks or linear layers of the backbone (see :func:`resolve_hidden_layers`).
        p_fixed: As in :class:`ExampleTiedDropout`.
        p_mem: As in :class:`ExampleTiedDropout`.
        seed: As in :class:`ExampleTiedDropout`.
        backbone: Attribute of ``module`` holding the network to hook.

    Attributes:
        etd: The installed :class:`ExampleTiedDropout` (None until the backbone exists).
    """

    def __init__(
        self,
        module: nn.Module,
        modules: str | Sequence[str],
        p_fixed: float,
        p_mem: float,
        seed: int,
        backbone: str = "model",
    ) -> None:
        _check_fractions(p_fixed, p_mem)
        self.modules, self.backbone = modules, backbone
        self.p_fixed, self.p_mem, self.seed = float(p_fixed), float(p_mem), int(seed)
        self.etd: ExampleTiedDropout | None = None
        self._handles = [
            module.register_forward_pre_hook(self._before_forward),
            module.register_forward_hook(self._after_forward),
        ]
        self.install(module)

    def install(self, module: nn.Module) -> ExampleTiedDropout | None:
        """Hook the backbone of ``module`` if it is built and not hooked yet; return the controller."""
        network = getattr(module, self.backbone, None)
        if self.etd is None and isinstance(network, nn.Module):
            self.etd = ExampleTiedDropout.install(network, self.modules, self.p_fixed, self.p_mem, self.seed)
        return self.etd

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        etd = self.install(module)
        if etd is None:
            raise RuntimeError(f"{type(module).__name__}.{self.backbone} is not built: call configure_model() first.")
        batch = args[0] if args else None
        if module.training and isinstance(batch, Mapping) and "index" in batch:
            etd.set_indices(batch["index"])  # [B]

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.etd is not None:
            self.etd.set_indices(None)

    def remove(self) -> None:
        """Remove the module hooks and the channel hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.etd is not None:
            self.etd.remove()


def add_example_tied_dropout(
    module: nn.Module,
    p_fixed: float = 0.2,
    p_mem: float = 0.1,
    seed: int = 0,
    *,
    modules: str | Sequence[str] = "blocks.*.mlp",
) -> ExampleTiedDropoutTraining:
    """Make ``module`` train with example-tied dropout and evaluate with its memorization channels dropped.

    Args:
        module: A LightningModule whose backbone is ``module.model`` (built now or later in
            ``configure_model``) and whose ``forward`` takes the batch dict (with ``index`` ``[B]`` in
            training), e.g. a :class:`~lightning_curv.models.LitViT`.
        p_fixed: Fraction of each layer's hidden channels that are always on, in (0, 1].
        p_mem: Fraction of the other channels each training example activates, in [0, 1].
        seed: Seed of the per-example channel subsets.
        modules: MLP blocks of the backbone (default: every timm ViT block's MLP).

    Returns:
        The wiring; ``.etd`` is the :class:`ExampleTiedDropout` once the backbone exists, ``.remove()``
        undoes everything.
    """
    return ExampleTiedDropoutTraining(module, modules, p_fixed, p_mem, seed)


def untrained_copy(module: nn.Module) -> nn.Module:
    """A fresh, untrained module of the same class and hyperparameters (no checkpoint, no pretrained weights).

    Args:
        module: A LightningModule with saved hyperparameters (e.g. a LitViT after ``configure_model``, whose
            ``hparams`` hold the resolved architecture).

    Returns:
        ``type(module)(**hparams)`` with ``checkpoint=None`` and ``pretrained=False`` where it takes them.
    """
    accepted = inspect.signature(type(module).__init__).parameters
    hparams = {k: v for k, v in getattr(module, "hparams", {}).items() if k in accepted}  # LightningCLI adds keys
    hparams.update({k: v for k, v in (("checkpoint", None), ("pretrained", False)) if k in accepted})
    return type(module)(**hparams)
