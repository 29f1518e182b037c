"""Label Studio headless for the demo and the end-to-end tests: the environment and command that
start it on loopback with a ready admin login, and the probe that says when it serves.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from autoannotator.errors import AutoAnnotatorError

# Label Studio's feature flag (an environment variable) for its memory-efficient predictions import.
FAST_PREDICTIONS_IMPORT = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
# Variables of the caller's environment that would steer Label Studio away from what is set here.
_LS_DROPPED = ("LABEL_STUDIO_", "DJANGO_", "PYTHON", "VIRTUAL_ENV", "XDG_", "TMPDIR", "SQLITE_")


def ls_environment(data_dir: Path, url: str, username: str, password: str, token: str) -> dict[str, str]:
    """LS headless: SQLite in ``data_dir``, the admin user and legacy token made at start, no
    signup, no network calls, an ML backend and webhooks on 127.0.0.1 allowed, and no stray
    writes outside ``data_dir`` (docs/label-studio.md). The caller's environment is kept, minus
    anything that would steer LS. The end-to-end tests start their Label Studio with it too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LS_DROPPED)}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_USERNAME": username,
            "LABEL_STUDIO_PASSWORD": password,
            "LABEL_STUDIO_USER_TOKEN": token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            # LS 1.23.2's default predictions import recounts every task of the project on each
            # request (1.1-1.4 s a request at 3,000 tasks, growing with the project); this flag's
            # path counts only the imported tasks (0.1 s for 100). Labelling runs import a chunk
            # per request, so large projects need it (README, "Scaling out").
            FAST_PREDICTIONS_IMPORT: "true",
            "LABEL_STUDIO_HOST": url,
            "XDG_CONFIG_HOME": str(data_dir / "xdg-config"),
            "XDG_CACHE_HOME": str(data_dir / "xdg-cache"),
            "XDG_DATA_HOME": str(data_dir / "xdg-data"),
            "TMPDIR": str(data_dir / "tmp"),
            "SQLITE_TMPDIR": str(data_dir / "tmp"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def ls_argv(executable: Path, port: int) -> list[str]:
    """The command that starts Label Studio headless on ``127.0.0.1:port``."""
    return [str(executable), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]


class PortTakenError(AutoAnnotatorError):
    """Label Studio found its port taken. It does not fail then: it quietly serves on the next
    port, which nobody asked for, so whoever started it must stop it."""


def ls_probe(output: str, url: str, port: int) -> str | None:
    """None once the Label Studio whose log so far is ``output`` serves ``url`` and its
    ``/health/`` says UP; else what it is still doing. Raises :class:`PortTakenError` when it
    reported ``port`` taken. /health/ is only trusted once the log says our process serves our
    URL: anything else on that port (a server that grabbed it first) could answer UP too."""
    if f"Port {port} is in use" in output:
        raise PortTakenError(f"port {port} was taken before Label Studio bound it")
    if f"Starting development server at {url}/" not in output:
        return "not serving yet (migrating the database, loading Django)"
    try:
        with urllib.request.urlopen(f"{url}/health/", timeout=2) as response:
            body = json.loads(response.read() or b"null")
    except (OSError, ValueError) as exc:  # refused while booting, a timeout, a non-JSON page
        return f"/health/: {exc}"
    if isinstance(body, dict) and body.get("status") == "UP":
        return None
    return f"/health/ answered {body!r}"
