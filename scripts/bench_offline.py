# SPDX-License-Identifier: Apache-2.0
"""Offline CPU benchmark: mindie-llm vs transformers on the same GGUF (same as ``mindie-llm bench``).

    python scripts/bench_offline.py [--num-requests 16 --output-len 128 --dtype bfloat16]
"""
import sys

from mindie_llm.bench.offline import main

if __name__ == "__main__":
    sys.exit(main())
