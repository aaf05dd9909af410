"""The masked-LM auxiliary objective (``--do_mlm``, :mod:`iscse.training.mlm`), on tiny random models.

- masking: the share of chosen tokens and the 80/10/10 split match BERT's recipe on a large batch; special tokens
  and padding are never chosen; the labels hold the original ids exactly where tokens were chosen; the masks are a
  function of the seed alone.
- the head: taken from a masked-LM checkpoint (its logits on the encoder's backbone equal those of
  ``AutoModelForMaskedLM`` loaded on its own, for BERT, RoBERTa, DistilBERT and ELECTRA), the output embedding tied
  to the backbone's input embedding; initialised with a warning when the checkpoint has none.
- the trainer: at step 1 the logged ``L_mlm`` equals a cross-entropy computed here by hand (log-softmax, gather,
  mean) from an independently loaded ``BertForMaskedLM`` on masks redrawn from the documented seed; the logged
  total is ``L_cl + alpha L_s + mlm_weight L_mlm``; ``L_cl`` at step 1 is that of the same run without ``--do_mlm``
  and differs at step 2 (the MLM gradient reaches the encoder).
- a run with ``--do_mlm`` resumed from a checkpoint replays the uninterrupted run bit for bit (``L_mlm`` included);
  ``model/`` holds the encoder only and the checkpoint the head.
- bad values fail in one line naming the flag, before anything is written.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict

import pytest
import torch

from test_train import WORDS, SPECIAL, make_tiny_setup, one_thread, read_metrics, tiny_args  # noqa: F401

from iscse import train as T
from iscse.training.mlm import IGNORE_INDEX, MLM_HEAD_FILE, MaskedLMHead, TokenMasker, mask_seed
from iscse.training.model import ISCSEModel

VOCAB = len(SPECIAL) + len(WORDS)


def _word_tokenizer(folder: Path, mask: bool = True):
    """A BERT tokenizer over the tiny vocabulary (``vocab=``: transformers 5 ignores ``vocab_file=``), saved into
    ``folder``; without ``mask`` it has no mask token."""
    from transformers import BertTokenizerFast

    vocab = folder.parent / "mlm_vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    kwargs = {} if mask else {"mask_token": None}
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=True, model_max_length=64, **kwargs)
    assert tok("w1 w2")["input_ids"] == [2, 6, 7, 3]  # words are words, not [UNK]
    tok.save_pretrained(str(folder))
    return tok


def _mlm_setup(root: Path, *, dropout: float, n_sentences: int = 240, with_head: bool = True) -> Dict[str, str]:
    """The trainer tests' tiny setup with a working word tokenizer and, with ``with_head``, a ``BertForMaskedLM``
    checkpoint (same backbone, plus a random head) in place of the bare ``BertModel``."""
    from transformers import BertConfig, BertForMaskedLM

    setup = make_tiny_setup(root, dropout=dropout, n_sentences=n_sentences)
    _word_tokenizer(Path(setup["model"]))
    if with_head:
        config = BertConfig.from_pretrained(setup["model"])
        torch.manual_seed(11)
        masked_lm = BertForMaskedLM(config)
        backbone = BertForMaskedLM.from_pretrained(setup["model"]).bert  # keep the setup's backbone weights
        masked_lm.bert.load_state_dict(backbone.state_dict())
        masked_lm.save_pretrained(setup["model"])
    return setup


# ------------------------------------------------------------------------------------------------ masking


def test_masking_follows_berts_recipe_and_depends_on_the_seed_only(tmp_path):
    tok = _word_tokenizer(tmp_path / "tok")
    g = torch.Generator().manual_seed(0)
    n, length = 600, 40
    ids = torch.randint(len(SPECIAL), VOCAB, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    ids[:, 0] = tok.cls_token_id
    for i, k in enumerate(lengths.tolist()):
        ids[i, k - 1] = tok.sep_token_id
        ids[i, k:] = tok.pad_token_id
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    masker = TokenMasker(tok, 0.15)
    masked, labels, count = masker(ids, seed=123)

    chosen = labels.ne(IGNORE_INDEX)
    assert count == int(chosen.sum())
    assert not (chosen & special).any()  # [CLS], [SEP] and padding are never chosen
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    eligible = int((~special).sum())
    share = count / eligible
    sigma = (0.15 * 0.85 / eligible) ** 0.5
    assert abs(share - 0.15) < 5 * sigma, share
    as_mask = masked[chosen].eq(tok.mask_token_id).float().mean().item()
    kept = masked[chosen].eq(ids[chosen]).float().mean().item()
    s = (0.25 / count) ** 0.5  # a generous binomial sigma
    assert abs(as_mask - 0.8) < 5 * s and abs(kept - (0.1 + 0.1 / len(tok))) < 5 * s, (as_mask, kept)

    again = masker(ids, seed=123)
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    other = masker(ids, seed=124)
    assert not torch.equal(other[1], labels)
    assert torch.equal(ids[:, 0], torch.full((n,), tok.cls_token_id))  # the input is not changed in place

    assert mask_seed(7, 0, 1, 0) != mask_seed(7, 1, 1, 0) != mask_seed(7, 0, 2, 0) != mask_seed(7, 0, 1, 1)
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="mlm_probability"):
            TokenMasker(tok, bad)


# ------------------------------------------------------------------------------------------------ the head


def _family_config(family: str):
    from transformers import BertConfig, DistilBertConfig, ElectraConfig, RobertaConfig

    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64)
    return {"bert": lambda: BertConfig(**kw), "roberta": lambda: RobertaConfig(**kw),
            "distilbert": lambda: DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                   max_position_embeddings=64),
            "electra": lambda: ElectraConfig(embedding_size=16, **kw)}[family]()


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra"])
def test_head_comes_from_the_checkpoint_and_computes_its_logits(tmp_path, family):
    from transformers import AutoModel, AutoModelForMaskedLM

    torch.manual_seed(3)
    AutoModelForMaskedLM.from_config(_family_config(family)).save_pretrained(str(tmp_path))
    reference = AutoModelForMaskedLM.from_pretrained(str(tmp_path)).eval()
    backbone = AutoModel.from_pretrained(str(tmp_path))
    head = MaskedLMHead.from_pretrained(backbone, str(tmp_path)).eval()
    assert not head.initialised and head.tied
    out = head._masked_lm.get_output_embeddings()
    assert out.weight is backbone.get_input_embeddings().weight
    ids = torch.randint(5, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(head(ids, mask), reference(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-6)
    # the head's parameters are its own but for the tied output embedding, which is the backbone's
    backbone_ids = {id(p) for p in backbone.parameters()}
    assert [p for p in head.parameters() if id(p) in backbone_ids] == [out.weight]
    state = head.head_state_dict()
    assert state and not any("embeddings" in k for k in state)


def test_head_is_initialised_with_a_warning_when_the_checkpoint_has_none(tmp_path, caplog):
    from transformers import AutoModel, BertConfig, BertModel

    BertModel(_family_config("bert")).save_pretrained(str(tmp_path))
    backbone = AutoModel.from_pretrained(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="iscse.train"):
        head = MaskedLMHead.from_pretrained(backbone, str(tmp_path))
    assert head.initialised
    assert any("no trained masked-LM head" in r.getMessage() for r in caplog.records)
    # a fresh head for a resumed run takes the saved state back
    other = MaskedLMHead.from_config(AutoModel.from_config(BertConfig.from_pretrained(str(tmp_path))))
    other.load_head_state_dict(head.head_state_dict())
    for (name, a), b in zip(head.heads.state_dict().items(), other.heads.state_dict().values()):
        if "decoder.weight" not in name:  # tied to each backbone's own (different) embedding
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_head_state_dict({"nonsense": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def mlm_nodrop(tmp_path_factory) -> Dict[str, str]:
    """The tiny model without dropout (the masked forward is then deterministic), with a masked-LM head."""
    return _mlm_setup(tmp_path_factory.mktemp("mlm_nodrop"), dropout=0.0)


def test_logged_mlm_loss_matches_an_independent_computation(mlm_nodrop, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

    seen = []
    real_forward = ISCSEModel.forward

    def spy(self, input_ids, attention_mask=None, token_type_ids=None, mlm_input_ids=None):
        seen.append({"input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(),
                     "token_type_ids": None if token_type_ids is None else token_type_ids.clone(),
                     "mlm_input_ids": None if mlm_input_ids is None else mlm_input_ids.clone()})
        return real_forward(self, input_ids, attention_mask, token_type_ids, mlm_input_ids)

    monkeypatch.setattr(ISCSEModel, "forward", spy)
    weight, prob, seed = 0.3, 0.3, 7
    flags = dict(max_steps=2, logging_steps=1, mlm_weight=weight, mlm_probability=prob, seed=seed)
    with_mlm, without = tmp_path / "mlm", tmp_path / "plain"
    assert T.main(tiny_args(mlm_nodrop, with_mlm, do_mlm=True, **flags)) == 0
    assert len(seen) == 2 and seen[0]["mlm_input_ids"] is not None
    assert T.main(tiny_args(mlm_nodrop, without, **flags)) == 0
    assert seen[2]["mlm_input_ids"] is None
    monkeypatch.undo()

    # The masks of step 1, redrawn here from the documented seed with transformers' own masking.
    tok = AutoTokenizer.from_pretrained(mlm_nodrop["model"])
    ids = seen[0]["input_ids"]
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=prob)
    collator.generator = torch.Generator().manual_seed(mask_seed(seed, 0, 1, 0))
    masked, labels = collator.torch_mask_tokens(ids.clone(), torch.isin(ids, torch.tensor(tok.all_special_ids)))
    assert torch.equal(masked, seen[0]["mlm_input_ids"])
    chosen = labels.ne(-100)
    assert chosen.sum() >= 10

    # The loss by hand: the checkpoint's masked LM (weights as at step 1), log-softmax, gather, mean.
    model = BertForMaskedLM.from_pretrained(mlm_nodrop["model"]).double().eval()
    with torch.no_grad():
        logits = model(input_ids=masked, attention_mask=seen[0]["attention_mask"],
                       token_type_ids=seen[0]["token_type_ids"]).logits
    logp = torch.log_softmax(logits, dim=-1)
    by_hand = -logp[chosen].gather(1, labels[chosen].unsqueeze(1)).mean().item()

    rec, plain = read_metrics(with_mlm), read_metrics(without)
    assert all("L_mlm" in r for r in rec) and not any("L_mlm" in r for r in plain)
    assert rec[0]["L_mlm"] == pytest.approx(by_hand, rel=1e-5)
    for r in rec:
        assert r["loss"] == pytest.approx(r["L_cl"] + r["alpha"] * r["L_s"] + weight * r["L_mlm"], rel=1e-6)
    assert rec[0]["L_cl"] == pytest.approx(plain[0]["L_cl"], rel=1e-6)  # the MLM leaves the views alone ...
    assert abs(rec[1]["L_cl"] - plain[1]["L_cl"]) > 1e-4 * plain[1]["L_cl"]  # ... but its gradient moves the encoder
    log = (with_mlm / "train.log").read_text(encoding="utf-8")
    assert "L_mlm" in log and "+ 0.3 x MLM" in log


@pytest.fixture(scope="module")
def mlm_short(tmp_path_factory) -> Dict[str, str]:
    """Dropout on (the RNG must replay), no trained head (initialised from the seed), 5 batches of 8 an epoch."""
    return _mlm_setup(tmp_path_factory.mktemp("mlm_short"), dropout=0.1, n_sentences=40, with_head=False)


def test_resume_with_mlm_replays_the_run_and_the_model_is_the_encoder(mlm_short, tmp_path):
    from safetensors.torch import load_file

    full = tmp_path / "full"
    flags = dict(do_mlm=True, max_steps=8, save_steps=5, logging_steps=4)
    assert T.main(tiny_args(mlm_short, full, **flags)) == 0
    reference = read_metrics(full)
    assert all(r["L_mlm"] > 0 for r in reference)
    ckpt = full / "checkpoint-5"
    head = load_file(str(ckpt / MLM_HEAD_FILE))
    assert head and all(k.startswith("cls.predictions.") for k in head)
    out = tmp_path / "continued"
    assert T.main(["--resume_from", str(ckpt), "--output_dir", str(out), "--disable_tqdm"]) == 0
    continued = read_metrics(out)
    assert [r["step"] for r in continued] == [6, 7, 8]
    for a, b in zip(continued, reference[5:]):
        assert (a["loss"], a["L_cl"], a["L_s"], a["L_mlm"]) == (b["loss"], b["L_cl"], b["L_s"], b["L_mlm"])
    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (full, out))
    assert wa.keys() == wb.keys() and not any(k.startswith("cls.") for k in wa)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=0)
    assert not (full / "model" / MLM_HEAD_FILE).exists()
    # A checkpoint without a head cannot continue a --do_mlm run ... and a --do_mlm run keeps --do_mlm.
    (ckpt / MLM_HEAD_FILE).unlink()
    assert T.main(["--resume_from", str(ckpt), "--output_dir", str(tmp_path / "x"), "--disable_tqdm"]) == 2
    assert T.main(["--resume_from", str(full / "checkpoint-8"), "--no-do_mlm"]) == 2


@pytest.fixture(scope="module")
def nomask(tmp_path_factory) -> Dict[str, str]:
    """A tiny model whose tokenizer has no mask token."""
    setup = make_tiny_setup(tmp_path_factory.mktemp("nomask"), n_sentences=20)
    _word_tokenizer(Path(setup["model"]), mask=False)
    return setup


@pytest.mark.parametrize("flags, named", [
    (["--mlm_weight", "-0.1"], "--mlm_weight"),
    (["--mlm_weight", "nan"], "--mlm_weight"),
    (["--mlm_probability", "0"], "--mlm_probability"),
    (["--mlm_probability", "1"], "--mlm_probability"),
    (["--mlm_probability", "1.5"], "--mlm_probability"),
    (["--do_mlm"], "--do_mlm"),  # the tokenizer of this model has no mask token
])
def test_bad_mlm_values_fail_in_one_line_before_writing(nomask, tmp_path, capsys, flags, named):
    out = tmp_path / "never"
    assert T.main(tiny_args(nomask, out, do_mlm=True) + flags) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1, err
    if flags == ["--do_mlm"]:
        assert "mask token" in err
    assert not out.exists()


def test_gradient_sum_scales_the_contrastive_part_only():
    """--ddp_gradient sum: the value is world x the loss (the trainer divides it back for the log); the gradient is
    world x that of L_cl + alpha L_s but 1 x that of mlm_weight L_mlm (DDP's average of the processes' own MLM
    gradients is already their mean)."""
    from iscse.training.mlm import scale_for_gradient_sum

    a = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)  # stands for L_cl + alpha L_s
    m = torch.tensor(4.2, dtype=torch.float64, requires_grad=True)  # stands for L_mlm
    w, world = 0.3, 4
    out = scale_for_gradient_sum(a + w * m, m, w, world)
    out.backward()
    assert out.item() == pytest.approx(world * (1.7 + w * 4.2), rel=1e-15)
    assert a.grad.item() == pytest.approx(world) and m.grad.item() == pytest.approx(w)
    a.grad = None
    plain = scale_for_gradient_sum(a * 1.0, None, w, world)
    plain.backward()
    assert plain.item() == pytest.approx(world * 1.7) and a.grad.item() == pytest.approx(world)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sum"])
def test_two_processes_train_with_mlm(mlm_nodrop, tmp_path, mode):
    """Under torchrun (gloo, 2 processes) the masked copy goes through DDP's forward with the views (no unused
    parameter, the head's gradients reduced), L_mlm is logged and the checkpoint carries the head."""
    from test_distributed import _torchrun

    out = tmp_path / "ddp"
    _torchrun(tiny_args(mlm_nodrop, out, do_mlm=True, per_device_train_batch_size=4, max_steps=3, save_steps=3,
                        logging_steps=1, ddp_gradient=mode))
    rec = read_metrics(out)
    assert [r["step"] for r in rec] == [1, 2, 3] and all(r["L_mlm"] > 0 for r in rec)
    for r in rec:
        assert r["loss"] == pytest.approx(r["L_cl"] + r["alpha"] * r["L_s"] + 0.1 * r["L_mlm"], rel=1e-6)
    assert (out / "checkpoint-3" / MLM_HEAD_FILE).is_file()
