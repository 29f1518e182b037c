"""Label Studio's JSON on one side, the engine's plain values on the other.

Every shape Label Studio (LS) defines — the labeling config XML, task objects, prediction items,
annotation objects — is read and written here and nowhere else, so the engine sees only texts, a
:class:`LabelSet` and label strings. LS validates nothing the backend sends back (a wrong
``from_name``, an unknown choice or an integer ``model_version`` are stored silently and break the UI
later), so this module is also where our answers are checked before they leave.

Label values: a ``<Choice>`` is known by its ``alias`` when it has one, else by its ``value``. That is
what the SDK's ``control.labels`` holds and what LS writes into an annotation's ``choices``, so the
label set, predictions and annotations all speak the same strings.
"""

from __future__ import annotations

import math
import numbers
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from autoannotator.core.labels import LabelSet
from autoannotator.core.limits import MAX_TEXT_CHARS
from autoannotator.errors import BadInputError, LabelMappingError, UnsupportedConfigError

WHAT_WORKS = (
    'AutoAnnotator serves one single-choice <Choices> whose toName is a <Text value="$field">, e.g. '
    '<View><Text name="text" value="$text"/><Choices name="label" toName="text" choice="single">'
    '<Choice value="A"/><Choice value="B"/></Choices></View>'
)
SINGLE_CHOICE = frozenset({"single", "single-radio"})  # LS's default, when `choice` is absent, is "single"


@dataclass(frozen=True)
class ProjectConfig:
    """What the backend needs from a labeling config: where text comes from and where labels go."""

    from_name: str  # the <Choices> control's name
    to_name: str  # the <Text> object's name
    text_field: str  # the task data key the <Text> reads: value="$text" -> "text"
    labels: LabelSet  # choice values (alias when set) in config order
    xml: str  # kept so a PredictionValidator can be built from the config alone


def _refuse(problem: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"{problem}. {WHAT_WORKS}")


def parse_label_config(xml: str, from_name: str | None = None) -> ProjectConfig:
    """Read an LS labeling config, or say precisely why this backend cannot serve it.

    Several ``<Choices>`` are allowed only when ``from_name`` picks one; guessing would send
    predictions to a question the project manager did not mean.
    """
    interface, root = _parse_xml(xml)
    control = _choices_control(interface, from_name)
    target = _text_object(interface, control)
    labels = _choice_labels(root, control.name)
    return ProjectConfig(control.name, target.name, target.value_name, labels, xml)


def _parse_xml(xml: str) -> tuple[LabelInterface, ET.Element]:
    """The SDK's view of the config and the raw XML tree, or why the text is not a config at all."""
    if not isinstance(xml, str) or not xml.strip():
        raise _refuse(f"the label config must be non-empty XML text, got {xml!r:.60}")
    try:
        return LabelInterface(xml), ET.fromstring(xml)
    except Exception as exc:  # the SDK raises bare Exception subclasses, AttributeError, ValueError...
        raise _refuse(f"the label config is not parseable XML ({exc})") from None


def _choices_control(interface: LabelInterface, from_name: str | None) -> Any:
    """The SDK's ``ControlTag`` for the one single-choice, whole-text ``<Choices>`` with fixed options
    that ``from_name`` names (or the only one there is), pointing at exactly one object."""
    controls = {c.name: c for c in interface.controls or []}
    choices = {n: c for n, c in controls.items() if c.tag.lower() == "choices"}
    if not choices:
        tags = ", ".join(f"<{c.tag} name={n!r}>" for n, c in controls.items()) or "no control tags"
        raise _refuse(f"the label config has no <Choices> control (found {tags})")
    if from_name is None and len(choices) > 1:
        raise _refuse(
            f"the label config has several <Choices> {sorted(choices)}; choose one by name (from_name)"
        )
    if from_name is not None and from_name not in choices:
        raise _refuse(f"no <Choices> named {from_name!r} in the label config (it has {sorted(choices)})")
    control = choices[from_name] if from_name is not None else next(iter(choices.values()))
    name = control.name
    mode = control.attr.get("choice", "single")
    if mode not in SINGLE_CHOICE:
        raise _refuse(f'<Choices name={name!r}> has choice="{mode}"; only single choice is supported')
    if control.attr.get("perRegion") == "true":
        raise _refuse(f"<Choices name={name!r}> is perRegion: it labels regions, not the whole text")
    if control.dynamic_value:
        raise _refuse(f"<Choices name={name!r}> takes its options from task data; list fixed <Choice> tags")
    if len(control.to_name) != 1:
        raise _refuse(f"<Choices name={name!r}> points at several objects {control.to_name}; point at one")
    return control


