"""The training-side index (two-stage attribution) against the full sweep, side by side in one run.

    python -m bench.index [--sizes 1e5,1e6,1e7] [--parts scale,dims,quality] [--quick]

  scale    the issue's scale MLP (64-256-10, 19,210 parameters; 64-d Gaussian inputs, labels from a random
           linear teacher: bench.scale's data) at each size, through the real registry, HTTP and RQ (one
           worker, ATTR_TORCH_THREADS=2 on this 2-core machine, a warm budget of --warm-mb): one full sweep
           at k = 1 (after a request that pays the one-off setup), the index's build (POST /v1/indexes to
           finished) and its ratio to that sweep, bytes per record, two-stage latency over HTTP (POST to
           finished) at k = 1 (20 requests) and k = 16 (5), the worker's search time, and the recall of the
           full sweep's top-10 (each end) among the re-scored candidates at M = 100, 1,000 and the default
           max(1,000, 0.1% of N), for 10 test points.
           At 10^6 records, leakage over 10^4 test points in one request through the index (1,000 exact
           copies of training records, 1,000 copies with 5% noise, 8,000 fresh points): the share of each
           flagged, and the full analysis against the index on 256 of them (its limit per request).
  dims     the same model on --dims-records records in the engine alone (no HTTP): sketch dimensions (and
           exact coordinates) against bytes per record, recall at the default M (exact inner products), and
           the seconds to sketch.
  gpt      fact tracing in the demo's tiny GPT (bench.generative's full corpus), in the engine alone: recall
           of the full sweep's top-10 among M candidates, and MRR / recall@10 of the queried facts' sentences
           for the full sweep and the two-stage answer at M = 100.
  quality  bench.quality's setups in the engine alone (digits MLP, digits CNN, breast_cancer MLP; the ResNet
           with --setups, separated by ';'): the default method's recall at M = 10, 50, 100 and 1,000 (capped at the set),
           and LDS of the two-stage answer at M = 100 (exact scores on the candidates, 0 elsewhere) against
           the full sweep's, on bench.quality's LDS ground truth (24 models; cached under bench/out/).

Results print as markdown tables and go to --out as JSON; docs/benchmarks.md ("Index") quotes them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from bench.scale import service, synthetic
from contract.indexes import default_candidates
from contract.registry import Registry
from worker.forward_inf import Classification, ForwardInf, MirrorConfig, build

ROOT = Path(__file__).resolve().parents[1]
ARCH, PARAMS = "builtin:mlp", {"in_features": 64, "out_features": 10, "hidden": [256]}


def train_mlp() -> torch.nn.Module:
    model = build(ARCH, PARAMS)
    x, y = synthetic(100_000, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for lo in range(0, len(x), 256):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[lo : lo + 256]), y[lo : lo + 256]).backward()
        opt.step()
    return model.eval()


LEAK = {"copies": 1000, "near": 1000, "clean": 8000}  # the leakage audit's test set at LEAK_RECORDS records
LEAK_RECORDS = 10**6


def build_registry(root: Path, sizes: list[int], shard: int, tmp: Path) -> None:
    registry = Registry(root)
    save_file(train_mlp().state_dict(), tmp / "mlp.safetensors")
    spec = {"shape": [64], "num_classes": 10}
    registry.add_model("synth-mlp", "classification", ARCH, tmp / "mlp.safetensors", spec, PARAMS)
    x, y = synthetic(1000, seed=2)
    save_file({"inputs": x, "targets": y}, tmp / "test.safetensors")
    registry.add_dataset("synth-test", [tmp / "test.safetensors"], spec)
    for n in sizes:
        files = []
        for s, lo in enumerate(range(0, n, shard)):
            x, y = synthetic(min(shard, n - lo), seed=1000 + s)
            files.append(tmp / f"{n}-{s}.safetensors")
            save_file({"inputs": x, "targets": y}, files[-1])
            if n == LEAK_RECORDS and s == 0:  # the audit's test set: copies and noisy copies of training records
                save_file(leak_test(x, y), tmp / "leak.safetensors")
                registry.add_dataset("synth-leak", [tmp / "leak.safetensors"], spec)
        registry.add_dataset(f"synth-{n}", files, spec, trained=["synth-mlp"])
        for f in files:
            f.unlink()


def leak_test(x: torch.Tensor, y: torch.Tensor) -> dict:
    """LEAK's test points: exact copies of training records, copies with Gaussian noise of 5% of the inputs'
    range (the analysis' own "noise" change), and fresh points from the same distribution; in that order."""
    g = torch.Generator().manual_seed(7)
    picked = torch.randperm(len(x), generator=g)[: LEAK["copies"] + LEAK["near"]]
    copies, near = picked[: LEAK["copies"]], picked[LEAK["copies"] :]
    noise = 0.05 * float(x.max() - x.min()) * torch.randn(len(near), x.shape[1], generator=g)
    fresh, labels = synthetic(LEAK["clean"], seed=99)
    inputs = torch.cat([x[copies], x[near] + noise, fresh])
    return {"inputs": inputs.contiguous(), "targets": torch.cat([y[copies], y[near], labels])}


def leakage(http, dataset: str, indices: list[int], candidates: int | None) -> tuple[float, dict]:
    body = {"model": "synth-mlp", "dataset": dataset, "test": {"dataset": "synth-leak", "indices": indices},
            "candidates": candidates}  # fmt: skip
    start = time.perf_counter()
    job = http.post("/v1/analyses/leakage", json=body).json()
    assert "links" in job, job
    view = finished(http, job["links"]["self"])
    return time.perf_counter() - start, view["result"]


def rates(result: dict, indices: list[int]) -> dict:
    """Flagged shares of the copies, the noisy copies and the clean points among `indices`."""
    kinds = [
        "copies" if i < LEAK["copies"] else "near" if i < LEAK["copies"] + LEAK["near"] else "clean" for i in indices
    ]
    flagged = [r["leaked"] for r in result["rows"]]
    return {k: round(sum(f for f, kk in zip(flagged, kinds, strict=True) if kk == k) / max(1, kinds.count(k)), 3)
            for k in LEAK}  # fmt: skip


def leakage_row(http, dataset: str) -> dict:
    """Whole-test-set leakage through the index against the full analysis (256 test points, its limit)."""
    everything = list(range(sum(LEAK.values())))
    wall, through = leakage(http, dataset, everything, None)
    sample = everything[:25] + everything[LEAK["copies"] : LEAK["copies"] + 25] + everything[-206:]
    full_s, full = leakage(http, dataset, sample, 0)
    _, same = leakage(http, dataset, sample, None)
    agree = sum(a["leaked"] == b["leaked"] for a, b in zip(full["rows"], same["rows"], strict=True)) / len(sample)
    return {"records": LEAK_RECORDS, "test_points": len(everything), "wall_s": round(wall, 1),
            "through_index": rates(through, everything), "full_256": rates(full, sample),
            "index_256": rates(same, sample), "agreement_256": round(agree, 3), "full_256_s": round(full_s, 1),
            "near_recall_expected": through["calibration"]["near_duplicate_recall"].get("noise"),
            "false_flag_expected": round(through["calibration"]["expected_false_flag_rate"], 4)}  # fmt: skip


def finished(http, link: str) -> dict:
    """The view once the job has ended: long polls for jobs; for an index (no long poll) a look every 0.5 s,
    so that polling takes no CPU from the worker it waits for."""
    view = http.get(link).json()
    while view["status"] in ("queued", "running"):
        if "/indexes/" in link:
            time.sleep(0.5)
        view = http.get(link, params={"wait_s": 30}).json()
    assert view["status"] == "finished", view
    return view


def attribute(http, dataset: str, indices: list[int], candidates: int | None) -> tuple[float, dict]:
    body = {"model": "synth-mlp", "dataset": dataset, "test": {"dataset": "synth-test", "indices": indices},
            "top_k": 10, "candidates": candidates}  # fmt: skip
    start = time.perf_counter()
    job = http.post("/v1/attributions", json=body).json()
    view = finished(http, job["links"]["self"])
    return time.perf_counter() - start, view


def recall(two: dict, full: dict) -> float:
    """The share of the full sweep's top-10 at both ends that the two-stage answer found (its candidates
    are scored exactly, so a true top-10 record among them is in its top-10)."""
    hits = total = 0
    for a, b in zip(two["result"]["rows"], full["result"]["rows"], strict=True):
        for side in ("proponents", "opponents"):
            truth = {p["index"] for p in b[side]}
            hits, total = hits + len(truth & {p["index"] for p in a[side]}), total + len(truth)
    return hits / total


def scale_rows(sizes: list[int], args) -> list[dict]:
    env = {"ATTR_WARM_BYTES": str(args.warm_mb << 20), "ATTR_BATCH_SIZE": "4096", "ATTR_PART_RECORDS": str(args.shard),
           "ATTR_TORCH_THREADS": "2"}  # fmt: skip
    rows, fresh = [], itertools.count()
    with tempfile.TemporaryDirectory(dir=ROOT / "var" if (ROOT / "var").is_dir() else None) as tmp:
        root, tmp = Path(tmp) / "registry", Path(tmp)
        build_registry(root, sizes, args.shard, tmp)
        for n in sizes:
            dataset = f"synth-{n}"
            with service(root, 1, env) as (http, _, _):
                attribute(http, dataset, [next(fresh)], 0)  # base losses, curvature, warm shards
                sweep_s = statistics.median(attribute(http, dataset, [next(fresh)], 0)[0] for _ in range(2))
                start = time.perf_counter()
                made = http.post("/v1/indexes", json={"model": "synth-mlp", "dataset": dataset}).json()
                entry = finished(http, made["links"]["self"])["index"]
                build_s = time.perf_counter() - start
                probes = [next(fresh) for _ in range(10)]
                full = attribute(http, dataset, probes, 0)[1]
                recalls = {m: recall(attribute(http, dataset, probes, m)[1], full) for m in (100, 1000)}
                default = default_candidates(n)
                recalls[default] = recall(attribute(http, dataset, probes, None)[1], full)
                latency = {}
                for k, count in ((1, 20), (16, 5)):
                    runs = [attribute(http, dataset, [next(fresh) for _ in range(k)], None) for _ in range(count)]
                    walls = sorted(w for w, _ in runs)
                    search = [v["timing"]["search_s"] for _, v in runs]
                    latency[k] = {"p50_s": round(walls[len(walls) // 2], 3), "p99_s": round(walls[-1], 3),
                                  "search_ms": round(1000 * statistics.median(search), 1)}  # fmt: skip
                audit = leakage_row(http, dataset) if n == LEAK_RECORDS else None
            rows.append({
                "records": n, "sweep_s": round(sweep_s, 2), "build_s": round(build_s, 1),
                "build_over_sweep": round(build_s / sweep_s, 1), "bytes_per_record": round(entry["bytes_per_record"], 1),
                "search": entry["search"], "index_recall": entry["recall"], "default_m": default,
                "recall": {str(m): round(r, 3) for m, r in recalls.items()}, "latency": latency, "leakage": audit,
            })  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def top_recall(exact: torch.Tensor, approx: torch.Tensor, m: int) -> float:
    """The share of `exact`'s top-10 at both ends within `approx`'s top m."""
    hits = 0
    for largest in (True, False):
        truth = exact.topk(10, dim=1, largest=largest).indices
        found = approx.topk(min(m, approx.shape[1]), dim=1, largest=largest).indices
        hits += sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True))
    return hits / (20 * exact.shape[0])


def dims_rows(records: int) -> list[dict]:
    torch.set_num_threads(2)
    model = train_mlp()
    x, y = synthetic(records, seed=5)
    test = synthetic(20, seed=2)
    fi = ForwardInf(model, Classification(), MirrorConfig(batch_size=4096)).prepare((x, y))
    exact, mirror = fi.scores(test), fi.mirror(test)
    m, rows = default_candidates(records), []
    for dims, rank in ((64, 32), (128, 64), (256, 32), (256, 64), (256, 128), (384, 64), (512, 64)):
        basis = fi.basis(dims, rank, 0)
        start = time.perf_counter()
        sketches = fi.sketch(basis)
        seconds = time.perf_counter() - start
        approx = fi.config.sign * basis.queries(mirror.first) @ sketches.T
        rows.append({"dims": dims, "exact": basis.exact, "flat_bytes": 2 * dims, "pq_bytes": dims // 4, "m": m,
                     "recall": round(top_recall(exact, approx, m), 3), "sketch_s": round(seconds, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def quality_rows(setups: list[str], models: int) -> list[dict]:
    from bench.quality import SETUPS, lds, lds_truth

    torch.set_num_threads(2)
    rows = []
    for setup in setups:
        data_fn, train_fn, _ = SETUPS[setup]
        x, y, x_test, y_test = data_fn()
        x_test, y_test = x_test[:100], y_test[:100]
        masks, margins = lds_truth(setup, train_fn, x, y, x_test, y_test, models, False)
        fi = ForwardInf(train_fn(x, y), Classification(), MirrorConfig()).prepare((x, y))
        exact, mirror = fi.scores((x_test, y_test)), fi.mirror((x_test, y_test))
        basis = fi.basis(256, 64, 0)
        approx = fi.config.sign * basis.queries(mirror.first) @ fi.sketch(basis).T
        two = torch.zeros_like(exact)  # two-stage at M = 100: exact scores on the candidates, 0 elsewhere
        for largest in (True, False):
            chosen = approx.topk(min(100, len(y)), dim=1, largest=largest).indices
            two.scatter_(1, chosen, exact.gather(1, chosen))
        rows.append({
            "setup": setup, "records": len(y), "precondition": fi.execution()["precondition"], "exact": basis.exact,
            "recall": {str(m): round(top_recall(exact, approx, m), 3) for m in (10, 50, 100, 1000)},
            "lds_full": round(lds(exact, masks, margins), 3), "lds_two_stage_100": round(lds(two, masks, margins), 3),
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def gpt_rows(queries: int) -> list[dict]:
    """Fact tracing in the demo's tiny GPT (bench.generative's full corpus: 2,200 sentences, 135,424
    parameters), in the engine alone, with its manifest's method (a finite Adam step, no curvature) and the
    linear SGD step (the gradient dot product): the index's candidates against the full sweep (recall of its
    top-10 among M) and against the facts (MRR and recall@10 of the sentences stating each queried fact, for
    the full sweep and the two-stage answer at M = 100)."""
    from bench.generative import mrr_recall, ranks
    from worker.corpus import encode, fact_corpus
    from worker.forward_inf import CausalLM
    from worker.generative import LM_METHOD, SIZES, train_lm

    torch.set_num_threads(2)
    corpus = fact_corpus(SIZES[True]["entities"])
    tokens, mask = (torch.tensor(v) for v in encode(corpus.sentences))
    model = train_lm(tokens, mask, SIZES[True]["lm_epochs"])
    facts = np.linspace(0, len(corpus.facts) - 1, queries).round().astype(int).tolist()
    asked = [corpus.query(f) for f in facts]
    truth = [set(corpus.proponents(f)) for f in facts]
    test_tokens, test_mask = (torch.tensor(v) for v in encode([p for p, _ in asked], [c for _, c in asked]))
    test, rows = {"inputs": test_tokens, "targets": test_mask}, []
    methods = {
        "finite Adam (the manifest's)": LM_METHOD,
        "linear SGD": {**LM_METHOD, "mode": "linear", "optimizer": "sgd"},
    }
    for name, method in methods.items():
        fi = ForwardInf(model, CausalLM(), MirrorConfig(**method)).prepare({"inputs": tokens, "targets": mask})
        exact, mirror = fi.scores(test), fi.mirror(test)
        basis = fi.basis(256, 64, 0)
        start = time.perf_counter()
        approx = fi.config.sign * basis.queries(mirror.first) @ fi.sketch(basis).T
        seconds = time.perf_counter() - start
        two = torch.full_like(exact, -math.inf)  # two-stage at M = 100: exact scores on the candidates
        for largest in (True, False):
            chosen = approx.topk(100, dim=1, largest=largest).indices
            two.scatter_(1, chosen, exact.gather(1, chosen))
        rows.append({"method": name, "sentences": len(tokens), "parameters": sum(p.numel() for p in fi.fm.theta.values()),
                     "exact": basis.exact, "sketch_s": round(seconds, 1),
                     "recall": {str(m): round(top_recall(exact, approx, m), 3) for m in (10, 50, 100, 1000)},
                     "mrr_recall10_full": [round(v, 3) for v in mrr_recall(ranks(exact.numpy(), truth))],
                     "mrr_recall10_two_stage_100": [round(v, 3) for v in mrr_recall(ranks(two.numpy(), truth))]})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e5,1e6,1e7")
    parser.add_argument("--parts", default="scale,dims,quality,gpt")
    parser.add_argument("--quick", action="store_true", help="sizes up to 1e6, dims on 1e5 records")
    parser.add_argument("--shard", type=int, default=1_000_000, help="records per shard (and per part)")
    parser.add_argument("--warm-mb", type=int, default=4096, help="the worker's warm budget")
    parser.add_argument("--dims-records", type=int, default=1_000_000)
    parser.add_argument(
        "--setups",
        default="digits MLP 64-64-10;digits CNN (2 conv, width 8);breast_cancer MLP 30-32-2",
        help="bench.quality's setups, separated by ';'",
    )
    parser.add_argument("--lds-models", type=int, default=24)
    parser.add_argument("--queries", type=int, default=60, help="facts queried in the GPT part")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "index.json")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.dims_records = [s for s in sizes if s <= 10**6], 100_000
    parts, result, started = args.parts.split(","), {}, time.perf_counter()
    if "scale" in parts:
        result["scale"] = scale_rows(sizes, args)
    if "dims" in parts:
        result["dims"] = dims_rows(args.dims_records)
    if "quality" in parts:
        result["quality"] = quality_rows(args.setups.split(";"), args.lds_models)
    if "gpt" in parts:
        result["gpt"] = gpt_rows(args.queries)
    result["machine"] = (
        f"torch {torch.__version__}, {os.cpu_count()} cores; bench {time.perf_counter() - started:.0f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['machine']}\n")
    if "scale" in result:
        print("| records | full sweep s | build s | build / sweep | bytes/record | search | recall M=100 | M=1,000 | "
              "default M | recall | k=1 p50 / p99 s | search ms | k=16 p50 / p99 s | search ms |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in result["scale"]:
            a, b = r["latency"][1], r["latency"][16]
            print(f"| {r['records']:,} | {r['sweep_s']} | {r['build_s']} | {r['build_over_sweep']} | {r['bytes_per_record']} | "
                  f"{r['search']} | {r['recall']['100']} | {r['recall']['1000']} | {r['default_m']:,} | "
                  f"{r['recall'][str(r['default_m'])]} | {a['p50_s']} / {a['p99_s']} | {a['search_ms']} | "
                  f"{b['p50_s']} / {b['p99_s']} | {b['search_ms']} |")  # fmt: skip
        for r in result["scale"]:
            if r.get("leakage"):
                print(f"\nleakage: {json.dumps(r['leakage'])}")
    if "dims" in result:
        print(f"\n{args.dims_records:,} records | dims | exact | bytes/record (flat / PQ) | recall at M | sketch s |")
        for r in result["dims"]:
            print(
                f"| {r['dims']} | {r['exact']} | {r['flat_bytes']} / {r['pq_bytes']} | {r['recall']} (M={r['m']:,}) | {r['sketch_s']} |"
            )
    if "gpt" in result:
        for r in result["gpt"]:
            print(f"\nGPT fact tracing: {json.dumps(r)}")
    if "quality" in result:
        print(
            "\n| setup | records | precondition | exact | recall M=10 / 50 / 100 / 1,000 | LDS full | LDS two-stage M=100 |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in result["quality"]:
            rc = " / ".join(str(r["recall"][m]) for m in ("10", "50", "100", "1000"))
            print(
                f"| {r['setup']} | {r['records']} | {r['precondition']} | {r['exact']} | {rc} | {r['lds_full']} | "
                f"{r['lds_two_stage_100']} |"
            )


if __name__ == "__main__":
    main()
