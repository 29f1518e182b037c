import json
import re
import shutil

import numpy as np
import pytest

from autoannotator.core.labels import LabelSet
from autoannotator.errors import BadInputError, LabelMappingError, TrainingError
from autoannotator.learning.coldstart import ColdStartConfig, check_seed, cold_start
from autoannotator.models.specialists import TrainConfig, load_specialist
from autoannotator.models.specialists import encoder as encoder_module
from autoannotator.models.specialists.encoder import MPNET_DIR, auto_encoder, model_reference
from tests import tiny

LABELS = LabelSet.of(tiny.LABELS)


def test_cold_start_builds_different_kinds_that_disagree_somewhere(tmp_path, tiny_encoder, tiny_corpus):
    seed, stream = tiny_corpus[:150], tiny_corpus[150:]
    config = ColdStartConfig(
        encoder=str(tiny_encoder),
        transformer_train=TrainConfig(learning_rate=5e-3, epochs=6, max_length=32),
    )
    result = cold_start(
        [t for t, _ in seed],
        [y for _, y in seed],
        LABELS,
        tmp_path,
        config,
        probe_texts=[t for t, _ in stream],
    )
    assert [m.kind for m in result.members] == ["transformer", "embedding-linear", "ngram-linear"]
    assert result.seed_counts == {lab: sum(1 for _, y in seed if y == lab) for lab in LABELS.names}
    d = result.disagreement
    assert d is not None and d.shape == (3, 3)
    np.testing.assert_allclose(np.diag(d), 0)
    assert d[np.triu_indices(3, 1)].max() > 0  # not clones
    report = result.report()
    assert set(report["pairwise_disagreement"]) == {
        "m0-transformer vs m1-embedding-linear",
        "m0-transformer vs m2-ngram-linear",
        "m1-embedding-linear vs m2-ngram-linear",
    }
    json.dumps(report)  # the report is plain JSON
    for m in result.members:  # each member reloads from its own directory
        assert load_specialist(tmp_path / m.name, LABELS).kind == m.kind


def test_seed_must_cover_every_label():
    with pytest.raises(TrainingError, match=re.escape("too few examples of {'neutral': 0}")):
        check_seed(["bearish", "bullish", "bearish", "bullish"], LABELS, 2)
    with pytest.raises(LabelMappingError, match="unknown label 'positive'"):
        check_seed(["positive"], LABELS, 1)


def test_config_refuses_unknown_kinds():
    with pytest.raises(ValueError, match="unknown specialist kinds"):
        ColdStartConfig(kinds=("transformer", "svm"))


def test_cold_start_refuses_empty_texts(tmp_path):
    texts = ["rally gains", "plunge losses", "meeting schedule", ""]
    with pytest.raises(BadInputError, match="empty"):
        cold_start(
            texts,
            ["bullish", "bearish", "neutral", "neutral"],
            LABELS,
            tmp_path,
            ColdStartConfig(kinds=("ngram-linear",), min_per_label=1),
        )


def test_an_encoder_named_by_a_relative_path_is_recorded_absolute(
    tmp_path, tiny_encoder, tiny_corpus, monkeypatch
):
    """A worker or web process may serve from another working directory than the one that trained."""
    monkeypatch.chdir(tiny_encoder.parent)
    config = ColdStartConfig(encoder=tiny_encoder.name, kinds=("embedding-linear",))
    result = cold_start(
        [t for t, _ in tiny_corpus[:60]], [y for _, y in tiny_corpus[:60]], LABELS, tmp_path / "m", config
    )
    assert result.members[0].meta.base_model == str(tiny_encoder.resolve())
    monkeypatch.chdir(tmp_path)
    reloaded = load_specialist(tmp_path / "m" / result.members[0].name, LABELS)
    assert reloaded.predict_proba(["shares rally"]).shape == (1, len(LABELS))


# ------------------------------------------------------------------- AUTOANNOTATOR_ENCODER=auto
# No CUDA GPU exists where these tests run, so they pass cuda=True (or patch cuda_present) themselves.


def test_auto_is_minilm_on_a_cpu_even_with_mpnet_installed(tmp_path):
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    assert auto_encoder(cuda=False, search_dir=tmp_path) == "minilm"


def test_auto_with_cuda_takes_the_installed_mpnet_folder(tmp_path, monkeypatch):
    """cuda=True stands for a CUDA GPU, which this machine has not. The folder is recorded absolute."""
    (tmp_path / "encoders" / "all-mpnet-base-v2").mkdir(parents=True)
    (tmp_path / "encoders" / "all-mpnet-base-v2" / "config.json").write_text("{}", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert auto_encoder(cuda=True, search_dir=MPNET_DIR) == str(tmp_path.resolve() / MPNET_DIR)


def test_auto_with_cuda_but_no_mpnet_is_minilm(tmp_path):
    """cuda=True stands for a CUDA GPU, which this machine has not."""
    assert auto_encoder(cuda=True, search_dir=tmp_path / "missing") == "minilm"
    (tmp_path / "empty").mkdir()  # a folder without a model (no config.json) is not an encoder
    assert auto_encoder(cuda=True, search_dir=tmp_path / "empty") == "minilm"


def test_a_named_encoder_is_never_replaced(monkeypatch):
    monkeypatch.setattr(encoder_module, "cuda_present", lambda: True)
    assert (
        model_reference("sentence-transformers/all-mpnet-base-v2")
        == "sentence-transformers/all-mpnet-base-v2"
    )
    assert model_reference("minilm") == "minilm"


def test_auto_is_resolved_before_the_cold_start_records_its_base_model(
    tmp_path, tiny_encoder, tiny_corpus, monkeypatch
):
    """cuda_present is patched to stand for a CUDA GPU, which this machine has not; the tiny encoder
    stands for an installed mpnet. The version records that folder, never "auto", and loads it again
    on a CPU from another working directory."""
    work = tmp_path / "work"
    shutil.copytree(tiny_encoder, work / MPNET_DIR)
    monkeypatch.chdir(work)
    monkeypatch.setattr(encoder_module, "cuda_present", lambda: True)
    config = ColdStartConfig(
        encoder="auto",
        kinds=("transformer", "embedding-linear"),
        transformer_train=TrainConfig(learning_rate=5e-3, epochs=1, max_length=32),
    )
    seed = tiny_corpus[:60]
    result = cold_start([t for t, _ in seed], [y for _, y in seed], LABELS, tmp_path / "m", config)
    mpnet = str((work / MPNET_DIR).resolve())
    assert [m.meta.base_model for m in result.members] == [mpnet, mpnet]

    monkeypatch.setattr(encoder_module, "cuda_present", lambda: False)  # served on a CPU
    monkeypatch.chdir(tmp_path)
    for m in result.members:
        reloaded = load_specialist(tmp_path / "m" / m.name, LABELS)
        assert reloaded.meta.base_model == mpnet
        assert reloaded.predict_proba(["shares rally"]).shape == (1, len(LABELS))
