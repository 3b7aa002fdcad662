"""`make demo`: the most complete real job panal can run so far.

It grows with the project; once `panal simulate` exists, it is that.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    print("panal demo: trust-layer throughput (signed envelopes, SHA-256)")
    sys.argv = ["bench/protocol.py", "--seconds", "1", "--mib", "64"]
    runpy.run_path(str(ROOT / "bench" / "protocol.py"), run_name="__main__")


if __name__ == "__main__":
    main()
