"""Train a ddp_seq model: ``torchrun --nproc_per_node=2 train.py --config configs/default.yaml [key=value ...]``.

Also runs as one process (``python train.py ...``). Everything lives in ``ddp_seq.cli``.
"""

import sys

from ddp_seq.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
