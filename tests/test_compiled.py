"""Serving forward passes compiled by OpenVINO (``AUTOANNOTATOR_RUNTIME=openvino``, specialists.compiled).

Tiny real BERTs, converted and compiled by the real OpenVINO runtime on this CPU: a served version
gives the probabilities torch gives, both members run compiled, every batch width reuses one
compiled model, and models that still train never compile.
"""

import os
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
from autoannotator.models.specialists import encoder as encoder_module
from autoannotator.models.specialists.encoder import Encoder, clear_encoder_caches
from autoannotator.settings import Settings
from tests import tiny

pytest.importorskip("openvino", reason="the openvino extra is not installed (make install installs it)")

LABELS = LabelSet.of(tiny.LABELS)
# Probabilities of the same fp32 model through torch and through OpenVINO: the same operations,
# fused and ordered differently, so equal to float rounding (1e-7 on a real MiniLM, BENCHMARKS 7e).
FP32_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory) -> Path:
    """One cache of converted models for the module: a test that loads a model another test
    converted (the same files) reuses it, as a second process would."""
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(ov_cache, monkeypatch) -> None:
    """Each test starts on torch (an app an earlier test built may have left ``auto``), converted
    models go to the module's cache, never the user's, and the runtime, weight format and cache
    are put back after each test."""
    monkeypatch.setattr(compiled_runtime, "_runtime", "torch")
    monkeypatch.setattr(compiled_runtime, "_cache_dir", ov_cache)
    monkeypatch.setattr(compiled_runtime, "_weights", "int8")


@pytest.fixture
def openvino(monkeypatch) -> Iterator[None]:
    """The runtime set to OpenVINO with fp32 weights (outputs comparable with torch's to float
    rounding) for the test, and back after it; the test starts with no shared encoder, so none that
    an earlier test loaded (with its torch weights, its compiled model) serves it."""
    saved = compiled_runtime.configured_runtime()
    monkeypatch.setattr(encoder_module, "_ENCODERS", {})
    clear_encoder_caches()
    compiled_runtime.set_runtime("openvino", weights="fp32")
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
    compiled_runtime.set_runtime("openvino", weights="fp32")
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
        # auto: where it is installed (here) and forward passes run in fp32; where they run in bf16,
        # torch's bf16 serves (as fast, less memory: BENCHMARKS 7e).
        monkeypatch.setattr(runtime, "_precision", "fp32")
        assert compiled_runtime.uses_openvino(torch.device("cpu"))
        monkeypatch.setattr(runtime, "_precision", "bf16")
        assert not compiled_runtime.uses_openvino(torch.device("cpu"))
        monkeypatch.setattr(compiled_runtime, "openvino_installed", lambda: False)
        monkeypatch.setattr(runtime, "_precision", "fp32")
        assert not compiled_runtime.uses_openvino(torch.device("cpu"))
        with pytest.raises(ValueError, match="runtime must be one of"):
            compiled_runtime.set_runtime("onnx")
        with pytest.raises(ValueError, match="OpenVINO weights must be one of"):
            compiled_runtime.set_runtime("openvino", weights="int4")
    finally:
        compiled_runtime.set_runtime(saved)


