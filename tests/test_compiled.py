"""Serving forward passes compiled by OpenVINO (``AUTOANNOTATOR_RUNTIME=openvino``, specialists.compiled).

Tiny real BERTs, converted and compiled by the real OpenVINO runtime on this CPU: a served version
gives the probabilities torch gives, both members run compiled, every batch width reuses one
compiled model, and models that still train never compile.
"""

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from autoannotator.core.labels import LabelSet
from autoannotator.errors import SpecialistLoadError
from autoannotator.models.ensemble import load_ensemble, write_manifest
from autoannotator.models.specialists import EmbeddingSpecialist, TrainConfig, TransformerSpecialist, runtime
from autoannotator.models.specialists import compiled as compiled_runtime
from autoannotator.models.specialists.encoder import Encoder, clear_encoder_caches
from autoannotator.settings import Settings
from tests import tiny

pytest.importorskip("openvino", reason="the openvino extra is not installed (make install installs it)")

LABELS = LabelSet.of(tiny.LABELS)
# Probabilities of the same fp32 model through torch and through OpenVINO: the same operations,
# fused and ordered differently, so equal to float rounding (1e-7 on a real MiniLM, BENCHMARKS 7e).
FP32_TOLERANCE = 1e-5


@pytest.fixture
def openvino() -> Iterator[None]:
    """The runtime set to OpenVINO for the test, and back to torch after it; encoders loaded under
    either are dropped so no test sees another's compiled model."""
    saved = compiled_runtime.configured_runtime()
    clear_encoder_caches()
    compiled_runtime.set_runtime("openvino")
    yield
    compiled_runtime.set_runtime(saved)
    clear_encoder_caches()


def _version(directory: Path, encoder: Path, corpus) -> Path:
    texts, ys = [t for t, _ in corpus[:150]], [y for _, y in corpus[:150]]
    fit = TrainConfig(learning_rate=5e-3, epochs=2, batch_size=16, seed=0)
    TransformerSpecialist.from_encoder(encoder, LABELS, name="m0-transformer").fit(
        texts, ys, directory / "m0-transformer", fit
    )
    EmbeddingSpecialist.untrained(encoder, LABELS, name="m1-embedding").fit(
        texts, ys, directory / "m1-embedding"
    )
    write_manifest(directory, version="v0001", labels=LABELS, members=["m0-transformer", "m1-embedding"])
    return directory


def _texts(corpus) -> list[str]:
    # Lengths from one word to a few hundred, so the length batches come in several widths.
    texts = [t for t, _ in corpus[150:230]]
    return [*texts, "w", " ".join(texts[:40]), texts[0] * 3]


def test_a_served_version_gives_torchs_probabilities_with_both_members_compiled(
    tmp_path, tiny_encoder, tiny_corpus, fp32, monkeypatch
):
    ran: list[str] = []
    call = compiled_runtime.CompiledForward.__call__

    def counted(self, batch):
        ran.append(self.kind)
        return call(self, batch)

    monkeypatch.setattr(compiled_runtime.CompiledForward, "__call__", counted)
    version = _version(tmp_path / "v", tiny_encoder, tiny_corpus)
    texts = _texts(tiny_corpus)
    clear_encoder_caches()
    reference = load_ensemble(version, LABELS, serving=True).predict_proba(texts)
    saved = compiled_runtime.configured_runtime()
    clear_encoder_caches()
    compiled_runtime.set_runtime("openvino")
    try:
        served = load_ensemble(version, LABELS, serving=True)
        transformer, embedding = served.members[0], served.members[1]
        # Both compiled as the version loaded, before any request could wait for it ...
        compiled = transformer._compiled._compiled, embedding.encoder._compiled._compiled
        assert None not in compiled
        probs = served.predict_proba(texts)
        # ... and those are what ran, for both members.
        assert (transformer._compiled._compiled, embedding.encoder._compiled._compiled) == compiled
        assert sorted(set(ran)) == ["logits", "pooled"]
    finally:
        compiled_runtime.set_runtime(saved)
        clear_encoder_caches()
    assert probs.shape == reference.shape
    assert np.abs(probs - reference).max() < FP32_TOLERANCE
    assert (probs.argmax(-1) == reference.argmax(-1)).all()


def test_every_batch_width_reuses_one_compiled_model(tmp_path, tiny_encoder, tiny_corpus, fp32, openvino):
    version = _version(tmp_path / "v", tiny_encoder, tiny_corpus)
    member = TransformerSpecialist.load(version / "m0-transformer", LABELS, serving=True)
    member.predict_proba(["short"])
    first = member._compiled._compiled
    member.predict_proba(_texts(tiny_corpus))  # batches of other widths and sizes
    assert member._compiled._compiled is first


