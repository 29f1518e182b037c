import numpy as np
import pytest

from autoannotator.core.metrics import accuracy, macro_f1
from autoannotator.errors import BadInputError
from autoannotator.learning.datasets import read_jsonl


def test_reads_examples_with_stable_keys(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y", "extra": 1}\n')
    rows = read_jsonl(f)
    assert [(r.key, r.text, r.label) for r in rows] == [("data:1", "a", "x"), ("data:3", "b", "y")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "data.jsonl:2: not JSON"),
        ('["a"]', "data.jsonl:2: expected an object"),
        ('{"label": "x"}', "data.jsonl:2: field 'text' is missing or empty"),
        ('{"text": "  ", "label": "x"}', "data.jsonl:2: field 'text' is missing or empty"),
        ('{"text": "a", "label": 3}', "data.jsonl:2: field 'label'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n' + line + "\n")
    with pytest.raises(BadInputError, match=message):
        read_jsonl(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(BadInputError, match="holds no examples"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_accuracy_and_macro_f1_on_hand_computed_values():
    gold = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    assert accuracy(gold, pred) == pytest.approx(4 / 6)
    # per class F1: c0 = 2*1/(2+1+1) = .5, c1 = 2*2/(4+1+0) = .8, c2 = 2*1/(2+0+1) = 2/3
    assert macro_f1(gold, pred, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a label absent from gold and predictions does not count
    assert macro_f1(np.array([0, 1]), np.array([0, 1]), 5) == 1.0
    assert accuracy(np.array([]), np.array([])) == 0.0
    with pytest.raises(ValueError, match="shape"):
        accuracy(np.array([1]), np.array([1, 2]))