def test_the_setting_is_read_and_applied_before_the_first_forward_pass(monkeypatch):
    from autoannotator.service.context import configure_runtime

    saved = compiled_runtime.configured_runtime()
    monkeypatch.setenv("AUTOANNOTATOR_RUNTIME", "openvino")
    monkeypatch.setenv("AUTOANNOTATOR_OPENVINO_WEIGHTS", "fp32")
    monkeypatch.setenv("AUTOANNOTATOR_MODEL_DIR", "/srv/models")
    try:
        settings = Settings.from_env()
        assert (settings.runtime, settings.openvino_weights) == ("openvino", "fp32")
        configure_runtime(settings)
        assert compiled_runtime.configured_runtime() == "openvino"
        assert compiled_runtime.configured_weights() == "fp32"
        # Converted models are kept beside the versions, which every worker shares.
        assert compiled_runtime.cache_dir() == Path("/srv/models/openvino")
    finally:
        compiled_runtime.set_runtime(saved)
    assert Settings().runtime == "auto"
    assert Settings().openvino_weights == "int8"
    monkeypatch.setenv("AUTOANNOTATOR_RUNTIME", "onnx")
    with pytest.raises(ValueError, match="AUTOANNOTATOR_RUNTIME must be one of"):
        Settings.from_env()
    monkeypatch.setenv("AUTOANNOTATOR_RUNTIME", "openvino")
    monkeypatch.setenv("AUTOANNOTATOR_OPENVINO_WEIGHTS", "int4")
    with pytest.raises(ValueError, match="AUTOANNOTATOR_OPENVINO_WEIGHTS must be one of"):
        Settings.from_env()


# Weight-only int8 against fp32 on a tiny BERT trained for a few steps: its probabilities sit close
# together, so a label flips more easily than on a real MiniLM (99.7% the same there, BENCHMARKS 7f).
INT8_SAME_LABELS = 0.95
INT8_PROB_TOLERANCE = 0.05


def test_int8_weights_give_the_same_labels_within_a_stated_tolerance_at_a_third_of_the_size(
    tmp_path, tiny_encoder, tiny_corpus, fp32, openvino
):
    version = _version(tmp_path / "v", tiny_encoder, tiny_corpus)
    texts = _texts(tiny_corpus)
    compiled_runtime.set_runtime("torch")
    clear_encoder_caches()
    reference = load_ensemble(version, LABELS, serving=True).predict_proba(texts)
    compiled_runtime.set_runtime("openvino", weights="int8")
    clear_encoder_caches()
    served = load_ensemble(version, LABELS, serving=True)
    probs = served.predict_proba(texts)
    for member in range(reference.shape[0]):
        same = (probs[member].argmax(-1) == reference[member].argmax(-1)).mean()
        assert same >= INT8_SAME_LABELS
        assert np.abs(probs[member] - reference[member]).max() < INT8_PROB_TOLERANCE
    int8_file = served.members[0]._compiled._compiled.model_file
    fp32_file = compiled_runtime.ir_file(str(version / "m0-transformer"), "logits", "fp32")
    assert int8_file != fp32_file
    assert int8_file.with_suffix(".bin").stat().st_size < 0.4 * fp32_file.with_suffix(".bin").stat().st_size


def test_a_member_served_compiled_holds_no_torch_weights_until_asked(
    tmp_path, tiny_encoder, tiny_corpus, fp32, openvino
):
    version = _version(tmp_path / "v", tiny_encoder, tiny_corpus)
    texts = _texts(tiny_corpus)
    served = load_ensemble(version, LABELS, serving=True)
    transformer, encoder = served.members[0], served.members[1].encoder
    probs = served.predict_proba(texts)
    # Loaded, compiled and predicting, neither holds a torch weight: the skeletons are on torch's
    # meta device, which allocates nothing.
    assert not transformer.holds_weights and not encoder.holds_weights
    assert {p.device.type for p in transformer._weights.structure.parameters()} == {"meta"}
    assert {p.device.type for p in encoder._weights.structure.parameters()} == {"meta"}
    # What asks for the torch model gets it, loaded then, with the weights on disk.
    compiled_runtime.set_runtime("torch")
    encoder.clear_cache()  # else the vectors of the compiled pass answer
    torch_probs = served.predict_proba(texts)
    assert transformer.holds_weights and encoder.holds_weights
    assert {p.device.type for p in transformer.model.parameters()} == {"cpu"}
    assert np.abs(torch_probs - probs).max() < FP32_TOLERANCE


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """The kind of each conversion the test's processes ran (real ones, counted)."""
    done: list[str] = []
    convert = compiled_runtime._convert_in_child

    def counted(source, kind, weights, out_dir):
        done.append(kind)
        convert(source, kind, weights, out_dir)

    monkeypatch.setattr(compiled_runtime, "_convert_in_child", counted)
    return done


