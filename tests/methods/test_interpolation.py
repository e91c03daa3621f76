"""Planning the weighted averages (merge_engine/methods/interpolation.py): weights that make every value of
a tensor a division by zero are refused by tensor before any data is read."""
import pytest

from merge_engine import parse_config
from merge_engine.errors import ConfigError
from merge_engine.plan import build_plan
from tests.conftest import assert_refused_when_planning

pytestmark = pytest.mark.slow  # generated checkpoints


def weighted(method, models, weights, **parameters):
    return {"merge_method": method, "dtype": "float32", **({"parameters": parameters} if parameters else {}),
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)]}


@pytest.mark.parametrize("method, weights, key", [
    ("linear", [0.0, 0.0], "normalize"),
    ("linear", [1.0, -1.0], "normalize"),
    ("linear", [0.1, 0.2, -0.3], "normalize"),  # zero in fp32, where the divisor is formed
    ("multislerp", [0.5, -0.5], "normalize_weights"),
])
def test_weights_summing_to_zero_are_refused_by_tensor(model_sets, tmp_path, method, weights, key):
    base, *experts = model_sets("llama")
    assert_refused_when_planning(parse_config(weighted(method, experts, weights)), tmp_path / "out",
                                 rf"merge method '{method}': the weights .* sum to 0 and {key}: true divides by "
                                 r"their sum.*\(tensor 'model.embed_tokens.weight'\)")
    build_plan(parse_config(weighted(method, experts, weights, **{key: False})))  # no division: merged


def test_only_the_tensors_whose_weights_cancel_are_named(model_sets):
    base, *experts = model_sets("llama")
    attention_cancels = [{"filter": "self_attn", "value": -1.0}, {"value": 1.0}]
    config = parse_config(weighted("linear", experts[:2], [1.0, attention_cancels]))
    with pytest.raises(ConfigError) as refused:
        build_plan(config)
    named = [p for p in refused.value.problems if "sum to 0" in p]
    attention = [n for n in build_plan(parse_config(weighted("linear", experts[:2], [1.0, 1.0]))).jobs
                 if "self_attn" in n.out_name]
    assert 0 < len(attention) < 50  # under the listing's cap: each one named
    assert len(named) == len(refused.value.problems) == len(attention)
    assert all("self_attn" in p for p in named)
