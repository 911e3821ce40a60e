"""U-Net speed, difflab against diffusers on one device: a script around ``difflab bench``.

    python bench/unet_speed.py                   # the full run (a GPU; compiles take minutes)
    python bench/unet_speed.py --quick           # tiny models on the CPU, a smoke run
    python bench/unet_speed.py --workloads sd_step --record BENCHMARKS.md

Every flag of ``difflab bench --help`` works here.
"""
import sys

from difflab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
