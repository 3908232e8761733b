"""LightningModule for any Hugging Face causal language model.

The backbone comes from a config (``model_type`` plus the config fields, passed to ``AutoConfig.for_model``)
or from ``from_pretrained`` (a hub name or a local directory written with ``save_pretrained``). It is built in
``configure_model`` so ``__init__`` stays cheap and DDP/FSDP strategies can place it.

Warning:
    Models with tied input/output embeddings are fine to train and edit as long as the tracked modules are the
    MLP projections; tracking ``lm_head`` of a tied model is rejected by the curvature core.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_curv.curvature import IGNORE_INDEX, KFACAccumulator, causal_lm_step, valid_positions
from lightning_curv.data.base import SPLIT_GROUP, EvalSet
from lightning_curv.metrics import (
    BatchMeanPerplexity,
    NDCGMetric,
    SequenceMatchMetric,
    TextMemorizationMetric,
    TokenPerplexity,
    reference_topk,
)
from lightning_curv.models.base import CurvatureModule, KFACMode
from lightning_curv.models.generation import greedy_generate, longest_prefix_match, prepend_context
from lightning_curv.utils import atomic_dir

#: MLP projections per architecture (``config.model_type``); the first pattern family that matches is used.
MLP_PATTERNS: dict[str, tuple[str, ...]] = {
    "llama": ("model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"),
    "olmo2": ("model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"),
    "olmo": ("model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"),
    "mistral": ("model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"),
    "qwen2": ("model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"),
    "gpt2": ("transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers.*.mlp.dense_h_to_4h", "gpt_neox.layers.*.mlp.dense_4h_to_h"),
}

NDCG_K = 10


class LitCausalLM(CurvatureModule):
    """Next-token training, evaluation and curvature collection for a transformers causal LM.

    Args:
        pretrained: Hub name or local directory for ``AutoModelForCausalLM.from_pretrained``. Exclusive with
            ``config``.
        config: ``{"model_type": ..., **fields}`` for ``AutoConfig.for_model`` (a model trained from scratch).
        torch_dtype: Dtype to load pretrained weights in (``"auto"`` keeps the checkpoint's).
        attn_implementation: Attention kernel (``"sdpa"``, ``"eager"``, ...); None lets transformers choose.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        warmup_steps: Linear warm-up steps.
        scheduler: Learning-rate schedule after warm-up, by ``transformers.get_scheduler`` name.
        curvature_modules: Layer patterns tracked by default; None uses the architecture's MLP projections.
        stress_shifts: Stress test of memorized sets: also score with the prefix/suffix split moved right by each
            of these many tokens (the prompt gains them, the target loses them).
        stress_context: Stress test: also score with this many tokens of extra context (the end of another
            example's prompt) prepended to each prompt.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = "sdpa",
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        scheduler: Literal["constant_with_warmup", "cosine", "linear"] = "cosine",
        curvature_modules: list[str] | None = None,
        stress_shifts: list[int] | None = None,
        stress_context: list[int] | None = None,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (config is None):
            raise ValueError(
                "Give exactly one of `pretrained` (hub name or save_pretrained directory) and `config` "
                "({'model_type': 'llama', ...} to train from scratch)."
            )
        if config is not None and "model_type" not in config:
            raise ValueError("`config` needs a `model_type` key (e.g. 'llama', 'gpt2', 'gpt_neox', 'olmo2').")
        self.save_hyperparameters()
        self.pretrained = pretrained
        self.config_fields = dict(config) if config is not None else None
        self.torch_dtype = torch_dtype
        self.attn_implementation = attn_implementation
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.scheduler = warmup_steps, scheduler
        self._curvature_modules = curvature_modules
        self.stress = [("shift", t) for t in stress_shifts or []] + [("context", t) for t in stress_context or []]
        if any(t <= 0 for _, t in self.stress):
            raise ValueError(f"stress_shifts and stress_context must be positive token counts, got {self.stress}.")
        # nDCG reference: top-k of the unedited model per (dataloader_idx, batch_idx), recorded on request.
        self.reference_topk: dict[tuple[int, int], tuple[Tensor, Tensor]] | None = None
        self.record_reference = False

    # ------------------------------------------------------------------ model
    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = {} if self.attn_implementation is None else {"attn_implementation": self.attn_implementation}
        if self.pretrained is not None:
            dtype = self.torch_dtype if self.torch_dtype == "auto" else getattr(torch, self.torch_dtype)
            self.model = AutoModelForCausalLM.from_pretrained(self.pretrained, dtype=dtype, **kwargs)
            return
        fields = dict(self.config_fields)
        model_type = fields.pop("model_type")
        try:
            hf_config = AutoConfig.for_model(model_type, **fields)
        except ValueError as err:
            from transformers import CONFIG_MAPPING

            raise ValueError(
                f"Unknown model_type {model_type!r}. Use a transformers model type such as 'llama', 'gpt2', "
                f"'gpt_neox' or 'olmo2' ({len(CONFIG_MAPPING)} are known)."
            ) from err
        self.model = AutoModelForCausalLM.from_config(hf_config, **kwargs)

    @property
    def hf_config(self) -> Any:
        """The backbone's transformers config."""
        return self.model.config

    @override
    def curvature_modules(self) -> list[str]:
        if self._curvature_modules:
            return list(self._curvature_modules)
        model_type = getattr(self.hf_config, "model_type", None)
        if model_type not in MLP_PATTERNS:
            raise ValueError(
                f"No default MLP modules for model_type {model_type!r}; set `modules` in the collect section "
                "(e.g. 'model.layers.*.mlp.*_proj')."
            )
        return list(MLP_PATTERNS[model_type])

    @override
    def check_data(self, datamodule: pl.LightningDataModule | None) -> None:
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is None or self.model is None:
            return
        if vocab > self.hf_config.vocab_size:
            raise ValueError(
                f"The data uses {vocab} token ids but the model's vocab_size is {self.hf_config.vocab_size}; set "
                f"model.config.vocab_size >= {vocab}."
            )

    @override
    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Logits of shape ``[B, T, V]``."""
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).logits

    # ------------------------------------------------------------------ training
    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels", batch["input_ids"]),
            use_cache=False,
        )
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    @override
    def configure_optimizers(self) -> Any:
        from transformers import get_scheduler

        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=self.betas,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = get_scheduler(
            self.scheduler, optimizer, num_warmup_steps=self.warmup_steps, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ curvature
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
        if mode not in (None, "tokens"):
            raise ValueError(f"Causal LMs collect statistics in 'tokens' mode; got mode={mode!r}.")
        return causal_lm_step(self.model, batch, accumulator, fisher=fisher, seed=seed, max_samples=max_samples)

    # ------------------------------------------------------------------ evaluation
    @override
    def make_metrics(self, eval_set: EvalSet) -> nn.ModuleDict:
        if eval_set.kind == "perplexity":
            return nn.ModuleDict(
                {"ppl": TokenPerplexity(), "ppl_batch_mean": BatchMeanPerplexity(), "ndcg": NDCGMetric(k=NDCG_K)}
            )
        stress = {}
        if eval_set.kind in ("text_memorization", "noise_memorization"):
            stress = {"prefix_match": MeanMetric()}
            for kind, t in self.stress:
                stress[f"{kind}{t}/match"] = SequenceMatchMetric()
                stress[f"{kind}{t}/prefix_match"] = MeanMetric()
        if eval_set.kind == "text_memorization":
            return nn.ModuleDict({"mem": TextMemorizationMetric(), **stress})
        if eval_set.kind in ("noise_memorization", "task", "backdoor"):
            groups = list(eval_set.groups) or None
            return nn.ModuleDict(
                {"match": SequenceMatchMetric(num_groups=len(groups) if groups else 1, group_names=groups), **stress}
            )
        raise ValueError(f"LitCausalLM cannot evaluate {eval_set.kind!r} sets ({eval_set.name}).")

    def start_reference_recording(self) -> None:
        """Record the top-k next tokens of the current (unedited) model in the next evaluation, for nDCG@10."""
        self.reference_topk, self.record_reference = {}, True

    def stop_reference_recording(self) -> None:
        """Score later evaluations against the recorded reference."""
        self.record_reference = False

    @override
    def evaluate_batch(
        self, eval_set: EvalSet, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int
    ) -> None:
        metrics = self.eval_metrics[eval_set.name]
        if eval_set.kind == "perplexity":
            logits = self(batch)  # [B, T, V]
            labels = batch.get("labels", batch["input_ids"])
            mask = batch.get("attention_mask")
            valid = valid_positions(torch.ones_like(labels) if mask is None else mask, labels)  # [B, T]
            targets = labels.roll(-1, dims=1)[valid]
            scores = logits[valid].float()  # [n, V]
            loss_sum = F.cross_entropy(scores, targets, reduction="sum")
            metrics["ppl"].update(loss_sum, valid.sum())
            metrics["ppl_batch_mean"].update(loss_sum, valid.sum())
            if self.reference_topk is not None:
                key = (dataloader_idx, batch_idx)
                if self.record_reference:
                    self.reference_topk[key] = tuple(t.cpu() for t in reference_topk(scores, NDCG_K))
                elif key in self.reference_topk:
                    ref_idx, ref_p = (t.to(scores.device) for t in self.reference_topk[key])
                    metrics["ndcg"].update(scores, ref_idx, ref_p)
            return
        target = batch["target_ids"]
        generated = self._generate(batch["prompt_ids"], batch["prompt_mask"], target.shape[1])
        if eval_set.kind == "text_memorization":
            metrics["mem"].update(generated, target)
        else:
            metrics["match"].update(generated, target, batch.get("alt_target_ids"), batch.get("group"))
        if "prefix_match" in metrics:
            metrics["prefix_match"].update(longest_prefix_match(generated, target).float())
            for kind, t in self.stress:
                prompt, mask, shifted = self._perturb(kind, t, batch["prompt_ids"], batch["prompt_mask"], target)
                out = self._generate(prompt, mask, shifted.shape[1])
                metrics[f"{kind}{t}/match"].update(out, shifted)
                metrics[f"{kind}{t}/prefix_match"].update(longest_prefix_match(out, shifted).float())

    def _generate(self, prompt_ids: Tensor, prompt_mask: Tensor, length: int) -> Tensor:
        return greedy_generate(
            self.model, prompt_ids, prompt_mask, max_new_tokens=length, pad_token_id=self._pad_token_id()
        )

    @staticmethod
    def _perturb(kind: str, t: int, prompt: Tensor, mask: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The stress-test variants of a generation batch: ``(prompt [B, P'], mask [B, P'], target [B, L'])``."""
        if kind == "shift":
            real = (target != IGNORE_INDEX).sum(dim=1)
            if int(real.min()) <= t:
                raise ValueError(
                    f"stress shift {t} leaves no target token for some rows (targets of {int(real.min())})."
                )
            moved = target[:, :t]
            return torch.cat([prompt, moved], 1), torch.cat([mask, torch.ones_like(moved)], 1), target[:, t:]
        # Extra context: the last t real tokens of the next row's prompt.
        donor = prompt.roll(1, dims=0)[:, -t:]
        ids, ctx_mask = prepend_context(prompt, mask, donor)
        return ids, ctx_mask, target

    def _pad_token_id(self) -> int:
        config = self.hf_config
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(config, attr, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return 0

    @override
    def compute_metrics(self, eval_set: EvalSet) -> dict[str, Tensor]:
        metrics = self.eval_metrics[eval_set.name]
        group = SPLIT_GROUP[eval_set.split]
        if eval_set.kind == "perplexity":
            out = {
                "util/ppl": metrics["ppl"].compute(),
                "util/ppl_batch_mean": metrics["ppl_batch_mean"].compute(),
                "util/loss": metrics["ppl"].mean_loss(),
            }
            if metrics["ndcg"].update_called:
                out["util/ndcg10"] = metrics["ndcg"].compute()["ndcg"]
            return out
        stress = {}
        if "prefix_match" in metrics:
            stress[f"{group}/prefix_match"] = metrics["prefix_match"].compute()
            for kind, t in self.stress:
                stress[f"{group}/{kind}{t}/match"] = metrics[f"{kind}{t}/match"].compute()["match"]
                stress[f"{group}/{kind}{t}/prefix_match"] = metrics[f"{kind}{t}/prefix_match"].compute()
        if eval_set.kind == "text_memorization":
            return {f"{group}/{k}": v for k, v in metrics["mem"].compute().items()} | stress
        values = metrics["match"].compute()
        if eval_set.kind == "noise_memorization":
            return {
                f"{group}/noise_memorized": values["match"],
                f"{group}/noise_rule_following": values["alt_match"],
                **stress,
            }
        if eval_set.kind == "backdoor":
            return {"mem/backdoor": values["match"]}
        out = {"util/task_acc": values["match_group_mean"], "util/task_token_acc": values["token_acc"]}
        out.update({f"util/task_acc/{g}": values[f"match/{g}"] for g in eval_set.groups})
        return out

    # ------------------------------------------------------------------ export
    @override
    def export(self, path: str) -> None:
        """``save_pretrained`` into a temporary folder beside ``path``, renamed into place once complete."""
        try:
            with atomic_dir(path) as tmp:
                self.model.save_pretrained(str(tmp))
        except OSError as err:
            raise OSError(err.errno, f"Could not export the model to {path}: {err.strerror or err}") from err
