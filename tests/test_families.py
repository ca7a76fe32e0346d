"""Models of the libraries people train with (worker/forward_inf/families.py), built from tiny configs here
(no downloads), registered over HTTP (app/routes/admin.py) and attributed end to end by a real worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import diffusers
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import start_worker, wait_for
from safetensors.torch import save_file
from torch.func import functional_call, grad

from app.resolve import encode_text
from contract.registry import Registry
from contract.schemas import TextTest
from worker.corpus import fact_corpus
from worker.forward_inf import ForwardInf, MirrorConfig, families, layers, make_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


# -- tiny models, saved as their libraries save them ---------------------------------------------------
def bpe_tokenizer(texts: list[str], folder: Path, vocab: int = 160) -> int:
    """A byte-level BPE tokenizer trained on `texts` (the `tokenizers` library), saved as tokenizer.json;
    returns its vocabulary size. Id 0 is the pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def gpt2(folder: Path, vocab: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2, pad_token_id=0)
    config.bos_token_id = config.eos_token_id = 0
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)


def bert(folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    transformers.BertForSequenceClassification(config).save_pretrained(folder)


def lora(base_folder: Path, folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    base = transformers.GPT2LMHeadModel.from_pretrained(base_folder)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)


def unet(folder: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).save_pretrained(folder)  # fmt: skip
    diffusers.DDPMScheduler(num_train_timesteps=50, beta_start=1e-4, beta_end=0.02).save_config(folder)


# -- the engine on transformers models ----------------------------------------------------------------
def test_linear_mode_equals_per_example_gradient_dot_products_on_gpt2(tmp_path):
    gpt2(tmp_path, vocab=48)
    model = families.load("transformers:causal-lm", tmp_path, "model.safetensors", {})
    task = make_task("causal-lm")
    train = torch.randint(1, 48, (12, 10), generator=torch.Generator().manual_seed(1))
    test = train[:2].clone()
    test[:, -3:] = torch.tensor([5, 6, 7])
    config = MirrorConfig(precondition="none", dtype="float64", lr=0.1, safeguard="none")
    scores = ForwardInf(model, task, config).prepare({"inputs": train}).scores({"inputs": test})

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, ids):
        return task.loss(lambda x: functional_call(model, p, (x,)), task.prepare({"inputs": ids[None]}))[0]

    def flat(ids):
        return torch.cat([g.flatten() for g in grad(loss)(params, ids).values()])

    expected = torch.stack([torch.stack([0.1 * flat(t) @ flat(x) for x in train]) for t in test])
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_the_layers_way_equals_the_jvp_on_gpt2_conv1d_layers(tmp_path, k, monkeypatch):
    """K-FAC perturbs GPT-2's Conv1D layers alone, so linear mode can read their terms from one backward
    pass: by products with the inputs at k = 1, by each sequence's gradient at k = 3 (10 positions), or
    by the products where those gradients would not fit."""
    gpt2(tmp_path, vocab=48)
    model = families.load("transformers:causal-lm", tmp_path, "model.safetensors", {})
    train = {"inputs": torch.randint(1, 48, (12, 10), generator=torch.Generator().manual_seed(3))}
    config = MirrorConfig(precondition="kfac", dtype="float64", lr=0.1, safeguard="none")
    scores, used = {}, {}
    for way in ("loop", "layers"):
        fi = ForwardInf(model, make_task("causal-lm"), config.replace(stacking=way)).prepare(train)
        scores[way], used[way] = fi.scores({"inputs": train["inputs"][:k]}), fi.execution()["stacking"]
    assert used == {"loop": "single" if k == 1 else "loop", "layers": "layers"}
    torch.testing.assert_close(scores["layers"], scores["loop"], rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(layers, "GRADIENTS_BYTES", 0)  # no room for each sequence's gradient: the products
    torch.testing.assert_close(fi.scores({"inputs": train["inputs"][:k]}), scores["loop"], rtol=1e-9, atol=1e-12)


def test_kronecker_curvature_covers_gpt2_conv1d_layers(tmp_path):
    """transformers' Conv1D (weight (in, out)) is factored like nn.Linear: K-FAC on it solves the explicit
    Kronecker system."""
    gpt2(tmp_path, vocab=48)
    model = families.load("transformers:causal-lm", tmp_path, "model.safetensors", {})
    train = {"inputs": torch.randint(1, 48, (16, 10), generator=torch.Generator().manual_seed(2))}
    fi = ForwardInf(model, make_task("causal-lm"), MirrorConfig(precondition="kfac", dtype="float64")).prepare(train)
    layer = "model.transformer.h.0.mlp.c_fc"
    assert f"{layer}.weight" in fi.fm.theta and "model.transformer.wte.weight" not in fi.fm.theta
    assert any("not perturbed" in note for note in fi.execution()["notes"])
    c = fi.curvature
    qa, qg = c.bases[layer]
    weight = fi.fm.theta[f"{layer}.weight"]  # (in, out)
    v = {n: torch.randn(1, *p.shape, dtype=torch.float64) for n, p in fi.fm.theta.items()}
    solved = c.solve(v)[f"{layer}.weight"][0]
    wide = torch.cat([v[f"{layer}.weight"][0].T, v[f"{layer}.bias"][0][:, None]], dim=1)  # (out, in + 1)
    a_cov = qa @ torch.diag(torch.linalg.eigvalsh(qa.T @ qa)) @ qa.T  # identity: qa is orthonormal
    assert torch.allclose(a_cov, torch.eye(a_cov.shape[0], dtype=torch.float64), atol=1e-10)
    dense = torch.kron(qg, qa) @ torch.diag((c.values[layer] + c.damping).flatten()) @ torch.kron(qg, qa).T
    explicit = torch.linalg.solve(dense, wide.flatten()).reshape(wide.shape)
    torch.testing.assert_close(solved, explicit[:, :-1].T)
    assert solved.shape == weight.shape


def test_lora_adapter_perturbs_only_its_own_parameters_and_shares_the_base(tmp_path):
    gpt2(tmp_path / "base", vocab=48)
    lora(tmp_path / "base", tmp_path / "adapter")
    base = families.load("transformers:causal-lm", tmp_path / "base", "model.safetensors", {})
    adapted = families.load("peft:lora", tmp_path / "adapter", "adapter_model.safetensors", {}, base)
    shared = {p.data_ptr() for p in base.parameters()}
    own = [n for n, p in adapted.named_parameters() if p.data_ptr() not in shared]
    assert own and all("lora_" in n for n in own)  # the base's tensors are the base's, not copies
    ids = torch.randint(1, 48, (2, 8))
    assert not torch.allclose(adapted(ids), base(ids))  # the adapter is applied
    fi = ForwardInf(adapted, make_task("causal-lm"), MirrorConfig(precondition="none", params=("*lora_*",)))
    scores = fi.prepare({"inputs": torch.randint(1, 48, (6, 8))}).scores({"inputs": ids})
    assert scores.shape == (2, 6) and torch.isfinite(scores).all()
    assert set(fi.fm.theta) == set(own)


# -- registered over HTTP and attributed end to end ---------------------------------------------------
@pytest.fixture
def service(settings, tmp_path):
    """The API in-process and one `python -m worker` process on an empty registry."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = settings.model_copy(update={"registry_dir": tmp_path / "registry", "probe_timeout_s": 120})
    worker = start_worker(settings, f"families-{time.monotonic_ns()}", ATTR_BATCH_SIZE=64)
    try:
        with TestClient(create_app(settings)) as api:
            yield api, Registry(settings.registry_dir)
    finally:
        worker.kill()
        worker.wait(10)


def upload(api, kind: str, id: str, folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        put = api.put(f"/v1/admin/{kind}/{id}/files/{path.name}", content=path.read_bytes())
        assert put.status_code == 201, put.text
        assert put.json()["size"] == path.stat().st_size


def register(api, id: str, folder: Path, **body) -> dict:
    upload(api, "models", id, folder)
    created = api.post(f"/v1/admin/models/{id}", json=body)
    assert created.status_code == 200, created.text
    return created.json()


def finished(api, body: dict, kind: str = "attributions") -> dict:
    created = api.post(f"/v1/{kind}", json=body)
    assert created.status_code == 202, created.text
    url = created.json()["links"]["self"]
    done = wait_for(lambda: (j := api.get(url, params={"wait_s": 5}).json())["status"] in ("finished", "failed") and j)
    assert done["status"] == "finished", done.get("error") or done
    return done


def scores_of(api, job) -> np.ndarray:
    got = api.get(job["links"]["scores"], params={"format": "npy"})
    assert got.status_code == 200
    return np.load(__import__("io").BytesIO(got.content), allow_pickle=False)


def direct(registry: Registry, model_id: str, dataset_id: str, job: dict, test: dict) -> torch.Tensor:
    """The engine called directly on the registered files: what the service must return."""
    m = registry.model(model_id)
    base = families.load(registry.model(m.base).architecture, registry.model(m.base).path, "", {}) if m.base else None
    model = families.load(m.architecture, m.path, m.weights, m.params, base)
    d = registry.dataset(dataset_id)
    train = {k: torch.from_numpy(v) for k, v in d.rows(0).items()}
    config = MirrorConfig(**job["method"], dtype="float32")
    return ForwardInf(model, make_task(m.task, **m.task_params), config).prepare(train).scores(test)


def test_transformers_models_register_over_http_and_attribute_like_the_engine(service, tmp_path):
    api, registry = service
    corpus = fact_corpus(entities=12, paraphrases=2, distractors=1)
    vocab = bpe_tokenizer(corpus.sentences, tmp_path / "gpt2")
    gpt2(tmp_path / "gpt2", vocab)
    chat = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    (tmp_path / "gpt2" / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat}))

    # a pickle checkpoint is refused at the door, with what to do instead
    refused = api.put("/v1/admin/models/tiny-gpt2/files/pytorch_model.bin", content=b"\x80\x04K\x01.")
    assert refused.status_code == 422 and "safetensors" in refused.json()["detail"]

    dry = register(api, "tiny-gpt2", tmp_path / "gpt2", architecture="transformers:causal-lm", dry_run=True)
    assert not dry["registered"] and api.get("/v1/models/tiny-gpt2").status_code == 404
    assert dry["probe"]["parameter_count"] == sum(
        p.numel() for p in transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").parameters()
    )
    made = api.post("/v1/admin/models/tiny-gpt2", json={"architecture": "transformers:causal-lm"}).json()
    assert made["registered"] and made["model"]["input"]["text"] == "tokenizer"  # read from its files

    (tmp_path / "text").mkdir()
    lines = [json.dumps({"text": s, "id": f"s{i}"}) for i, s in enumerate(corpus.sentences)]
    (tmp_path / "text" / "corpus.jsonl").write_text("\n".join(lines))
    upload(api, "datasets", "facts-text", tmp_path / "text")
    text = {"file": "corpus.jsonl", "model": "tiny-gpt2", "max_length": 24}
    data = api.post("/v1/admin/datasets/facts-text", json={"text": text, "trained": ["tiny-gpt2"]})
    assert data.status_code == 200, data.text
    assert data.json()["dataset"]["size"] == len(corpus.sentences)

    job = finished(
        api, {"model": "tiny-gpt2", "dataset": "facts-text", "test": {"dataset": "facts-text", "indices": [0, 3]}}
    )
    test = {k: torch.from_numpy(v) for k, v in registry.dataset("facts-text").read([0, 3]).items()}
    expected = direct(registry, "tiny-gpt2", "facts-text", job, test)
    np.testing.assert_allclose(scores_of(api, job), expected.numpy(), rtol=1e-4, atol=1e-6)

    prompt, completion = corpus.query(0)
    asked = finished(
        api,
        {
            "model": "tiny-gpt2",
            "dataset": "facts-text",
            "test": {"texts": [{"prompt": prompt, "completion": completion}]},
        },
    )
    assert asked["result"]["rows"][0]["proponents"]
    page = api.get(asked["links"]["report"])
    assert page.status_code == 200 and completion.strip(" .") in page.text  # tokens decoded by the model's tokenizer

    # chat-style: the conversation rendered by the model's own template is the prompt
    conversation = {"messages": [{"role": "user", "content": prompt}], "completion": completion}
    rendered = encode_text(TextTest(texts=[conversation]), registry.model("tiny-gpt2")).inputs[0]
    gpt = registry.model("tiny-gpt2")
    whole = gpt.encode(f"<|user|>{prompt}\n<|assistant|>") + gpt.encode(completion)
    assert rendered[: min(len(whole), 32)] == whole[-32:]  # a prompt too long for 32 tokens loses its beginning
    body = {"model": "tiny-gpt2", "dataset": "facts-text", "test": {"texts": [conversation]}}
    assert finished(api, body)["result"]["rows"][0]["proponents"]

    # a LoRA adapter over it: only the adapter's parameters are perturbed; the base is shared warm
    lora(tmp_path / "gpt2", tmp_path / "adapter")
    adapter = register(api, "tiny-gpt2-lora", tmp_path / "adapter", architecture="peft:lora", base="tiny-gpt2")
    assert adapter["probe"]["perturbed"] and all("lora_" in n for n in adapter["probe"]["perturbed"])
    job = finished(
        api, {"model": "tiny-gpt2-lora", "dataset": "facts-text", "test": {"dataset": "facts-text", "indices": [1]}}
    )
    assert job["execution"]["parameters"] == adapter["probe"]["perturbed"]
    assert finished(api, {**body, "model": "tiny-gpt2-lora"})["status"] == "finished"  # the base's tokenizer
    test = {k: torch.from_numpy(v) for k, v in registry.dataset("facts-text").read([1]).items()}
    expected = direct(registry, "tiny-gpt2-lora", "facts-text", job, test)
    np.testing.assert_allclose(scores_of(api, job), expected.numpy(), rtol=1e-4, atol=1e-6)

    # a BERT-style sequence classifier on token-id shards
    bert(tmp_path / "bert")
    register(api, "tiny-bert", tmp_path / "bert", architecture="transformers:sequence-classification")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (40, 12), generator=gen)
    ids[::3, 9:] = 0  # padded records
    (tmp_path / "shards").mkdir()
    save_file(
        {"inputs": ids, "targets": torch.randint(0, 3, (40,), generator=gen)}, tmp_path / "shards" / "train.safetensors"
    )
    upload(api, "datasets", "bert-train", tmp_path / "shards")
    spec = api.get("/v1/models/tiny-bert").json()["input"]
    assert (
        api.post("/v1/admin/datasets/bert-train", json={"input": spec, "shards": ["train.safetensors"]}).status_code
        == 200
    )
    job = finished(
        api, {"model": "tiny-bert", "dataset": "bert-train", "test": {"dataset": "bert-train", "indices": [0, 5]}}
    )
    test = {k: torch.from_numpy(v) for k, v in registry.dataset("bert-train").read([0, 5]).items()}
    expected = direct(registry, "tiny-bert", "bert-train", job, test)
    np.testing.assert_allclose(scores_of(api, job), expected.numpy(), rtol=1e-4, atol=1e-6)

    not_text = api.post("/v1/attributions", json={**body, "model": "tiny-bert", "dataset": "bert-train"})
    assert not_text.status_code == 422 and "does not take text" in not_text.json()["detail"]

    # replacing a model gives it a new identity: the same request is computed again, not served stale
    old = api.get("/v1/models/tiny-bert").json()["digest"]
    bert(tmp_path / "bert", seed=1)
    register(api, "tiny-bert", tmp_path / "bert", architecture="transformers:sequence-classification")
    assert api.get("/v1/models/tiny-bert").json()["digest"] != old
    again = finished(
        api, {"model": "tiny-bert", "dataset": "bert-train", "test": {"dataset": "bert-train", "indices": [0, 5]}}
    )
    assert again["id"] != job["id"] and not np.allclose(scores_of(api, again), scores_of(api, job))
    assert api.delete("/v1/admin/models/tiny-bert").status_code == 204
    assert api.get("/v1/models/tiny-bert").status_code == 404
    gone = api.post(
        "/v1/attributions",
        json={"model": "tiny-bert", "dataset": "bert-train", "test": {"dataset": "bert-train", "indices": [0]}},
    )
    assert gone.status_code == 404


def test_a_diffusers_unet_registers_and_attributes_like_the_engine(service, tmp_path):
    api, registry = service
    unet(tmp_path / "unet")
    made = register(api, "tiny-unet", tmp_path / "unet", architecture="diffusers:unet2d", input={"shape": [1, 8, 8]})
    assert made["model"]["task"] == "diffusion"
    assert registry.model("tiny-unet").task_params == {"timesteps": 50, "beta_start": 1e-4, "beta_end": 0.02}
    images = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    (tmp_path / "shards").mkdir()
    save_file({"inputs": images}, tmp_path / "shards" / "images.safetensors")
    upload(api, "datasets", "images", tmp_path / "shards")
    assert (
        api.post(
            "/v1/admin/datasets/images", json={"input": {"shape": [1, 8, 8]}, "shards": ["images.safetensors"]}
        ).status_code
        == 200
    )
    job = finished(api, {"model": "tiny-unet", "dataset": "images", "test": {"dataset": "images", "indices": [2]}})
    test = {k: torch.from_numpy(v) for k, v in registry.dataset("images").read([2]).items()}
    expected = direct(registry, "tiny-unet", "images", job, test)
    np.testing.assert_allclose(scores_of(api, job), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_registration_refuses_what_would_not_run(service, tmp_path):
    api, _ = service
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x80\x04\x95 a pickle, renamed")  # not a safetensors file
    (folder / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2})
    )
    upload(api, "models", "fake", folder)
    refused = api.post("/v1/admin/models/fake", json={"architecture": "transformers:causal-lm"})
    assert refused.status_code == 422 and "does not run on a worker" in refused.json()["detail"]
    assert api.get("/v1/models/fake").status_code == 404
    assert api.post("/v1/admin/models/nothing", json={"architecture": "builtin:mlp"}).status_code == 422
    bad = api.put("/v1/admin/models/x/files/..%2Fescape.json", content=b"{}")
    assert bad.status_code in (404, 422)


def test_a_torchvision_resnet_registers_and_attributes_like_the_engine(service, tmp_path):
    """Runs where a torchvision built for the installed torch imports (not the default install: PyPI has
    no CPU build of it for torch 2.13.0; the README says how)."""
    torchvision = pytest.importorskip("torchvision")
    api, registry = service
    torch.manual_seed(0)
    (tmp_path / "resnet").mkdir()
    save_file(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet" / "weights.safetensors")
    spec = {"shape": [3, 32, 32], "num_classes": 10}
    body = {
        "architecture": "torchvision:resnet18",
        "task": "classification",
        "input": spec,
        "params": {"num_classes": 10},
    }
    made = register(api, "resnet", tmp_path / "resnet", **body)
    assert made["probe"]["parameter_count"] == 11_181_642
    gen = torch.Generator().manual_seed(5)
    (tmp_path / "shards").mkdir()
    images, labels = torch.rand(24, 3, 32, 32, generator=gen), torch.randint(0, 10, (24,), generator=gen)
    save_file({"inputs": images, "targets": labels}, tmp_path / "shards" / "train.safetensors")
    upload(api, "datasets", "cifar-like", tmp_path / "shards")
    assert (
        api.post("/v1/admin/datasets/cifar-like", json={"input": spec, "shards": ["train.safetensors"]}).status_code
        == 200
    )
    test = {"dataset": "cifar-like", "indices": [0, 7]}
    method = {"precondition": "none"}  # auto takes EK-FAC here: ~100 s of setup on two CPU cores
    job = finished(api, {"model": "resnet", "dataset": "cifar-like", "test": test, "method": method})
    test = {k: torch.from_numpy(v) for k, v in registry.dataset("cifar-like").read([0, 7]).items()}
    expected = direct(registry, "resnet", "cifar-like", job, test)
    np.testing.assert_allclose(scores_of(api, job), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_calibration_rows_of_token_models_are_padded_with_the_models_pad_id():
    """A leakage or memorization request's calibration rows (training records) are stacked under its test
    points; shorter token sequences are padded with the model's pad id (masks with 0), not a real token."""
    from worker.jobs import _concat

    stacked = _concat(torch.tensor([[7, 8, 9]]), torch.tensor([[4]]), pad=3)
    assert stacked.tolist() == [[7, 8, 9], [4, 3, 3]]
