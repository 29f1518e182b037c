"""The serving forward path: batches by token length, one tokenization per tokenizer per ensemble
call, and forward passes in reduced precision (bf16 autocast) with fp32 weights.

Real tiny transformers throughout; the fine-tuned one is trained here so that its margins are those
of a model that learned something (an untrained head answers ~1/3 everywhere, where any rounding
flips a label).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from autoannotator.core.labels import LabelSet
from autoannotator.errors import TrainingError
from autoannotator.models.ensemble import Ensemble, load_ensemble, write_manifest
from autoannotator.models.specialists import (
    EmbeddingSpecialist,
    NgramSpecialist,
    TrainConfig,
    TransformerSpecialist,
    runtime,
)
from autoannotator.models.specialists import encoder as encoder_module
from autoannotator.models.specialists.batching import (
    PAD_MULTIPLE,
    TOKEN_MULTIPLE,
    batch_width,
    length_batches,
    shared_tokens,
    token_ids,
    tokenizer_key,
)
from autoannotator.models.specialists.encoder import Encoder
from autoannotator.models.specialists.loading import load_specialist
from autoannotator.settings import Settings
from tests import tiny

LABELS = LabelSet.of(tiny.LABELS)

# bf16 keeps 8 bits of mantissa: a probability moves by at most a few hundredths on these models,
# and a label changes only where two classes were within that of each other.
BF16_PROB_TOLERANCE = 0.03
BF16_MIN_AGREEMENT = 0.98


@pytest.fixture
def precision() -> Iterator[None]:
    """Each test sets the precision it needs; the process's setting comes back afterwards."""
    saved = runtime._precision
    yield
    runtime.configure_precision(saved)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_encoder, tiny_corpus) -> TransformerSpecialist:
    texts, ys = [t for t, _ in tiny_corpus[:180]], [y for _, y in tiny_corpus[:180]]
    base = TransformerSpecialist.from_encoder(tiny_encoder, LABELS, name="tf")
    config = TrainConfig(learning_rate=5e-3, epochs=6, batch_size=16, max_length=32, seed=0)
    return base.fit(texts, ys, tmp_path_factory.mktemp("tuned") / "v1", config)


def _one_by_one(spec: TransformerSpecialist, texts: list[str]) -> np.ndarray:
    """The reference: each text alone through the model in fp32, no padding at all."""
    rows = []
    with torch.no_grad():
        for text in texts:
            logits = spec.model(**spec._encode([text])).logits
            rows.append(torch.softmax(logits, -1)[0].numpy())
    return np.asarray(rows)[:, np.argsort(spec.targets)]


def test_token_length_batches_give_what_each_text_alone_gives(precision, tuned, tiny_corpus):
    runtime.configure_precision("fp32")
    texts = [t for t, _ in tiny_corpus[180:]] + ["rally " * 40, "a"]  # one truncated, one short
    tuned.batch_size = 7  # batches of mixed lengths, a last one not full
    try:
        np.testing.assert_allclose(tuned.predict_proba(texts), _one_by_one(tuned, texts), atol=1e-5)
    finally:
        tuned.batch_size = 32


def test_batches_group_texts_of_similar_token_counts_and_mask_the_padding():
    ids = [[1] * n for n in (5, 2, 9, 3, 2, 7, 12)]
    seen = []
    widths = []
    for idx, batch in length_batches(ids, 2, pad_id=0, device=torch.device("cpu"), max_width=32):
        lengths = [len(ids[i]) for i in idx]
        seen.extend(idx.tolist())
        widths.append(batch["input_ids"].shape[1])
        assert batch["input_ids"].shape[0] == len(idx)
        assert batch["attention_mask"].sum(1).tolist() == lengths
        assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert [len(ids[i]) for i in seen] == [2, 2, 3, 5, 7, 9, 12]  # shortest first, every text once
    assert sorted(seen) == list(range(len(ids)))
    # Widths rounded up so that every batch holds a multiple of 32 tokens (two rows: a multiple of
    # 16; the last, one row: 32), never past max_width.
    assert widths == [16, 16, 16, 32]
    capped = [b["input_ids"].shape[1] for _, b in length_batches(ids, 2, 0, torch.device("cpu"), 12)]
    assert capped == [12, 12, 12, 12]


