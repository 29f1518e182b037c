import math

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from autoannotator.errors import BadInputError, LabelMappingError, UnsupportedConfigError
from autoannotator.labelstudio.config import (
    PredictionValidator,
    ProjectConfig,
    TaskText,
    annotation_label,
    empty_prediction,
    extract_texts,
    parse_label_config,
    prediction,
)

SENTIMENT = """
<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single-radio" showInLine="true">
    <Choice value="Positive"/>
    <Choice value="Negative"/>
    <Choice value="Neutral"/>
  </Choices>
</View>"""

# Default choice mode, plus a second control (a free-text comment) that is not ours to answer.
TOXICITY = """
<View>
  <Header value="Is this comment toxic?"/>
  <Text name="comment" value="$text"/>
  <Choices name="toxicity" toName="comment">
    <Choice value="not-offensive"/>
    <Choice value="offensive"/>
  </Choices>
  <TextArea name="note" toName="comment" placeholder="Why?"/>
</View>"""

TWEETS = """
<View>
  <Text name="tw" value="$tweet"/>
  <View style="box-shadow: 2px 2px 5px #999">
    <Choices name="mood" toName="tw" choice="single">
      <Choice value="Très positif"/>
      <Choice value="Not sure"/>
      <Choice value="1 – low &amp; slow"/>
      <Choice value="Negative" alias="neg"/>
    </Choices>
  </View>
</View>"""


@pytest.fixture(scope="module")
def sentiment() -> ProjectConfig:
    return parse_label_config(SENTIMENT)


@pytest.fixture(scope="module")
def tweets() -> ProjectConfig:
    return parse_label_config(TWEETS)


# ---------------------------------------------------------------- parse_label_config


def test_sentiment_config(sentiment):
    assert (sentiment.from_name, sentiment.to_name, sentiment.text_field) == ("sentiment", "text", "text")
    assert sentiment.labels.names == ("Positive", "Negative", "Neutral")
    assert sentiment.xml == SENTIMENT


def test_binary_config_with_another_control_beside_it():
    cfg = parse_label_config(TOXICITY)
    assert (cfg.from_name, cfg.to_name, cfg.text_field) == ("toxicity", "comment", "text")
    assert cfg.labels.names == ("not-offensive", "offensive")


def test_unusual_labels_nested_view_tweet_field_and_alias(tweets):
    assert (tweets.from_name, tweets.to_name, tweets.text_field) == ("mood", "tw", "tweet")
    # The alias is what LS writes into results, so it is the label.
    assert tweets.labels.names == ("Très positif", "Not sure", "1 – low & slow", "neg")


def xml_with(choices: str, text: str = '<Text name="text" value="$text"/>') -> str:
    return f"<View>{text}{choices}</View>"


TWO = '<Choice value="A"/><Choice value="B"/>'

