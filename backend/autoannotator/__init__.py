"""AutoAnnotator: an ensemble of small classifiers votes; uncertain items go to an LLM or a human."""

__version__ = "0.1.0"
