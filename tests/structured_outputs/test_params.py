from __future__ import annotations

import pytest

from kvmem import SamplingParams, StructuredOutputsParams


def test_exactly_one_kind_is_set():
    with pytest.raises(ValueError, match="exactly one of .*none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one of .*regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one of .*json, json_object"):
        StructuredOutputsParams(json={"type": "object"}, json_object=True)
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    assert StructuredOutputsParams(regex="[0-9]+").kind == "regex"


@pytest.mark.parametrize("kwargs, match", [
    (dict(json="{not json"), "structured_outputs.json is not valid JSON"),
    (dict(json="[1, 2]"), "structured_outputs.json must be a JSON schema object"),
    (dict(json=5), "structured_outputs.json must be a JSON schema object"),
    (dict(regex=""), "structured_outputs.regex must be a non-empty string"),
    (dict(grammar=3), "structured_outputs.grammar must be a non-empty string"),
    (dict(choice=[]), "structured_outputs.choice must be a non-empty list"),
    (dict(choice=["a", 1]), "structured_outputs.choice must be a non-empty list"),
    (dict(choice="ab"), "structured_outputs.choice must be a non-empty list"),
    (dict(json_object="yes"), "structured_outputs.json_object must be a bool"),
    (dict(regex="a", disable_any_whitespace=1), "structured_outputs.disable_any_whitespace must be a bool"),
])
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kwargs)


def test_schema_text_and_dict_are_the_same_grammar_and_keep_key_order():
    a = StructuredOutputsParams(json='{"type": "object", "properties": {"b": {}, "a": {}}}')
    b = StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}})
    assert a.key == b.key
    assert a.key.spec.index('"b"') < a.key.spec.index('"a"')  # properties come out in this order
    assert StructuredOutputsParams(json_object=True, disable_any_whitespace=True).key.any_whitespace is False


def test_sampling_params_take_a_dict_and_refuse_min_tokens():
    params = SamplingParams(structured_outputs={"choice": ["yes", "no"]})
    assert isinstance(params.structured_outputs, StructuredOutputsParams)
    with pytest.raises(ValueError, match="structured_outputs: .*unexpected keyword argument 'guided_json'"):
        SamplingParams(structured_outputs={"guided_json": {}})
    with pytest.raises(ValueError, match="^structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs="json")
    with pytest.raises(ValueError, match="^min_tokens cannot be combined with structured_outputs"):
        SamplingParams(min_tokens=2, structured_outputs={"regex": "a+"})
