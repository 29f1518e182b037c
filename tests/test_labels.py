import numpy as np
import pytest

from autoannotator.core.labels import LabelSet, map_model_labels, project_columns
from autoannotator.errors import LabelMappingError

FIN = LabelSet.of(["bearish", "bullish", "neutral"])


def test_exact_names_ignore_case_and_punctuation():
    assert map_model_labels(["Neutral", "BULLISH", "bear-ish"], FIN) == [2, 1, 0]


def test_common_synonyms_map_sentiment_models_onto_finance_labels():
    assert map_model_labels(["NEG", "NEU", "POS"], FIN) == [0, 2, 1]
    assert map_model_labels(["negative", "neutral", "positive"], FIN) == [0, 2, 1]


def test_toxicity_synonyms():
    tox = LabelSet.of(["not-offensive", "offensive"])
    assert map_model_labels(["non-toxic", "toxic"], tox) == [0, 1]
    assert map_model_labels(["toxic", "nontoxic"], tox) == [1, 0]
    # A toxicity model whose harmless class is called "neutral" still maps onto a binary project.
    assert map_model_labels(["neutral", "toxic"], tox) == [0, 1]


def test_unmappable_model_is_refused_naming_the_missing_labels():
    with pytest.raises(LabelMappingError) as err:
        map_model_labels(["LABEL_0", "LABEL_1", "LABEL_2"], FIN)
    msg = str(err.value)
    assert "LABEL_0" in msg and "'bearish'" in msg and "explicit" in msg


def test_partial_mapping_names_only_what_is_missing():
    with pytest.raises(LabelMappingError) as err:
        map_model_labels(["negative", "positive"], FIN)
    assert "['neutral']" in str(err.value)


def test_explicit_mapping_wins_and_may_fold_labels():
    targets = map_model_labels(
        ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"],
        FIN,
        {"LABEL_0": "bearish", "LABEL_1": "neutral", "LABEL_2": "bullish", "LABEL_3": "bullish"},
    )
    assert targets == [0, 2, 1, 1]
    folded = project_columns(np.array([[0.1, 0.2, 0.3, 0.4]]), targets, 3)
    np.testing.assert_allclose(folded, [[0.1, 0.7, 0.2]])


def test_explicit_mapping_to_unknown_label_is_refused():
    with pytest.raises(LabelMappingError, match="not one of the project's labels"):
        map_model_labels(["a", "b", "c"], FIN, {"a": "positive"})
    with pytest.raises(LabelMappingError, match="does not output"):
        map_model_labels(["NEG", "NEU", "POS"], FIN, {"LABEL_9": "bearish"})


def test_two_model_labels_on_one_project_label_need_an_explicit_mapping():
    with pytest.raises(LabelMappingError, match="several model labels"):
        map_model_labels(["negative", "neg", "neutral", "positive"], FIN)


def test_label_set_validation_and_lookup():
    with pytest.raises(ValueError, match="at least two"):
        LabelSet.of(["only"])
    with pytest.raises(ValueError, match="unique"):
        LabelSet.of(["a", "a"])
    with pytest.raises(ValueError, match="non-empty"):
        LabelSet.of(["a", " "])
    with pytest.raises(LabelMappingError, match="unknown label 'positive'"):
        FIN.index("positive")
    assert FIN.match(" Bullish ") == "bullish"
    assert FIN.match("bullish or bearish") is None
