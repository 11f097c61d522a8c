"""Train the LLaMA architecture: python llama/train.py [config.py] [--key=value ...]

The same as `python train.py --arch=llama`; the loop itself lives in the top-level train.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, before llama/

import train  # noqa: E402

if __name__ == "__main__":
    train.main(arch="llama")
