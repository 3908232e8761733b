"""NoisyLabelImageDataModule and flip_labels: determinism, exact noise, batch contract, sources, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lightning_curv.data.base import EvalSet
from lightning_curv.data.images import NoisyLabelImageDataModule, flip_labels

DIGITS_N = 1797
NORM_TOL = {"rtol": 0.0, "atol": 1e-4}  # mean/std of normalized training images vs 0/1
OFFSET_REL_TOL = 0.15  # per-offset count vs its expectation, 9 offsets x ~1100 draws
CLASSES = ("ant", "bee", "cat")
PIXEL_STEP = 60  # class c images have red value PIXEL_STEP * (c + 1): the label can be read off the image


# ----------------------------------------------------------------------------------------------------------
# flip_labels
# ----------------------------------------------------------------------------------------------------------


def _labels(n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def test_flip_labels_deterministic_in_seed():
    labels = _labels(500, 7)
    a, ia = flip_labels(labels, 7, 0.3, seed=11)
    b, ib = flip_labels(labels, 7, 0.3, seed=11)
    c, ic = flip_labels(labels, 7, 0.3, seed=12)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    assert not torch.equal(ia, ic)
    assert not torch.equal(a, c)


def test_flip_labels_ignores_global_rng():
    labels = _labels(200, 5)
    torch.manual_seed(1)
    a, _ = flip_labels(labels, 5, 0.5, seed=3)
    torch.manual_seed(2)
    b, _ = flip_labels(labels, 5, 0.5, seed=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize(("n", "fraction"), [(100, 0.2), (1797, 0.2), (37, 0.5), (10, 0.25), (999, 0.0), (50, 1.0)])
@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_flip_labels_exact_fraction_never_true_class(n, fraction, num_classes):
    labels = _labels(n, num_classes, seed=n)
    noisy, idx = flip_labels(labels, num_classes, fraction, seed=5)
    assert idx.numel() == round(fraction * n)
    assert noisy.dtype == torch.long and idx.dtype == torch.long and noisy.shape == labels.shape
    assert torch.equal(idx, idx.unique())  # sorted, no duplicates
    assert torch.equal(idx, (noisy != labels).nonzero().flatten())  # flipped exactly there, never to itself
    assert noisy.min() >= 0 and noisy.max() < num_classes
    assert torch.equal(labels, _labels(n, num_classes, seed=n))  # input not modified


def test_flip_labels_offsets_cover_all_classes():
    num_classes, n, fraction = 10, 20_000, 0.5
    labels = _labels(n, num_classes)
    noisy, idx = flip_labels(labels, num_classes, fraction, seed=0)
    offsets = (noisy[idx] - labels[idx]) % num_classes
    counts = torch.bincount(offsets, minlength=num_classes)
    assert counts[0] == 0
    assert (counts[1:] > 0).all(), counts
    expected = idx.numel() / (num_classes - 1)
    assert ((counts[1:] - expected).abs() / expected).max() < OFFSET_REL_TOL, counts


def test_flip_labels_two_classes_always_swaps():
    labels = _labels(300, 2)
    noisy, idx = flip_labels(labels, 2, 0.4, seed=1)
    assert torch.equal(noisy[idx], 1 - labels[idx])


@pytest.mark.parametrize(
    ("labels", "num_classes", "fraction", "match"),
    [
        (torch.tensor([0, 1, 2]), 3, -0.1, "fraction"),
        (torch.tensor([0, 1, 2]), 3, 1.5, "fraction"),
        (torch.tensor([0, 0, 0]), 1, 0.5, "at least 2"),
        (torch.tensor([0, 1, 3]), 3, 0.5, r"\[0, 3\)"),
        (torch.tensor([-1, 1, 2]), 3, 0.5, r"\[0, 3\)"),
        (torch.tensor([0.0, 1.0]), 3, 0.5, "integer"),
        (torch.tensor([[0, 1]]), 3, 0.5, "1-D"),
    ],
)
def test_flip_labels_errors(labels, num_classes, fraction, match):
    with pytest.raises(ValueError, match=match):
        flip_labels(labels, num_classes, fraction, seed=0)


# ----------------------------------------------------------------------------------------------------------
# Digits (offline default)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> NoisyLabelImageDataModule:
    dm = NoisyLabelImageDataModule(batch_size=32, eval_batch_size=50, seed=0)
    dm.setup("fit")
    return dm


def _all(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_digits_sizes_and_exact_noise(digits):
    num_val = round(0.2 * DIGITS_N)
    n_train = DIGITS_N - num_val
    assert digits.num_classes == 10 and digits.image_size == 8 and digits.in_chans == 1
    assert digits.true_train_labels.shape == (n_train,) and digits.noisy_train_labels.shape == (n_train,)
    assert digits.noisy_indices.numel() == round(0.2 * n_train)
    flipped = (digits.noisy_train_labels != digits.true_train_labels).nonzero().flatten()
    assert torch.equal(digits.noisy_indices, flipped)
    assert torch.equal(
        digits.clean_indices, (digits.noisy_train_labels == digits.true_train_labels).nonzero().flatten()
    )
    assert len(digits.val_dataloader()[0].dataset) == num_val
    # Every class is present in the training labels (the split is random, not a slice of a sorted set).
    assert torch.bincount(digits.true_train_labels, minlength=10).min() > 100


def test_selection_test_halves_disjoint_and_cover(digits):
    sel, test, noisy = digits.selection_indices, digits.test_indices, digits.noisy_indices
    assert abs(sel.numel() - test.numel()) <= 1
    assert not set(sel.tolist()) & set(test.tolist())
    assert torch.equal(torch.cat([sel, test]).sort().values, noisy)
    assert torch.equal(sel, sel.sort().values) and torch.equal(test, test.sort().values)
    # A random half, not the first half of the sorted noisy set.
    assert not torch.equal(sel, noisy[: sel.numel()])


def test_eval_sets_match_val_dataloader_order(digits):
    sets = digits.eval_sets
    assert [s.name for s in sets] == ["val", "train_clean", "noisy_selection", "noisy_test"]
    assert all(isinstance(s, EvalSet) for s in sets)
    assert [(s.kind, s.split, s.metric_name) for s in sets] == [
        ("classification", None, "val_acc"),
        ("classification", None, "train_clean_acc"),
        ("label_memorization", "selection", None),
        ("label_memorization", "test", None),
    ]
    loaders = digits.val_dataloader()
    assert len(loaders) == len(sets)
    val, clean, sel, test = (_all(loader) for loader in loaders)
    # Validation is clean; its index is the position in the validation set.
    assert torch.equal(val["labels"], val["true_labels"])
    assert torch.equal(val["index"], torch.arange(val["index"].numel()))
    # train_clean: exactly the unflipped training examples, by training-set index.
    assert torch.equal(clean["index"], digits.clean_indices)
    assert torch.equal(clean["labels"], clean["true_labels"])
    # The memorization halves: flipped examples with their flipped and original labels.
    for batch, expected in ((sel, digits.selection_indices), (test, digits.test_indices)):
        assert torch.equal(batch["index"], expected)
        assert torch.equal(batch["labels"], digits.noisy_train_labels[expected])
        assert torch.equal(batch["true_labels"], digits.true_train_labels[expected])
        assert (batch["labels"] != batch["true_labels"]).all()
    # test_dataloader mirrors val_dataloader.
    for a, b in zip(loaders, digits.test_dataloader(), strict=True):
        assert_close(_all(a)["pixel_values"], _all(b)["pixel_values"], rtol=0, atol=0)


def test_batches_carry_the_contract(digits):
    loaders = {"train": digits.train_dataloader(), "collect": digits.collect_dataloader()}
    loaders.update({s.name: loader for s, loader in zip(digits.eval_sets, digits.val_dataloader(), strict=True)})
    for name, loader in loaders.items():
        batch = next(iter(loader))
        assert set(batch) == {"pixel_values", "labels", "true_labels", "index"}, name
        size = batch["index"].shape[0]
        assert size == loader.batch_size, name
        assert batch["pixel_values"].shape == (size, 1, 8, 8) and batch["pixel_values"].dtype == torch.float32
        for key in ("labels", "true_labels", "index"):
            assert batch[key].shape == (size,) and batch[key].dtype == torch.long, (name, key)


def test_collect_loader_is_ordered_noisy_training_set(digits):
    first, second = _all(digits.collect_dataloader()), _all(digits.collect_dataloader())
    n_train = digits.noisy_train_labels.numel()
    assert torch.equal(first["index"], torch.arange(n_train))
    assert torch.equal(first["labels"], digits.noisy_train_labels)
    assert torch.equal(first["true_labels"], digits.true_train_labels)
    assert_close(first["pixel_values"], second["pixel_values"], rtol=0, atol=0)


def test_train_loader_shuffles_same_examples(digits):
    torch.manual_seed(0)
    train = _all(digits.train_dataloader())
    collect = _all(digits.collect_dataloader())
    assert not torch.equal(train["index"], collect["index"])
    order = train["index"].argsort()
    assert torch.equal(train["index"][order], collect["index"])
    assert torch.equal(train["labels"][order], collect["labels"])
    assert_close(train["pixel_values"][order], collect["pixel_values"], rtol=0, atol=0)  # no augmentation


def test_digits_normalized_on_train_split(digits):
    pixels = _all(digits.collect_dataloader())["pixel_values"]
    assert_close(pixels.mean(), torch.tensor(0.0), **NORM_TOL)
    assert_close(pixels.std(unbiased=False), torch.tensor(1.0), **NORM_TOL)
    mean, std = digits.normalization
    assert mean.shape == (1,) and 0.2 < mean.item() < 0.4  # digits pixels are mostly dark, scaled to [0, 1]


def test_setup_is_deterministic_and_seeded():
    a = NoisyLabelImageDataModule(seed=3, normalize=False)
    b = NoisyLabelImageDataModule(seed=3, normalize=False)
    c = NoisyLabelImageDataModule(seed=4, normalize=False)
    for dm in (a, b, c):
        dm.setup()
    for attr in (
        "noisy_indices",
        "selection_indices",
        "test_indices",
        "noisy_train_labels",
        "true_train_labels",
    ):
        assert torch.equal(getattr(a, attr), getattr(b, attr)), attr
    assert not torch.equal(a.noisy_indices, c.noisy_indices)
    assert_close(_all(a.collect_dataloader())["pixel_values"], _all(b.collect_dataloader())["pixel_values"])
    pixels = _all(a.collect_dataloader())["pixel_values"]
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.max() == 1  # 0..16 scaled to [0, 1]


def test_upscaled_rgb_digits_with_given_normalization():
    dm = NoisyLabelImageDataModule(image_size=16, in_chans=3, mean=[0.5], std=[0.25], batch_size=8)
    dm.setup()
    batch = next(iter(dm.collect_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 16, 16)
    assert dm.image_size == 16 and dm.in_chans == 3
    raw = batch["pixel_values"] * 0.25 + 0.5
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    assert_close(batch["pixel_values"][:, 0], batch["pixel_values"][:, 2])  # grey repeated over channels
    mean, std = dm.normalization
    assert_close(mean, torch.full((3,), 0.5)) and assert_close(std, torch.full((3,), 0.25))


def test_limit_train_and_zero_noise():
    dm = NoisyLabelImageDataModule(limit_train=100, noise_fraction=0.3)
    dm.setup()
    assert dm.noisy_train_labels.numel() == 100 and dm.noisy_indices.numel() == 30
    assert len(dm.val_dataloader()[0].dataset) == round(0.2 * DIGITS_N)  # validation is not limited
    clean = NoisyLabelImageDataModule(noise_fraction=0.0)
    clean.setup()
    assert clean.noisy_indices.numel() == 0
    assert torch.equal(clean.noisy_train_labels, clean.true_train_labels)
    assert [len(loader.dataset) for loader in clean.val_dataloader()][2:] == [0, 0]


def test_augmentation_only_on_train_loader():
    dm = NoisyLabelImageDataModule(augment=True, normalize=False)
    dm.setup()
    assert dm.hflip is False  # flipping digits changes their meaning
    torch.manual_seed(0)
    train = _all(dm.train_dataloader())
    collect = _all(dm.collect_dataloader())
    order = train["index"].argsort()
    augmented = train["pixel_values"][order]
    assert augmented.shape == collect["pixel_values"].shape
    assert not torch.equal(augmented, collect["pixel_values"])
    assert_close(_all(dm.collect_dataloader())["pixel_values"], collect["pixel_values"], rtol=0, atol=0)
    assert_close(_all(dm.val_dataloader()[1])["pixel_values"], collect["pixel_values"][dm.clean_indices])


def test_datasets_pickle_for_worker_processes(digits):
    for dataset in (digits.train_dataloader().dataset, digits.val_dataloader()[2].dataset):
        clone = pickle.loads(pickle.dumps(dataset))
        assert_close(clone[3]["pixel_values"], dataset[3]["pixel_values"])


def test_properties_need_setup():
    dm = NoisyLabelImageDataModule()
    assert dm.num_classes == 10 and dm.image_size == 8 and dm.in_chans == 1  # linkable before setup
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.noisy_indices
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


# ----------------------------------------------------------------------------------------------------------
# Image folders on disk: datasets `imagefolder` and torchvision `ImageFolder`
# ----------------------------------------------------------------------------------------------------------


def _write_images(root: Path, classes=CLASSES, per_class: int = 4, size: tuple[int, int] = (6, 6)) -> None:
    """PNGs under root/<class>/; class c has red value PIXEL_STEP * (c + 1) so labels can be checked."""
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = torch.zeros(size[1], size[0], 3, dtype=torch.uint8)
            pixels[..., 0] = PIXEL_STEP * (CLASSES.index(name) + 1)
            pixels[..., 1] = 10 * i
            Image.fromarray(pixels.numpy()).save(root / name / f"{c}_{i}.png")


def _check_red_encodes_label(batch: dict[str, torch.Tensor]) -> None:
    red = batch["pixel_values"][:, 0].mean(dim=(1, 2)) * 255  # normalize=False: values in [0, 1]
    assert_close(red, PIXEL_STEP * (batch["true_labels"] + 1).float(), rtol=0, atol=1e-3)


def test_hf_imagefolder_source(tmp_path):
    _write_images(tmp_path / "data" / "train", per_class=8)
    _write_images(tmp_path / "data" / "test", per_class=2)
    dm = NoisyLabelImageDataModule(
        source="hf",
        path=str(tmp_path / "data"),
        val_split="test",
        cache_dir=str(tmp_path / "cache"),
        noise_fraction=0.25,
        normalize=False,
        batch_size=4,
    )
    dm.prepare_data()
    assert dm.num_classes == 3 and dm.image_size == 6 and dm.in_chans == 3
    dm.setup()
    assert dm.noisy_train_labels.numel() == 24 and dm.noisy_indices.numel() == 6
    val = _all(dm.val_dataloader()[0])
    assert val["index"].numel() == 6 and torch.equal(val["labels"], val["true_labels"])
    _check_red_encodes_label(val)
    collect = _all(dm.collect_dataloader())
    assert collect["pixel_values"].shape == (24, 3, 6, 6)
    _check_red_encodes_label(collect)
    assert torch.equal(collect["labels"], dm.noisy_train_labels)
    assert (collect["labels"] != collect["true_labels"]).sum() == 6


def test_hf_source_grayscale_resized_with_carved_validation(tmp_path):
    _write_images(tmp_path / "flat", per_class=5)
    dm = NoisyLabelImageDataModule(
        source="hf", path=str(tmp_path / "flat"), cache_dir=str(tmp_path / "cache"), image_size=12, in_chans=1
    )
    dm.setup()
    batch = next(iter(dm.collect_dataloader()))
    assert batch["pixel_values"].shape[1:] == (1, 12, 12)
    assert len(dm.val_dataloader()[0].dataset) == round(0.2 * 15)
    assert dm.noisy_train_labels.numel() == 12


def test_torchvision_folder_source(tmp_path):
    _write_images(tmp_path / "imgs", per_class=6)
    dm = NoisyLabelImageDataModule(
        source="folder", path=str(tmp_path / "imgs"), val_fraction=1 / 3, normalize=False, batch_size=5
    )
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 3 and dm.image_size == 6 and dm.in_chans == 3
    assert dm.noisy_train_labels.numel() == 12 and dm.noisy_indices.numel() == round(0.2 * 12)
    for loader in [dm.collect_dataloader(), *dm.val_dataloader()]:
        batch = _all(loader)
        assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape[1:] == (3, 6, 6)
        _check_red_encodes_label(batch)


def test_torchvision_folder_split_subdirs_map_classes_by_name(tmp_path):
    _write_images(tmp_path / "root" / "train", per_class=4)
    _write_images(tmp_path / "root" / "val", classes=("bee", "cat"), per_class=2)  # no "ant": indices shift
    dm = NoisyLabelImageDataModule(
        source="folder", path=str(tmp_path / "root"), train_split="train", val_split="val", normalize=False
    )
    dm.setup()
    val = _all(dm.val_dataloader()[0])
    assert sorted(val["true_labels"].tolist()) == [1, 1, 2, 2]
    _check_red_encodes_label(val)


def test_non_square_images_need_image_size(tmp_path):
    _write_images(tmp_path / "imgs", per_class=3, size=(8, 4))
    dm = NoisyLabelImageDataModule(source="folder", path=str(tmp_path / "imgs"))
    with pytest.raises(ValueError, match="not square"):
        _ = dm.image_size
    resized = NoisyLabelImageDataModule(source="folder", path=str(tmp_path / "imgs"), image_size=5)
    resized.setup()
    assert next(iter(resized.collect_dataloader()))["pixel_values"].shape[1:] == (3, 5, 5)


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_noise_fraction_outside_range(fraction):
    with pytest.raises(ValueError, match=r"noise_fraction must be in \[0, 1\)"):
        NoisyLabelImageDataModule(noise_fraction=fraction)


def test_unknown_source():
    with pytest.raises(ValueError, match="Unknown source 'cifar'"):
        NoisyLabelImageDataModule(source="cifar")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "folder"}, "needs a path"),
        ({"val_split": "test"}, "no named splits"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"in_chans": 2}, "in_chans"),
        ({"mean": [0.5]}, "both mean and std"),
        ({"mean": [0.5, 0.5], "std": [1.0, 1.0]}, "1 or 1 values"),
        ({"batch_size": 0}, "Batch sizes"),
        ({"limit_train": 0}, "limit_train"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoisyLabelImageDataModule(**kwargs)


def test_missing_folder_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    dm = NoisyLabelImageDataModule(source="folder", path=str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dm.setup()
    hf = NoisyLabelImageDataModule(source="hf", path=str(missing), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf.prepare_data()


def test_missing_split_subdir_names_path(tmp_path):
    _write_images(tmp_path / "root" / "train", per_class=2)
    dm = NoisyLabelImageDataModule(source="folder", path=str(tmp_path / "root"), train_split="train", val_split="val")
    with pytest.raises(FileNotFoundError, match="val"):
        dm.setup()


def test_fewer_than_two_classes(tmp_path):
    _write_images(tmp_path / "one", classes=("ant",), per_class=4)
    dm = NoisyLabelImageDataModule(source="folder", path=str(tmp_path / "one"))
    with pytest.raises(ValueError, match="at least 2"):
        dm.setup()
    # datasets drops the label column of a single-class imagefolder: the error says so.
    hf = NoisyLabelImageDataModule(source="hf", path=str(tmp_path / "one"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="single class directory"):
        hf.setup()


def test_hf_plain_integer_labels(tmp_path):
    """A parquet dataset whose label column is a plain integer: classes are counted from the values."""
    import datasets
    from PIL import Image

    def write(directory: Path, labels: list[int]) -> None:
        images = [Image.new("RGB", (4, 4), (PIXEL_STEP * (y + 1), 0, 0)) for y in labels]
        features = datasets.Features({"img": datasets.Image(), "target": datasets.Value("int64")})
        directory.mkdir(parents=True)
        datasets.Dataset.from_dict({"img": images, "target": labels}, features=features).to_parquet(
            str(directory / "train.parquet")
        )

    write(tmp_path / "multi", [0, 1, 2, 3] * 5)
    dm = NoisyLabelImageDataModule(
        source="hf", path=str(tmp_path / "multi"), cache_dir=str(tmp_path / "c"), normalize=False
    )
    assert dm.num_classes == 4 and dm.image_size == 4
    dm.setup()
    _check_red_encodes_label(_all(dm.collect_dataloader()))
    write(tmp_path / "single", [0] * 6)
    single = NoisyLabelImageDataModule(source="hf", path=str(tmp_path / "single"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="at least 2"):
        single.setup()


def test_hf_unknown_split(tmp_path):
    _write_images(tmp_path / "flat", per_class=2)
    dm = NoisyLabelImageDataModule(
        source="hf", path=str(tmp_path / "flat"), val_split="validation", cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(ValueError, match="'validation' not in dataset"):
        dm.setup()
