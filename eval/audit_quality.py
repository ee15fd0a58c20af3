"""Precision and recall of ``facepipe audit`` per kind of fault, on a set built by ``make_noisy_training_set.py``.

    python eval/audit_quality.py /tmp/noisy

Runs the audit (data-derived thresholds) on ``emb_train`` against ``emb_eval`` and compares what it flags with
``truth.json``: misfiled images (label noise), split identities (duplicate identities), copies (near-duplicate
pairs) and overlapping identities (overlap, by training identity).

CFP has faults of its own, which the audit finds as well: photos filed under the wrong person, exact duplicate
photos, extreme close-ups the detector mis-aligns. They are not in ``truth.json``, so the table gives two
precisions: *raw* (every flag not in the truth counts as false) and *injected* (flags that the audit of the
unmodified set, ``emb_clean``, raises too are left out: they are CFP's, not ours). Near-duplicates are
groups: a copy of photo A is also a near-duplicate of CFP's own near-duplicates of A, so a flagged pair that
joins two members of one group (connected by injected copies and CFP's own flagged pairs) is not a false flag.
The injection renames what it moves (``<to>/misfiled_<from>_<name>``, ``<id>_alt/<name>``): a flag is matched
with the clean audit's under the image's name before the move (``original_path``), else a CFP duplicate pair one
of whose photos was moved by the injection would count as a false flag of the noisy audit only.
Recall is over the injected faults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from facepipe.runtime.cpu import cpu_summary


def precision_recall(flagged: set, truth: set) -> tuple[float, float, int, int]:
    hits = len(flagged & truth)
    precision = hits / len(flagged) if flagged else 1.0
    recall = hits / len(truth) if truth else 1.0
    return precision, recall, len(flagged), len(truth)


def original_path(path: str) -> str:
    """A training crop's path before the faults were injected (the name the clean audit knows it by)."""
    folder, name = path.rsplit("/", 1)
    if name.startswith("misfiled_"):
        folder, name = name.removeprefix("misfiled_").split("_", 1)
    return f"{folder.removesuffix('_alt')}/{name}"


def _groups(pairs: set) -> dict[str, str]:
    """Each member's group representative (union-find over the pairs)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in (tuple(pair) for pair in pairs):
        parent[root(a)] = root(b)
    return {member: root(member) for member in list(parent)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    from facepipe.audit.data import load_embedding_folder
    from facepipe.audit.run import audit

    truth = json.loads((args.folder / "truth.json").read_text())
    evaluation = load_embedding_folder(args.folder / "emb_eval", name="eval")
    result = audit(load_embedding_folder(args.folder / "emb_train"), [evaluation])
    clean = audit(load_embedding_folder(args.folder / "emb_clean"), [evaluation])

    def flagged(tables, name: str, columns: list[str]) -> set:
        table = tables[name].loc[tables[name]["flagged"], columns]
        return {row[0] if len(columns) == 1 else frozenset(row) for row in table.itertuples(index=False)}

    kinds = {
        "label noise (misfiled images)": ("label_noise", ["path"], set(truth["misfiled"])),
        "duplicate identities (split)": ("duplicate_identities", ["identity_a", "identity_b"], {frozenset(p) for p in truth["split"]}),
        "near-duplicates (copies)": ("near_duplicates", ["path_a", "path_b"], {frozenset(p) for p in truth["copies"]}),
        "overlap (identities)": ("overlap", ["identity"], set(truth["overlap"])),
    }
    print(f"CPU: {cpu_summary()}; {result.summary['images']} images, {result.summary['identities']} identities")
    print(f"thresholds: {json.dumps({k: round(v, 4) for k, v in result.thresholds.to_dict().items() if k != 'how'})}")
    print("| kind | precision (raw) | precision (injected) | recall | flagged | CFP's own | injected |")
    print("|---|---|---|---|---|---|---|")
    for kind, (name, columns, true) in kinds.items():
        found = flagged(result.tables, name, columns)
        rename = original_path if name in ("label_noise", "near_duplicates") else str
        original = lambda item: frozenset(map(rename, item)) if isinstance(item, frozenset) else rename(item)  # noqa: E731
        clean_flags = flagged(clean.tables, name, columns)
        own = {item for item in found - true if original(item) in clean_flags}
        if name == "near_duplicates":
            group = _groups(clean_flags | {original(pair) for pair in true})
            own |= {pair for pair in found - true if len({group.get(member, member) for member in original(pair)}) == 1}
        raw_p, recall, n_flagged, n_true = precision_recall(found, true)
        injected_p, _, _, _ = precision_recall(found - own, true)
        print(f"| {kind} | {raw_p:.3f} | {injected_p:.3f} | {recall:.3f} | {n_flagged} | {len(found & own)} | {n_true} |")


if __name__ == "__main__":
    main()
