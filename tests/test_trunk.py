"""The fine-tuned member and the embedding member run their shared lower layers once (specialists.trunk).

Tiny real BERTs (2 layers): the fine-tuned member keeps the embeddings and layer 0 frozen, so a served
version computes them once per text for both members, and the labels stay those of the whole models.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from autoannotator.core.labels import LabelSet
from autoannotator.models.ensemble import load_ensemble, share_trunks, write_manifest
from autoannotator.models.specialists import EmbeddingSpecialist, TrainConfig, TransformerSpecialist
from autoannotator.models.specialists.encoder import Encoder
from autoannotator.models.specialists.loading import load_specialist
from autoannotator.models.specialists.trunk import layer_view, lower_modules, same_weights
from autoannotator.settings import Settings
from tests import tiny

LABELS = LabelSet.of(tiny.LABELS)
FIT = {"learning_rate": 5e-3, "epochs": 3, "batch_size": 16, "seed": 0}


def _version(
    directory: Path, encoder: Path, corpus, frozen: int, encoder_seed_of_member: Path | None = None
) -> Path:
    texts, ys = [t for t, _ in corpus[:180]], [y for _, y in corpus[:180]]
    base = TransformerSpecialist.from_encoder(
        encoder_seed_of_member or encoder, LABELS, name="m0-transformer"
    )
    base.fit(texts, ys, directory / "m0-transformer", TrainConfig(**FIT, frozen_layers=frozen))
    EmbeddingSpecialist.untrained(encoder, LABELS, name="m1-embedding").fit(
        texts, ys, directory / "m1-embedding"
    )
    write_manifest(directory, version="v0001", labels=LABELS, members=["m0-transformer", "m1-embedding"])
    return directory


def test_a_frozen_member_keeps_the_encoders_lower_weights_and_trains_the_rest(
    tmp_path, tiny_encoder, tiny_corpus
):
    version = _version(tmp_path / "v", tiny_encoder, tiny_corpus, frozen=1)
    member = TransformerSpecialist.load(version / "m0-transformer", LABELS)
    start = TransformerSpecialist.from_encoder(tiny_encoder, LABELS)
    assert member.frozen_layers == 1
    assert same_weights(lower_modules(member.model, 1), lower_modules(start.model, 1))
    upper = [member.model.base_model.encoder.layer[1]], [start.model.base_model.encoder.layer[1]]
    assert not same_weights(*upper)  # the layer above did train


def test_a_member_trained_whole_moves_its_embeddings_too(tmp_path, tiny_encoder, tiny_corpus):
    texts, ys = [t for t, _ in tiny_corpus[:60]], [y for _, y in tiny_corpus[:60]]
    start = TransformerSpecialist.from_encoder(tiny_encoder, LABELS)
    tuned = start.fit(texts, ys, tmp_path / "m", TrainConfig(**FIT))
    assert tuned.frozen_layers == 0
    embeddings = [tuned.model.base_model.embeddings], [start.model.base_model.embeddings]
    assert not same_weights(*embeddings)


def test_at_least_one_layer_always_trains(tmp_path, tiny_encoder, tiny_corpus):
    texts, ys = [t for t, _ in tiny_corpus[:60]], [y for _, y in tiny_corpus[:60]]
    base = TransformerSpecialist.from_encoder(tiny_encoder, LABELS)
    tuned = base.fit(texts, ys, tmp_path / "m", TrainConfig(**FIT, frozen_layers=50))
    assert tuned.frozen_layers == 1  # 2 layers: the lower one frozen, the upper trained
    assert TrainConfig().frozen_layers == 0
    with pytest.raises(ValueError, match="frozen_layers"):
        TrainConfig(frozen_layers=-1)


def test_a_served_version_shares_the_trunk_and_gives_the_whole_models_labels(
    fp32, tmp_path, tiny_encoder, tiny_corpus
):
    version = _version(tmp_path / "v", tiny_encoder, tiny_corpus, frozen=1)
    texts = [t for t, _ in tiny_corpus[180:]] + ["rally " * 80, "a"]  # one truncated, one short
    whole = load_ensemble(version, LABELS)  # loaded to train: nothing shared
    served = load_ensemble(version, LABELS, serving=True)
    member, head = served.members
    assert (member.shared_depth, head.trunk_depth) == (1, 1)
    assert whole.members[0].shared_depth == 0
    encoder = head.encoder
    # The member holds the encoder's modules, not copies of them.
    assert member.model.base_model.embeddings is encoder.model.embeddings
    assert member.model.base_model.encoder.layer[0] is encoder.model.encoder.layer[0]
    encoder.clear_cache()
    shared = served.predict_proba(texts)
    encoder.clear_cache()  # the embedding member's vectors from its own whole pass too
    np.testing.assert_allclose(shared, whole.predict_proba(texts), atol=1e-5)


def test_the_trunk_runs_once_per_text_for_both_members(fp32, tmp_path, tiny_encoder, tiny_corpus):
    version = _version(tmp_path / "v", tiny_encoder, tiny_corpus, frozen=1)
    served = load_ensemble(version, LABELS, serving=True)
    member, head = served.members
    rows = []
    # Every embeddings module either member could run: one object when they share, two when not.
    modules = {id(m): m for m in (member.model.base_model.embeddings, head.encoder.model.embeddings)}
    hooks = [
        m.register_forward_hook(lambda _m, args, out: rows.append(out.shape[0])) for m in modules.values()
    ]
    try:
        texts = [f"{t} today" for t, _ in tiny_corpus[180:230]]  # new to the encoder's cache
        served.predict_proba(texts)
        assert sum(rows) == len(texts)  # once for both members, not once each
        rows.clear()
        member.predict_proba([f"{t} quarter" for t in texts])  # a member alone: its own pass
        assert sum(rows) == len(texts)
    finally:
        for hook in hooks:
            hook.remove()


def test_members_whose_lower_layers_differ_run_whole(fp32, tmp_path, tiny_encoder, tiny_corpus):
    """Sharing is decided by the weights, never by the recorded setting: a member trained whole, or
    frozen on another encoder, keeps its own layers, with the same labels as before."""
    other = tiny.build_encoder(tmp_path / "other-encoder", seed=5)
    cases = {
        "trained whole": _version(tmp_path / "whole", tiny_encoder, tiny_corpus, frozen=0),
        "another encoder": _version(
            tmp_path / "other", tiny_encoder, tiny_corpus, frozen=1, encoder_seed_of_member=other
        ),
    }
    texts = [t for t, _ in tiny_corpus[180:]]
    for case, version in cases.items():
        served = load_ensemble(version, LABELS, serving=True)
        assert share_trunks(served.members) == {}, case
        assert (served.members[0].shared_depth, served.members[1].trunk_depth) == (0, 0), case
        whole = load_ensemble(version, LABELS)
        np.testing.assert_allclose(served.predict_proba(texts), whole.predict_proba(texts), atol=1e-5)


def test_a_layer_view_shares_weights_and_splits_the_forward_pass_exactly(fp32, tiny_encoder):
    encoder = Encoder(tiny_encoder)
    model = encoder.model
    batch = encoder.tokenizer(["rally on the market", "a"], padding=True, return_tensors="pt")
    with torch.no_grad():
        whole = model(**batch).last_hidden_state
        lower = layer_view(model, 0, 1, pooler=False)(**batch).last_hidden_state
        upper = layer_view(model, 1, None)(inputs_embeds=lower, attention_mask=batch["attention_mask"])
    torch.testing.assert_close(upper.last_hidden_state, whole, atol=1e-6, rtol=1e-5)
    assert len(model.encoder.layer) == 2  # the original is untouched
    assert layer_view(model, 1, None).encoder.layer[0] is model.encoder.layer[1]


def test_the_setting_reaches_the_cold_start_and_every_retraining(monkeypatch):
    from autoannotator.service import training  # the service stack: here, not at the top (conftest)

    monkeypatch.setenv("AUTOANNOTATOR_SHARED_LAYERS", "3")
    s = Settings.from_env()
    assert training._first_version_plan(s).cold_start.transformer_train.frozen_layers == 3
    refine = training._refine_config(s)
    assert (refine.train.frozen_layers, refine.refit_train.frozen_layers) == (3, 3)
    monkeypatch.setenv("AUTOANNOTATOR_SHARED_LAYERS", "-1")
    with pytest.raises(ValueError, match="AUTOANNOTATOR_SHARED_LAYERS"):
        Settings.from_env()


def test_a_long_call_goes_through_in_slices_with_the_same_result(
    fp32, monkeypatch, tmp_path, tiny_encoder, tiny_corpus
):
    """The trunk's states are kept for one slice at a time, so a call of many texts holds a bounded store."""
    from autoannotator.models import ensemble as ensemble_module
    from autoannotator.models.specialists.trunk import Trunk

    version = _version(tmp_path / "v", tiny_encoder, tiny_corpus, frozen=1)
    served = load_ensemble(version, LABELS, serving=True)
    whole = load_ensemble(version, LABELS)
    texts = [f"{t} on {i}" for i, (t, _) in enumerate(tiny_corpus)]  # 240 texts
    asked: list[int] = []
    states = Trunk.states
    monkeypatch.setattr(Trunk, "states", lambda self, t: asked.append(len(t)) or states(self, t))
    monkeypatch.setattr(ensemble_module, "SHARED_TRUNK_SLICE", 50)
    served.members[1].encoder.clear_cache()
    shared = served.predict_proba(texts)
    served.members[1].encoder.clear_cache()
    np.testing.assert_allclose(shared, whole.predict_proba(texts), atol=1e-5)
    assert asked and max(asked) == 50 and sum(asked) == 2 * len(texts)  # both members, slice by slice


