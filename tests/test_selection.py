"""Specialist selection: the catalog, Eq. 1 ranking, LLM re-ranking over real HTTP, and pruning.

Ranking is tested with a bag-of-words hashing embedder, so "the sentiment models come first" is a
statement about the catalog's words, not about a neural model's mood; one slow test checks the
same with the packaged MiniLM. The LLM is a stdlib HTTP server speaking the chat completions API to
a real ``openai`` client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
from transformers import BertConfig, BertModel

from autoannotator.core.labels import LabelSet, map_model_labels
from autoannotator.errors import BadInputError
from autoannotator.learning.selection import (
    CatalogEntry,
    RankedCandidate,
    load_catalog,
    mean_pool_embedder,
    prune_members,
    rank_candidates,
    rerank_with_llm,
)
from tests import tiny

SENTIMENT = LabelSet.of(["negative", "neutral", "positive"])
TOXICITY = LabelSet.of(["non-toxic", "toxic"])
PAPER_SENTIMENT = {
    "cardiffnlp/twitter-roberta-base-sentiment-latest",
    "cardiffnlp/twitter-xlm-roberta-base-sentiment",
    "finiteautomata/bertweet-base-sentiment-analysis",
}
PAPER_TOXICITY = {
    "s-nlp/roberta_toxicity_classifier",
    "JungleLee/bert-toxic-comment-classification",
    "garak-llm/toxic-comment-model",
}


def hashing_embedder(texts: list[str], dim: int = 512) -> np.ndarray:
    """Bag of words hashed into ``dim`` buckets: deterministic, and similar only when words are shared."""
    out = np.zeros((len(texts), dim))
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % dim] += 1.0
    return out


def write_catalog(path: Path, models: Any) -> Path:
    path.write_text(json.dumps({"version": 1, "note": "test", "models": models}), encoding="utf-8")
    return path


# --- catalog ---------------------------------------------------------------------------------------


def test_packaged_catalog_lists_the_papers_table_2_models() -> None:
    entries = load_catalog()
    assert {e.id for e in entries} == PAPER_SENTIMENT | PAPER_TOXICITY
    assert all(e.id.strip() and len(e.description) > 40 for e in entries)
    assert {e.id for e in entries if e.task == "sentiment"} == PAPER_SENTIMENT
    assert {e.id for e in entries if e.task == "toxicity"} == PAPER_TOXICITY
    # The sentiment models' published labels fit a sentiment project without an explicit mapping.
    for entry in entries:
        if entry.task == "sentiment":
            assert sorted(map_model_labels(entry.labels, SENTIMENT)) == [0, 1, 2]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON (line 1"),
        ("[]", '"models" list'),
        (json.dumps({"version": 1, "models": []}), '"models" list'),
        (
            json.dumps({"models": [{"id": "a/b", "description": "fine"}, {"id": "c/d"}]}),
            'entry 1 is missing the field "description"',
        ),
        (json.dumps({"models": [{"id": "  ", "description": "x"}]}), 'entry 0 is missing the field "id"'),
        (json.dumps({"models": ["a/b"]}), "entry 0 must be a JSON object"),
        (
            json.dumps({"models": [{"id": "a/b", "description": "x", "lables": ["x"]}]}),
            "unknown fields ['lables']",
        ),
        (
            json.dumps({"models": [{"id": "a/b", "description": "x", "labels": "pos,neg"}]}),
            '"labels" must be a list',
        ),
        (json.dumps({"models": [{"id": "a/b", "description": "x", "task": 3}]}), '"task" must be a string'),
        (
            json.dumps({"models": [{"id": "a/b", "description": "x"}, {"id": "a/b", "description": "y"}]}),
            "entry 1 repeats the id 'a/b'",
        ),
    ],
)
def test_malformed_catalog_is_refused_with_the_entry_and_field(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BadInputError) as err:
        load_catalog(path)
    assert message in str(err.value)
    assert "catalog.json" in str(err.value)


def test_missing_catalog_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="cannot read catalog"):
        load_catalog(tmp_path / "nope.json")


def test_local_directories_are_ids_and_relative_ones_resolve_against_the_catalog(tmp_path: Path) -> None:
    path = write_catalog(
        tmp_path / "catalog.json",
        [
            {
                "id": "./specialists/fin",
                "description": "our own financial sentiment model",
                "labels": ["bearish"],
            },
            {"id": "/srv/models/tox", "description": "our own toxicity model"},
            {"id": "org/hub-model", "description": "a hub model", "task": "sentiment"},
        ],
    )
    entries = load_catalog(path)
    assert [e.id for e in entries] == [
        str(tmp_path / "specialists" / "fin"),
        "/srv/models/tox",
        "org/hub-model",
    ]
    assert entries[0].labels == ("bearish",) and entries[0].task == ""
    assert entries[2].task == "sentiment" and entries[2].labels == ()


# --- Eq. 1 ranking ---------------------------------------------------------------------------------


def test_sentiment_task_ranks_the_sentiment_models_first() -> None:
    ranked = rank_candidates(
        "Classify the sentiment of English tweets as negative, neutral or positive.",
        SENTIMENT,
        load_catalog(),
        hashing_embedder,
        top_k=3,
    )
    assert {c.entry.id for c in ranked} == PAPER_SENTIMENT
    assert [c.rank for c in ranked] == [1, 2, 3]
    assert ranked[0].score >= ranked[1].score >= ranked[2].score > 0


def test_toxicity_task_ranks_the_toxicity_models_first() -> None:
    catalog = load_catalog()
    ranked = rank_candidates(
        "Flag toxic online comments: insults, threats and abuse.",
        TOXICITY,
        catalog,
        hashing_embedder,
        top_k=6,
    )
    assert {c.entry.id for c in ranked[:3]} == PAPER_TOXICITY
    assert {c.entry.id for c in ranked[3:]} == PAPER_SENTIMENT
    assert min(c.score for c in ranked[:3]) > max(c.score for c in ranked[3:])


def test_ties_are_broken_by_id_whatever_the_catalog_order() -> None:
    same = "a classifier of product reviews"
    catalog = [CatalogEntry(i, same) for i in ("m/zeta", "m/alpha", "m/mid")]
    for order in (catalog, catalog[::-1], [catalog[2], catalog[0], catalog[1]]):
        ranked = rank_candidates("label product reviews", SENTIMENT, order, hashing_embedder, top_k=3)
        assert [c.entry.id for c in ranked] == ["m/alpha", "m/mid", "m/zeta"]
        assert len({c.score for c in ranked}) == 1


def test_top_k_larger_than_the_catalog_returns_everything_and_bad_inputs_are_refused() -> None:
    catalog = load_catalog()
    assert len(rank_candidates("sentiment of tweets", SENTIMENT, catalog, hashing_embedder, top_k=50)) == 6
    with pytest.raises(BadInputError, match="task description is empty"):
        rank_candidates("  ", SENTIMENT, catalog, hashing_embedder)
    with pytest.raises(BadInputError, match="top_k"):
        rank_candidates("tweets", SENTIMENT, catalog, hashing_embedder, top_k=0)
    with pytest.raises(BadInputError, match="catalog is empty"):
        rank_candidates("tweets", SENTIMENT, [], hashing_embedder)
    with pytest.raises(ValueError, match="one row per text"):
        rank_candidates("tweets", SENTIMENT, catalog, lambda texts: np.ones((2, 4)))


def test_an_entry_whose_embedding_is_zero_scores_zero_not_nan() -> None:
    catalog = [CatalogEntry("a/words", "tweets sentiment"), CatalogEntry("b/empty", "...")]

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # query, a/words, b/empty

    ranked = rank_candidates("tweets sentiment", SENTIMENT, catalog, embed, top_k=2)
    assert [(c.entry.id, c.score) for c in ranked] == [("a/words", 1.0), ("b/empty", 0.0)]


# --- LLM re-ranking against a real HTTP server -----------------------------------------------------


class ChatServer:
    """A stdlib HTTP server answering ``POST /v1/chat/completions`` from a script of (status, content)."""

    def __init__(self) -> None:
        self.script: deque[tuple[int, str]] = deque()
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                status, content = server.script.popleft() if server.script else (200, "")
                if self.path != "/v1/chat/completions":
                    status, content = 404, "not found"
                if status == 200:
                    payload: dict[str, Any] = {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                else:
                    payload = {"error": {"message": content, "type": "server_error", "code": None}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.httpd.server_address[1]}/v1",
            api_key="k",
            max_retries=0,
            timeout=5,
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    server = ChatServer()
    yield server
    server.close()


@pytest.fixture
def shortlist() -> list[RankedCandidate]:
    entries = [
        CatalogEntry(f"org/{name}", f"model {name} for tweets", "sentiment", ("neg", "pos")) for name in "abc"
    ]
    return [RankedCandidate(e, 0.9 - 0.1 * i, i + 1) for i, e in enumerate(entries)]


def ids(candidates: list[RankedCandidate]) -> list[str]:
    return [c.entry.id for c in candidates]


def test_llm_json_answer_reorders_and_omitted_ids_keep_embedding_order(
    chat: ChatServer, shortlist: list
) -> None:
    chat.script.append((200, '```json\n["org/c", "org/a"]\n```'))
    out = rerank_with_llm(shortlist, "Sentiment of tweets", SENTIMENT, chat.client, "meta-llm")
    assert ids(out) == ["org/c", "org/a", "org/b"]
    assert [c.rank for c in out] == [1, 2, 3]
    assert [c.score for c in out] == [0.7, 0.9, 0.8]  # embedding scores travel with their entries
    request = chat.requests[0]
    assert request["model"] == "meta-llm" and request["temperature"] == 0
    user = request["messages"][-1]["content"]
    assert "Sentiment of tweets" in user and "negative, neutral, positive" in user
    assert all(f"- org/{n}: model {n} for tweets (outputs: neg, pos)" in user for n in "abc")


def test_llm_line_answer_with_invented_ids_never_adds_candidates(
    chat: ChatServer, shortlist: list, caplog: pytest.LogCaptureFixture
) -> None:
    chat.script.append((200, "1. org/b - best for tweets\n2. evil/invented\n- `ORG/A`\n3. org/b\n"))
    with caplog.at_level(logging.WARNING, logger="autoannotator.learning.selection"):
        out = rerank_with_llm(shortlist, "Sentiment of tweets", SENTIMENT, chat.client, "meta-llm", top_k=2)
    assert ids(out) == ["org/b", "org/a"]
    assert "evil/invented" in caplog.text


def test_llm_server_error_keeps_the_embedding_order(
    chat: ChatServer, shortlist: list, caplog: pytest.LogCaptureFixture
) -> None:
    chat.script.append((500, "upstream exploded"))
    with caplog.at_level(logging.WARNING, logger="autoannotator.learning.selection"):
        out = rerank_with_llm(shortlist, "Sentiment of tweets", SENTIMENT, chat.client, "meta-llm", top_k=2)
    assert ids(out) == ["org/a", "org/b"]
    assert len(chat.requests) == 1
    assert "keeping the embedding order" in caplog.text and "InternalServerError" in caplog.text


def test_llm_answer_naming_no_candidate_keeps_the_embedding_order(
    chat: ChatServer, shortlist: list, caplog: pytest.LogCaptureFixture
) -> None:
    chat.script.append((200, "I would pick a RoBERTa model."))
    with caplog.at_level(logging.WARNING, logger="autoannotator.learning.selection"):
        out = rerank_with_llm(shortlist, "Sentiment of tweets", SENTIMENT, chat.client, "meta-llm")
    assert ids(out) == ["org/a", "org/b", "org/c"]
    assert "named no candidate" in caplog.text


def test_llm_unreachable_keeps_the_embedding_order(shortlist: list) -> None:
    server = ChatServer()
    server.close()
    out = rerank_with_llm(shortlist, "Sentiment of tweets", SENTIMENT, server.client, "meta-llm")
    assert ids(out) == ["org/a", "org/b", "org/c"]
    assert rerank_with_llm([], "x", SENTIMENT, server.client, "meta-llm") == []


# --- the mean-pooling embedder on a tiny real BERT ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    tiny.save_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tiny.vocabulary()),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
    )
    BertModel(config).save_pretrained(directory)
    return directory


def test_mean_pool_embedder_gives_unit_vectors_one_per_text(tiny_bert: Path) -> None:
    embed = mean_pool_embedder(tiny_bert, batch_size=2)
    vectors = embed(["shares rally", "stock plunge after report", "the company holds a meeting today"])
    assert vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])
    assert embed([]).shape == (0, 32)


def test_mean_pool_embedder_ignores_padding(tiny_bert: Path) -> None:
    # Two embedders, so the second call cannot be answered from the first one's cache.
    alone = mean_pool_embedder(tiny_bert)(["shares rally"])[0]
    longer = [
        "the company shares plunge today after a weak quarter report",
        "investors fear losses on the market",
    ]
    in_batch = mean_pool_embedder(tiny_bert, batch_size=8)(["shares rally", *longer])[0]
    np.testing.assert_allclose(alone, in_batch, atol=1e-5)


@pytest.mark.slow
def test_minilm_ranks_financial_sentiment_above_toxicity() -> None:
    embed = mean_pool_embedder()
    finance = CatalogEntry(
        "ProsusAI/finbert",
        "Financial sentiment classifier: BERT further trained on financial text and fine-tuned on the "
        "Financial PhraseBank to read news about companies and markets as positive, negative or neutral.",
        "sentiment",
        ("positive", "negative", "neutral"),
    )
    catalog = [finance, *(e for e in load_catalog() if e.task == "toxicity")]
    ranked = rank_candidates(
        "Label tweets about stocks and financial markets as bearish, bullish or neutral for the stock.",
        LabelSet.of(["bearish", "bullish", "neutral"]),
        catalog,
        embed,
        top_k=len(catalog),
    )
    assert ranked[0].entry.id == "ProsusAI/finbert"
    assert ranked[0].score > max(c.score for c in ranked[1:]) + 0.05
    ranked = rank_candidates(
        "Sentiment of tweets: negative, neutral or positive", SENTIMENT, load_catalog(), embed, top_k=6
    )
    assert {c.entry.id for c in ranked[:3]} == PAPER_SENTIMENT


# --- pruning on verified items (Table 13) ----------------------------------------------------------


def member(gold: np.ndarray, predicted: np.ndarray, wrong_conf: float = 0.6, labels: int = 3) -> np.ndarray:
    """Probabilities of a member predicting ``predicted``: 0.9 on it when right, else ``wrong_conf``."""
    conf = np.where(predicted == gold, 0.9, wrong_conf)
    probs = np.repeat(((1 - conf) / (labels - 1))[:, None], labels, axis=1)
    probs[np.arange(len(gold)), predicted] = conf
    return probs


def wrong(gold: np.ndarray, shift: int = 1) -> np.ndarray:
    return (gold + shift) % 3


def test_a_weak_member_that_drags_the_vote_below_the_best_single_is_dropped() -> None:
    gold = np.arange(20) % 3
    strong = gold.copy()
    strong[16:] = wrong(gold[16:])  # right on 16/20
    steady = gold.copy()
    steady[10:16] = wrong(gold[10:16])  # right on 14/20, on other items than `strong`
    weak = wrong(gold)  # agrees with `steady`'s mistakes and `strong`'s at the end
    weak[16:18] = gold[16:18]
    P = np.stack([member(gold, strong), member(gold, weak), member(gold, steady)])  # noqa: N806

    report = prune_members(P, gold)

    assert report.member_accuracy == (0.8, 0.1, 0.7)
    assert report.vote_accuracy_all < report.best_single == 0.8  # Table 13's situation
    assert report.kept == (0, 2) and report.dropped == (1,)
    assert report.vote_accuracy_kept == 1.0
    summary = report.summary()
    assert (
        "keep members [0, 2], drop [1]" in summary
        and "20 verified items" in summary
        and "#1 10.0%" in summary
    )


def test_three_good_members_are_all_kept() -> None:
    gold = np.arange(15) % 3
    preds = []
    for errors in (slice(0, 3), slice(3, 6), slice(6, 9)):
        p = gold.copy()
        p[errors] = wrong(gold[errors])
        preds.append(p)
    report = prune_members(np.stack([member(gold, p) for p in preds]), gold)
    assert report.kept == (0, 1, 2) and report.dropped == ()
    assert report.vote_accuracy_all == report.vote_accuracy_kept == 1.0
    assert report.summary().startswith("keep all 3 members")


def test_vote_ties_go_to_the_highest_mean_probability() -> None:
    gold = np.array([0, 0])
    sure = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]])
    unsure = np.array([[0.2, 0.45, 0.35], [0.2, 0.45, 0.35]])
    report = prune_members(np.stack([unsure, sure]), gold, min_members=2)
    assert report.kept == (0, 1) and report.vote_accuracy_kept == 1.0  # 1-1 tie, 0.55 vs 0.25


def test_many_members_use_elimination_that_crosses_plateaus() -> None:
    gold = np.arange(30) % 3
    good = []
    for m in range(4):  # four good members; pairs of them share 4 mistakes, all with the same wrong label
        p = gold.copy()
        errs = slice(0, 4) if m < 2 else slice(4, 8)
        p[errs] = wrong(gold[errs])
        good.append(member(gold, p))
    bad = [member(gold, wrong(gold)) for _ in range(6)]  # always that same wrong label
    P = np.stack([bad[0], good[0], bad[1], good[1], bad[2], good[2], bad[3], good[3], bad[4], bad[5]])  # noqa: N806
    report = prune_members(P, gold)
    # Removing one bad member at a time gains nothing until four are gone: greedy must walk on.
    assert report.vote_accuracy_all == 0.0
    assert report.kept == (1, 3, 5, 7) and report.dropped == (0, 2, 4, 6, 8, 9)
    assert report.vote_accuracy_kept == 1.0
    # The same data with 8 members is searched exhaustively and lands on the same four.
    assert prune_members(P[:8], gold).kept == (1, 3, 5, 7)


def test_equal_accuracy_prefers_gold_probability_then_more_members() -> None:
    gold = np.arange(20) % 3
    right = member(gold, gold)
    meek = member(gold, wrong(gold))  # always wrong, but never sure enough to win a 1-1 tie
    sure = member(gold, wrong(gold), wrong_conf=0.99)  # always wrong and wins 1-1 ties
    # 100% either way, but the always-wrong member lowers the gold label's probability: dropped.
    assert prune_members(np.stack([right, meek]), gold).kept == (0,)
    # Two copies of a good member: same accuracy and same gold probability, so the larger set wins.
    assert prune_members(np.stack([right, right]), gold).kept == (0, 1)
    P = np.stack([right, sure, sure])  # noqa: N806
    assert prune_members(P, gold).kept == (0,)
    report = prune_members(P, gold, min_members=2)  # every set of 2+ scores 0%: the least wrong pair
    assert report.kept == (0, 1) and report.vote_accuracy_kept == 0.0 and report.best_single == 1.0


@pytest.mark.parametrize(
    ("P", "gold", "message"),
    [
        (np.zeros((2, 0, 3)), np.zeros(0, dtype=int), "no verified items"),
        (np.zeros((2, 4, 3)), np.zeros(5, dtype=int), "P covers 4 items but gold has 5"),
        (np.zeros((4, 3)), np.zeros(4, dtype=int), "P must be [k, n, labels]"),
        (np.zeros((2, 4, 3)), np.array([0, 1, 2, 3]), "label indices in [0, 3)"),
        (np.zeros((2, 4, 3)), np.array([0.0, 1.0, 2.0, 1.0]), "label indices"),
    ],
)
def test_prune_refuses_bad_shapes_and_empty_gold(P: np.ndarray, gold: np.ndarray, message: str) -> None:  # noqa: N803
    with pytest.raises(ValueError) as err:
        prune_members(P, gold)
    assert message in str(err.value)
    with pytest.raises(ValueError, match="min_members"):
        prune_members(np.zeros((2, 3, 3)), np.zeros(3, dtype=int), min_members=3)
