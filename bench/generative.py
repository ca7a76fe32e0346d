"""Fact tracing in a tiny GPT and attribution of a customized DDPM's generations, over HTTP, against
baselines computed here, all in one run.

    python -m bench.generative [--queries 60] [--generations 20]

Builds the full-size generative registry once (bench/out/generative-registry: `python -m
worker.registry demo --generative --full`, a few minutes), starts the service (bench.service), then:
  - LM (worker/corpus.py): queries "X lives in" + " C."; ground truth: the sentences stating that fact.
    MRR (of the first true proponent in the full ranking) and recall@10, for Forward-INF settings over
    HTTP, an explicit gradient dot product (per-example gradients, torch.func) and BM25 (Okapi, k1 1.5,
    b 0.75, over words).
  - Diffusion: images sampled from `digits-ddpm` (fine-tuned on 5 exemplars); ground truth: the
    exemplars among the 1,442 training images. Recall@10 and average precision, for Forward-INF over
    HTTP, the gradient dot product, and nearest neighbours in pixels and in the hidden features of the
    digits classifier (`digits-mlp`).
Times are wall seconds for all queries: HTTP POST to finished for ours (warm worker), the computation
alone for the baselines.
"""

from __future__ import annotations

import argparse
import io
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.func import functional_call, grad, vmap

from contract.registry import Registry
from worker.corpus import encode, fact_corpus
from worker.forward_inf import CausalLM, Diffusion, build
from worker.forward_inf.tasks import TEST_INDEX_OFFSET
from worker.generative import DDPM_METHOD, DIFFUSION, EXEMPLARS, LM_METHOD, SIZES, sample_ddpm
from worker.registry import main as registry_main

from .service import run_to_end, service

ROOT = Path(__file__).resolve().parents[1]
LM_METHODS = {  # explicit, not the manifest's defaults, so the table says what ran
    "Forward-INF finite, Adam lr 1e-3 (default)": LM_METHOD,
    "Forward-INF finite, Adam lr 1e-4": {**LM_METHOD, "lr": 1e-4},
    "Forward-INF finite, SGD lr 1e-2": {**LM_METHOD, "optimizer": "sgd", "lr": 1e-2},
    "Forward-INF linear (= gradient dot product)": {**LM_METHOD, "mode": "linear", "optimizer": "sgd"},
}
DDPM_METHODS = {
    "Forward-INF finite, Adam lr 1e-3, relative (default)": DDPM_METHOD,
    "Forward-INF finite, Adam lr 1e-3, signed": {**DDPM_METHOD, "score": "signed"},
    "Forward-INF linear, relative": {**DDPM_METHOD, "mode": "linear", "optimizer": "sgd"},
}


def load(registry: Registry, id: str) -> torch.nn.Module:
    m = registry.model(id)
    model = build(m.architecture, m.params)
    model.load_state_dict(load_file(m.path / m.weights))
    return model.eval()