def test_a_model_is_converted_once_and_again_when_its_weights_change(
    tmp_path, tiny_encoder, tiny_corpus, fp32, openvino, conversions
):
    member_dir = _version(tmp_path / "v", tiny_encoder, tiny_corpus) / "m0-transformer"
    conversions.clear()  # the encoder's, as the version's embedding member was fit
    first = compiled_runtime.ir_file(str(member_dir), "logits")
    assert compiled_runtime.ir_file(str(member_dir), "logits") == first and conversions == ["logits"]
    # New weights in the same folder (a member refit in place) are another model.
    weights = member_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert compiled_runtime.ir_file(str(member_dir), "logits") != first
    assert conversions == ["logits", "logits"]
    # A conversion killed halfway leaves its staging folder; the next conversion of that model
    # clears it, and a folder that lost its model file is converted again.
    second = compiled_runtime.ir_file(str(member_dir), "logits")
    stale = second.parent.parent / f".{second.parent.name}-killed"
    stale.mkdir()
    second.unlink()
    assert compiled_runtime.ir_file(str(member_dir), "logits") == second and second.is_file()
    assert not stale.exists() and conversions == ["logits", "logits", "logits"]


def test_two_threads_converting_at_once_convert_once(
    tmp_path, tiny_encoder, tiny_corpus, openvino, conversions
):
    member_dir = _version(tmp_path / "v", tiny_encoder, tiny_corpus) / "m0-transformer"
    conversions.clear()  # the encoder's, as the version's embedding member was fit
    found: list[Path] = []
    workers = [
        threading.Thread(target=lambda: found.append(compiled_runtime.ir_file(str(member_dir), "logits")))
        for _ in range(3)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(found) == 3 and len(set(found)) == 1 and conversions == ["logits"]


def test_a_model_that_cannot_be_converted_says_why_and_leaves_nothing_cached(
    tmp_path, tiny_encoder, tiny_corpus, openvino, ov_cache
):
    member_dir = _version(tmp_path / "v", tiny_encoder, tiny_corpus) / "m0-transformer"
    (member_dir / "model.safetensors").write_bytes(b"not a weights file")
    before = set(ov_cache.iterdir())
    with pytest.raises(SpecialistLoadError, match=r"cannot convert .* for OpenVINO"):
        compiled_runtime.ir_file(str(member_dir), "logits")
    left = {p for p in set(ov_cache.iterdir()) - before if not p.name.endswith(".lock")}
    assert left == set()


def test_int8_without_nncf_says_what_to_install(tmp_path, tiny_encoder, tiny_corpus, openvino, monkeypatch):
    member_dir = _version(tmp_path / "v", tiny_encoder, tiny_corpus) / "m0-transformer"
    find_spec = compiled_runtime.importlib.util.find_spec
    monkeypatch.setattr(
        compiled_runtime.importlib.util, "find_spec", lambda name: None if name == "nncf" else find_spec(name)
    )
    with pytest.raises(SpecialistLoadError, match=r"nncf package: pip install 'autoannotator\[openvino\]'"):
        compiled_runtime.ir_file(str(member_dir), "logits", "int8")


def test_the_web_app_serves_predict_through_compiled_members_converted_beside_the_versions(
    tmp_path, tiny_encoder, tiny_corpus, fp32, openvino, redis_url
):
    """/predict loads the version as labelling runs do (``load_ensemble(serving=True)``): under
    AUTOANNOTATOR_RUNTIME=openvino both MiniLM members answer compiled, from model files converted
    into AUTOANNOTATOR_MODEL_DIR/openvino, and neither holds torch weights."""
    from autoannotator.service.app import create_app
    from autoannotator.storage.model_store import ProjectModels

    texts, ys = [t for t, _ in tiny_corpus[:150]], [y for _, y in tiny_corpus[:150]]
    fit = TrainConfig(learning_rate=5e-3, epochs=2, batch_size=16, seed=0)
    projects = ProjectModels(tmp_path / "models")
    projects.registry(tiny.PROJECT).save_ensemble(
        LABELS,
        {
            "m0-transformer": lambda d: TransformerSpecialist.from_encoder(tiny_encoder, LABELS).fit(
                texts, ys, d, fit
            ),
            "m1-embedding": lambda d: EmbeddingSpecialist.untrained(tiny_encoder, LABELS).fit(texts, ys, d),
        },
    )
    env = {
        "AUTOANNOTATOR_MODEL_DIR": str(projects.root),
        "AUTOANNOTATOR_REDIS_URL": redis_url,
        "AUTOANNOTATOR_RUNTIME": "openvino",
        "AUTOANNOTATOR_PRECISION": "fp32",
    }
    client = create_app(Settings.from_env(env), projects).test_client()
    config = (
        '<View><Text name="text" value="$text"/><Choices name="label" toName="text">'
        + "".join(f'<Choice value="{label}"/>' for label in tiny.LABELS)
        + "</Choices></View>"
    )
    tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(_texts(tiny_corpus)[:20])]
    reply = client.post("/predict", json={"tasks": tasks, "project": tiny.PROJECT, "label_config": config})
    assert reply.status_code == 200
    results = reply.get_json()["results"]
    assert len(results) == len(tasks) and all(r["result"] for r in results)
    served = projects._served[tiny.PROJECT]
    transformer, embedding = served.members
    assert transformer._compiled._compiled is not None and embedding.encoder._compiled._compiled is not None
    assert not transformer.holds_weights and not embedding.encoder.holds_weights
    converted = sorted(p.parent for p in (projects.root / "openvino").glob("*/model.xml"))
    assert {
        transformer._compiled._compiled.model_file.parent,
        embedding.encoder._compiled._compiled.model_file.parent,
    } == set(converted)


