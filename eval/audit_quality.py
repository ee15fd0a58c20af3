"""Precision and recall of ``facepipe audit`` per kind of fault, on a set built by ``make_noisy_training_set.py``.

    python eval/audit_quality.py /tmp/noisy

Runs the audit (data-derived thresholds) on ``emb_train`` against ``emb_eval`` and compares what it flags with
``truth.json``: misfiled images (label noise), split identities (duplicate identities), copies (near-duplicate
pairs) and overlapping identities (overlap, by training identity).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def precision_recall(flagged: set, truth: set) -> tuple[float, float, int, int]:
    hits = len(flagged & truth)
    precision = hits / len(flagged) if flagged else 1.0
    recall = hits / len(truth) if truth else 1.0
    return precision, recall, len(flagged), len(truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    from facepipe.audit.data import load_embedding_folder
    from facepipe.audit.run import audit

    truth = json.loads((args.folder / "truth.json").read_text())
    train = load_embedding_folder(args.folder / "emb_train")
    result = audit(train, [load_embedding_folder(args.folder / "emb_eval", name="eval")])
    tables = result.tables

    def flagged(name: str, columns: list[str]) -> set:
        table = tables[name].loc[tables[name]["flagged"], columns]
        return {row[0] if len(columns) == 1 else frozenset(row) for row in table.itertuples(index=False)}

    rows = {
        "label noise (misfiled images)": precision_recall(flagged("label_noise", ["path"]), set(truth["misfiled"])),
        "duplicate identities (split)": precision_recall(
            flagged("duplicate_identities", ["identity_a", "identity_b"]), {frozenset(p) for p in truth["split"]}
        ),
        "near-duplicates (copies)": precision_recall(flagged("near_duplicates", ["path_a", "path_b"]), {frozenset(p) for p in truth["copies"]}),
        "overlap (identities)": precision_recall(
            {row[0] for row in tables["overlap"].loc[tables["overlap"]["flagged"], ["identity"]].itertuples(index=False)}, set(truth["overlap"])
        ),
    }
    print(f"CPU: {platform.processor() or platform.machine()}; {result.summary['images']} images, {result.summary['identities']} identities")
    print(f"thresholds: {json.dumps({k: round(v, 4) for k, v in result.thresholds.to_dict().items() if k != 'how'})}")
    print("| kind | precision | recall | flagged | true |")
    print("|---|---|---|---|---|")
    for kind, (p, r, n_flagged, n_true) in rows.items():
        print(f"| {kind} | {p:.3f} | {r:.3f} | {n_flagged} | {n_true} |")


if __name__ == "__main__":
    main()
