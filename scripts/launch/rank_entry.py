# SPDX-License-Identifier: Apache-2.0
"""The program torchrun starts for every rank (see launch.py): global rank 0 serves
(``mindie-llm serve`` with the same arguments), every other rank runs the tensor-parallel worker
loop until rank 0 sends SHUTDOWN or disappears."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "python"))


def main() -> int:
    argv = sys.argv[1:]
    if int(os.environ.get("RANK", "0")) == 0:
        from mindie_llm.server.launcher import main as serve

        pidfile = os.environ.get("MINDIE_RANK0_PIDFILE")
        if pidfile:     # launch.py sends SIGTERM here (the server drains, then stops every rank)
            with open(pidfile, "w") as f:
                f.write(str(os.getpid()))

        return serve(argv)
    from mindie_llm.executor.multiproc_executor import main as work

    return work(argv)


if __name__ == "__main__":
    sys.exit(main())
