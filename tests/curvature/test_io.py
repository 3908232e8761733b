"""Factor and eigen files: round trips, metadata, and every mismatch error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lightning_curv.curvature import (
    collect_factors,
    eigendecompose,
    load_eigens,
    load_factors,
    read_metadata,
    save_eigens,
    save_factors,
)
from tests.cases import LLAMA_MLP, lm_batch, tiny_gpt2, tiny_llama


@pytest.fixture()
def collected():
    model = tiny_llama()
    factors = collect_factors(model, [lm_batch()], LLAMA_MLP, fisher="true", seed=5)
    return model, factors


def test_factor_round_trip_and_metadata(tmp_path, collected):
    model, factors = collected
    path = tmp_path / "factors.safetensors"
    save_factors(factors, path, {"fisher": "true", "seed": 5}, model=model)
    loaded = load_factors(path, model=model)
    assert set(loaded) == set(factors)
    for name, f in factors.items():
        assert torch.equal(loaded[name].A, f.A) and torch.equal(loaded[name].G, f.G)
        assert loaded[name].num_samples == f.num_samples
    meta = read_metadata(path)
    assert meta["kind"] == "factors" and meta["fisher"] == "true" and meta["seed"] == 5
    assert meta["dtype"] == "float32" and meta["package_version"]
    assert meta["num_samples"] == next(iter(factors.values())).num_samples
    assert meta["modules"]["model.layers.0.mlp.up_proj"] == {
        "d_in": 16,
        "d_out": 24,
        "num_samples": meta["num_samples"],
    }
    assert set(meta["model"]) == {"class", "config_hash", "structure_hash", "weights_hash"}
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


def test_eigen_round_trip(tmp_path, collected):
    model, factors = collected
    eigens = {n: eigendecompose(f) for n, f in factors.items()}
    path = tmp_path / "eigen.safetensors"
    save_eigens(eigens, path, {"source": "factors.safetensors"}, model=model)
    loaded = load_eigens(path, model=model)
    for name, e in eigens.items():
        assert torch.equal(loaded[name].eigenvectors_G, e.eigenvectors_G)
        assert torch.equal(loaded[name].eigenvalues_A, e.eigenvalues_A)
    with pytest.raises(ValueError, match="holds 'eigen' data"):
        load_factors(path)


def test_factors_from_another_architecture_are_rejected(tmp_path, collected):
    model, factors = collected
    path = tmp_path / "f.safetensors"
    save_factors(factors, path, model=model)
    with pytest.raises(ValueError, match="which this model does not have"):
        load_factors(path, model=tiny_gpt2())


def test_factors_from_another_checkpoint_are_rejected(tmp_path, collected):
    model, factors = collected
    path = tmp_path / "f.safetensors"
    save_factors(factors, path, model=model)
    other = tiny_llama()  # same architecture, different random init
    other.load_state_dict(model.state_dict())
    load_factors(path, model=other)  # identical weights load fine
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="different checkpoint"):
        load_factors(path, model=other)


def test_factors_for_another_config_are_rejected(tmp_path, collected):
    model, factors = collected
    path = tmp_path / "f.safetensors"
    save_factors(factors, path, model=model)
    other = tiny_llama(vocab=80)  # same MLP shapes, different embedding
    with pytest.raises(ValueError, match="different (config|parameter names or shapes)"):
        load_factors(path, model=other)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="lightning_curv collect"):
        load_factors(tmp_path / "nope.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not written by lightning_curv"):
        load_factors(foreign)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_metadata(tmp_path / "garbage.safetensors")


def test_newer_format_is_rejected(tmp_path, collected):
    model, factors = collected
    path = tmp_path / "f.safetensors"
    save_factors(factors, path, {"format_version": 99})
    with pytest.raises(ValueError, match="newer than this package"):
        load_factors(path)


def test_nan_factors_are_not_written(tmp_path, collected):
    _, factors = collected
    name = next(iter(factors))
    factors[name].A[0, 0] = float("nan")
    path = tmp_path / "f.safetensors"
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_factors(factors, path)
    assert not path.exists() and not list(tmp_path.iterdir())
