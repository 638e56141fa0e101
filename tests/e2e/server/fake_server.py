# SPDX-License-Identifier: Apache-2.0
"""The real ``mindie-llm serve`` launcher over the fake engine of test_http_fake_engine.py (no
model load: starts in about a second). Used by server_harness.start_server(..., fake=True).

    python fake_server.py --config server.yaml [--step-delay 0.01]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mindie_llm.engine.async_llm import AsyncLLM  # noqa: E402
from mindie_llm.server import launcher  # noqa: E402
from test_http_fake_engine import FakeEngine  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    delay = 0.0
    if "--step-delay" in argv:
        i = argv.index("--step-delay")
        delay = float(argv[i + 1])
        del argv[i:i + 2]

    def make_llm(cfg):
        return AsyncLLM(FakeEngine(step_delay_s=delay, max_model_len=100000), cfg)

    return launcher.main(argv, make_llm=make_llm)


if __name__ == "__main__":
    sys.exit(main())
