"""Hold a run directory's lock as another job would: ``python hold_run_dir.py DIR``; prints ``held``,
then keeps the lock until its stdin closes (a clean release) or it is killed (a crash)."""

import sys
from pathlib import Path

from ddp_seq.train.run_dir import lock_run_dir, release_run_dir

if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    lock_run_dir(run_dir, "holder")
    print("held", flush=True)
    sys.stdin.read()
    release_run_dir(run_dir)
