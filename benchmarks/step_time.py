"""Step time of ResNet-50 + MLC-NC at 224 px, batch 8, 20 and 80 classes, on this device.

The forward + backward + Adam step (median after compilation, compile time apart) is
measured by benchmarks/speed.py; this is its ResNet-50-only table:

    python benchmarks/step_time.py      # = python benchmarks/speed.py --no-head --batch_sizes 8
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import speed  # noqa: E402

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--no-head", "--batch_sizes", "8", *sys.argv[1:]]
    speed.main()