def test_batch_widths_keep_the_count_of_distinct_batch_shapes_small():
    assert (PAD_MULTIPLE, TOKEN_MULTIPLE) == (8, 32)
    # Full batches pad only to a multiple of 8 tokens a text; a batch's token count is always a
    # multiple of 32, so one-text calls see 4 widths up to 128, not 16.
    assert batch_width(32, 17, 128) == 24 and batch_width(4, 17, 128) == 24
    assert batch_width(2, 17, 128) == 32 and batch_width(2, 33, 128) == 48
    assert {batch_width(1, n, 128) for n in range(1, 129)} == {32, 64, 96, 128}
    assert {batch_width(3, n, 128) for n in range(1, 129)} == {32, 64, 96, 128}
    for rows in range(1, 33):
        for longest in range(1, 129):
            width = batch_width(rows, longest, 128)
            assert longest <= width <= 128 and width % PAD_MULTIPLE == 0
            assert (rows * width) % TOKEN_MULTIPLE == 0
    counts = {rows * batch_width(rows, n, 128) for rows in range(1, 33) for n in range(1, 129)}
    assert len(counts) <= 32 * 128 // TOKEN_MULTIPLE
    assert batch_width(1, 20, 24) == 24 and batch_width(1, 300, 128) == 300  # the cap; a longer text


def test_members_on_one_encoder_tokenize_each_text_once_per_ensemble_call(
    monkeypatch, tmp_path, tiny_encoder, tiny_corpus
):
    texts, ys = [t for t, _ in tiny_corpus[:120]], [y for _, y in tiny_corpus[:120]]
    emb = EmbeddingSpecialist.untrained(tiny_encoder, LABELS).fit(texts, ys, tmp_path / "emb")
    clf = TransformerSpecialist.load(tiny.build_classifier(tmp_path / "clf", list(LABELS.names)), LABELS)
    ngram = NgramSpecialist.untrained(LABELS).fit(texts, ys, tmp_path / "ng")
    encoder = Encoder.shared(tiny_encoder, max_length=clf.max_length)
    assert tokenizer_key(clf.tokenizer) == tokenizer_key(encoder.tokenizer)  # two folders, one tokenizer
    calls: list[int] = []
    cls = type(clf.tokenizer)
    assert type(encoder.tokenizer) is cls
    real = cls.__call__

    def counted(self, batch, *args, **kwargs):
        calls.append(len(batch))
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counted)
    fresh = [f"{t} fresh{i}" for i, (t, _) in enumerate(tiny_corpus[120:150])]  # not in the encoder's cache
    Ensemble([clf, emb, ngram], LABELS).predict_proba(fresh)
    assert calls == [len(fresh)]  # one tokenization, by whichever member asked first
    calls.clear()
    clf.predict_proba(fresh[:5])  # outside an ensemble call nothing is shared or kept
    clf.predict_proba(fresh[:5])
    assert calls == [5, 5]


def test_tokenizers_that_cut_text_differently_never_share(tmp_path):
    a = tiny.save_tokenizer(tmp_path / "a")
    b = tiny.save_tokenizer(tmp_path / "b")
    assert tokenizer_key(a) == tokenizer_key(b)
    b.add_tokens(["selloffs"])
    assert tokenizer_key(a) != tokenizer_key(b)
    with shared_tokens():
        first = token_ids(a, tokenizer_key(a), ["big selloffs"], 16)
        second = token_ids(b, tokenizer_key(b), ["big selloffs"], 16)
    assert first != second


