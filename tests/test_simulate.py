"""``autoannotator simulate`` end to end on tiny real models, with an oracle and with a real LLM server."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autoannotator.cli import main
from autoannotator.lab.benchmark import peak_rss_mb, reset_peak, rss_mb
from tests import tiny
from tests.openai_server import OpenAIServer


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


@pytest.fixture
def data(tmp_path):
    corpus = tiny.make_corpus(420, seed=7, noise=0.3)
    return write_jsonl(tmp_path / "seed.jsonl", corpus[:150]), write_jsonl(
        tmp_path / "stream.jsonl", corpus[150:]
    )


def run(tmp_path, data, tiny_encoder, *extra):
    seed, stream = data
    out = tmp_path / "out"
    argv = [
        "simulate",
        "--seed-file", str(seed),
        "--stream-file", str(stream),
        "--out", str(out),
        "--n-seed", "60",
        "--chunk-size", "45",
        "--beta", "20",
        "--encoder", str(tiny_encoder),
        "--cold-lr", "5e-3",
        "--cold-epochs", "4",
        "--lr", "1e-3",
        *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text()), out


def test_oracle_run_reports_accuracy_review_share_cycles_baselines_and_a_plot(
    tmp_path, data, tiny_encoder, capsys
):
    report, out = run(tmp_path, data, tiny_encoder, "--policy", "budget:0.25:mean")
    final = report["final"]
    n = report["config"]["n_stream"]
    assert n == 270
    assert report["config"]["gate_alpha"] == 0.0  # the paper's gate unless told otherwise
    # Budget: exactly ceil(0.25 * 45) = 12 items of every 45-item chunk.
    assert final["reviewed"] == 6 * 12
    assert final["review_share"] == pytest.approx(72 / 270)
    assert final["human_labels_total"] == 60 + 72  # seed + oracle reviews
    # Reviewed items are right (oracle), so the final labels beat the unreviewed vote.
    assert final["accuracy"] > report["baselines"]["majority_vote"]["accuracy"]
    assert set(report["baselines"]["members_alone"]) == {
        "m0-transformer",
        "m1-embedding-linear",
        "m2-ngram-linear",
    }
    # The pool grew by 12 per chunk and beta is 20: a retraining after every second chunk.
    assert [c["after_items"] for c in report["cycles"]] == [90, 180, 270]
    assert all(c["n_new"] > 0 and c["reason"] for c in report["cycles"])
    assert sum(v["items"] for v in report["per_version"].values()) == n
    assert set(report["seconds"]) == {
        "cold_start",
        "predict_and_route",
        "review",
        "retrain",
        "baseline_predict",
        "total",
    }
    assert report["tradeoff"]["curves"]["mean probability"]["accuracy"][-1] == 1.0
    assert (out / "report.png").stat().st_size > 20_000
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == round(final["accuracy"], 4)


def test_a_budget_over_the_weighted_vote_gets_member_weights_after_each_retraining(
    tmp_path, data, tiny_encoder
):
    report, _ = run(tmp_path, data, tiny_encoder, "--policy", "budget:0.25:weighted")
    assert report["config"]["policy"].startswith("budget:0.25:weighted")
    assert report["cycles"]
    members = 3  # one weight per member of the version serving after the cycle
    for cycle in report["cycles"]:
        if cycle["promoted"] and cycle["pruning"]:  # a member that pulled the vote down was dropped
            assert cycle["pruning"]["without"] > cycle["pruning"]["with"]
            members = len(cycle["pruning"]["kept"])
        weights = cycle["member_weights"]
        assert len(weights) == members >= 2 and all(0 < w < 1 for w in weights)


def test_with_gate_alpha_only_a_significant_drop_rejects_a_retraining(tmp_path, data, tiny_encoder):
    """A reviewer right only 30% of the time makes retrainings worse on the (equally noisy) held-out
    labels; with alpha every such drop is put to the sign test, and only a significant one rejects."""
    report, _ = run(
        tmp_path,
        data,
        tiny_encoder,
        "--policy",
        "budget:0.25:mean",
        "--gate-alpha",
        "0.05",
        "--review",
        "noisy:0.3",
    )
    assert report["config"]["gate_alpha"] == 0.05
    drops = [c for c in report["cycles"] if c["metrics_new"]["accuracy"] < c["metrics_old"]["accuracy"]]
    assert drops, "the noisy reviewer should have made at least one retraining worse"
    for cycle in drops:  # every drop was put to the test, promoted or not
        assert "sign test p = " in cycle["reason"], cycle["reason"]
    for cycle in report["cycles"]:
        if not cycle["promoted"]:
            assert ", a significant drop (" in cycle["reason"], cycle["reason"]


def test_the_refit_strategy_retrains_the_fine_tuned_member_from_its_encoder(tmp_path, data, tiny_encoder):
    report, out = run(
        tmp_path, data, tiny_encoder, "--policy", "budget:0.25:mean", "--retrain-strategy", "refit"
    )
    assert report["config"]["retrain_strategy"] == "refit"
    assert report["cycles"] and all(c["strategy"].get("m0-transformer") == "refit" for c in report["cycles"])
    for cycle in report["cycles"]:
        if cycle["promoted"] and "m0-transformer" in cycle["strategy"]:
            meta = json.loads(
                (
                    out / "models" / "versions" / cycle["version"] / "m0-transformer" / "specialist.json"
                ).read_text()
            )
            # The cold start's recipe (--cold-lr 5e-3, --cold-epochs 4), from the encoder itself.
            assert meta["parent"] is None and meta["base_model"] == str(tiny_encoder)
            assert (meta["train_config"]["learning_rate"], meta["train_config"]["epochs"]) == (5e-3, 4)


def test_self_training_calibrates_on_the_audit_and_never_on_gold_it_should_not_see(
    tmp_path, data, tiny_encoder
):
    report, _ = run(
        tmp_path, data, tiny_encoder, "--policy", "budget:0.25:mean", "--audit-share", "0.3",
        "--self-training", "0.5", "--pseudo-precision", "0.6",
    )  # fmt: skip
    assert report["config"]["self_training"]["ratio"] == 0.5
    made = [c["self_training"] for c in report["cycles"]]
    assert made and all(m["calibrated_on"] == "audit" for m in made)
    used = [m for m in made if m.get("n_used")]
    assert used, "some retraining should have had pseudo-labels"
    for m in used:
        assert 0 < m["n_used"] <= m["cap"] and m["calibration_accuracy"] >= 0.6


def test_paper_epsilon_rule_without_retraining(tmp_path, data, tiny_encoder):
    report, _ = run(tmp_path, data, tiny_encoder, "--policy", "epsilon:0.34", "--no-retrain")
    assert report["cycles"] == []
    assert list(report["per_version"]) == ["v0001"]
    # ε = 0.34 with k = 3 reviews exactly the items without a 2-of-3 majority.
    point = {p["epsilon"]: p for p in report["tradeoff"]["epsilon_points"]}[0.6667]
    assert report["final"]["review_share"] == pytest.approx(point["share"])


def test_the_llm_seeded_start_labels_covering_seed_items_with_the_reviewer(tmp_path, data, tiny_encoder):
    """--llm-seeds: the seed items are one per cluster of the seed file, labelled by the reviewer (a
    70%-right noisy oracle standing in for the LLM); no seed label counts as a human label."""
    report, _ = run(tmp_path, data, tiny_encoder, "--llm-seeds", "--review", "noisy:0.7", "--no-retrain")
    seed_set = report["start"]["seed_set"]
    assert seed_set["chosen"] == "clusters" and seed_set["labelled_by"].startswith("the reviewer")
    assert seed_set["n"] == seed_set["asked"] == 60
    assert 0.45 <= seed_set["label_accuracy"] <= 0.9  # ~0.7 over 60 draws
    human = run(tmp_path / "human", data, tiny_encoder, "--review", "noisy:0.7", "--no-retrain")[0]
    assert human["start"]["seed_set"] == {"chosen": "random", "labelled_by": "people", "n": 60}
    assert human["final"]["human_labels_total"] - report["final"]["human_labels_total"] == 60


def test_seeds_chosen_by_clusters_are_labelled_by_people(tmp_path, data, tiny_encoder):
    """--seed-choice clusters: the same covering choice as the LLM-seeded start, gold labels, and
    every seed label a human one, as with a random draw."""
    report, _ = run(tmp_path, data, tiny_encoder, "--seed-choice", "clusters", "--no-retrain")
    assert report["start"]["seed_set"] == {"chosen": "clusters", "labelled_by": "people", "n": 60}
    random_draw = run(tmp_path / "random", data, tiny_encoder, "--no-retrain")[0]
    assert report["final"]["human_labels_total"] == random_draw["final"]["human_labels_total"]
    assert "seed_choice" in report["seconds"]  # the clustering ran; random draws skip it
    assert "seed_choice" not in random_draw["seconds"]


def test_target_policy_reviews_everything_until_it_can_certify_then_accepts_what_it_certified(
    tmp_path, data, tiny_encoder
):
    report, _ = run(
        tmp_path, data, tiny_encoder, "--policy", "target:0.7", "--audit-share", "0.4", "--chunk-size", "30"
    )
    g = report["guarantee"]
    assert g["target"] == 0.7 and g["calibration_seeds"] == 12  # 20% of the 60 seeds, kept out
    first = g["certificates"][0]
    # 12 labels cannot certify 0.7 for any of 3 labels (it takes 13 right of 13 at delta/3)
    assert first["calibration"] == 12 and first["thresholds"] == [None, None, None]
    assert 0 not in first["needed"]  # each label says it needs more (or that more would not help: None)
    # The first chunk is reviewed whole; later chunks calibrate on the audit as it grows.
    calib = [c["calibration"] for c in g["certificates"]]
    assert calib == sorted(calib) and calib[-1] > 12
    assert report["final"]["review_share"] < 1.0, "nothing was ever certified"
    assert g["accepted_share"] == pytest.approx(1 - report["final"]["review_share"], abs=1e-4)
    # Seeds (cold start and calibration), reviews, and the audit's labels of accepted items.
    assert report["final"]["human_labels_total"] == 60 + report["final"]["reviewed"] + g["audit_extra_labels"]
    assert 0.25 < g["audit_share_of_stream"] < 0.55
    assert g["audit"]["n"] == g["audit_extra_labels"]
    low, high = g["audit"]["interval"]
    assert low <= g["audit"]["estimate"] <= high
    assert 0 <= g["oracle_review_share"] < 1
    assert g["reached"] is (g["accepted_accuracy"] >= 0.7)
    # Every label held to the target by an oracle with a threshold per label: another floor.
    assert 0 <= g["oracle_review_share_per_label"] <= 1
    assert len(g["accepted_accuracy_per_label"]) == 3
    assert report["config"]["n_seed"] == 60


def test_while_nothing_is_certified_the_audit_takes_its_larger_share_at_no_extra_label(
    tmp_path, data, tiny_encoder
):
    report, _ = run(
        tmp_path, data, tiny_encoder, "--policy", "target:0.7", "--audit-share", "0.1",
        "--audit-uncertified", "1.0", "--chunk-size", "30",
    )  # fmt: skip
    g = report["guarantee"]
    assert report["config"]["audit"] == {"share": 0.1, "uncertified": 1.0}
    certs = g["certificates"]
    assert certs[0]["thresholds"] == [None, None, None]  # 12 calibration seeds certify nothing
    # The first chunk, served uncertified, went to the audit whole: 30 more calibration labels.
    assert certs[1]["calibration"] == 12 + 30
    uncertified = [c for c in certs if all(t is None for t in c["thresholds"])]
    assert g["audit_share_of_stream"] >= len(uncertified) * 30 / report["config"]["n_stream"] - 1e-9
    # Those items were reviewed anyway: people's labels are the seeds, the reviews, and the audit of
    # accepted items only (which the uncertified chunks had none of).
    assert report["final"]["human_labels_total"] == 60 + report["final"]["reviewed"] + g["audit_extra_labels"]


def test_reviews_of_uncertified_labels_calibrate_the_version_that_routed_them(tmp_path, data, tiny_encoder):
    report, _ = run(
        tmp_path, data, tiny_encoder, "--policy", "target:0.7", "--audit-share", "0.1",
        "--calibrate-on-reviews", "--chunk-size", "30", "--no-retrain",
    )  # fmt: skip
    assert report["config"]["calibrate_on_reviews"] is True
    certs = report["guarantee"]["certificates"]
    assert certs[0]["calibration"] == 12 and certs[0]["thresholds"] == [None, None, None]
    # Nothing was certified for the first chunk, so all 30 of its items were reviewed by a person (or
    # audited): each calibrates v0001 from the next chunk on.
    assert certs[1]["calibration"] == 12 + 30
    # Afterwards only reviews of labels still uncertified are added (and the audit).
    growth = [b["calibration"] - a["calibration"] for a, b in itertools.pairwise(certs)]
    assert all(0 <= g <= 30 for g in growth)


def test_an_audit_under_a_budget_policy_estimates_the_accepted_accuracy(tmp_path, data, tiny_encoder):
    report, _ = run(
        tmp_path, data, tiny_encoder, "--policy", "budget:0.2:mean", "--audit-share", "0.5", "--no-retrain"
    )
    g = report["guarantee"]
    assert g["target"] is None and g["calibration_seeds"] == 0
    assert "oracle_review_share" not in g
    # Without retraining one version served: the audit's estimate is of that version's accepted labels.
    (version,) = g["per_version"]
    assert g["per_version"][version]["audit"] == g["audit"]
    truth, (low, high) = g["accepted_accuracy"], g["audit"]["interval"]
    assert g["audit"]["n"] > 40 and high - low < 0.35
    assert low - 0.1 <= truth <= high + 0.1  # an unbiased sample lands near the truth


def test_noisy_reviewer_is_worse_than_the_oracle(tmp_path, data, tiny_encoder):
    oracle, _ = run(tmp_path / "a", data, tiny_encoder, "--policy", "budget:0.4:mean", "--no-retrain")
    noisy, _ = run(tmp_path / "b", data, tiny_encoder, "--policy", "budget:0.4:mean", "--review", "noisy:0.5",
                   "--no-retrain")  # fmt: skip
    assert noisy["config"]["reviewer"] == "noisy-oracle"
    assert noisy["final"]["accuracy"] < oracle["final"]["accuracy"]
    # Seed labels are human; the noisy reviewer stands for an LLM, so its labels are not human labels.
    assert noisy["final"]["human_labels_total"] == 60


def test_llm_review_against_a_real_openai_compatible_server(
    tmp_path, data, tiny_encoder, monkeypatch, capsys
):
    gold = {t: y for t, y in tiny.make_corpus(420, seed=7, noise=0.3)}

    def answer(text: str) -> str:
        # A decent LLM: right on most items, off-label on texts mentioning "fear", wrong on "boom".
        if "fear" in text.split():
            return "I cannot decide"
        if "boom" in text.split():
            return "neutral"
        return gold[text].capitalize() + "."

    monkeypatch.setenv("SIM_TEST_LLM_KEY", "sk-secret-value")
    with OpenAIServer(answer=answer) as server:
        report, out = run(
            tmp_path, data, tiny_encoder,
            "--policy", "budget:0.3:mean", "--review", "llm", "--llm-base-url", server.base_url,
            "--llm-model", "house-model", "--llm-api-key-env", "SIM_TEST_LLM_KEY", "--llm-price", "1000,2000",
        )  # fmt: skip
        requests = list(server.completions)
    assert requests and all(r.authorization == "Bearer sk-secret-value" for r in requests)
    assert "bearish, bullish, neutral" in requests[0].system_prompt
    final = report["final"]
    usage = report["llm"]
    # Off-label answers (and nothing else: the server never fails) went to a human instead, so every
    # routed item still got a label.
    assert final["human_fallbacks"] == usage["off_label"] > 0 and usage["failures"] == 0
    assert final["reviewer_labelled"] + final["human_fallbacks"] == final["reviewed"]
    assert final["human_labels_total"] == 60 + final["human_fallbacks"]
    llm_only = report["baselines"]["llm_only"]
    assert 0.5 < llm_only["answered_share"] < 1.0
    assert llm_only["calls"] == report["config"]["n_stream"]
    # AutoAnnotator's own LLM use: one call per routed item (every stream text differs: no cache
    # hit; no failure: no retry); the LLM-only baseline is accounted apart.
    assert (usage["calls"], usage["cache_hits"]) == (final["reviewed"], 0)
    assert usage["calls"] < llm_only["calls"]
    assert llm_only["estimated_cost"] == pytest.approx(usage["cost"] / usage["calls"] * llm_only["calls"])
    assert (out / "report.png").stat().st_size > 20_000
    # The configured price (USD 1000 / 2000 per million tokens) is the one charged.
    expected = (usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000) / 1e6
    assert usage["prompt_tokens"] > 0 and usage["cost"] == pytest.approx(expected)
    # The key never lands in the report, the cache or the output.
    for path in out.iterdir():
        if path.suffix in {".json", ".jsonl"}:
            assert "sk-secret-value" not in path.read_text()
    assert "sk-secret-value" not in capsys.readouterr().out


def test_items_without_text_are_left_out_and_counted(tmp_path, data, tiny_encoder):
    seed, stream = data
    for path in (seed, stream):  # as tweeteval-hate holds a few
        path.write_text(path.read_text() + '{"text": "  ", "label": "bullish"}\n')
    report, _ = run(tmp_path, (seed, stream), tiny_encoder, "--no-retrain", "--policy", "budget:0.2:mean")
    assert report["config"]["empty_texts_left_out"] == {"seed_file": 1, "stream_file": 1}
    assert report["config"]["n_stream"] == 270


def test_bad_inputs_exit_with_a_clear_message(tmp_path, data, tiny_encoder, capsys):
    seed, _ = data
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "rally", "label": "bullish"}\n{"txt": "slump", "label": "bearish"}\n')
    argv = ["simulate", "--seed-file", str(seed), "--stream-file", str(bad), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "bad.jsonl:2: field 'text' is missing or empty" in capsys.readouterr().err
    assert (
        main([*argv[:3], "--stream-file", str(seed), "--n-seed", "10000", "--out", str(tmp_path / "p")]) == 2
    )
    assert "only 150" in capsys.readouterr().err


def test_sweep_runs_every_epsilon_point_and_the_challenger_at_the_same_shares(
    tmp_path, data, tiny_encoder, capsys
):
    seed, stream = data
    out = tmp_path / "sweep"
    argv = [
        "sweep", "--seed-file", str(seed), "--stream-file", str(stream), "--out", str(out),
        "--n-seed", "60", "--chunk-size", "45", "--beta", "30", "--encoder", str(tiny_encoder),
        "--cold-lr", "5e-3", "--cold-epochs", "4", "--kinds", "transformer,embedding-linear,ngram-linear",
        "--budgets", "0.15", "--targets", "0.7", "--audit-share", "0.3",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())
    (target,) = [r for r in result["runs"] if r["rule"] == "target"]
    assert target["policy"] == "target:0.7" and target["target"] == 0.7
    assert {"accepted_accuracy", "reached", "oracle_review_share", "review_to_oracle", "audit"} <= set(target)
    # With a target in the sweep, every run keeps the same 20% of the seeds out of its cold start.
    assert json.loads((out / "eps-1" / "report.json").read_text())["guarantee"]["calibration_seeds"] == 12
    eps = [r for r in result["runs"] if r["rule"] == "epsilon"]
    challengers = [r for r in result["runs"] if r["rule"] == "challenger"]
    assert [r["policy"] for r in eps] == ["epsilon:0.3333333333333333", "epsilon:0.6666666666666666"]
    assert len(challengers) == 3
    # Each challenger run reviews the share its ε twin reviewed, rounded down to whole items per chunk.
    for e, c in zip(eps, challengers, strict=False):
        assert e["review_share"] - 6 / 270 <= c["review_share"] <= e["review_share"]
    assert challengers[-1]["review_share"] == pytest.approx(0.15, abs=6 / 270)
    # Later runs reuse the first run's cold-start members instead of training new ones, copied into
    # each run's own first version so that every run stays reloadable on its own.
    assert json.loads((out / "eps-2" / "report.json").read_text())["start"]["given_models"][0].endswith(
        "eps-1/models/versions/v0001/m0-transformer"
    )
    copied = out / "eps-2" / "models" / "versions" / "v0001"
    assert sorted(p.name for p in copied.iterdir() if p.is_dir()) == [
        "m0-transformer",
        "m1-embedding-linear",
        "m2-ngram-linear",
    ]
    assert (out / "sweep.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "epsilon" in printed and "challenger" in printed and "sweep.png" in printed


def test_benchmark_times_every_member_of_a_version(tmp_path, data, tiny_encoder, capsys):
    _, out = run(tmp_path, data, tiny_encoder, "--no-retrain", "--policy", "budget:0.1:mean")
    capsys.readouterr()
    _, stream = data
    version = out / "models" / "versions" / "v0001"
    result_file = tmp_path / "bench.json"
    argv = ["benchmark", "--version-dir", str(version), "--data", str(stream), "--n", "100",
            "--train-n", "60", "--epochs", "1", "--repeats", "2", "--out", str(result_file)]  # fmt: skip
    # A process of its own, as the benchmark is meant to run: in this one, other tests' threads may
    # free memory between two readings and make the per-phase figures disagree.
    done = subprocess.run(
        [sys.executable, "-m", "autoannotator.cli", *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(result_file.read_text())
    assert [m["kind"] for m in result["members"]] == ["transformer", "embedding-linear", "ngram-linear"]
    for m in result["members"]:
        assert m["predict_texts_per_s"] > 0 and m["fit_seconds"] > 0 and m["fit_examples"] == 60
    slowest = min(m["predict_texts_per_s"] for m in result["members"])
    assert 0 < result["ensemble_predict_texts_per_s"] <= slowest
    assert result["machine"]["cpus_usable"] == len(os.sched_getaffinity(0))
    memory = result["memory"]
    assert memory["peak_is_per_phase"] is sys.platform.startswith("linux")
    # Loading tiny members into a process that already ran a simulation may reuse freed pages: no growth.
    assert 0 < memory["rss_start_mb"] <= memory["rss_loaded_mb"] <= memory["peak_predict_mb"] + 1
    for m in result["members"]:
        assert m["fit_peak_rss_mb"] >= m["rss_before_fit_mb"] - 1  # the peak window opens at that RSS
    assert json.loads(done.stdout) == result


def test_peak_memory_is_reset_between_phases():
    """The benchmark's per-phase peaks: a 64 MiB block raises the peak, and a reset after it is
    freed starts a window that no longer holds it."""
    if not reset_peak():
        pytest.skip("the peak resident set cannot be reset here (Linux only)")
    before = rss_mb()
    assert before is not None
    block = np.ones(64 * 2**20 // 8)  # written, so every page is resident
    high = peak_rss_mb()
    del block
    assert high >= before + 60
    assert reset_peak()
    assert peak_rss_mb() < high - 50


def test_a_contrastive_encoder_is_built_from_the_seed_labels_only_and_used_by_the_cold_start(
    tmp_path, data, tiny_encoder
):
    report, out = run(tmp_path, data, tiny_encoder, "--contrastive-pairs", "2", "--no-retrain")
    made = report["start"]["contrastive_encoder"]
    assert made["n_examples"] == 60  # the run's seed labels, nothing from the stream
    assert made["n_pairs"] == 60 * 2 * 2  # per seed: 2 same-label and 2 other-label pairs
    assert made["base"] == str(tiny_encoder)
    encoder = (out / "models" / "encoders" / "v0001-contrastive").resolve()  # as the backend keeps it
    assert json.loads((encoder / "adaptation.json").read_text()) == made
    assert report["config"]["cold_start"]["contrastive_pairs"] == 2
    version = out / "models" / "versions" / "v0001"
    metas = [json.loads((version / m / "specialist.json").read_text()) for m in report["start"]["members"]]
    assert {m["kind"]: m["base_model"] for m in metas if m["kind"] != "ngram-linear"} == {
        "transformer": str(encoder),
        "embedding-linear": str(encoder),
    }


def test_a_simcse_encoder_is_built_once_from_the_unlabelled_texts_and_kept_by_later_versions(
    tmp_path, data, tiny_encoder
):
    report, out = run(tmp_path, data, tiny_encoder, "--simcse-texts", "1000", "--policy", "budget:0.5:mean")
    made = report["start"]["simcse_encoder"]
    assert made["n_texts"] == len({t for t in _texts(data)})  # every text of both files, no label
    assert made["base"] == str(tiny_encoder)
    assert report["config"]["cold_start"]["simcse_texts"] == 1000
    encoders = out / "models" / "encoders"
    assert [p.name for p in encoders.iterdir()] == ["v0001-simcse"]  # built once, before v0001
    encoder = (encoders / "v0001-simcse").resolve()
    promoted = [c["version"] for c in report["cycles"] if c.get("promoted")]
    assert promoted, "the run should have retrained at least once"
    for version in ["v0001", *promoted]:
        directory = out / "models" / "versions" / version
        for member in json.loads((directory / "ensemble.json").read_text())["members"]:
            meta = json.loads((directory / member / "specialist.json").read_text())
            if meta["kind"] == "embedding-linear":
                assert meta["base_model"] == str(encoder)  # reused, not rebuilt


def _texts(data):
    return [json.loads(line)["text"] for path in data for line in path.read_text().splitlines()]
