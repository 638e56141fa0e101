# SPDX-License-Identifier: Apache-2.0
"""Speculative decoding: proposers (n-gram, draft model, EAGLE-style head) behind one interface,
driven by the worker after each step (``Speculator``). The runner verifies the proposals; the
scheduler gives them lookahead slots. Must not import the engine or the server."""