def test_an_mpnet_splits_as_exactly_and_an_unknown_architecture_trains_whole(tmp_path):
    """The other encoder family the product ships for (all-mpnet-base-v2), built tiny from a config;
    DistilBERT names its layers otherwise, so it is never split and its members train whole."""
    from transformers import DistilBertConfig, DistilBertModel, MPNetConfig, MPNetForSequenceClassification

    from autoannotator.models.specialists.trunk import frozen_depth, layers_of

    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
    )
    model = MPNetForSequenceClassification(config).eval()
    ids = torch.randint(5, 50, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
        lower = layer_view(model.mpnet, 0, 1, pooler=False)(input_ids=ids, attention_mask=mask)
        upper = layer_view(model, 1, None)(inputs_embeds=lower.last_hidden_state, attention_mask=mask)
    torch.testing.assert_close(upper.logits, whole, atol=1e-6, rtol=1e-5)
    distil = DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64))
    assert layers_of(distil) is None and frozen_depth(distil, 1) == 0


# ------------------------------------------------------------ an embedding member on fewer layers


def test_an_embedding_member_can_pool_the_states_after_fewer_layers(
    fp32, tmp_path, tiny_encoder, tiny_corpus
):
    texts, ys = [t for t, _ in tiny_corpus[:120]], [y for _, y in tiny_corpus[:120]]
    head = EmbeddingSpecialist.untrained(tiny_encoder, LABELS, layers=1).fit(texts, ys, tmp_path / "m1")
    encoder = head.encoder
    probe = [t for t, _ in tiny_corpus[200:210]]
    batch = encoder.tokenizer(probe, padding=True, return_tensors="pt")
    with torch.no_grad():
        after_one = encoder.model(**batch, output_hidden_states=True).hidden_states[1]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((after_one * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    encoder.clear_cache()
    np.testing.assert_allclose(head.features(probe), expected, atol=1e-5)
    # Other vectors than the last layer's, cached apart from them.
    assert not np.allclose(encoder.embed(probe), expected, atol=1e-3)
    np.testing.assert_allclose(head.features(probe), expected, atol=1e-5)
    # The choice is recorded, survives a reload and every refit.
    reloaded = load_specialist(tmp_path / "m1", LABELS)
    assert reloaded.layers == 1
    refit = reloaded.fit(texts[:60], ys[:60], tmp_path / "m1b")
    assert refit.layers == 1 and load_specialist(tmp_path / "m1b", LABELS).layers == 1
    # As many layers as the encoder has, or more, is every layer.
    assert np.allclose(encoder.embed(probe, layers=5), encoder.embed(probe))
    with pytest.raises(ValueError, match="layers"):
        EmbeddingSpecialist.untrained(tiny_encoder, LABELS, layers=-1)


def test_the_embedding_layers_setting_reaches_the_cold_start(monkeypatch):
    from autoannotator.learning.coldstart import untrained_member
    from autoannotator.service import training

    monkeypatch.setenv("AUTOANNOTATOR_EMBEDDING_LAYERS", "4")
    config = training._first_version_plan(Settings.from_env()).cold_start
    assert config.embedding_layers == 4
    member = untrained_member("embedding-linear", 1, LABELS, config)
    assert member.layers == 4
    monkeypatch.setenv("AUTOANNOTATOR_EMBEDDING_LAYERS", "-1")
    with pytest.raises(ValueError, match="AUTOANNOTATOR_EMBEDDING_LAYERS"):
        Settings.from_env()
