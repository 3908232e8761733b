"""Example-tied dropout: fixed channels always on, per-example channels from the index, dropped at test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lightning_curv.baselines import ExampleTiedDropout
from tests.cases import tiny_vit

P_FIXED, P_MEM = 0.25, 0.5
LAYERS = ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
D_HIDDEN = 64  # tiny_vit: embed_dim 16, mlp_ratio 4
N_FIXED = 16  # round(0.25 * 64)
N_MEM = 24  # round(0.5 * (64 - 16))
#: Hidden activations scaled by the hook vs. the same float32 product by hand.
SCALED = {"rtol": 1e-6, "atol": 1e-7}


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


class _Capture:
    """fc2 inputs before (``raw``) and after (``masked``) the dropout hook per layer, [B, tokens, d]."""

    def __init__(self, model):
        self.raw, self.masked, self.handles = {}, {}, []
        modules = dict(model.named_modules())
        for name in LAYERS:

            def pre(module, args, name=name):
                self.raw[name] = args[0].detach().clone()

            def post(module, args, output, name=name):
                self.masked[name] = args[0].detach().clone()

            self.handles.append(modules[name].register_forward_pre_hook(pre, prepend=True))
            self.handles.append(modules[name].register_forward_hook(post))

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def vit():
    torch.manual_seed(0)
    model = tiny_vit()
    etd = ExampleTiedDropout.install(model, "blocks.*.mlp", P_FIXED, P_MEM, seed=3, rescale=False)
    capture = _Capture(model)
    yield model, etd, capture
    capture.remove()
    etd.remove()


def test_layers_and_counts(vit):
    _, etd, _ = vit
    assert etd.layers == LAYERS
    for layer in LAYERS:
        assert etd.num_channels(layer) == D_HIDDEN
        assert (etd.num_fixed(layer), etd.num_mem(layer)) == (N_FIXED, N_MEM)
        assert etd.fixed_channels(layer).tolist() == list(range(N_FIXED))


def test_test_time_drops_exactly_the_memorization_channels(vit):
    model, etd, capture = vit
    model.eval()  # "auto" mode -> "drop"; no indices needed
    model(_images(3))
    for layer in LAYERS:
        raw, masked = capture.raw[layer], capture.masked[layer]  # [B, tokens, d]
        assert torch.equal(masked[..., :N_FIXED], raw[..., :N_FIXED]), "fixed channels pass unchanged"
        assert bool((masked[..., N_FIXED:] == 0).all()), "every memorization channel is dropped"
        assert bool((raw[..., N_FIXED:] != 0).all()), "(they were active before the hook)"


def test_test_time_rescale_matches_the_training_channel_count():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    capture = _Capture(model)
    with ExampleTiedDropout.install(model, "blocks.*.mlp", P_FIXED, P_MEM) as etd:
        assert etd.rescale
        model(_images(2))
        for layer in LAYERS:
            raw, masked = capture.raw[layer], capture.masked[layer]
            assert_close(masked[..., :N_FIXED], raw[..., :N_FIXED] * (N_FIXED + N_MEM) / N_FIXED, **SCALED)
            assert bool((masked[..., N_FIXED:] == 0).all())
    capture.remove()


def test_training_keeps_fixed_channels_and_each_examples_own_channels(vit):
    model, etd, capture = vit
    model.train()
    index = torch.tensor([7, 3, 12, 7])
    with etd.indices(index):
        model(_images(4))
    for layer in LAYERS:
        raw, masked = capture.raw[layer], capture.masked[layer]
        assert torch.equal(masked[..., :N_FIXED], raw[..., :N_FIXED]), "fixed channels are always on"
        channels = etd.memorization_channels(layer, index)  # [B, n_mem]
        assert channels.shape == (4, N_MEM)
        for row in range(4):
            active = (masked[row] != 0).all(dim=0)  # [d]: channel on for every token of the image
            silent = (masked[row] == 0).all(dim=0)
            assert bool((active | silent).all()), "a channel is on or off for a whole image"
            on = active.nonzero().flatten()
            assert on.tolist() == list(range(N_FIXED)) + channels[row].tolist()
            # p_mem of the memorization channels, exactly.
            assert int(active[N_FIXED:].sum()) == N_MEM == round(P_MEM * (D_HIDDEN - N_FIXED))
            assert torch.equal(masked[row][:, on], raw[row][:, on]), "active channels pass unchanged"
        assert torch.equal(channels[0], channels[3]), "same index, same channels"
        assert len({tuple(c.tolist()) for c in channels[:3]}) == 3, "different examples, different channels"
    assert not torch.equal(*(etd.memorization_channels(layer, index[:1]) for layer in LAYERS)), "per-layer subsets"


def test_channels_depend_only_on_index_and_seed():
    model = tiny_vit()
    a = ExampleTiedDropout.install(model, "blocks.*.mlp", P_FIXED, P_MEM, seed=3)
    b = ExampleTiedDropout.install(tiny_vit(), ["blocks.0.mlp", "blocks.1.mlp"], P_FIXED, P_MEM, seed=3)
    c = ExampleTiedDropout.install(model, "blocks.*.mlp", P_FIXED, P_MEM, seed=4)
    layer = LAYERS[1]
    batch = torch.arange(50)
    full = a.memorization_channels(layer, batch)
    # Batching and position do not matter; another model instance with the same arguments agrees.
    assert torch.equal(a.memorization_channels(layer, batch[30:40].flip(0)), full[30:40].flip(0))
    assert torch.equal(b.memorization_channels(layer, batch), full)
    assert not torch.equal(c.memorization_channels(layer, batch), full), "the seed changes the subsets"
    # Over many examples every memorization channel is used, at rate p_mem, and no fixed channel appears.
    counts = torch.bincount(full.flatten(), minlength=D_HIDDEN)
    assert int(counts[:N_FIXED].sum()) == 0 and bool((counts[N_FIXED:] > 0).all())
    assert counts[N_FIXED:].sum().item() == 50 * N_MEM
    for etd in (a, b, c):
        etd.remove()


def test_dropped_channels_get_no_gradient():
    torch.manual_seed(0)
    model = tiny_vit().train()
    etd = ExampleTiedDropout.install(model, "blocks.0.mlp", P_FIXED, P_MEM, seed=1)
    index = torch.tensor([11])
    with etd.indices(index):
        F.cross_entropy(model(_images(1)), torch.tensor([2])).backward()
    fc1_grad = model.blocks[0].mlp.fc1.weight.grad  # [d_hidden, embed]: row c feeds hidden channel c
    on = torch.zeros(D_HIDDEN, dtype=torch.bool)
    on[:N_FIXED] = True
    on[etd.memorization_channels("blocks.0.mlp.fc2", index)[0]] = True
    assert bool((fc1_grad[~on] == 0).all()) and bool((fc1_grad[on].abs().sum(dim=1) > 0).all())
    etd.remove()


def test_average_mode_and_remove_restore_behaviour(vit):
    model, etd, capture = vit
    model.eval()
    x = _images(2)
    etd.mode = "average"
    model(x)
    for layer in LAYERS:
        raw, masked = capture.raw[layer], capture.masked[layer]
        assert torch.equal(masked[..., :N_FIXED], raw[..., :N_FIXED])
        assert_close(masked[..., N_FIXED:], raw[..., N_FIXED:] * (N_MEM / (D_HIDDEN - N_FIXED)), **SCALED)
    etd.remove()
    etd.remove()  # idempotent
    model(x)
    for layer in LAYERS:
        assert torch.equal(capture.masked[layer], capture.raw[layer]), "no hook left"


def test_training_forward_needs_matching_indices(vit):
    model, etd, _ = vit
    model.train()
    with pytest.raises(RuntimeError, match="no batch indices"):
        model(_images(2))
    with etd.indices(torch.tensor([1, 2, 3])), pytest.raises(RuntimeError, match="3 batch indices"):
        model(_images(2))
    etd.set_indices(torch.tensor([4, 5]))
    model(_images(2))
    etd.set_indices(None)
    with pytest.raises(ValueError, match="mode must be"):
        etd.mode = "test"


@pytest.mark.parametrize(
    ("p_fixed", "p_mem", "error"),
    [(0.0, 0.1, "p_fixed"), (1.2, 0.1, "p_fixed"), (0.2, -0.1, "p_mem"), (0.001, 0.1, "no fixed channel")],
)
def test_bad_fractions(p_fixed, p_mem, error):
    with pytest.raises(ValueError, match=error):
        ExampleTiedDropout.install(tiny_vit(), "blocks.*.mlp", p_fixed, p_mem)


def test_pattern_without_mlp_raises():
    with pytest.raises(ValueError, match="matches no MLP block"):
        ExampleTiedDropout.install(tiny_vit(), "blocks.*.attn.q_norm", P_FIXED, P_MEM)


class _BatchModule(torch.nn.Module):
    """A LightningModule-like wrapper: backbone in ``.model``, ``forward`` takes the batch dict."""

    def __init__(self, model=None):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(batch["pixel_values"])


def test_add_example_tied_dropout_wires_a_module_from_outside():
    from lightning_curv.baselines import add_example_tied_dropout

    torch.manual_seed(0)
    lazy = _BatchModule()
    wiring = add_example_tied_dropout(lazy, P_FIXED, P_MEM, seed=3)
    assert wiring.etd is None  # the backbone does not exist yet
    with pytest.raises(RuntimeError, match="not built"):
        lazy({"pixel_values": _images(2)})
    wiring.remove()

    backbone = tiny_vit()
    module = _BatchModule(backbone).train()
    wiring = add_example_tied_dropout(module, P_FIXED, P_MEM, seed=3)
    assert wiring.etd is not None and wiring.etd.layers == LAYERS
    images, index = _images(4), torch.tensor([5, 1, 9, 2])
    with torch.no_grad():
        wired = module({"pixel_values": images, "index": index})
        with wiring.etd.indices(index):  # the same forward with indices set by hand
            by_hand = backbone(images)
    assert_close(wired, by_hand, rtol=0, atol=0)
    assert wiring.etd._index is None, "indices are cleared after each forward"
    wiring.remove()
    with torch.no_grad():
        backbone(images)  # no hooks left: a training-mode forward without indices works
    with pytest.raises(ValueError, match="p_fixed"):
        add_example_tied_dropout(module, 0.0, P_MEM)


def test_untrained_copy_keeps_the_architecture_and_drops_the_weights():
    from lightning_curv.baselines import untrained_copy
    from lightning_curv.models import LitViT

    base = LitViT(num_classes=3, img_size=8, patch_size=2, in_chans=1, model_kwargs={"embed_dim": 16, "depth": 1})
    base.hparams["checkpoint"] = "elsewhere.safetensors"
    copy = untrained_copy(base)
    assert type(copy) is LitViT and copy.model is None
    assert copy.hparams["checkpoint"] is None and copy.hparams["model_kwargs"] == base.hparams["model_kwargs"]
