"""LightningModule for any timm vision transformer: label-noise training, CLS-token curvature, evaluation.

The setting is the label-noise memorization study of Maini et al., *Can Neural Network Memorization Be
Localized?* (ICML 2023), as used by Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss
Curvature* (arXiv 2510.24256, 2025): a ViT is trained on images some of whose labels were flipped, K-FAC
statistics of its MLP layers are collected from the token the classification head reads (one sample per
image), and the edit keeps only the high-curvature weight directions.

The backbone is ``timm.create_model(name, ...)``, built in ``configure_model`` so ``__init__`` stays cheap.
Weights come from one of:

* nothing (random init, the default);
* ``pretrained=True``: timm's pretrained weights for ``name`` (hub download), or, with ``checkpoint``, from
  that local file through timm's pretrained loader, which adapts the weights (drops a classifier of another
  size, resamples position embeddings for another ``img_size``, converts the input convolution to
  ``in_chans``);
* ``checkpoint`` alone: an exact (strict) load of a directory written by :meth:`LitViT.export`, a
  ``.safetensors``/``.pth`` state dict of the timm model, or a Lightning ``.ckpt`` of a ``LitViT``. Exported
  directories and Lightning checkpoints also carry the architecture (timm name and ``create_model`` keywords).

Architecture values are resolved per field in this order: the value given to ``__init__`` (for ``name``: any
value other than the default), the checkpoint's recorded architecture, the attached data module
(``num_classes``, ``image_size``, ``in_chans``), timm's default for ``name``. The resolved values are written
back into ``hparams``, so a Lightning checkpoint of the module rebuilds the same backbone.

Library use: parameter groups come from ``timm.optim.param_groups_weight_decay`` and plain state dicts are
read by ``timm.models.load_state_dict``. Hand-written on purpose: the learning-rate factor (:func:`lr_factor`),
because ``transformers.get_scheduler`` warms up as ``step / warmup`` from 0 instead of ``(step + 1) /
(warmup + 1)`` and would change every trained ViT; Lightning checkpoints (their ``model.`` prefix and recorded
architecture) and the strict load's check, which names the mismatching keys before ``load_state_dict`` runs.

Warning:
    CLS-only statistics (``mode="cls"``) need a model whose head reads one token (timm
    ``global_pool="token"``, position 0). Models that average or attention-pool the tokens
    (``global_pool="avg"``, ``"map"``, ...) have no such token: collect with ``mode="tokens"`` (every token
    position is a sample) or set ``cls_position``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_curv.curvature import KFACAccumulator, classifier_step
from lightning_curv.data.base import SPLIT_GROUP, EvalSet
from lightning_curv.metrics.vision import LabelMemorizationMetric
from lightning_curv.models.base import CurvatureModule, KFACMode
from lightning_curv.utils import atomic_dir

__all__ = [
    "DEFAULT_VIT_NAME",
    "EXPORT_CONFIG",
    "EXPORT_WEIGHTS",
    "VIT_MLP_PATTERNS",
    "LitViT",
    "read_vit_checkpoint",
]

DEFAULT_VIT_NAME = "vit_tiny_patch16_224"
#: MLP projections of timm ViT blocks (``Block.mlp`` is a ``timm.layers.Mlp`` with ``fc1``/``fc2``).
VIT_MLP_PATTERNS: tuple[str, ...] = ("blocks.*.mlp.fc1", "blocks.*.mlp.fc2")
#: File names inside a directory written by :meth:`LitViT.export`.
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
#: ``format`` field of the exported JSON; other JSON files beside a weights file are ignored.
EXPORT_FORMAT = "lightning_curv.vit"
EXPORT_VERSION = 1
#: Keyword arguments of ``timm.create_model`` that LitViT has its own fields for.
_SIZE_FIELDS = ("num_classes", "img_size", "patch_size", "in_chans")
#: Parameters without weight decay besides biases and norms (timm's ``no_weight_decay`` convention).
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


class LitViT(CurvatureModule):
    """Cross-entropy training, evaluation and CLS-token curvature collection for a timm vision transformer.

    Args:
        name: timm model name (any registered architecture, optionally with a pretrained tag, or a timm
            ``hf-hub:``/``local-dir:`` reference). When ``checkpoint`` records another name and this is left
            at the default, the checkpoint's name is used.
        pretrained: Load timm's pretrained weights for ``name``: downloaded, or from ``checkpoint`` when given
            (adapted to ``num_classes``, ``img_size`` and ``in_chans`` by timm).
        checkpoint: Local weights: a directory written by :meth:`export`, a ``.safetensors``/``.pth`` state
            dict of the timm model, or a Lightning ``.ckpt`` of a LitViT (exact load unless ``pretrained``).
        num_classes: Classifier outputs; None: the checkpoint's, else the data module's, else timm's default.
        img_size: Input side in pixels; None: the checkpoint's, else the data module's ``image_size``, else
            timm's.
        patch_size: Patch side; None: the checkpoint's, else the one ``name`` implies. Must divide
            ``img_size``.
        in_chans: Input channels; None: the checkpoint's, else the data module's, else timm's (3).
        model_kwargs: Further ``timm.create_model`` keywords (``embed_dim``, ``depth``, ``num_heads``,
            ``mlp_ratio``, ``global_pool``, ``drop_rate``, ``drop_path_rate``, ...). A checkpoint's recorded
            keywords are the base; these override them.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases, norms, position embeddings and class tokens).
        betas: AdamW betas.
        warmup_steps: Linear warm-up steps.
        scheduler: Learning-rate schedule after warm-up: constant, cosine decay to 0, or linear decay to 0.
        label_smoothing: Label smoothing of the training cross-entropy.
        curvature_modules: Layer patterns tracked by default; None: every block's ``mlp.fc1`` and ``mlp.fc2``.
        cls_position: Token position whose statistics count in ``"cls"`` mode; None: inferred (0 for models
            whose head reads the class token).

    Raises:
        ValueError: On out-of-range sizes or options (checked here, before any model is built).
    """

    default_curvature_modules = VIT_MLP_PATTERNS

    def __init__(
        self,
        name: str = DEFAULT_VIT_NAME,
        pretrained: bool = False,
        checkpoint: str | None = None,
        num_classes: int | None = None,
        img_size: int | None = None,
        patch_size: int | None = None,
        in_chans: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        scheduler: Literal["constant_with_warmup", "cosine", "linear"] = "cosine",
        label_smoothing: float = 0.0,
        curvature_modules: list[str] | None = None,
        cls_position: int | None = None,
    ) -> None:
        super().__init__()
        for field_name, value in (
            ("num_classes", num_classes),
            ("img_size", img_size),
            ("patch_size", patch_size),
            ("in_chans", in_chans),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{field_name} must be a positive integer or None, got {value!r}.")
        _check_divisible(img_size, patch_size, name)
        if scheduler not in ("constant_with_warmup", "cosine", "linear"):
            raise ValueError(f"scheduler must be 'constant_with_warmup', 'cosine' or 'linear', got {scheduler!r}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        if cls_position is not None and cls_position < 0:
            raise ValueError(f"cls_position must be a non-negative token index or None, got {cls_position}.")
        if model_kwargs is not None:
            clash = sorted(set(model_kwargs) & {*_SIZE_FIELDS, "pretrained", "checkpoint_path"})
            if clash:
                raise ValueError(f"Set {clash} as LitViT arguments, not inside model_kwargs.")
        self.save_hyperparameters()
        self.name = name
        self.pretrained = pretrained
        self.checkpoint = checkpoint
        self.sizes: dict[str, int | None] = {
            "num_classes": num_classes,
            "img_size": img_size,
            "patch_size": patch_size,
            "in_chans": in_chans,
        }
        self.model_kwargs = dict(model_kwargs or {})
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.scheduler = warmup_steps, scheduler
        self.label_smoothing = label_smoothing
        self._curvature_modules = curvature_modules
        self.cls_position = cls_position
        #: Sizes read from the attached data module in ``setup`` (used for fields left None, then checked).
        self._data_sizes: dict[str, int] = {}
        #: The ``timm.create_model`` keywords the backbone was built with (set by ``configure_model``).
        self.create_kwargs: dict[str, Any] | None = None

    # ------------------------------------------------------------------ model
    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self._data_sizes = _data_sizes(datamodule)
        super().setup(stage)

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        import timm

        recorded = read_vit_checkpoint(self.checkpoint) if self.checkpoint and not self.pretrained else None
        name, kwargs = self._resolve_architecture(recorded[0] if recorded else None)
        _check_name(name)
        _check_divisible(kwargs.get("img_size"), kwargs.get("patch_size") or _name_patch_size(name), name)
        create: dict[str, Any] = {"pretrained": self.pretrained, **kwargs}
        if self.pretrained and self.checkpoint:
            create["pretrained_cfg_overlay"] = {"file": str(_weights_file(self.checkpoint))}
        try:
            model = timm.create_model(name, **create)
        except Exception as err:  # timm raises assorted errors for kwargs an architecture does not take
            raise ValueError(f"timm.create_model({name!r}, **{kwargs}) failed: {err}") from err
        _check_divisible(_as_int(model, "img_size"), _as_int(model, "patch_size"), name)
        if recorded is not None:
            _load_exact(model, recorded[1], self.checkpoint)
        self.model = model
        self.name = name
        self.create_kwargs = {k: v for k, v in kwargs.items() if v is not None}
        self._record_resolved(model)
        self._check_against_data()

    def _resolve_architecture(self, recorded: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
        """``(name, create_model keywords)`` from the fields, a checkpoint's record and the data module."""
        name = self.name
        recorded_kwargs: dict[str, Any] = {}
        if recorded is not None:
            if name not in (DEFAULT_VIT_NAME, recorded["name"]):
                raise ValueError(
                    f"name={name!r} but the checkpoint {self.checkpoint} holds a {recorded['name']!r}; drop "
                    "`name` to use the checkpoint's architecture."
                )
            name = recorded["name"]
            recorded_kwargs = dict(recorded.get("create_kwargs", {}))
        data_keys = {"num_classes": "num_classes", "img_size": "image_size", "in_chans": "in_chans"}
        kwargs = {k: v for k, v in recorded_kwargs.items() if k not in _SIZE_FIELDS}
        kwargs.update(self.model_kwargs)
        for field_name in _SIZE_FIELDS:
            value = self.sizes[field_name]
            if value is None:
                value = recorded_kwargs.get(field_name)
            if value is None and field_name in data_keys:
                value = self._data_sizes.get(data_keys[field_name])
            if value is not None:
                kwargs[field_name] = value
        return name, kwargs

    def _record_resolved(self, model: nn.Module) -> None:
        """Write the resolved architecture into ``hparams``: a Lightning checkpoint rebuilds this model."""
        self.hparams["name"] = self.name
        resolved = {
            "num_classes": getattr(model, "num_classes", None),
            "img_size": _as_int(model, "img_size"),
            "patch_size": _as_int(model, "patch_size"),
            "in_chans": _as_int(model, "in_chans"),
        }
        for field_name, value in resolved.items():
            value = value if value is not None else self.create_kwargs.get(field_name)
            self.sizes[field_name] = value
            self.hparams[field_name] = value
        extra = {k: v for k, v in self.create_kwargs.items() if k not in _SIZE_FIELDS}
        self.hparams["model_kwargs"] = extra or None

    def _check_against_data(self) -> None:
        data = self._data_sizes
        if not data:
            return
        problems = []
        if "image_size" in data and self.sizes["img_size"] not in (None, data["image_size"]):
            problems.append(f"the data has {data['image_size']}px images but img_size={self.sizes['img_size']}")
        if "in_chans" in data and self.sizes["in_chans"] not in (None, data["in_chans"]):
            problems.append(f"the data has {data['in_chans']} channel(s) but in_chans={self.sizes['in_chans']}")
        if "num_classes" in data and self.sizes["num_classes"] is not None:
            if self.sizes["num_classes"] < data["num_classes"]:
                problems.append(
                    f"the data has {data['num_classes']} classes but num_classes={self.sizes['num_classes']}"
                )
        if problems:
            raise ValueError(
                "The model does not fit the data: " + "; ".join(problems) + ". Set the model's sizes to the data's "
                "(or leave them unset to take them from the data module)."
            )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The state dict holds every weight and the hparams the resolved architecture, so reloading the
        # checkpoint must neither read the original weights file (it may be gone) nor download weights.
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and self.model is not None:
            hparams["checkpoint"] = None
            hparams["pretrained"] = False

    @override
    def check_data(self, datamodule: pl.LightningDataModule | None) -> None:
        self._data_sizes = _data_sizes(datamodule)
        if self.model is not None:
            self._check_against_data()

    @override
    def forward(self, batch: Mapping[str, Tensor] | Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of a batch dict (``pixel_values`` ``[B, C, H, W]``) or of images."""
        pixels = batch if isinstance(batch, Tensor) else batch["pixel_values"]
        return self.model(pixels)

    @property
    def num_classes(self) -> int | None:
        """Classifier outputs (resolved once the backbone is built)."""
        return self.sizes["num_classes"] or self._data_sizes.get("num_classes")

    # ------------------------------------------------------------------ training
    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch)  # [B, num_classes]; training-time hooks (e.g. a baseline's) see the whole batch
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        size = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/acc", acc, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        return loss

    @override
    def configure_optimizers(self) -> Any:
        from timm.optim import param_groups_weight_decay

        no_decay = set(getattr(self.model, "no_weight_decay", set)())
        no_decay |= {n for n, _ in self.model.named_parameters() if n.rsplit(".", 1)[-1] in _NO_DECAY_NAMES}
        groups = param_groups_weight_decay(self.model, self.weight_decay, no_weight_decay_list=no_decay)
        # timm lists the no-decay group first; decay first keeps the parameter order of earlier releases (and
        # with it the summation order of a gradient-norm clip).
        optimizer = torch.optim.AdamW(groups[::-1], lr=self.lr, betas=self.betas)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        factor = lr_factor(self.scheduler, self.warmup_steps, total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ curvature
    @override
    def curvature_modules(self) -> list[str]:
        if self._curvature_modules:
            return list(self._curvature_modules)
        return list(VIT_MLP_PATTERNS)

    def head_position(self) -> int:
        """The token position the classification head reads (``cls_position`` or inferred).

        Raises:
            ValueError: If the head pools over tokens (no single position) and ``cls_position`` is unset.
        """
        if self.cls_position is not None:
            return self.cls_position
        model = self.model
        pool = getattr(model, "global_pool", None)
        has_token = getattr(model, "cls_token", None) is not None or getattr(model, "num_prefix_tokens", 0) > 0
        if pool == "token" and has_token and getattr(model, "attn_pool", None) is None:
            return 0
        raise ValueError(
            f"{self.name!r} (global_pool={pool!r}, class token: {has_token}) has no single token that the "
            "classification head reads, so CLS-only statistics are undefined. Collect with mode='tokens' "
            "(every token position is a sample), build the model with model_kwargs={'global_pool': 'token'}, "
            "or set cls_position."
        )

    @override
    def kfac_step(
        self,
        batch: Mapping[str, Tensor],
        accumulator: KFACAccumulator,
        *,
        fisher: str,
        seed: int,
        max_samples: int | None,
        mode: KFACMode | None,
    ) -> int:
        """One curvature step: ``"cls"`` (default) counts the head's token of each image, ``"tokens"`` all.

        In ``"tokens"`` mode the sample budget counts token positions but is applied in whole images, so a
        pass may overshoot it by less than one image.
        """
        mode = mode or "cls"
        if mode not in ("cls", "tokens"):
            raise ValueError(f"LitViT collects statistics in 'cls' or 'tokens' mode; got mode={mode!r}.")
        position = self.head_position() if mode == "cls" else None
        if mode == "tokens" and max_samples is not None:
            max_samples = -(-max_samples // self.tokens_per_image())  # whole images
        before = accumulator.num_samples
        classifier_step(
            self.model,
            batch,
            accumulator,
            position=position,
            fisher=fisher,
            seed=seed,
            max_samples=max_samples,
        )
        return accumulator.num_samples - before

    def tokens_per_image(self) -> int:
        """Token positions per image seen by the blocks (prefix tokens plus patches)."""
        patches = getattr(getattr(self.model, "patch_embed", None), "num_patches", None)
        if patches is None:
            raise ValueError(f"Cannot count the tokens of {self.name!r}: it has no patch_embed.num_patches.")
        return int(patches) + int(getattr(self.model, "num_prefix_tokens", 0))

    # ------------------------------------------------------------------ evaluation
    @override
    def make_metrics(self, eval_set: EvalSet) -> nn.ModuleDict:
        if eval_set.kind == "classification":
            num_classes = self.num_classes
            if num_classes is None:
                raise ValueError("num_classes is unknown: set model.num_classes or use a data module that has it.")
            return nn.ModuleDict({"acc": MulticlassAccuracy(num_classes=num_classes, average="micro")})
        if eval_set.kind == "label_memorization":
            return nn.ModuleDict({"mem": LabelMemorizationMetric(self.num_classes)})
        raise ValueError(f"LitViT cannot evaluate {eval_set.kind!r} sets ({eval_set.name}).")

    @override
    def evaluate_batch(
        self, eval_set: EvalSet, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int
    ) -> None:
        metrics = self.eval_metrics[eval_set.name]
        preds = self(batch).argmax(dim=-1)  # [B]
        if eval_set.kind == "classification":
            metrics["acc"].update(preds, batch["labels"])
        else:
            metrics["mem"].update(preds, batch["labels"], batch["true_labels"])

    @override
    def compute_metrics(self, eval_set: EvalSet) -> dict[str, Tensor]:
        metrics = self.eval_metrics[eval_set.name]
        if eval_set.kind == "classification":
            key = f"util/{eval_set.metric_name or eval_set.name + '_acc'}"
            acc = metrics["acc"]
            return {key: acc.compute() if acc.update_called else torch.tensor(float("nan"))}
        group = SPLIT_GROUP[eval_set.split]
        mem = metrics["mem"]
        if mem.update_called:
            values = mem.compute()
        else:  # an empty set (no flipped labels): the fractions are undefined
            values = {"memorized": torch.tensor(float("nan")), "gt_recovery": torch.tensor(float("nan"))}
        return {f"{group}/memorized": values["memorized"], f"{group}/gt_recovery": values["gt_recovery"]}

    # ------------------------------------------------------------------ export
    @override
    def export(self, path: str) -> None:
        """Write ``path/model.safetensors`` (backbone state dict) and ``path/config.json`` (name, kwargs).

        ``LitViT(checkpoint=path)`` rebuilds and reloads the backbone.
        """
        from safetensors.torch import save_file

        if self.model is None:
            raise RuntimeError("Nothing to export: the backbone is not built yet (call configure_model()).")
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        config = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "name": self.name,
            "create_kwargs": dict(self.create_kwargs or {}),
        }
        try:  # the whole folder appears at once, replacing an older export only when complete
            with atomic_dir(path) as tmp:  # the folder is fsynced and renamed whole: no per-file renames needed
                save_file(state, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
                (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        except OSError as err:
            raise OSError(err.errno, f"Could not export the model to {path}: {err.strerror or err}") from err


# ---------------------------------------------------------------------------- helpers
def lr_factor(schedule: str, warmup_steps: int, total_steps: int):  # noqa: ANN201 - returns a closure
    """Multiplier of the peak learning rate at each optimizer step: linear warm-up, then the schedule.

    Args:
        schedule: ``"constant_with_warmup"``, ``"cosine"`` (to 0 at ``total_steps``) or ``"linear"`` (to 0).
        warmup_steps: Steps of linear warm-up from 0.
        total_steps: Total optimizer steps.

    Returns:
        A function ``step -> factor`` for ``torch.optim.lr_scheduler.LambdaLR``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant_with_warmup":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _as_int(model: nn.Module, attr: str) -> int | None:
    """A square size attribute of a timm ViT (``img_size``/``patch_size`` on ``patch_embed``) as one int."""
    if attr == "in_chans":
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        return int(proj.in_channels) if isinstance(proj, nn.Conv2d) else None
    value = getattr(getattr(model, "patch_embed", None), attr, None)
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return int(value[0]) if len(set(value)) == 1 else None
    return int(value)


def _check_divisible(img_size: int | None, patch_size: int | None, name: str) -> None:
    if img_size is None or patch_size is None:
        return
    if img_size % patch_size:
        lower = img_size - img_size % patch_size
        near = f"{lower} or {lower + patch_size}" if lower else str(patch_size)
        raise ValueError(
            f"img_size={img_size} is not divisible by patch_size={patch_size} ({name}): the patch grid would "
            f"drop pixels. Use an img_size that is a multiple of {patch_size} (e.g. {near}; the data module "
            "resizes to data.image_size) or another patch_size."
        )


def _name_patch_size(name: str) -> int | None:
    """The patch size a timm name states (``vit_small_patch16_224`` -> 16), if it states one."""
    match = re.search(r"patch(\d+)", name)
    return int(match.group(1)) if match else None


def _check_name(name: str) -> None:
    import timm

    if ":" in name.split(".")[0]:  # hf-hub:/local-dir: references are resolved by timm itself
        return
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close names: {close}." if close else " See timm.list_models('vit*')."
    raise ValueError(f"Unknown timm model {name!r}.{hint}")


def _data_sizes(datamodule: Any) -> dict[str, int]:
    """``num_classes``, ``image_size`` and ``in_chans`` of a data module that exposes them."""
    sizes = {}
    for key in ("num_classes", "image_size", "in_chans"):
        try:
            value = getattr(datamodule, key, None)
        except Exception:  # a property that needs setup() or the source; the check happens later
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            sizes[key] = value
    return sizes


def _weights_file(checkpoint: str) -> Path:
    """The weights file of ``checkpoint`` (an export directory's safetensors, or the file itself)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        path = path / EXPORT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"No weights at {checkpoint}: expected a directory written by LitViT.export (with "
            f"{EXPORT_WEIGHTS}), a .safetensors/.pth state dict or a Lightning .ckpt."
        )
    return path


def read_vit_checkpoint(checkpoint: str) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
    """Architecture record and backbone state dict of a local checkpoint.

    Args:
        checkpoint: A directory written by :meth:`LitViT.export` (or its ``model.safetensors``), a plain
            ``.safetensors``/``.pth`` state dict, or a Lightning ``.ckpt`` of a LitViT.

    Returns:
        ``(record, state_dict)``: ``record`` is ``{"name": ..., "create_kwargs": {...}}`` when the checkpoint
        carries the architecture (export config or Lightning hyperparameters), else None; ``state_dict`` keys
        are the timm model's own (``blocks.0.mlp.fc1.weight``).

    Raises:
        FileNotFoundError: If nothing is at ``checkpoint``.
        ValueError: If the file holds no state dict.
    """
    from timm.models import load_state_dict

    path = _weights_file(checkpoint)
    record = None
    if path.suffix == ".safetensors":
        state = load_state_dict(str(path))
        config = path.with_name(EXPORT_CONFIG)
        if config.is_file():
            data = json.loads(config.read_text())
            if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT:
                record = {"name": data["name"], "create_kwargs": dict(data.get("create_kwargs", {}))}
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"Could not read {path} as a torch state dict or Lightning checkpoint: {err}") from err
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path} holds a {type(raw).__name__}, not a state dict.")
        if "state_dict" in raw and "hyper_parameters" in raw:  # a Lightning checkpoint of a LitViT
            hp = raw["hyper_parameters"]
            prefix = "model."
            state = {k[len(prefix) :]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
            if "name" in hp:
                kwargs = {k: hp.get(k) for k in _SIZE_FIELDS if hp.get(k) is not None}
                kwargs.update(hp.get("model_kwargs") or {})
                record = {"name": hp["name"], "create_kwargs": kwargs}
        else:  # timm picks the EMA / state_dict / model entry of training checkpoints and strips DDP prefixes
            state = load_state_dict(str(path), use_ema=True)
        state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{path} holds no tensors of a model.")
    return record, state


def _load_exact(model: nn.Module, state: Mapping[str, Tensor], checkpoint: str) -> None:
    """Strict load with a message that says which architecture to use."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {shapes[:5]}" if shapes else "",
            )
            if part
        )
        raise ValueError(
            f"The weights in {checkpoint} do not fit the configured model ({detail}). Use the architecture "
            "they were saved with (name, sizes, model_kwargs), or pretrained=True to let timm adapt "
            "pretrained weights."
        )
    model.load_state_dict(state, strict=True)
