#!/usr/bin/env bash
# Fetch SimCSE's training corpus (wiki1m) and SentEval's evaluation data from the same places as SimCSE's
# data/download_wiki.sh and SentEval/data/downstream/download_dataset.sh.
#
#   scripts/download_data.sh [DEST]        (default DEST: data)
#
# leaves DEST/wiki1m_for_simcse.txt (pass as --train_file) and DEST/SentEval/data/downstream (pass as --data_dir).
# The same, in Python, with atomic writes and the default cache python -m iscse.train looks in:
#   python -m iscse.download [--dest DEST]
set -euo pipefail

DEFAULT_DEST=data
usage() {
    echo "usage: scripts/download_data.sh [DEST]"
    echo
    echo "Download wiki1m_for_simcse.txt and SentEval's data/downstream into DEST (default: $DEFAULT_DEST)."
    echo "Both come from huggingface.co (princeton-nlp/datasets-for-simcse); files already there are kept."
}
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    -*) echo "download_data.sh: error: unknown option $1" >&2; usage >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "download_data.sh: error: one DEST at most, got $#" >&2; usage >&2; exit 2; }

DEST="${1:-$DEFAULT_DEST}"
BASE="https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main"
mkdir -p "$DEST/SentEval/data/downstream"

fetch() {  # url target: download to a .part file, rename when complete
    if command -v curl >/dev/null; then curl -fL --retry 3 -o "$2.part" "$1"; else wget -O "$2.part" "$1"; fi
    mv "$2.part" "$2"
}

[ -f "$DEST/wiki1m_for_simcse.txt" ] || fetch "$BASE/wiki1m_for_simcse.txt" "$DEST/wiki1m_for_simcse.txt"

if [ ! -d "$DEST/SentEval/data/downstream/STS" ]; then
    fetch "$BASE/senteval.tar" "$DEST/SentEval/data/downstream/senteval.tar"
    tar -xf "$DEST/SentEval/data/downstream/senteval.tar" -C "$DEST/SentEval/data/downstream"
    rm "$DEST/SentEval/data/downstream/senteval.tar"
fi

echo "--train_file $DEST/wiki1m_for_simcse.txt"
echo "--data_dir   $DEST/SentEval/data/downstream"
