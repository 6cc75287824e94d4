"""``python -m ddp_seq [train] ...``"""

import sys

from .cli import train_main

sys.exit(train_main())
