import pytest
from hypothesis import given
from hypothesis import strategies as st

from moecomp.errors import ConfigError
from moecomp.plan import CompressionPlan, LayerPlan

layer = st.builds(LayerPlan, sparsity=st.floats(0, 0.999), bits=st.integers(1, 8),
                  quantizer=st.sampled_from(["uniform", "kmeans"]))


@given(st.dictionaries(st.text(min_size=1, max_size=12), layer, min_size=1, max_size=6))
def test_json_round_trip(layers):
    plan = CompressionPlan(layers=layers)
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan
    assert list(again.layers) == list(plan.layers)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["layers"]["fc1"].update(sparsity=1.0), "plan.layers.fc1.sparsity"),
        (lambda d: d["layers"]["fc1"].update(bits=0), "plan.layers.fc1.bits"),
        (lambda d: d["layers"]["fc1"].update(bits=2.5), "plan.layers.fc1.bits"),
        (lambda d: d["layers"]["fc1"].update(quantizer="lloyd"), "plan.layers.fc1.quantizer"),
        (lambda d: d["layers"]["fc1"].update(colour=1), "plan.layers.fc1.colour"),
        (lambda d: d["layers"]["fc1"].pop("sparsity"), "plan.layers.fc1.sparsity"),
        (lambda d: d.update(format=99), "plan.format"),
        (lambda d: d.update(extra=1), "plan.extra"),
        (lambda d: d.update(layers={}), "plan.layers"),
        (lambda d: d["layers"]["fc1"].update(quantizer="shared"), "plan.shared_k"),
        (lambda d: d.update(shared_k=1), "plan.shared_k"),
    ],
)
def test_bad_plans_name_the_field(mutate, field):
    d = CompressionPlan.uniform(["fc1", "fc2"], sparsity=0.5, bits=4).to_dict()
    mutate(d)
    with pytest.raises(ConfigError) as err:
        CompressionPlan.from_dict(d)
    assert err.value.field == field


def test_not_json():
    with pytest.raises(ConfigError, match="not valid JSON"):
        CompressionPlan.from_json("{nope")
