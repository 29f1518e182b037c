"""Flask's test client made to close responses as a real WSGI server does (see ``conftest.py``)."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient


class ServerLikeClient(FlaskClient):
    """Flask's test client, closing every response as a WSGI server does once it has sent it.

    /predict counts and queues its review job in a close callback (after the answer is sent); the
    plain test client never closes responses, so those callbacks would never run in unit tests.
    """

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)