def _text_object(interface: LabelInterface, control: Any) -> Any:
    """The SDK's ``ObjectTag`` for the ``<Text>`` that ``control`` points at, which must read its
    text from a task field."""
    name, to_name = control.name, control.to_name[0]
    objects = {o.name: o for o in interface.objects or []}
    target = objects.get(to_name)
    if target is None:
        raise _refuse(f'<Choices name={name!r}> has toName="{to_name}", which names no object tag')
    if target.tag.lower() != "text":
        raise _refuse(f"<Choices name={name!r}> is attached to <{target.tag} name={to_name!r}>, not a <Text>")
    if not target.value_is_variable:
        raise _refuse(f'<Text name={to_name!r}> has value="{target.value}", not a "$field" reference')
    if target.attr.get("valueType", "text") != "text":
        raise _refuse(f"<Text name={to_name!r}> loads its text from a URL; put the text itself in the task")
    return target


def _choice_labels(root: ET.Element, name: str) -> LabelSet:
    """The label set of the ``<Choices>`` called ``name``: two or more distinct values, in order."""
    # Read from the XML, not the SDK: the SDK keys choices by value, silently merging duplicates.
    found = [
        c.get("alias") or c.get("value")
        for el in root.iter()
        if el.tag.lower() == "choices" and el.get("name") == name
        for c in el.iter("Choice")
    ]
    values = [v for v in found if v is not None]
    if len(values) < 2:
        raise _refuse(f"<Choices name={name!r}> has {len(values)} choice(s) {values}; a classifier needs two")
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise _refuse(f"<Choices name={name!r}> lists {dupes} more than once; choice values must be unique")
    try:
        return LabelSet.of(values)
    except ValueError as exc:
        raise _refuse(f"<Choices name={name!r}>: {exc}") from None


@dataclass(frozen=True)
class TaskText:
    """One task's text, or the reason it has none; the batch keeps one entry per task, in order."""

    task_id: int | None
    text: str | None
    problem: str | None
    clipped: bool = False  # the text was longer than max_chars and was cut; not a problem

    @property
    def ok(self) -> bool:
        return self.problem is None


def _task_text(task: object, field: str, max_chars: int) -> TaskText:
    if not isinstance(task, Mapping):
        return TaskText(None, None, f"a task must be a JSON object, got {type(task).__name__}")
    raw_id = task.get("id")
    task_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
    data = task.get("data")
    if not isinstance(data, Mapping):
        got = "nothing" if data is None else type(data).__name__
        return TaskText(task_id, None, f"task {task_id}: 'data' must be an object, got {got}")
    if field not in data:
        keys = sorted(map(str, data))[:10]
        return TaskText(task_id, None, f"task {task_id}: data has no field {field!r} (it has {keys})")
    value = data[field]
    if not isinstance(value, str):
        # A number or a list is not what the project manager meant to classify; converting it would
        # pre-label garbage without anyone noticing, so the task is refused instead.
        shown = f" {value!r}" if isinstance(value, int | float | bool) else ""
        kind = "null" if value is None else type(value).__name__
        return TaskText(task_id, None, f"task {task_id}: data[{field!r}] is {kind}{shown}, not text")
    if not value.strip():
        return TaskText(task_id, None, f"task {task_id}: data[{field!r}] is empty or only whitespace")
    return TaskText(task_id, value[:max_chars], None, clipped=len(value) > max_chars)


def extract_texts(
    tasks: Sequence[Mapping[str, Any]], config: ProjectConfig, max_chars: int = MAX_TEXT_CHARS
) -> list[TaskText]:
    """The text of every LS task at ``data[config.text_field]``, one entry per task, in order.

    A bad task yields a ``problem`` instead of raising, so one malformed task never costs the rest of
    the batch their predictions. Texts over ``max_chars`` are cut: the models read a few hundred
    tokens anyway, and a megabyte of text must not stall a batch.
    """
    if max_chars < 1:
        raise BadInputError(f"max_chars must be at least 1, got {max_chars}")
    return [_task_text(task, config.text_field, max_chars) for task in tasks]


def _check_model_version(model_version: object) -> str:
    if not isinstance(model_version, str) or not model_version.strip():
        # An int model_version makes LS's /api/projects/{id}/next answer 500.
        raise BadInputError(f"model_version must be a non-empty string, got {model_version!r}")
    return model_version


