"""Near-duplicate leakage over HTTP, per kind of change, with the shipped defaults.

    python -m bench.leakage

For each kind, the audit training set (worker/demo.py: audit_data) is rebuilt with its 40 planted test
images changed that way (exact, pixel noise at 5% and 10% of the range, brightness x 0.7, contrast x 0.7,
a 1-pixel shift, a 1-pixel crop enlarged back), an MLP is trained on it and both are registered; the
leakage analysis then runs on all 400 test images (40 planted, 360 clean). Then the other way round for
noise, shift and crop: the demo's audit model and set (exact plants), the 40 test points changed.
Reported per kind: recall (planted flagged), the false-flag rate (clean flagged) against the rate the
service expects, top-1 (the best match is the planted record) for the service and for the input-space
nearest neighbour (Euclidean, the plain baseline), and how many of the planted were found as copies
(the model's response) and as near duplicates (input similarity). The noise kinds run DRAWS times, each
on its own noise (and, for changed training copies, its own model): their rows give the mean over the
draws, and top-1 per draw follows the table. Last, text (`text`): the demo's tiny
fact-corpus GPT, 40 of its training sentences changed in case, spacing or one word, among 100 sentences
of the same templates about other entities (none of them also a training sentence).
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from contract.registry import Registry
from worker.analyses.similarity import _shift
from worker.corpus import fact_corpus
from worker.demo import AUDIT_PLANTED, add_dataset, add_model, audit_data, digits_mlp
from worker.generative import SIZES
from worker.registry import main as registry_main

from .service import run_to_end, service

TRAIN = 1397  # the audit set's clean records; the planted test images follow them


DRAWS = 8  # noise kinds: independent noise draws (40 plants each: one draw's top-1 has a standard error ~0.035)


def changes(draw: int = 1) -> dict:
    noise = torch.randn((AUDIT_PLANTED, 64), generator=torch.Generator().manual_seed(draw))
    img = lambda x: x.reshape(-1, 1, 8, 8)  # noqa: E731
    moves = torch.tensor([(0, 1), (1, 0), (0, -1), (-1, 0)])
    return {
        "exact": lambda x: x,
        "noise 5%": lambda x: (x + 0.05 * noise).clamp(0, 1),
        "noise 10%": lambda x: (x + 0.10 * noise).clamp(0, 1),
        "brightness x0.7": lambda x: x * 0.7,
        "contrast x0.7": lambda x: ((x - 0.5) * 0.7 + 0.5).clamp(0, 1),
        "shift 1 px": lambda x: torch.cat([_shift(img(x[i : i + 1]), *moves[i % 4].tolist()) for i in range(len(x))]),
        "crop 1 px": lambda x: F.interpolate(img(x)[..., 1:7, 1:7], size=(8, 8), mode="bilinear").flatten(1),
    }


def main() -> None:
    audit = audit_data()
    test, labels = audit["test_inputs"], audit["test_targets"]
    planted = torch.arange(TRAIN, TRAIN + AUDIT_PLANTED)
    kinds = changes()
    draws = {kind: range(1, DRAWS + 1 if kind.startswith("noise") else 2) for kind in kinds}
    expected = {"noise 5%": "noise", "brightness x0.7": "brightness", "contrast x0.7": "contrast"}
    expected |= {"shift 1 px": "shift", "crop 1 px": "crop"}
    with tempfile.TemporaryDirectory() as tmp:
        registry_main(["--root", tmp, "demo"])
        registry = Registry(Path(tmp))
        runs = []  # (what, changed training inputs, request body)
        for kind in kinds:
            for draw in draws[kind]:
                x, n = audit["inputs"].clone(), len(runs)
                x[planted] = changes(draw)[kind](test[:AUDIT_PLANTED]).flatten(1).float()
                add_model(registry, f"leak-{n}-mlp", digits_mlp(x, audit["targets"]), f"audit MLP, plants: {kind}")
                add_dataset(registry, f"leak-{n}-train", x, audit["targets"], trained=[f"leak-{n}-mlp"])
                every = {"dataset": "digits-audit-test", "indices": list(range(400))}
                body = {"model": f"leak-{n}-mlp", "dataset": f"leak-{n}-train", "test": every}
                runs.append((kind, "training copy", x, body))
        for kind in ("noise 5%", "shift 1 px", "crop 1 px"):  # the other side changed: the test point
            for draw in draws[kind]:
                changed = changes(draw)[kind](test[:AUDIT_PLANTED]).flatten(1).float()
                inline = {"inputs": torch.cat([changed, test[AUDIT_PLANTED:]]).tolist(), "targets": labels.tolist()}
                body = {"model": "digits-audit-mlp", "dataset": "digits-audit-train", "test": inline}
                runs.append((kind, "test point", audit["inputs"], body))
        figures = {}  # (kind, side): per draw (recall, false flags, expected, top-1, NN top-1, copies, near, said, s)
        with service(Path(tmp), warm=False, ATTR_MAX_TEST_POINTS="512") as client:
            for kind, side, x, body in runs:
                seconds, job = run_to_end(client, body, "/v1/analyses/leakage")
                rows, cal = job["result"]["rows"], job["result"]["calibration"]
                queries = torch.tensor(body["test"]["inputs"][:AUDIT_PLANTED]) if side == "test point" else test
                said = cal["near_duplicate_recall"].get(expected.get(kind, ""), math.nan)
                figures.setdefault((kind, side), []).append(
                    [
                        sum(r["leaked"] for r in rows[:AUDIT_PLANTED]) / AUDIT_PLANTED,
                        sum(r["leaked"] for r in rows[AUDIT_PLANTED:]) / (400 - AUDIT_PLANTED),
                        cal["expected_false_flag_rate"],
                        sum(r["best"]["index"] == TRAIN + r["row"] for r in rows[:AUDIT_PLANTED]) / AUDIT_PLANTED,
                        float((torch.cdist(queries[:AUDIT_PLANTED], x).argmin(1) == planted).double().mean()),
                        sum(r["match"] == "copy" for r in rows[:AUDIT_PLANTED]),
                        sum(r["match"] == "near-duplicate" for r in rows[:AUDIT_PLANTED]),
                        said,
                        seconds,
                    ]
                )
        print(
            "| change | changed | draws | recall | false flags (expected) | top-1 | top-1 input NN | as copy / near "
            "duplicate | expected recall (kind) | s |\n|---|---|---|---|---|---|---|---|---|---|"
        )
        for (kind, side), per_draw in figures.items():
            found, false, said_false, top1, nn, copies, near, said, seconds = torch.tensor(per_draw).mean(0).tolist()
            print(
                f"| {kind} | {side} | {len(per_draw)} | {found:.3f} | {false:.2%} ({said_false:.2%}) | {top1:.3f} | "
                f"{nn:.3f} | {copies:.1f} / {near:.1f} | {'' if math.isnan(said) else f'{said:.3f}'} | {seconds:.1f} |"
            )
        for (kind, side), per_draw in figures.items():
            if len(per_draw) > 1:
                print(
                    f"top-1 per draw (service / input NN), {kind}, {side}: "
                    + ", ".join(f"{f[3]:.3f} / {f[4]:.3f}" for f in per_draw)
                )

    text()


def text() -> None:
    """The tiny fact-corpus GPT (worker/generative.py): 40 of its training sentences changed (upper case,
    doubled spaces, one word replaced) among 100 sentences of the same templates about other entities."""
    corpus = fact_corpus(SIZES[False]["entities"])
    clean = [t for t in fact_corpus(SIZES[False]["entities"], seed=1).sentences if t not in corpus.sentences][:100]
    picked = list(range(0, len(corpus.sentences), len(corpus.sentences) // 40))[:40]
    rng = random.Random(2)
    words = sorted({w for t in corpus.sentences for w in t.split()})

    def replaced(t: str) -> str:
        w = t.split()
        w[rng.randrange(len(w))] = rng.choice(words)
        return " ".join(w)

    kinds = {"case": str.upper, "whitespace": lambda t: "  ".join(t.split()), "one word": replaced}
    print(
        "\n| text change | recall | false flags (expected) | top-1 | expected recall (kind) | s |\n|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as tmp:
        registry_main(["--root", tmp, "demo", "--generative"])
        with service(Path(tmp), warm=False, ATTR_MAX_TEST_POINTS="512") as client:
            for kind, change in kinds.items():
                sentences = [change(corpus.sentences[i]) for i in picked] + clean
                texts = [{"prompt": t.rsplit(" ", 1)[0], "completion": " " + t.rsplit(" ", 1)[1]} for t in sentences]
                body = {"model": "facts-gpt", "dataset": "facts-corpus", "test": {"texts": texts}}
                seconds, job = run_to_end(client, body, "/v1/analyses/leakage")
                rows, cal = job["result"]["rows"], job["result"]["calibration"]
                found = sum(r["leaked"] for r in rows[:40]) / 40
                false = sum(r["leaked"] for r in rows[40:]) / len(clean)
                top1 = sum(r["best"]["index"] == i for r, i in zip(rows, picked, strict=False)) / 40
                said = cal["near_duplicate_recall"].get(kind.replace("one ", ""))
                print(
                    f"| {kind} | {found:.3f} | {false:.2%} ({cal['expected_false_flag_rate']:.2%}) | {top1:.3f} | "
                    f"{said:.3f} | {seconds:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