def test_truncation_and_padding_a_tokenizer_file_carries_do_not_make_it_another_tokenizer(tmp_path):
    a = tiny.save_tokenizer(tmp_path / "a")
    b = tiny.save_tokenizer(tmp_path / "b")
    b.backend_tokenizer.enable_truncation(max_length=128)  # as the packaged MiniLM's file has them
    b.backend_tokenizer.enable_padding(length=128)
    assert tokenizer_key(a) == tokenizer_key(b)
    assert token_ids(a, "a", ["big selloffs"] * 2, 16) == token_ids(b, "b", ["big selloffs"] * 2, 16)


def _two_encoder_members(directory: Path, encoder: Path, corpus: list[tuple[str, str]]) -> Path:
    """A version directory: a transformer member and an embedding head on the same tiny encoder (the
    classifier's folder has a tokenizer file of its own, as a fine-tuned member's has)."""
    texts, ys = [t for t, _ in corpus[:120]], [y for _, y in corpus[:120]]
    tiny.build_classifier(directory / "m0-transformer", list(LABELS.names))
    EmbeddingSpecialist.untrained(encoder, LABELS).fit(texts, ys, directory / "m1-embedding")
    write_manifest(directory, version="v0001", labels=LABELS, members=["m0-transformer", "m1-embedding"])
    return directory


def test_a_served_ensembles_transformer_members_share_one_tokenizer_safely_across_threads(
    monkeypatch, tmp_path, tiny_encoder, tiny_corpus
):
    version = _two_encoder_members(tmp_path / "v0001", tiny_encoder, tiny_corpus)
    monkeypatch.setattr(encoder_module, "_ENCODERS", {})  # the served encoder loads with the version
    served = load_ensemble(version, LABELS, serving=True)
    clf, emb = served.members
    assert isinstance(clf, TransformerSpecialist) and isinstance(emb, EmbeddingSpecialist)
    shared = clf.tokenizer
    assert emb.encoder.tokenizer is shared  # one object for both members: loaded once per process
    # A member loaded to be trained keeps a tokenizer of its own.
    assert load_specialist(version / "m0-transformer", LABELS).tokenizer is not shared

    # The shared object from many threads at once, each asking for its own length (so each call
    # changes the truncation the last one set), against tokenizers of their own, one at a time.
    texts = [t for t, _ in tiny_corpus] + ["rally " * 40]
    lengths = (6, 9, 16, 32)
    separate = {n: tiny.save_tokenizer(tmp_path / f"own-{n}") for n in lengths}
    expected = {n: token_ids(separate[n], "own", texts, n) for n in lengths}
    assert len({str(ids) for ids in expected.values()}) == len(lengths)  # the lengths do differ

    def cut(job: int) -> tuple[int, list[list[int]]]:
        n = lengths[job % len(lengths)]
        chunk = texts[job % 7 :: 3]
        ids = token_ids(shared, tokenizer_key(shared), chunk, n)
        want = [expected[n][texts.index(t)] for t in chunk]
        return int(ids == want), ids

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(cut, range(400)))
    assert all(ok for ok, _ in results)
    # The ensemble itself from several threads: each member the same as it alone, one at a time.
    fresh = [f"{t} thread{i}" for i, (t, _) in enumerate(tiny_corpus[120:200])]
    alone = served.predict_proba(fresh)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for got in pool.map(lambda _: served.predict_proba(fresh), range(8)):
            np.testing.assert_allclose(got, alone, atol=1e-6)


