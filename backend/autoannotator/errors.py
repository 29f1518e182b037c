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


# ---------------------------------------------------------------- the service's state and setup
# Faults of ours or of our surroundings, never of the client's input: the web app answers them with
# a 5xx (503 where retrying later helps), jobs fail with the message.


class StateUnavailableError(AutoAnnotatorError):
    """Redis cannot be reached; the message says which URL, never its password."""


class LockTimeoutError(AutoAnnotatorError):
    """A project's lock (its pool, its training) was not free in time; the job can be retried."""


class CorruptStoreError(AutoAnnotatorError):
    """A file of the model store (a pool log, a manifest) is damaged; the message names the line."""


class NotConfiguredError(AutoAnnotatorError):
    """A job needs a setting that is missing (for example LABEL_STUDIO_API_KEY)."""


class EncoderInstallError(AutoAnnotatorError):
    """An encoder could not be installed; nothing was left at the destination."""
