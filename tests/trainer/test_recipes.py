from __future__ import annotations

from pathlib import Path

import pytest

from midfill.api import RECIPE_NAMES, TrainingRun, load_file
from midfill.api.trainingrun import Architecture
from trainer.recipes import RECIPES, get_recipe

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "samples").glob("trainingrun*.yaml"))


def test_recipe_names_match_the_api():
    assert tuple(RECIPES) == RECIPE_NAMES


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_is_a_valid_decoder(name):
    r = get_recipe(name)
    assert r.hidden_size % r.num_heads == 0 and r.num_heads % r.num_kv_heads == 0
    assert r.max_position_embeddings >= 512


def test_debug_is_the_5m_model_of_cpu_notes():
    r = get_recipe("debug")
    assert (r.num_layers, r.hidden_size, r.num_heads, r.max_position_embeddings) == (4, 256, 4, 512)
    assert 5.0e6 < r.num_params(8192) < 5.6e6
    assert 6.3e9 < get_recipe("7b").num_params(51200) < 7.0e9


def test_overrides_apply_and_are_checked():
    r = get_recipe("debug").with_overrides(Architecture(num_layers=2, max_position_embeddings=1024))
    assert (r.num_layers, r.max_position_embeddings, r.hidden_size) == (2, 1024, 256)
    with pytest.raises(ValueError, match="numKvHeads"):
        get_recipe("debug").with_overrides(Architecture(num_kv_heads=3))
    with pytest.raises(ValueError, match="model.recipe"):
        get_recipe("13b")


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_runs_fit_their_recipe(path):
    (run,) = load_file(path)
    assert isinstance(run, TrainingRun)
    if run.spec.model.composition is not None:
        pytest.skip("composed models take their geometry from the parents, not a recipe")
    recipe = get_recipe(run.spec.model.recipe).with_overrides(run.spec.model.architecture)
    t = run.spec.training
    assert t.seq_length <= recipe.max_position_embeddings
    per_rank = t.global_batch_tokens // t.seq_length // run.spec.parallelism.world_size()
    assert per_rank >= t.micro_batch_size and per_rank % t.micro_batch_size == 0