def test_a_serving_encoder_keeps_a_small_cache_and_one_that_trains_a_large_one(
    monkeypatch, tmp_path, tiny_encoder, tiny_corpus
):
    version = _two_encoder_members(tmp_path / "v0001", tiny_encoder, tiny_corpus)
    monkeypatch.setattr(encoder_module, "_ENCODERS", {})  # a serving process: no head was fit in it
    assert encoder_module.SERVING_CACHE_SIZE <= encoder_module.TRAINING_CACHE_SIZE // 10
    monkeypatch.setattr(encoder_module, "SERVING_CACHE_SIZE", 5)  # read where it is set, when asked
    served = load_specialist(version / "m1-embedding", LABELS, serving=True)
    assert isinstance(served, EmbeddingSpecialist) and served.serving
    encoder = served.encoder
    assert encoder.cache_size == 5
    texts = [t for t, _ in tiny_corpus[:30]]
    served.predict_proba(texts)
    assert len(encoder._cache) == 5  # the bound holds: the last 5 texts' vectors
    # A head loaded to be refit (or being fit) asks the same encoder for room for a pool.
    trainable = load_specialist(version / "m1-embedding", LABELS)
    assert isinstance(trainable, EmbeddingSpecialist) and not trainable.serving
    assert trainable.encoder is encoder
    assert encoder.cache_size == encoder_module.TRAINING_CACHE_SIZE
    assert served.encoder.cache_size == encoder_module.TRAINING_CACHE_SIZE  # never shrinks back


def test_bf16_forward_passes_keep_the_labels_of_fp32_within_the_stated_tolerance(
    precision, tuned, tiny_encoder, tiny_corpus
):
    texts = [t for t, _ in tiny_corpus]
    runtime.configure_precision("fp32")
    exact = tuned.predict_proba(texts)
    emb_exact = Encoder(tiny_encoder)._forward(texts)
    runtime.configure_precision("bf16")
    reduced = tuned.predict_proba(texts)
    emb_reduced = Encoder(tiny_encoder)._forward(texts)
    assert not np.array_equal(exact, reduced)  # bf16 did run: the figures moved
    assert np.abs(exact - reduced).max() <= BF16_PROB_TOLERANCE
    assert (exact.argmax(1) == reduced.argmax(1)).mean() >= BF16_MIN_AGREEMENT
    cosine = (emb_exact * emb_reduced).sum(1)  # unit vectors
    assert cosine.min() > 0.99
    assert next(tuned.model.parameters()).dtype == torch.float32  # weights stay fp32 for training


def test_a_member_loaded_to_serve_keeps_bf16_weights_and_refuses_to_be_trained(
    precision, tuned, tiny_encoder, tiny_corpus, tmp_path
):
    texts, ys = [t for t, _ in tiny_corpus], [y for _, y in tiny_corpus]
    assert tuned.directory is not None
    runtime.configure_precision("bf16")
    served = TransformerSpecialist.load(tuned.directory, LABELS, serving=True)
    assert {p.dtype for p in served.model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in served.model.parameters())
    # Against fp32 weights under the same autocast: the same labels within bf16's tolerance.
    reference, got = tuned.predict_proba(texts), served.predict_proba(texts)
    assert np.abs(reference - got).max() <= BF16_PROB_TOLERANCE
    assert (reference.argmax(1) == got.argmax(1)).mean() >= BF16_MIN_AGREEMENT
    with pytest.raises(TrainingError, match="serving=False"):
        served.fit(texts[:20], ys[:20], tmp_path / "never")
    with pytest.raises(TrainingError, match="serving=False"):
        served.save(tmp_path / "never")
    assert not (tmp_path / "never").exists()
    # The frozen encoder is held once per dtype: a change of precision loads it anew.
    in_bf16 = Encoder.shared(tiny_encoder)
    assert next(in_bf16.model.parameters()).dtype == torch.bfloat16
    runtime.configure_precision("fp32")
    in_fp32 = Encoder.shared(tiny_encoder)
    assert in_fp32 is not in_bf16 and next(in_fp32.model.parameters()).dtype == torch.float32
    fp32_served = TransformerSpecialist.load(tuned.directory, LABELS, serving=True)
    assert next(fp32_served.model.parameters()).dtype == torch.float32  # serving in fp32: fp32 weights


def test_precision_follows_the_setting_and_the_hardware(precision, monkeypatch):
    cpu = torch.device("cpu")
    runtime.configure_precision("fp32")
    assert runtime.inference_dtype(cpu) is None
    runtime.configure_precision("bf16")
    assert runtime.inference_dtype(cpu) is torch.bfloat16
    runtime.configure_precision("fp16")
    assert runtime.inference_dtype(cpu) is None  # fp16 on a CPU is emulated: fp32 instead
    runtime.configure_precision("auto")
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: True)
    assert runtime.inference_dtype(cpu) is torch.bfloat16
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: False)
    assert runtime.inference_dtype(cpu) is None
    with pytest.raises(ValueError, match="precision"):
        runtime.configure_precision("int4")


