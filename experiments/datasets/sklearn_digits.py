"""Write scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes) as an .npz for ``--data``.

    pip install scikit-learn && python experiments/datasets/sklearn_digits.py --out /tmp/digits.npz

The data ship inside the scikit-learn wheel (``sklearn.datasets.load_digits``; no download). The file holds
``x`` (float32, ``(1797, 8, 8)``, pixel values 0-16) and ``y`` (int32); ``metagrad.load_dataset`` splits it
70/15/15 at random and standardizes it like every other source. A data set that is not in this repository,
for checking that the applications' defaults are not tuned to the built-in ones.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="digits.npz", help="the .npz file to write")
    args = parser.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("sklearn_digits.py: scikit-learn is not installed: pip install scikit-learn", file=sys.stderr)
        return 2
    digits = load_digits()
    x = np.asarray(digits.images, np.float32)
    y = np.asarray(digits.target, np.int32)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, x=x, y=y)
    print(f"wrote {args.out}: x {x.shape}, y {y.shape}, {len(np.unique(y))} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