def grad_dot(model, task, train: dict, test: dict, chunk: int = 64) -> np.ndarray:
    """g_test . g_i for every pair, from explicit per-example gradients (the TracIn-style baseline)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, example):
        return task.loss(lambda *a: functional_call(model, p, a), {k: v.unsqueeze(0) for k, v in example.items()})[0]

    per_example = vmap(grad(loss), in_dims=(None, 0))

    def grads(data):  # (n, P); task.prepare (the diffusion draws) runs outside vmap
        out = []
        for lo in range(0, len(data["inputs"]), chunk):
            g = per_example(params, task.prepare({k: v[lo : lo + chunk] for k, v in data.items()}))
            out.append(torch.cat([v.flatten(1) for v in g.values()], 1))
        return torch.cat(out)

    return (grads(test) @ grads(train).T).numpy()


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def bm25(corpus: list[str], queries: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    docs = [Counter(words(s)) for s in corpus]
    lengths = np.array([sum(d.values()) for d in docs])
    df = Counter(w for d in docs for w in d)
    n, avg = len(docs), lengths.mean()
    out = np.zeros((len(queries), n))
    for j, query in enumerate(queries):
        for w in set(words(query)):
            idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
            tf = np.array([d[w] for d in docs])
            out[j] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths / avg))
    return out


def ranks(scores: np.ndarray, truth: list[set[int]]) -> list[list[int]]:
    """Per query, the 1-based ranks of its true proponents in the descending order of its scores."""
    out = []
    for row, true in zip(scores, truth, strict=True):
        position = np.empty(len(row), dtype=int)
        position[np.argsort(-row, kind="stable")] = np.arange(1, len(row) + 1)
        out.append(sorted(position[list(true)].tolist()))
    return out


def mrr_recall(r: list[list[int]]) -> tuple[float, float]:
    return float(np.mean([1 / x[0] for x in r])), float(np.mean([sum(k <= 10 for k in x) / len(x) for x in r]))


def recall_ap(r: list[list[int]]) -> tuple[float, float]:
    ap = [np.mean([(i + 1) / k for i, k in enumerate(x)]) for x in r]
    return float(np.mean([sum(k <= 10 for k in x) / len(x) for x in r])), float(np.mean(ap))


def http_scores(client, body: dict) -> tuple[float, np.ndarray]:
    seconds, job = run_to_end(client, body)
    scores = client.get(job["links"]["scores"], params={"format": "npy"})
    return seconds, np.load(io.BytesIO(scores.content), allow_pickle=False)


def table(title: str, header: tuple[str, str], rows: list[tuple[str, tuple[float, float], float]]) -> None:
    print(f"\n{title}\n| method | {header[0]} | {header[1]} | seconds |\n|---|---|---|---|")
    for name, (a, b), seconds in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--generations", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = ROOT / "bench" / "out" / "generative-registry"
    start = time.perf_counter()
    registry_main(["--root", str(root), "demo", "--generative", "--full", "--if-absent"])
    print(f"registry ready in {time.perf_counter() - start:.0f} s ({root})")
    registry = Registry(root)

    corpus = fact_corpus(SIZES[True]["entities"])
    facts = np.linspace(0, len(corpus.facts) - 1, args.queries).round().astype(int).tolist()
    queries = [corpus.query(f) for f in facts]
    truth = [set(corpus.proponents(f)) for f in facts]
    data = load_file(registry.dataset("facts-corpus").path / registry.dataset("facts-corpus").shards[0].file)

    gpt, unet = load(registry, "facts-gpt"), load(registry, "digits-ddpm")
    generated = sample_ddpm(unet, args.generations, seed=1)
    images = load_file(registry.dataset("digits-ddpm-train").path / "shard-000.safetensors")["inputs"]
    exemplars = [set(range(len(images) - EXEMPLARS, len(images)))] * args.generations

    lm_rows, ddpm_rows = [], []
    with service(root, warm=True, ATTR_BATCH_SIZE="512") as client:  # the best measured for the GPT
        texts = [{"prompt": p, "completion": c} for p, c in queries]
        for name, method in LM_METHODS.items():
            body = {"model": "facts-gpt", "dataset": "facts-corpus", "test": {"texts": texts}, "method": method}
            seconds, scores = http_scores(client, body)
            lm_rows.append((name, mrr_recall(ranks(scores, truth)), seconds))
        for name, method in DDPM_METHODS.items():
            body = {"model": "digits-ddpm", "dataset": "digits-ddpm-train", "method": method,
                    "test": {"inputs": generated.tolist()}}  # fmt: skip
            seconds, scores = http_scores(client, body)
            ddpm_rows.append((name, recall_ap(ranks(scores, exemplars)), seconds))

    tokens, mask = (torch.tensor(v) for v in encode([p for p, _ in queries], [c for _, c in queries]))
    t = time.perf_counter()
    scores = grad_dot(gpt, CausalLM(), {"inputs": data["inputs"], "targets": data["targets"]},
                      {"inputs": tokens, "targets": mask})  # fmt: skip
    lm_rows.append(("gradient dot product (explicit per-example gradients)", mrr_recall(ranks(scores, truth)),
                    time.perf_counter() - t))  # fmt: skip
    t = time.perf_counter()
    scores = bm25(corpus.sentences, [p + c for p, c in queries])
    lm_rows.append(("BM25", mrr_recall(ranks(scores, truth)), time.perf_counter() - t))

    diffusion = Diffusion(**DIFFUSION)
    n = len(images)
    t = time.perf_counter()
    test = {"inputs": generated, "index": torch.arange(args.generations) + TEST_INDEX_OFFSET}
    scores = grad_dot(unet, diffusion, {"inputs": images, "index": torch.arange(n)}, test)
    ddpm_rows.append(("gradient dot product", recall_ap(ranks(scores, exemplars)), time.perf_counter() - t))
    t = time.perf_counter()
    pixels = -torch.cdist(generated.flatten(1), images.flatten(1)).numpy()
    ddpm_rows.append(("nearest neighbours, pixels", recall_ap(ranks(pixels, exemplars)), time.perf_counter() - t))
    classifier = load(registry, "digits-mlp")
    t = time.perf_counter()
    with torch.no_grad():
        features = lambda x: classifier.net[:2]((x.flatten(1) + 1) / 2)  # noqa: E731 (hidden ReLU layer)
        hidden = -torch.cdist(features(generated), features(images)).numpy()
    ddpm_rows.append(("nearest neighbours, classifier features", recall_ap(ranks(hidden, exemplars)),
                      time.perf_counter() - t))  # fmt: skip

    table(f"Fact tracing: {args.queries} queries, {len(corpus.sentences)} sentences", ("MRR", "recall@10"), lm_rows)
    table(f"Diffusion: {args.generations} generations, {n} training images ({EXEMPLARS} exemplars)",
          ("recall@10", "mAP"), ddpm_rows)  # fmt: skip


if __name__ == "__main__":
    main()
