import torch
from torch import nn

from lightning_curv.data.base import EvalSet
from lightning_curv.metrics import BatchMeanPerplexity, TokenPerplexity
from lightning_curv.models.base import CurvatureModule


class WithMetrics(CurvatureModule):
    """The smallest CurvatureModule: a linear backbone and two float64 metrics."""

    def __init__(self):
        super().__init__()
        self.model = nn.Linear(4, 4)
        self.eval_metrics = nn.ModuleDict(
            {"s": nn.ModuleDict({"ppl": TokenPerplexity(), "mean": BatchMeanPerplexity()})}
        )

    def kfac_step(self, *args, **kwargs):
        raise NotImplementedError

    def make_metrics(self, eval_set: EvalSet):
        raise NotImplementedError

    def evaluate_batch(self, *args, **kwargs):
        raise NotImplementedError

    def compute_metrics(self, eval_set: EvalSet):
        raise NotImplementedError

    def export(self, path):
        raise NotImplementedError


def _state_dtypes(module):
    metrics = module.eval_metrics["s"]
    return {f"{k}.{n}": getattr(m, n).dtype for k, m in metrics.items() for n in m._defaults}


def test_bf16_true_conversion_keeps_metric_states_float64():
    module = WithMetrics()
    before = _state_dtypes(module)
    assert set(before.values()) == {torch.float64}
    module.to(torch.bfloat16)  # what the bf16-true precision plugin does
    assert module.model.weight.dtype == torch.bfloat16
    assert _state_dtypes(module) == before
    metric = module.eval_metrics["s"]["mean"]
    metric.update(torch.tensor(1.0 + 1e-9, dtype=torch.float64), torch.tensor(3))
    assert metric.compute().dtype == torch.float64
    module.double().float()
    assert _state_dtypes(module) == before
