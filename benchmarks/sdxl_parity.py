"""SDXL's full-size check: `unet_parity.py --model=sdxl` (its docstring says what runs).

  python benchmarks/sdxl_parity.py [--batch=2] [--size=128]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import unet_parity  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  unet_parity.main(['--model=sdxl'] + sys.argv[1:])