def test_under_auto_a_model_that_cannot_be_converted_is_served_by_torch(
    tmp_path, tiny_encoder, tiny_corpus, fp32, openvino, monkeypatch, caplog
):
    """A conversion that fails stands in for an architecture OpenVINO cannot trace (every tiny BERT
    here converts): under auto the member answers with torch and says why, once; asked for by name,
    OpenVINO's error reaches the caller."""
    version = _version(tmp_path / "v", tiny_encoder, tiny_corpus)
    texts = _texts(tiny_corpus)
    compiled_runtime.set_runtime("torch")
    expected = TransformerSpecialist.load(version / "m0-transformer", LABELS, serving=True).predict_proba(
        texts
    )
    attempts: list[str] = []

    def fails(source, kind, weights, out_dir):
        attempts.append(kind)
        raise SpecialistLoadError(f"cannot convert {source!r} for OpenVINO ({kind}, {weights} weights)")

    monkeypatch.setattr(compiled_runtime, "_convert_in_child", fails)
    compiled_runtime.set_runtime("auto")  # OpenVINO here: installed, and forward passes in fp32
    member = TransformerSpecialist.load(version / "m0-transformer", LABELS, serving=True)
    assert not member.holds_weights
    with caplog.at_level("WARNING", logger=compiled_runtime.__name__):
        probs = member.predict_proba(texts)
        again = member.predict_proba(texts)
    assert member.holds_weights  # torch's weights, loaded when the compile failed
    np.testing.assert_allclose(probs, expected, atol=FP32_TOLERANCE)
    np.testing.assert_array_equal(again, probs)
    assert attempts == ["logits"]  # not tried again at every request
    assert "torch serves it" in caplog.text
    compiled_runtime.set_runtime("openvino")
    named = TransformerSpecialist.load(version / "m0-transformer", LABELS, serving=True)
    with pytest.raises(SpecialistLoadError, match="cannot convert"):
        named.predict_proba(texts)