def prediction(
    config: ProjectConfig,
    label: str,
    score: float,
    model_version: str,
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One LS prediction item choosing ``label`` for the whole text.

    ``score`` is the confidence LS sorts and filters by: it must be a finite number; float noise just
    outside [0, 1] is clipped, anything further off is a bug and refused. ``extra`` adds top-level keys
    for the caller but can never replace ``result``, ``score`` or ``model_version``.
    """
    config.labels.index(label)  # raises LabelMappingError naming the label set
    if not isinstance(score, numbers.Real) or isinstance(score, bool) or not math.isfinite(score):
        raise BadInputError(f"score must be a finite number, got {score!r}")
    if not -1e-6 <= float(score) <= 1 + 1e-6:
        raise BadInputError(f"score must lie in [0, 1], got {score!r}")
    clash = sorted({"result", "score", "model_version"} & set(extra or {}))
    if clash:
        raise BadInputError(f"extra may not set {clash}; they are prediction()'s own arguments")
    region = {
        "from_name": config.from_name,
        "to_name": config.to_name,
        "type": "choices",
        "value": {"choices": [label]},
    }
    item = {"result": [region], "score": min(1.0, max(0.0, float(score)))}
    item["model_version"] = _check_model_version(model_version)
    return {**(extra or {}), **item}


def empty_prediction(model_version: str) -> dict[str, Any]:
    """The item for a task that could not be labelled.

    LS requires one item per task, in order: this is how a bad task keeps its place in the batch
    without a fake label. Measured on LS 1.23.2 (tests/test_backend_e2e.py): LS stores the item as a
    prediction row with an empty result and score 0.0, so the task counts as predicted for that
    version and is not asked about again until the version changes.
    """
    return {"result": [], "score": 0.0, "model_version": _check_model_version(model_version)}


class PredictionValidator:
    """Checks prediction items before they are sent to LS, which would store them unchecked.

    Built once per project: parsing the config is not free. ``validate`` runs the SDK's
    ``LabelInterface.validate_prediction(item, return_errors=True)`` and adds checks for what it lets
    through. Measured on label-studio-sdk 2.1.2 (pinned by tests/test_labelconfig.py):

    * it catches: a ``from_name`` or ``to_name`` not in the config, a ``type`` other than the
      control's (compared case-insensitively), a choice outside the control's labels, a ``choices``
      that is not a list, a missing ``result`` or one that is not a list, and a ``score`` that
      ``float()`` maps outside [0, 1] (3.5, -0.1, nan, inf);
    * it lets through: an empty ``result``, an empty ``choices`` list, several choices on a
      single-choice control, several results for one control, a result for another control of the
      config, a ``score`` that is missing, null, a string ("0.5") or a bool, and any ``model_version``
      (missing, an int, empty).

    Our checks cover exactly the second list (an empty ``result`` stays valid: it is
    :func:`empty_prediction`), so no problem is reported twice.
    """

    def __init__(self, config: ProjectConfig) -> None:
        self.config = config
        self._interface = LabelInterface(config.xml)
        self._controls = {c.name for c in self._interface.controls or []}

    def validate(self, item: object) -> list[str]:
        """Every problem with ``item``, as readable sentences; empty when LS may have it."""
        if not isinstance(item, Mapping):
            return [f"a prediction must be a JSON object, got {type(item).__name__}"]
        errors: list[str] = list(self._interface.validate_prediction(dict(item), return_errors=True))
        score = item.get("score")
        if not isinstance(score, numbers.Real) or isinstance(score, bool):
            errors.append(f"score must be a number in [0, 1], got {score!r}")
        version = item.get("model_version")
        if not isinstance(version, str) or not version.strip():
            errors.append(f"model_version must be a non-empty string, got {version!r}")
        result = item.get("result")
        ours = 0
        for i, region in enumerate(result if isinstance(result, list) else []):
            if not isinstance(region, Mapping):
                continue
            name = region.get("from_name")
            if name != self.config.from_name:
                if name in self._controls:
                    errors.append(f"result[{i}] is for {name!r}; we predict {self.config.from_name!r}")
                continue
            ours += 1
            value = region.get("value")
            chosen = value.get("choices") if isinstance(value, Mapping) else None
            if isinstance(chosen, list) and len(chosen) != 1:
                errors.append(f"result[{i}] must choose exactly one label, got {chosen!r}")
        if ours > 1:
            errors.append(f"{ours} results for control {self.config.from_name!r}; a single choice needs one")
        return errors

    def check(self, item: object) -> None:
        """Raise :class:`BadInputError` naming every problem, for callers that must not send a bad item."""
        errors = self.validate(item)
        if errors:
            raise BadInputError("invalid prediction: " + "; ".join(errors))


def annotation_label(annotation: Mapping[str, Any], config: ProjectConfig) -> str | None:
    """The label a person chose in an LS annotation, for the verified pool.

    None when there is nothing to learn from: the annotation was cancelled (skipped), or it holds no
    choice for our control (an annotator may answer only other questions of the config). A choice
    outside the label set means the config changed under the annotation: :class:`LabelMappingError`.
    """
    if annotation.get("was_cancelled"):
        return None
    result = annotation.get("result") or []
    if not isinstance(result, list):
        raise BadInputError(f"an annotation's result must be a list, got {type(result).__name__}")
    chosen: list[str] = []
    for region in result:
        if isinstance(region, Mapping) and region.get("from_name") == config.from_name:
            value = region.get("value")
            picks = value.get("choices") if isinstance(value, Mapping) else None
            if not isinstance(picks, list):
                raise BadInputError(f"annotation result for {config.from_name!r} has no choices: {value!r}")
            chosen.extend(picks)
    if not chosen:
        return None
    if len(set(chosen)) > 1:
        raise BadInputError(f"annotation chooses several labels {chosen!r} on a single-choice control")
    label = chosen[0]
    if label not in config.labels:
        raise LabelMappingError(
            f"annotation chooses {label!r}, which is not one of the project's labels {list(config.labels)!r}"
        )
    return str(label)
