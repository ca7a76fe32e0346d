"""Beyond classifiers, end to end over HTTP: fact tracing in a tiny GPT, attribution of a customized
DDPM's generations (small versions of bench.generative's models, trained here in seconds)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from contract.registry import Registry
from worker.corpus import fact_corpus
from worker.generative import DDPM_METHOD, DIFFUSION, EXEMPLARS, LM_METHOD, SIZES, sample_ddpm


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory):
    from worker.registry import main

    root = tmp_path_factory.mktemp("generative")
    assert main(["--root", str(root), "demo", "--generative"]) == 0
    return root


def run(client, worker, body: dict) -> dict:
    created = client.post("/v1/attributions", json=body)
    assert created.status_code == 202, created.text
    worker.work(burst=True)
    done = client.get(created.headers["location"]).json()
    assert done["status"] == "finished", done
    return done


def test_lm_fact_tracing_over_http(client, worker):
    corpus = fact_corpus(SIZES[False]["entities"])
    facts = list(range(0, len(corpus.facts), 6))
    texts = [dict(zip(("prompt", "completion"), corpus.query(f), strict=True)) for f in facts]
    done = run(client, worker, {"model": "facts-gpt", "dataset": "facts-corpus", "test": {"texts": texts}})
    reciprocal = []
    for row, fact in zip(done["result"]["rows"], facts, strict=True):
        ranked = [p["index"] for p in row["proponents"]]
        hits = [r for r, i in enumerate(ranked, 1) if i in corpus.proponents(fact)]
        reciprocal.append(1 / hits[0] if hits else 0.0)
    mrr = float(np.mean(reciprocal))
    print(f"\nfact tracing, {len(facts)} queries over {len(corpus.sentences)} sentences: MRR@10 {mrr:.3f}")
    assert mrr >= 0.3  # chance: a proponent among 3 of ~260 sentences, MRR ~0.03

    # a leakage analysis takes text too (its calibration rows, training sentences, are padded to fit), with
    # the leakage preset's step over the model's own defaults (LM_METHOD: lr 1e-3), resolved at POST; two
    # training sentences shouted and spaced out are found as near duplicates of themselves
    shouted = []
    for i in (5, 50):
        *head, last = corpus.sentences[i].split()
        shouted.append({"prompt": "  ".join(head).upper(), "completion": " " + last.upper()})
    leak = client.post(
        "/v1/analyses/leakage",
        json={
            "model": "facts-gpt",
            "dataset": "facts-corpus",
            "test": {"texts": texts[:2] + shouted},
            "calibration_records": 16,
        },
    )
    assert leak.status_code == 202 and leak.json()["method"]["lr"] == 0.05 != LM_METHOD["lr"]
    assert leak.json()["method"]["score"] == "signed"  # what the analysis reads, not the preset's "match"
    worker.work(burst=True)
    leaked = client.get(leak.json()["links"]["self"]).json()
    assert leaked["status"] == "finished" and leaked["execution"]["method"]["lr"] == 0.05
    rows, cal = leaked["result"]["rows"], leaked["result"]["calibration"]
    assert [(r["match"], r["best"]["index"]) for r in rows[2:]] == [("near-duplicate", 5), ("near-duplicate", 50)]
    assert cal["near_duplicate_recall"]["case"] == cal["near_duplicate_recall"]["whitespace"] == 1.0

    report = client.get(done["links"]["report"]).text
    first = texts[0]
    assert f"<mark>{first['completion']}</mark>" in report  # the query, its completion marked
    top = corpus.sentences[done["result"]["rows"][0]["proponents"][0]["index"]]
    assert top in report  # proponents shown as text


def test_diffusion_attribution_is_deterministic_and_finds_the_exemplars(client, worker, registry_dir):
    registry = Registry(registry_dir)
    m, d = registry.model("digits-ddpm"), registry.dataset("digits-ddpm-train")
    from worker.forward_inf import Diffusion, ForwardInf, MirrorConfig, build

    model = build(m.architecture, m.params)
    model.load_state_dict(load_file(m.path / m.weights))
    generated = sample_ddpm(model, 2, seed=1)
    body = {"model": "digits-ddpm", "dataset": "digits-ddpm-train", "test": {"inputs": generated.tolist()}}
    done = run(client, worker, body)
    scores = np.array(client.get(done["links"]["scores"]).json()["scores"])

    train = load_file(d.path / d.shards[0].file)["inputs"]
    config = MirrorConfig(**DDPM_METHOD, batch_size=256)
    direct = ForwardInf(model, Diffusion(**DIFFUSION), config).prepare(train).scores(generated)
    np.testing.assert_allclose(scores, direct.numpy(), rtol=1e-4, atol=1e-6)  # the same draws: the same scores

    exemplars = set(range(len(train) - EXEMPLARS, len(train)))
    ranks = [np.argsort(-row).tolist() for row in scores]
    recall = np.mean([len(exemplars & set(order[:10])) / EXEMPLARS for order in ranks])
    print(f"\ndiffusion: exemplar recall@10 {recall:.2f} (chance {10 / len(train):.3f})")
    assert recall >= 0.2

    report = client.get(done["links"]["report"]).text
    assert report.count("<img") >= 2 * 21  # each generated image, its 10 proponents and 10 opponents


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("analyses/leakage", {"model": "digits-ddpm", "dataset": "digits-ddpm-train"}, "diffusion model"),
        ("analyses/memorization", {"model": "digits-ddpm", "dataset": "digits-ddpm-train"}, "deterministic loss"),
        ("attributions", {"model": "facts-gpt", "dataset": "facts-corpus", "test": {"inputs": [[]]}}, "at least 2"),
        ("attributions", {"model": "facts-gpt", "dataset": "facts-corpus", "test": {"inputs": [[5]]}}, "at least 2"),
        (
            "attributions",
            {"model": "facts-gpt", "dataset": "facts-corpus", "test": {"inputs": [[5, 6]], "targets": [[1, 0]]}},
            "target token after the first",
        ),
    ],
)
def test_what_the_generative_models_cannot_serve_is_refused_at_post(client, path, body, needle):
    test = {"inputs": [[[[0.0] * 8] * 8]]} if body["model"] == "digits-ddpm" else None
    if "memorization" in path:
        body = {**body, "records": {"dataset": "digits-ddpm-train", "indices": [0]}}
    elif test is not None:
        body = {**body, "test": test}
    response = client.post(f"/v1/{path}", json=body)
    assert response.status_code == 422 and needle in response.json()["detail"], response.text
