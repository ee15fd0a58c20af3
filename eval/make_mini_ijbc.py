"""Build a small IJB-C-format data set from the real CFP images (see ``facepipe.evaluation.ijbc_mini``).

    python eval/make_mini_ijbc.py --cfp ../shared/assets/cfp/cfp-dataset --out /tmp/mini_ijbc \\
        [--subjects 500] [--detector retinaface] [--seed 0] [--target IJBC] [--copy]
    facepipe eval ijbc /tmp/mini_ijbc -o /tmp/mini_ijbc_eval --configs all --detector given --detector mtcnn
    facepipe eval ijbc /tmp/mini_ijbc -o /tmp/mini_ijbc_1n --protocol 1n     # galleries G1 / G2, mixed probes

Five points and faceness come from the chosen detector (largest face); images without a face are left out and
counted. Loose crops are symlinks to the CFP files unless --copy.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from facepipe.detection.base import DETECTOR_NAMES, create_detector
from facepipe.evaluation.ijbc_mini import build_mini_ijbc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfp", default="../shared/assets/cfp/cfp-dataset", help="CFP root (holding Data/Images)")
    parser.add_argument("--out", required=True, help="new (or empty) folder for loose_crop/ and meta/")
    parser.add_argument("--subjects", type=int, default=None, help="first N CFP identities (default: all 500)")
    parser.add_argument("--detector", choices=DETECTOR_NAMES, default="retinaface")
    parser.add_argument("--detector-weights", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=["IJBC", "IJBB"], default="IJBC")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    detector = create_detector(args.detector, weights=args.detector_weights)
    stats = build_mini_ijbc(
        args.cfp, args.out, detector, num_subjects=args.subjects, seed=args.seed, target=args.target,
        copy=args.copy, batch_size=args.batch_size,
    )
    print(json.dumps(asdict(stats)))


if __name__ == "__main__":
    main()