def test_the_web_process_applies_its_precision_setting_before_serving(precision, tmp_path, redis_url):
    from autoannotator.service.app import create_app

    env = {"AUTOANNOTATOR_MODEL_DIR": str(tmp_path), "AUTOANNOTATOR_REDIS_URL": redis_url}
    create_app(Settings.from_env({**env, "AUTOANNOTATOR_PRECISION": "fp32"}))
    assert runtime._precision == "fp32"
    create_app(Settings.from_env({**env, "AUTOANNOTATOR_PRECISION": "bf16"}))
    assert runtime.inference_dtype(torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="AUTOANNOTATOR_PRECISION"):
        Settings.from_env({"AUTOANNOTATOR_PRECISION": "int8"})


def test_bench_precision_compares_one_version_in_two_precisions(
    precision, tmp_path, tuned, tiny_encoder, tiny_corpus
):
    from autoannotator.lab.bench_precision import run_bench_precision
    from autoannotator.storage.registry import Registry

    texts, ys = [t for t, _ in tiny_corpus[:150]], [y for _, y in tiny_corpus[:150]]
    registry = Registry(tmp_path / "trained")
    version = registry.save_ensemble(
        LABELS,
        {
            "m0-transformer": lambda d: (tuned.save(d), TransformerSpecialist.load(d, LABELS))[1],
            "m1-embedding": lambda d: EmbeddingSpecialist.untrained(tiny_encoder, LABELS).fit(texts, ys, d),
            "m2-ngram": lambda d: NgramSpecialist.untrained(LABELS).fit(texts, ys, d),
        },
        note="bench-precision test",
    )
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in tiny_corpus[150:]))
    runtime.configure_precision("fp32")
    result = run_bench_precision([registry.path(version)] * 2, [stream], ("fp32", "bf16"), "budget:0.2:mean")
    assert runtime.configured_precision() == "fp32"  # the process's own setting, not the last arm's
    first = result["versions"][0]["precisions"]
    assert first["fp32"]["computes_in"] == "float32" and first["bf16"]["computes_in"] == "bfloat16"
    assert all(m["agreement"] == 1.0 for m in first["fp32"]["members"].values())  # the reference itself
    transformer, embedding, ngram = first["bf16"]["members"]  # vote order; keys are member names
    assert first["bf16"]["members"][transformer]["max_abs_prob_change"] > 0  # bf16 did run
    assert first["bf16"]["members"][ngram]["max_abs_prob_change"] == 0  # no forward pass to change
    assert first["fp32"]["reviewed_share"] == pytest.approx(0.2, abs=0.02)
    assert set(first["bf16"]["ms_per_text"]) == {transformer, embedding, ngram}
    summary = result["summary"]["bf16"]
    assert len(summary["accuracy_change_points"]) == 2 and summary["sd_change_points"] == 0.0  # same version
    assert abs(summary["mean_change_points"]) <= 100 * (1 - BF16_MIN_AGREEMENT)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))


@pytest.mark.skipif(runtime._TRIM is None or not Path("/proc/self/status").exists(), reason="glibc on Linux")
def test_freed_buffers_go_back_to_the_os_after_a_large_batch():
    # 160 MB in 64 KiB blocks (below glibc's mmap threshold: they come from the heap), then one block
    # kept above them, so the freed space sits below the heap's top where glibc does not trim it alone.
    blocks = [bytearray(64 * 1024) for _ in range(2560)]
    pin = bytearray(64 * 1024)
    del blocks
    before = _rss_mb()
    runtime.release_freed_memory()
    assert before - _rss_mb() > 100
    assert len(pin) == 64 * 1024
