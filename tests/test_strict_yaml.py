"""Hand-edited YAML (specs, server configs): a key written twice is refused, merges still work."""
import pytest
import yaml

from serving.strict_yaml import load_yaml, yaml_problem


def _problem(text: str) -> str:
    with pytest.raises(yaml.YAMLError) as err:
        load_yaml(text)
    return yaml_problem(err.value)


def test_a_section_written_twice_is_refused_naming_both_lines():
    # PyYAML keeps the later `train:` and drops num_epochs without a word
    text = "train:\n  num_epochs: 5\nmodel:\n  backbone: resnet50\ntrain:\n  optim:\n    base_lr: 0.01\n"
    assert yaml.safe_load(text)["train"] == {"optim": {"base_lr": 0.01}}
    assert _problem(text) == ("line 5, column 1: key 'train' appears twice in one mapping (first on line 1); "
                              "YAML would keep only the later value: merge the two")


def test_nested_and_flow_duplicates_and_equal_numbers_are_refused():
    assert "key 'base_lr' appears twice" in _problem("train:\n  optim:\n    base_lr: 1\n    momentum: 0.9\n    base_lr: 2\n")
    assert _problem("x: {a: 1, a: 1}").startswith("line 1, column 11: key 'a' appears twice")
    assert "key 1.0 appears twice" in _problem("1: a\n1.0: b\n")  # one key to Python, as to PyYAML


def test_what_safe_load_reads_is_read_the_same():
    text = "base: &b {lr: 1, wd: 2}\nrun:\n  <<: *b\n  lr: 3\nlist: [1, {a: 2}]\nsame_key_elsewhere: {lr: 4}\n"
    assert load_yaml(text) == yaml.safe_load(text) == {
        "base": {"lr": 1, "wd": 2}, "run": {"lr": 3, "wd": 2}, "list": [1, {"a": 2}], "same_key_elsewhere": {"lr": 4}}
    assert load_yaml("") is None
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):  # still safe: no Python objects
        load_yaml("!!python/object/apply:os.system ['true']")
