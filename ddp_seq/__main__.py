"""``python -m ddp_seq [train] ...``"""

import sys

from ddp_seq.cli import train_main

sys.exit(train_main())
