"""Every kind of specialist on tiny real models: load, map labels, predict, fine-tune into a new dir."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from autoannotator.core.labels import LabelSet
from autoannotator.errors import BadInputError, LabelMappingError, SpecialistLoadError, TrainingError
from autoannotator.models.specialists import (
    EmbeddingSpecialist,
    NgramSpecialist,
    TrainConfig,
    TransformerSpecialist,
    load_specialist,
)
from autoannotator.models.specialists.base import MAX_TEXT_CHARS, staged_dir
from autoannotator.models.specialists.runtime import (
    available_cpus,
    configure_torch,
    inference_mode,
    threads_per_process,
)
from autoannotator.settings import Settings
from tests import tiny

LABELS = LabelSet.of(tiny.LABELS)


def split(corpus, n_train=180):
    train, test = corpus[:n_train], corpus[n_train:]
    return [t for t, _ in train], [y for _, y in train], [t for t, _ in test], [y for _, y in test]


def accuracy(spec, texts, ys):
    return float((spec.predict_proba(texts).argmax(1) == np.array(LABELS.indices(ys))).mean())


def test_hub_style_classifier_labels_are_mapped_into_project_order(tmp_path):
    d = tiny.build_classifier(tmp_path / "clf", ["POS", "NEG", "NEU"])
    spec = TransformerSpecialist.load(d, LABELS)
    assert spec.targets == [1, 0, 2]
    probs = spec.predict_proba(["shares rally", "the market"])
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    # Column order is the project's: the model's POS column (index 0) lands in "bullish" (index 1).
    with inference_mode(spec.device):  # the same precision as predict_proba's
        raw = torch.softmax(spec.model(**spec._encode(["shares rally"])).logits.float(), -1).numpy()[0]
    np.testing.assert_allclose(probs[0], [raw[1], raw[0], raw[2]], atol=1e-6)


def test_classifier_with_generic_labels_is_refused_unless_mapped(tmp_path):
    d = tiny.build_classifier(tmp_path / "clf", ["LABEL_0", "LABEL_1", "LABEL_2"])
    with pytest.raises(LabelMappingError, match="LABEL_0"):
        TransformerSpecialist.load(d, LABELS)
    spec = TransformerSpecialist.load(
        d, LABELS, label_mapping={"LABEL_0": "neutral", "LABEL_1": "bearish", "LABEL_2": "bullish"}
    )
    assert spec.targets == [2, 0, 1]


def test_missing_model_gives_a_load_error_that_mentions_offline_use(tmp_path):
    with pytest.raises(SpecialistLoadError, match="local directory"):
        TransformerSpecialist.load(tmp_path / "nothing-here", LABELS)


def test_empty_text_is_refused_and_huge_text_is_clipped(tmp_path, tiny_corpus, tiny_encoder):
    texts, ys, _, _ = split(tiny_corpus)
    spec = NgramSpecialist.untrained(LABELS).fit(texts, ys, tmp_path / "ng")
    with pytest.raises(BadInputError, match="text #1 is empty"):
        spec.predict_proba(["rally", "   "])
    huge = "rally " * (MAX_TEXT_CHARS // 2)
    probs = spec.predict_proba([huge])
    assert probs.shape == (1, 3) and np.isfinite(probs).all()
    clf = TransformerSpecialist.load(tiny.build_classifier(tmp_path / "clf", ["NEG", "POS", "NEU"]), LABELS)
    assert clf.predict_proba([huge]).shape == (1, 3)  # truncated to max_length tokens, no error
    # The shared encoder truncates to the model's 64 positions too, not to the default 128.
    emb = EmbeddingSpecialist.untrained(tiny_encoder, LABELS).fit(texts, ys, tmp_path / "emb")
    assert emb.predict_proba([huge, "rally"]).shape == (2, 3)


def test_transformer_fine_tune_learns_writes_a_new_dir_and_leaves_the_old_model_alone(
    tmp_path, tiny_encoder, tiny_corpus
):
    texts, ys, test_x, test_y = split(tiny_corpus)
    base = TransformerSpecialist.from_encoder(tiny_encoder, LABELS, name="tf")
    before = base.predict_proba(test_x)
    config = TrainConfig(
        learning_rate=5e-3, weight_decay=0.05, epochs=6, batch_size=16, max_length=32, seed=0
    )
    tuned = base.fit(texts, ys, tmp_path / "v1", config)
    np.testing.assert_allclose(base.predict_proba(test_x), before)  # the serving model is untouched
    assert accuracy(tuned, test_x, test_y) > 0.75
    meta = json.loads((tmp_path / "v1" / "specialist.json").read_text())
    assert meta["train_config"] == asdict(config)  # the configured values are the ones used
    assert meta["labels"] == list(LABELS.names) and meta["n_train"] == len(texts)
    assert len(meta["metrics"]["train_loss"]) == 6
    assert meta["metrics"]["train_loss"][-1] < meta["metrics"]["train_loss"][0]
    reloaded = load_specialist(tmp_path / "v1", LABELS)
    np.testing.assert_allclose(reloaded.predict_proba(test_x), tuned.predict_proba(test_x), atol=1e-5)
    # Fine-tuning the reloaded version continues from it, into yet another directory.
    again = reloaded.fit(texts[:30], ys[:30], tmp_path / "v2", TrainConfig(epochs=1))
    assert json.loads((tmp_path / "v2" / "specialist.json").read_text())["parent"] == str(tmp_path / "v1")
    assert again.directory == tmp_path / "v2"


def test_learning_rate_is_really_used(tmp_path, tiny_encoder, tiny_corpus):
    texts, ys, _, _ = split(tiny_corpus, 60)
    base = TransformerSpecialist.from_encoder(tiny_encoder, LABELS)
    slow = base.fit(texts, ys, tmp_path / "slow", TrainConfig(learning_rate=1e-7, epochs=1))
    fast = base.fit(texts, ys, tmp_path / "fast", TrainConfig(learning_rate=1e-2, epochs=1))

    def drift(spec):
        return sum(
            float((a - b).detach().abs().sum())
            for a, b in zip(spec.model.parameters(), base.model.parameters(), strict=True)
        )

    assert drift(fast) > 100 * drift(slow)


def test_versions_are_never_overwritten(tmp_path, tiny_corpus):
    texts, ys, _, _ = split(tiny_corpus)
    spec = NgramSpecialist.untrained(LABELS)
    spec.fit(texts, ys, tmp_path / "v1")
    with pytest.raises(FileExistsError):
        spec.fit(texts, ys, tmp_path / "v1")


def test_a_crash_while_writing_leaves_no_half_written_dir(tmp_path):
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "v1") as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["embedding", "ngram"])
def test_linear_kinds_train_save_and_reload_exactly(tmp_path, tiny_encoder, tiny_corpus, kind):
    texts, ys, test_x, test_y = split(tiny_corpus)
    untrained = (
        EmbeddingSpecialist.untrained(tiny_encoder, LABELS)
        if kind == "embedding"
        else NgramSpecialist.untrained(LABELS)
    )
    with pytest.raises(TrainingError, match="not been trained"):
        untrained.predict_proba(["x"])
    spec = untrained.fit(texts, ys, tmp_path / kind)
    assert accuracy(spec, test_x, test_y) > (0.6 if kind == "embedding" else 0.9)
    reloaded = load_specialist(tmp_path / kind, LABELS)
    assert type(reloaded) is type(spec)
    np.testing.assert_allclose(reloaded.predict_proba(test_x), spec.predict_proba(test_x), atol=1e-6)
    # No pickles in a model store: everything is arrays and JSON.
    assert not [p for p in (tmp_path / kind).iterdir() if p.suffix in {".pkl", ".pickle", ".joblib"}]


def test_linear_head_handles_classes_absent_from_training(tmp_path, tiny_corpus):
    rows = [(t, y) for t, y in tiny_corpus if y != "neutral"][:60]
    spec = NgramSpecialist.untrained(LABELS).fit([t for t, _ in rows], [y for _, y in rows], tmp_path / "ng")
    probs = spec.predict_proba([t for t, _ in tiny_corpus[:50]])
    assert probs[:, LABELS.index("neutral")].max() < 1e-6
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)


def test_training_refuses_bad_data(tmp_path, tiny_corpus):
    spec = NgramSpecialist.untrained(LABELS)
    with pytest.raises(TrainingError, match="no training examples"):
        spec.fit([], [], tmp_path / "a")
    with pytest.raises(TrainingError, match="single label"):
        spec.fit(["rally up", "surge on"], ["bullish", "bullish"], tmp_path / "b")
    with pytest.raises(LabelMappingError, match="unknown label 'positive'"):
        spec.fit(["rally", "plunge"], ["positive", "bearish"], tmp_path / "c")
    with pytest.raises(BadInputError, match="empty"):
        spec.fit(["rally", ""], ["bullish", "bearish"], tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_linear_specialist_of_another_project_is_refused(tmp_path, tiny_corpus):
    texts, ys, _, _ = split(tiny_corpus)
    NgramSpecialist.untrained(LABELS).fit(texts, ys, tmp_path / "ng")
    with pytest.raises(LabelMappingError, match="was trained for labels"):
        load_specialist(tmp_path / "ng", LabelSet.of(["negative", "neutral", "positive"]))


def test_train_config_validates():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=0)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    assert TrainConfig() == TrainConfig(learning_rate=2e-5, weight_decay=0.01, epochs=3)  # the paper's


def test_thread_count_fits_the_machine():
    configure_torch()
    assert torch.get_num_threads() == available_cpus()


def test_each_process_takes_its_share_of_the_cpus():
    assert threads_per_process(cpus=16) == 16
    assert threads_per_process(sharers=4, cpus=16) == 4  # 3 gunicorn workers + 1 label worker
    assert threads_per_process(sharers=3, cpus=16) == 5
    assert threads_per_process(sharers=5, cpus=2) == 1  # more processes than CPUs: one each
    assert threads_per_process(threads=3, sharers=4, cpus=16) == 3  # set by hand, it wins


def test_the_web_process_sizes_torch_and_blas_threads_from_its_settings(tmp_path, redis_url):
    from threadpoolctl import threadpool_info

    from autoannotator.service.app import create_app

    env = {"AUTOANNOTATOR_MODEL_DIR": str(tmp_path), "AUTOANNOTATOR_REDIS_URL": redis_url}
    try:
        create_app(Settings.from_env({**env, "AUTOANNOTATOR_THREADS": "1"}))
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
        create_app(Settings.from_env({**env, "AUTOANNOTATOR_CPU_SHARERS": str(available_cpus())}))
        assert torch.get_num_threads() == 1
    finally:
        configure_torch(available_cpus())
    assert torch.get_num_threads() == available_cpus()


@pytest.mark.parametrize(
    ("name", "value"), [("AUTOANNOTATOR_THREADS", "-1"), ("AUTOANNOTATOR_CPU_SHARERS", "0")]
)
def test_thread_settings_refuse_what_means_nothing(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})