def test_it_compiles_again_for_another_precision_and_thread_count(
    tmp_path, tiny_encoder, tiny_corpus, openvino
):
    saved_precision = runtime._precision
    member = TransformerSpecialist.load(
        _version(tmp_path / "v", tiny_encoder, tiny_corpus) / "m0-transformer", LABELS, serving=True
    )
    try:
        runtime.configure_precision("fp32")
        member.predict_proba(["a text"])
        fp32_compiled = member._compiled._compiled
        assert fp32_compiled is not None and fp32_compiled.precision == "fp32"
        runtime.configure_precision("bf16")
        member.predict_proba(["a text"])
        assert member._compiled._compiled is not fp32_compiled
        assert member._compiled._compiled.precision == "bf16"
    finally:
        runtime.configure_precision(saved_precision)


def test_a_member_that_still_trains_keeps_torch(tmp_path, tiny_encoder, tiny_corpus, openvino):
    version = _version(tmp_path / "v", tiny_encoder, tiny_corpus)
    member = TransformerSpecialist.load(version / "m0-transformer", LABELS)  # not serving: may be refit
    member.predict_proba(["a text"])
    assert member._compiled._compiled is None


def test_threads_predicting_at_once_get_the_same_answers(tmp_path, tiny_encoder, tiny_corpus, fp32, openvino):
    member = TransformerSpecialist.load(
        _version(tmp_path / "v", tiny_encoder, tiny_corpus) / "m0-transformer", LABELS, serving=True
    )
    texts = _texts(tiny_corpus)
    expected = member.predict_proba(texts)
    results: list[np.ndarray] = []
    workers = [threading.Thread(target=lambda: results.append(member.predict_proba(texts))) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(results) == 4
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_the_encoder_compiles_only_its_whole_model(tiny_encoder, tiny_corpus, fp32, openvino):
    encoder = Encoder(tiny_encoder, cache_size=0)
    texts = _texts(tiny_corpus)
    whole = encoder.embed(texts)
    assert encoder._compiled._compiled is not None
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, rtol=1e-5)
    compiled_runtime.set_runtime("torch")
    np.testing.assert_allclose(Encoder(tiny_encoder, cache_size=0).embed(texts), whole, atol=FP32_TOLERANCE)
    compiled_runtime.set_runtime("openvino")
    # Pooled after fewer layers: the torch view, not the compiled whole model.
    fewer = Encoder(tiny_encoder, cache_size=0)
    fewer.embed(texts, layers=1)
    assert fewer._compiled._compiled is None


def test_without_the_package_the_first_forward_pass_says_what_to_install(
    tmp_path, tiny_encoder, tiny_corpus, openvino, monkeypatch
):
    member = TransformerSpecialist.load(
        _version(tmp_path / "v", tiny_encoder, tiny_corpus) / "m0-transformer", LABELS, serving=True
    )
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` meets where it is absent
    with pytest.raises(SpecialistLoadError, match=r"pip install 'autoannotator\[openvino\]'"):
        member.predict_proba(["a text"])


def test_which_devices_and_settings_use_openvino(monkeypatch):
    saved = compiled_runtime.configured_runtime()
    try:
        compiled_runtime.set_runtime("torch")
        assert not compiled_runtime.uses_openvino(torch.device("cpu"))
        compiled_runtime.set_runtime("openvino")
        assert compiled_runtime.uses_openvino(torch.device("cpu"))
        assert not compiled_runtime.uses_openvino(torch.device("cuda"))  # a GPU keeps torch
        compiled_runtime.set_runtime("auto")
        assert compiled_runtime.uses_openvino(torch.device("cpu"))  # installed here
        with pytest.raises(ValueError, match="runtime must be one of"):
            compiled_runtime.set_runtime("onnx")
    finally:
        compiled_runtime.set_runtime(saved)


def test_the_setting_is_read_and_applied_before_the_first_forward_pass(monkeypatch):
    from autoannotator.service.context import configure_runtime

    saved = compiled_runtime.configured_runtime()
    monkeypatch.setenv("AUTOANNOTATOR_RUNTIME", "openvino")
    try:
        settings = Settings.from_env()
        assert settings.runtime == "openvino"
        configure_runtime(settings)
        assert compiled_runtime.configured_runtime() == "openvino"
    finally:
        compiled_runtime.set_runtime(saved)
    assert Settings().runtime == "torch"
    monkeypatch.setenv("AUTOANNOTATOR_RUNTIME", "onnx")
    with pytest.raises(ValueError, match="AUTOANNOTATOR_RUNTIME must be one of"):
        Settings.from_env()
