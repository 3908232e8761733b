"""LightningModules: causal LMs (transformers) and vision transformers (timm)."""

from lightning_curv.models.base import CurvatureModule
from lightning_curv.models.causal_lm import LitCausalLM
from lightning_curv.models.vit import LitViT

__all__ = ["CurvatureModule", "LitCausalLM", "LitViT"]