UNSUPPORTED = {
    "empty": ("", ["non-empty XML"]),
    "not xml": ("sentiment: [Positive, Negative]", ["not parseable XML"]),
    "unclosed": ("<View><Text name='t' value='$t'/>", ["not parseable XML", "Premature end"]),
    "ner": (
        xml_with('<Labels name="ner" toName="text"><Label value="PER"/><Label value="ORG"/></Labels>'),
        ["no <Choices>", "<Labels name='ner'>"],
    ),
    "image": (
        '<View><Image name="img" value="$image"/><RectangleLabels name="box" toName="img">'
        '<Label value="Cat"/></RectangleLabels></View>',
        ["no <Choices>", "<RectangleLabels name='box'>"],
    ),
    "choices on image": (
        f'<View><Image name="img" value="$image"/><Choices name="kind" toName="img">{TWO}</Choices></View>',
        ["attached to <Image name='img'>", "not a <Text>"],
    ),
    "multiple": (
        xml_with(f'<Choices name="topics" toName="text" choice="multiple">{TWO}</Choices>'),
        ['choice="multiple"', "only single choice"],
    ),
    "several": (
        xml_with(
            f'<Choices name="a" toName="text">{TWO}</Choices><Choices name="b" toName="text">{TWO}</Choices>'
        ),
        ["several <Choices> ['a', 'b']", "choose one by name"],
    ),
    "one choice": (
        xml_with('<Choices name="c" toName="text"><Choice value="Only"/></Choices>'),
        ["['Only']"],
    ),
    "duplicates": (
        xml_with(f'<Choices name="c" toName="text">{TWO}<Choice value="A"/></Choices>'),
        ["['A'] more than once"],
    ),
    "blank choice": (
        xml_with('<Choices name="c" toName="text"><Choice value="A"/><Choice value=" "/></Choices>'),
        ["non-empty strings"],
    ),
    "literal text": (
        xml_with(f'<Choices name="c" toName="text">{TWO}</Choices>', '<Text name="text" value="Hello"/>'),
        ['value="Hello"', '"$field"'],
    ),
    "url text": (
        xml_with(
            f'<Choices name="c" toName="text">{TWO}</Choices>',
            '<Text name="text" value="$u" valueType="url"/>',
        ),
        ["from a URL"],
    ),
    "dynamic": (xml_with('<Choices name="c" toName="text" value="$options"/>'), ["from task data"]),
    "per region": (
        xml_with(f'<Choices name="c" toName="text" perRegion="true">{TWO}</Choices>'),
        ["perRegion"],
    ),
    "dangling toName": (xml_with(f'<Choices name="c" toName="body">{TWO}</Choices>'), ['toName="body"']),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_unsupported_configs_say_what_is_wrong_and_what_works(kind):
    xml, fragments = UNSUPPORTED[kind]
    with pytest.raises(UnsupportedConfigError) as err:
        parse_label_config(xml)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg
    assert 'a <Text value="$field">' in msg  # every refusal shows a config that would work
    assert isinstance(err.value, ValueError)


def test_non_string_config_is_refused():
    with pytest.raises(UnsupportedConfigError, match="non-empty XML text, got None"):
        parse_label_config(None)  # type: ignore[arg-type]


def test_from_name_picks_one_of_several_choices():
    xml = xml_with(
        f'<Choices name="a" toName="text">{TWO}</Choices>'
        '<Choices name="b" toName="text"><Choice value="X"/><Choice value="Y"/></Choices>'
    )
    assert parse_label_config(xml, from_name="b").labels.names == ("X", "Y")
    with pytest.raises(UnsupportedConfigError, match=r"no <Choices> named 'c' .*\['a', 'b'\]"):
        parse_label_config(xml, from_name="c")


# ---------------------------------------------------------------- extract_texts


def test_extract_texts_keeps_order_and_names_each_problem(sentiment):
    tasks = [
        {"id": 1, "data": {"text": "Shares jump 5%"}},
        {"id": 2},
        {"id": 3, "data": {"tweet": "wrong field", "user": "x"}},
        {"id": 4, "data": {"text": 42}},
        {"id": 5, "data": {"text": None}},
        {"id": 6, "data": {"text": ["a", "b"]}},
        {"id": 7, "data": {"text": "  \n\t"}},
        {"id": 8, "data": "text"},
        "not a task",
        {"data": {"text": "no id yet"}},
        {"id": 11, "data": {"text": "é" * 50}},
    ]
    out = extract_texts(tasks, sentiment, max_chars=10)
    assert [t.task_id for t in out] == [1, 2, 3, 4, 5, 6, 7, 8, None, None, 11]
    assert out[0] == TaskText(1, "Shares jum", None, clipped=True)
    assert out[9] == TaskText(None, "no id yet", None, clipped=False)
    assert out[10].text == "é" * 10 and out[10].clipped and out[10].ok
    problems = {t.task_id: t.problem for t in out[1:8]}
    assert problems[2] == "task 2: 'data' must be an object, got nothing"
    assert problems[3] == "task 3: data has no field 'text' (it has ['tweet', 'user'])"
    assert problems[4] == "task 4: data['text'] is int 42, not text"
    assert problems[5] == "task 5: data['text'] is null, not text"
    assert problems[6] == "task 6: data['text'] is list, not text"
    assert problems[7] == "task 7: data['text'] is empty or only whitespace"
    assert problems[8] == "task 8: 'data' must be an object, got str"
    assert out[8].problem == "a task must be a JSON object, got str"
    assert all(t.text is None and not t.ok for t in out[1:9])


def test_extract_texts_reads_the_configured_field(tweets):
    out = extract_texts([{"id": 9, "data": {"tweet": "gm", "text": "not this"}}], tweets)
    assert out == [TaskText(9, "gm", None)]


def test_extract_texts_refuses_a_nonsense_limit(sentiment):
    with pytest.raises(BadInputError, match="max_chars must be at least 1, got 0"):
        extract_texts([], sentiment, max_chars=0)


# ---------------------------------------------------------------- prediction / empty_prediction


def test_prediction_round_trip_is_valid_for_the_sdk(sentiment, tweets):
    p = prediction(sentiment, "Negative", np.float32(0.71), "ens-3")
    assert p == {
        "result": [
            {
                "from_name": "sentiment",
                "to_name": "text",
                "type": "choices",
                "value": {"choices": ["Negative"]},
            }
        ],
        "score": pytest.approx(0.71),
        "model_version": "ens-3",
    }
    assert type(p["score"]) is float
    for cfg, label in [(sentiment, "Neutral"), (tweets, "Très positif"), (tweets, "neg")]:
        item = prediction(cfg, label, 0.5, "v1")
        assert LabelInterface(cfg.xml).validate_prediction(item, return_errors=True) == []
        assert PredictionValidator(cfg).validate(item) == []


def test_prediction_score_is_clipped_only_for_float_noise(sentiment):
    assert prediction(sentiment, "Positive", 1.0000001, "v")["score"] == 1.0
    assert prediction(sentiment, "Positive", -1e-9, "v")["score"] == 0.0
    assert prediction(sentiment, "Positive", 1, "v")["score"] == 1.0
    for bad, msg in [
        (1.5, "in \\[0, 1\\], got 1.5"),
        (math.nan, "finite number, got nan"),
        (True, "got True"),
    ]:
        with pytest.raises(BadInputError, match=msg):
            prediction(sentiment, "Positive", bad, "v")


def test_prediction_refuses_unknown_labels_and_bad_model_versions(sentiment):
    with pytest.raises(LabelMappingError, match=r"'positive'.*'Positive', 'Negative', 'Neutral'"):
        prediction(sentiment, "positive", 0.9, "v")
    for version in [3, "", "  ", None]:
        with pytest.raises(BadInputError, match=f"model_version must be a non-empty string, got {version!r}"):
            prediction(sentiment, "Positive", 0.9, version)  # type: ignore[arg-type]


def test_prediction_extra_adds_keys_but_never_replaces_ours(sentiment):
    p = prediction(sentiment, "Positive", 0.9, "v", extra={"cluster": 4})
    assert p["cluster"] == 4 and p["model_version"] == "v"
    with pytest.raises(BadInputError, match=r"\['model_version', 'score'\]"):
        prediction(sentiment, "Positive", 0.9, "v", extra={"score": 1.0, "model_version": "x"})


def test_empty_prediction_keeps_a_bad_tasks_place(sentiment):
    item = empty_prediction("ens-3")
    assert item == {"result": [], "score": 0.0, "model_version": "ens-3"}
    assert PredictionValidator(sentiment).validate(item) == []
    with pytest.raises(BadInputError, match="got 7"):
        empty_prediction(7)  # type: ignore[arg-type]


# ---------------------------------------------------------------- PredictionValidator


def region(from_name="sentiment", to_name="text", choices=("Positive",), type_="choices"):
    return {"from_name": from_name, "to_name": to_name, "type": type_, "value": {"choices": list(choices)}}


def item(*regions, score=0.5, model_version="v1"):
    return {"result": list(regions), "score": score, "model_version": model_version}


# What LabelInterface.validate_prediction (SDK 2.1.2) catches and misses: the docstring of
# PredictionValidator relies on this list, so a change in the SDK fails here first.
SDK_CATCHES = {
    "unknown from_name": item(region(from_name="mood")),
    "unknown to_name": item(region(to_name="body")),
    "wrong type": item(region(type_="labels")),
    "unknown choice": item(region(choices=["Bogus"])),
    "choices not a list": item({**region(), "value": {"choices": "Positive"}}),
    "score 3.5": item(region(), score=3.5),
    "score -0.1": item(region(), score=-0.1),
    "score nan": item(region(), score=math.nan),
    "score inf": item(region(), score=math.inf),
    "no result": {"score": 0.5, "model_version": "v"},
}
SDK_MISSES = {
    "empty choices": item(region(choices=[])),
    "two choices": item(region(choices=["Positive", "Negative"])),
    "two regions": item(region(), region(choices=["Neutral"])),
    "score string": item(region(), score="0.5"),
    "score bool": item(region(), score=True),
    "score null": item(region(), score=None),
    "int model_version": item(region(), model_version=3),
    "empty model_version": item(region(), model_version=""),
}


@pytest.mark.parametrize("case", list(SDK_CATCHES))
def test_measured_sdk_catches(sentiment, case):
    assert LabelInterface(sentiment.xml).validate_prediction(SDK_CATCHES[case], return_errors=True)


@pytest.mark.parametrize("case", list(SDK_MISSES))
def test_measured_sdk_misses_and_we_do_not(sentiment, case):
    bad = SDK_MISSES[case]
    assert LabelInterface(sentiment.xml).validate_prediction(bad, return_errors=True) == []
    assert PredictionValidator(sentiment).validate(bad)


def test_validator_rejects_what_ls_would_silently_store(sentiment):
    v = PredictionValidator(sentiment)
    assert v.validate(item(region())) == []
    assert v.validate(item(region(from_name="mood"))) == [
        "Region 0: 'from_name' 'mood' not found in configuration"
    ]
    [unknown] = v.validate(item(region(choices=["Bogus"])))
    assert "'Bogus'" in unknown and "'Positive', 'Negative', 'Neutral'" in unknown
    assert v.validate(item(region(), score=3.5)) == ["Score must be between 0.00 and 1.00 inclusive, got 3.5"]
    assert v.validate(item(region(), model_version=3)) == ["model_version must be a non-empty string, got 3"]
    assert v.validate(item(region(), score="0.5")) == ["score must be a number in [0, 1], got '0.5'"]
    assert v.validate(item(region(choices=[]))) == ["result[0] must choose exactly one label, got []"]
    assert v.validate(item(region(), region(choices=["Neutral"]))) == [
        "2 results for control 'sentiment'; a single choice needs one"
    ]
    assert v.validate(["not", "an", "item"]) == ["a prediction must be a JSON object, got list"]


def test_validator_rejects_a_result_for_another_control_of_the_config():
    cfg = parse_label_config(TOXICITY)
    note = {"from_name": "note", "to_name": "comment", "type": "textarea", "value": {"text": ["rude"]}}
    assert PredictionValidator(cfg).validate(item(note)) == ["result[0] is for 'note'; we predict 'toxicity'"]


def test_check_raises_with_every_problem_named(sentiment):
    v = PredictionValidator(sentiment)
    v.check(prediction(sentiment, "Neutral", 0.4, "v"))
    with pytest.raises(BadInputError) as err:
        v.check(item(region(choices=["Bogus"]), score=3.5, model_version=3))
    msg = str(err.value)
    assert msg.startswith("invalid prediction: ")
    assert "got 3.5" in msg and "'Bogus'" in msg and "model_version must be a non-empty string, got 3" in msg


# ---------------------------------------------------------------- annotation_label


def ls_annotation(result, was_cancelled=False):
    """The shape LS 1.23 sends in an ANNOTATION_CREATED webhook's "annotation"."""
    return {
        "id": 31,
        "result": result,
        "created_username": " admin@example.com, 1",
        "created_ago": "0 minutes",
        "completed_by": 1,
        "was_cancelled": was_cancelled,
        "ground_truth": False,
        "created_at": "2025-11-23T08:40:12.511204Z",
        "updated_at": "2025-11-23T08:40:12.511225Z",
        "draft_created_at": None,
        "lead_time": 4.217,
        "import_id": None,
        "last_action": None,
        "bulk_created": False,
        "task": 12,
        "project": 3,
        "updated_by": 1,
        "parent_prediction": 57,
        "parent_annotation": None,
        "last_created_by": None,
    }


def ls_region(from_name, to_name, type_, value):
    return {"value": value, "id": "Xk3_9aQ1", "from_name": from_name, "to_name": to_name, "type": type_}


def test_annotation_label_reads_the_human_choice():
    cfg = parse_label_config(TOXICITY)
    note = ls_region("note", "comment", "textarea", {"text": ["slur in line 2"]})
    chosen = ls_region("toxicity", "comment", "choices", {"choices": ["offensive"]})
    assert annotation_label(ls_annotation([note, {**chosen, "origin": "manual"}]), cfg) == "offensive"


def test_annotation_label_alias(tweets):
    chosen = ls_region("mood", "tw", "choices", {"choices": ["neg"]})
    assert annotation_label(ls_annotation([chosen]), tweets) == "neg"


def test_annotation_label_none_when_nothing_to_learn():
    cfg = parse_label_config(TOXICITY)
    chosen = ls_region("toxicity", "comment", "choices", {"choices": ["offensive"]})
    assert annotation_label(ls_annotation([], was_cancelled=True), cfg) is None
    assert annotation_label(ls_annotation([chosen], was_cancelled=True), cfg) is None
    note_only = ls_region("note", "comment", "textarea", {"text": ["unsure"]})
    assert annotation_label(ls_annotation([note_only]), cfg) is None
    assert annotation_label(ls_annotation([]), cfg) is None


def test_annotation_label_refuses_labels_outside_the_set(sentiment):
    old = ls_region("sentiment", "text", "choices", {"choices": ["Mixed"]})
    with pytest.raises(LabelMappingError, match=r"'Mixed'.*'Positive', 'Negative', 'Neutral'"):
        annotation_label(ls_annotation([old]), sentiment)
    both = ls_region("sentiment", "text", "choices", {"choices": ["Positive", "Negative"]})
    with pytest.raises(BadInputError, match=r"several labels \['Positive', 'Negative'\]"):
        annotation_label(ls_annotation([both]), sentiment)
    with pytest.raises(BadInputError, match="result must be a list, got dict"):
        annotation_label({"result": {"choices": ["Positive"]}}, sentiment)
