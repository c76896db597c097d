"""Step time of ResNet-50 + MLC-NC at 224 px, batch 8, 20 and 80 classes, on this device.

The forward + backward + Adam step (median after compilation, compile time apart) is
measured by benchmarks/speed.py; this is its ResNet-50-only table:

    python -m benchmarks.step_time     # = python -m benchmarks.speed --no-head --batch_sizes 8
"""

import sys

from benchmarks import speed

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--no-head", "--batch_sizes", "8", *sys.argv[1:]]
    speed.main()
