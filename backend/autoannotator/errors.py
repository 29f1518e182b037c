"""Exceptions of the engine: one line each, so callers can catch exactly what they can handle."""


class AutoAnnotatorError(Exception):
    """Base class: anything the engine raises on purpose."""


class LabelMappingError(AutoAnnotatorError, ValueError):
    """A model's labels (or a label given by a reviewer or a dataset) do not fit the project's label set."""


class UnsupportedConfigError(AutoAnnotatorError, ValueError):
    """A Label Studio labeling config this backend cannot serve; the message says what would work."""


class SpecialistLoadError(AutoAnnotatorError):
    """A specialist directory or hub id could not be loaded."""


class BadInputError(AutoAnnotatorError, ValueError):
    """Input the engine refuses with a message: an empty text, a malformed dataset line, ..."""


class TrainingError(AutoAnnotatorError):
    """Fine-tuning could not run (no examples, a single class, ...); the served version is untouched."""


class ReviewError(AutoAnnotatorError):
    """A reviewer could not produce a label for an item; the item goes to a human instead."""
