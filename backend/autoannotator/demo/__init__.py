"""make demo: Label Studio, Redis, the backend and its workers on loopback with a demo project.

``run`` goes through the phases (and stops everything on Ctrl-C); ``services`` starts Redis, Label
Studio and the backend under ``processes``, the supervisor; ``project`` does through Label Studio's
API what a person would click; ``tasks`` samples the tweets; ``report`` prints progress and the
summary; ``config`` is what a run is told. ``label_studio`` (a headless start) and ``processes`` serve
the end-to-end tests too.
"""
