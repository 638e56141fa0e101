# SPDX-License-Identifier: Apache-2.0
"""Tokenizer (tokenizer.py) and chat templates (chat_template.py). Must not import torch."""
from mindie_llm.tokenizer.tokenizer import Tokenizer, TokenizerError

__all__ = ["Tokenizer", "TokenizerError"]
