"""Hugging Face models in the engine: fact tracing with a GPT-2-architecture model and its own BPE
tokenizer (full and LoRA), and the cost of one query on a 124M-parameter GPT-2 configuration.

    python -m bench.families [--queries 60] [--epochs 40] [--timing-records 32] [--only facts|timing]
        [--ks 1,8] [--preconditions none,auto] [--ways auto]

Fact tracing (worker/corpus.py, 200 entities): a byte-level BPE tokenizer (`tokenizers`, 512 tokens)
trained on the corpus; a GPT-2 (transformers, 4 layers, width 128) trained on it here; a LoRA adapter
(peft, r 8 on every attention and MLP projection) fine-tuned from a base trained for a third of the epochs.
Queries "X lives in" + " C."; ground truth: the sentences stating that fact. MRR and recall@10 for
Forward-INF settings (the engine in-process: the service returns the same scores, tests/test_families.py),
explicit per-example gradient dot products and BM25. Timing: GPT-2 124M (random weights), sequences of 128
tokens, k = 1 and 8 test points, per precondition and per stacking way (`--ways`, e.g. vmap,layers: one
engine each, the curvature estimated once): the mirrored step and the sweep of one query over
`--timing-records` sequences (the query scaled linearly to 10k), the sweep against the model's own no_grad
forward + loss over the same records in the same batches, measured just before each row; each after one
untimed query (the engine's one-off choice of its way per k, which a warm worker keeps). Peak RSS is the
process's lifetime peak, so each row's is an upper bound set by the rows before it: run one row per process
for its own (`--only timing --ks 8 --preconditions none`).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import peft
import torch
import transformers

from worker.corpus import fact_corpus
from worker.forward_inf import ForwardInf, MirrorConfig, families, make_task

from .generative import bm25, grad_dot, mrr_recall, ranks, table

METHODS = {
    "Forward-INF default (auto: EK-FAC)": {},
    "Forward-INF linear, no curvature (= gradient dot product)": {"precondition": "none"},
    "Forward-INF finite, Adam lr 1e-3 (facts-gpt's default)": {
        "mode": "finite", "optimizer": "adam", "lr": 1e-3, "precondition": "none",
    },
}  # fmt: skip


def tokenizer(texts: list[str], folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def encode(tok, heads: list[str], tails: list[str], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, masks = [], []
    for head, tail in zip(heads, tails, strict=True):
        a, b = tok.encode(head).ids, tok.encode(tail).ids
        mask = [0] * len(a) + [1] * len(b) if tail else [1] * len(a)
        ids.append((a + b + [0] * width)[:width])
        masks.append((mask + [0] * width)[:width])
    return torch.tensor(ids), torch.tensor(masks)


def train(model, data: dict, epochs: int, lr: float, params=None) -> None:
    task = make_task("causal-lm")
    opt = torch.optim.AdamW(params or model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(data["inputs"]), generator=gen).split(64):
            loss = task.loss(model, task.prepare({k: v[batch] for k, v in data.items()})).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def fact_tracing(args, folder: Path) -> None:
    corpus = fact_corpus(200)
    tok = tokenizer(corpus.sentences, folder)
    width = 2 + max(len(tok.encode(s).ids) for s in corpus.sentences)
    inputs, targets = encode(tok, corpus.sentences, [""] * len(corpus.sentences), width)
    data = {"inputs": inputs, "targets": targets}
    facts = np.linspace(0, len(corpus.facts) - 1, args.queries).round().astype(int).tolist()
    queries = [corpus.query(f) for f in facts]
    truth = [set(corpus.proponents(f)) for f in facts]
    q_inputs, q_targets = encode(tok, [p for p, _ in queries], [c for _, c in queries], width)
    test = {"inputs": q_inputs, "targets": q_targets}
    print(f"corpus: {len(corpus.sentences)} sentences, {tok.get_vocab_size()} BPE tokens, {width} tokens each")

    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=width, n_embd=128, n_layer=4, n_head=4, pad_token_id=0,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    t = time.perf_counter()
    full = transformers.GPT2LMHeadModel(config)
    train(families.CausalLM(full, 0), data, args.epochs, 3e-3)
    full.save_pretrained(folder / "full")
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    train(families.CausalLM(base, 0), data, args.epochs // 3, 3e-3)
    base.save_pretrained(folder / "base")
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    )
    wrapped = families.CausalLM(lora.get_base_model(), 0)
    train(wrapped, data, args.epochs - args.epochs // 3, 3e-3, [p for p in lora.parameters() if p.requires_grad])
    lora.save_pretrained(folder / "lora")
    print(f"trained full and LoRA in {time.perf_counter() - t:.0f} s")

    task = make_task("causal-lm")
    full_m = families.load("transformers:causal-lm", folder / "full", "", {})
    base_m = families.load("transformers:causal-lm", folder / "base", "", {})
    lora_m = families.load("peft:lora", folder / "lora", "", {}, base_m)
    for name, model, params in (("full", full_m, ("*",)), ("LoRA", lora_m, ("*lora_*",))):
        rows = []
        for label, method in METHODS.items():
            t = time.perf_counter()
            fi = ForwardInf(model, task, MirrorConfig(**method, params=params, batch_size=512))
            scores = fi.prepare(data).scores(test).numpy()
            rows.append((label, mrr_recall(ranks(scores, truth)), time.perf_counter() - t))
        if name == "full":  # for LoRA, the linear row above is the gradient dot product over the adapter
            t = time.perf_counter()
            scores = grad_dot(model, task, data, test)
            rows.append(("gradient dot product (explicit per-example gradients)", mrr_recall(ranks(scores, truth)),
                         time.perf_counter() - t))  # fmt: skip
        t = time.perf_counter()
        scores = bm25(corpus.sentences, [p + c for p, c in queries])
        rows.append(("BM25", mrr_recall(ranks(scores, truth)), time.perf_counter() - t))
        table(f"Fact tracing, GPT-2 ({name}), {args.queries} queries", ("MRR", "recall@10"), rows)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timing(args) -> None:
    config = transformers.GPT2Config(n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp)
        model = families.load("transformers:causal-lm", Path(tmp), "", {})
    size = sum(p.numel() for p in model.parameters())
    n = args.timing_records
    train = {"inputs": torch.randint(1, config.vocab_size, (n, 128), generator=torch.Generator().manual_seed(1))}
    task = make_task("causal-lm")
    print(f"\nGPT-2 {size / 1e6:.0f}M parameters, {n} sequences of 128 tokens, batch 8, float32, CPU (2 cores)")
    print(
        "| precondition | way | k | setup s | mirror s | sweep s | per 10k records (scaled) s | inference s | "
        "sweep x inference per test point | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|"
    )

    def inference() -> float:  # the model's own no_grad forward + loss over the same records and batches
        start = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, n, 8):
                task.loss(model, task.prepare({"inputs": train["inputs"][lo : lo + 8]}))
        return time.perf_counter() - start

    inference()  # warm: first calls allocate
    for precondition in args.preconditions:
        curvature = None  # estimated once per precondition, shared by its ways' engines (as the fleet shares it)
        for way in args.ways:
            start = time.perf_counter()
            config = MirrorConfig(precondition=precondition, batch_size=8, curvature_samples=n, stacking=way)
            fi = ForwardInf(model, task, config)
            if curvature is not None:
                fi.use(curvature)
            fi.prepare(train)
            curvature, setup = fi.curvature, time.perf_counter() - start
            for k in args.ks:
                test = {"inputs": train["inputs"][:k]}
                fi.scores(test)  # one-off per engine and k, as a worker keeps it: "auto" chooses its way
                reference = inference()
                start = time.perf_counter()
                mirror = fi.mirror(test)
                stepped = time.perf_counter()
                fi.sweep(mirror)
                done = time.perf_counter()
                print(
                    f"| {fi.precondition} | {fi.execution()['stacking']} | {k} | {setup:.1f} | {stepped - start:.1f} "
                    f"| {done - stepped:.1f} | {(done - start) * 10_000 / n:.0f} | {reference:.2f} "
                    f"| {(done - stepped) / reference / k:.2f} | {rss_mb():.0f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--timing-records", type=int, default=32)
    parser.add_argument("--only", choices=("facts", "timing"), help="one part (peak RSS is the process's)")
    parser.add_argument("--ks", type=lambda v: [int(k) for k in v.split(",")], default=[1, 8], help="timing: k values")
    parser.add_argument("--preconditions", type=lambda v: v.split(","), default=["none", "auto"])
    parser.add_argument("--ways", type=lambda v: v.split(","), default=["auto"], help="timing: stacking values")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.only != "timing":
        with tempfile.TemporaryDirectory() as tmp:
            fact_tracing(args, Path(tmp))
    if args.only != "facts":
        timing(args)


if __name__ == "__main__":
    main()
