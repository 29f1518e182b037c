"""What a process pays for at import: the CLI's parser loads no model library, the web app no lab.

Each check runs in a fresh interpreter, since this test process has long since imported everything.
"""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


def test_the_cli_parser_and_its_help_load_neither_torch_nor_transformers() -> None:
    loaded = _modules_after("from autoannotator.cli import build_parser\nbuild_parser().format_help()")
    assert "torch" not in loaded
    assert "transformers" not in loaded
    assert "autoannotator.learning.recipes" in loaded  # the kinds and recipe defaults were read


def test_importing_the_web_app_loads_no_lab_no_plotting_and_no_llm_client() -> None:
    loaded = _modules_after("from autoannotator.service.app import create_app")
    assert "autoannotator.service.app" in loaded
    assert "autoannotator.review.llm" in loaded  # prices and the answer cache, read by /status
    assert {
        "openai",  # 13 MB per web worker; only review jobs call an LLM
        "matplotlib",
        "autoannotator.lab",
        "autoannotator.lab.simulate",
        "autoannotator.demo",
    } & loaded == set()


def test_a_web_worker_imports_neither_scikit_learn_nor_the_label_studio_client() -> None:
    # Measured in one process: scikit-learn with the pandas and scipy.stats it imports is ~110 MB,
    # the SDK's client with its exports' pandas ~6 MB more; a worker pays for them only when it loads
    # a version with a linear member, or a job talks to Label Studio.
    loaded = _modules_after(
        "from autoannotator.service.app import create_app\n"
        "from autoannotator.models.specialists import load_specialist"
    )
    assert {"sklearn", "pandas", "scipy.stats", "label_studio_sdk.projects.client_ext"} & loaded == set()
    assert "autoannotator.core.guarantee" in loaded  # the target policy's thresholds, without SciPy


def test_the_label_studio_client_and_the_linear_kinds_load_when_used() -> None:
    loaded = _modules_after(
        "from autoannotator.labelstudio.client import connect\n"
        "connect('http://localhost:1', 'token')\n"
        "from autoannotator.models.specialists.loading import _linear_kinds\n"
        "assert set(_linear_kinds()) == {'embedding-linear', 'ngram-linear'}"
    )
    assert {"sklearn", "label_studio_sdk.projects.client_ext"} <= loaded


def test_the_torch_backed_specialists_still_load_on_first_use() -> None:
    loaded = _modules_after(
        "import autoannotator.models.specialists as s\nassert s.TransformerSpecialist.kind == 'transformer'"
    )
    assert "autoannotator.models.specialists.transformer" in loaded
