"""Planning the task-arithmetic family (merge_engine/methods/task_arithmetic.py): DELLA's keep probabilities,
density +- epsilon, must lie in (0, 1) for every expert of every tensor; values outside are refused by tensor
when planning, before any data is read (mergekit raises mid-merge)."""
import pytest

from merge_engine import parse_config
from merge_engine.errors import ConfigError
from merge_engine.plan import build_plan
from tests.conftest import assert_refused_when_planning

pytestmark = pytest.mark.slow  # generated checkpoints


def della(base, experts, density, epsilon):
    return parse_config({"merge_method": "della", "base_model": base, "dtype": "float32",
                         "models": [{"model": e, "parameters": {"weight": 0.5, "density": density, "epsilon": epsilon}}
                                    for e in experts]})


def test_della_probabilities_outside_the_unit_interval_are_refused_by_tensor(model_sets, tmp_path):
    base, *experts = model_sets("llama")
    assert_refused_when_planning(della(base, experts, 0.5, 0.6), tmp_path / "out",
                                 r"della needs 0 < density - epsilon and density \+ epsilon < 1 "
                                 r"\(density=0.5, epsilon=0.6\) \(tensor 'model.embed_tokens.weight'\)")


def test_only_the_layers_a_gradient_takes_outside_are_refused(model_sets):
    base, *experts = model_sets("llama")
    layers = len({n.split(".")[2] for n in build_plan(della(base, experts, 0.5, 0.1)).models[base].tensors
                  if n.startswith("model.layers.")})
    with pytest.raises(ConfigError) as refused:  # epsilon 0.1 in the first layer up to 0.5 in the last
        build_plan(della(base, experts, 0.5, [0.1, 0.5]))
    named = {p.split("(tensor '")[1].rstrip("')") for p in refused.value.problems}
    assert named and all(n.startswith(f"model.layers.{layers - 1}.") for n in named)


def test_density_one_keeps_everything_whatever_epsilon(model_sets):
    base, *experts = model_sets("llama")
    build_plan(della(base, experts, 1.0, 0.3))  # no draw: mergekit returns the task vector as it is
