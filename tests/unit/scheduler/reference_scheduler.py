# SPDX-License-Identifier: Apache-2.0
"""Pure-Python reference of the C++ scheduler (the oracle of test_differential.py).

Written from the same rules as cpp/scheduler, independently: plain lists and dicts, the prefix
cache keyed by the whole token prefix (no hashes). Speculation follows the rules of scheduler.h:
drafts given to update() become the next decode's proposals (capped by budget, max_tokens,
max_model_len and free blocks), update() takes several tokens per row and rolls back past the
first rejected proposal. Must not import mindie_llm.
"""
from __future__ import annotations

import bisect
from collections import deque
from types import SimpleNamespace

POLICIES = ("fcfs", "priority", "static", "prefill_first")


class RefScheduler:
    def __init__(self, num_blocks, block_size, max_num_batched_tokens, max_num_seqs, max_model_len,
                 enable_prefix_caching=True, enable_chunked_prefill=True, policy="fcfs", role="colocated"):
        self.nb, self.bs, self.budget_max, self.max_seqs = num_blocks, block_size, max_num_batched_tokens, max_num_seqs
        self.max_len, self.caching, self.policy, self.role = max_model_len, enable_prefix_caching, policy, role
        self.chunking = enable_chunked_prefill and policy != "prefill_first"
        self.free, self.ref = deque(range(1, num_blocks)), [0] * num_blocks
        self.cache, self.block_key = {}, {}          # prefix tuple -> block, block -> prefix tuple
        self.reqs, self.waiting, self.running = {}, [], []
        self.step, self.finished, self.last_rows, self.last_sample = 0, [], [], []
        self.queries = self.hits = self.preemptions = 0

    # -- blocks
    def _blocks_for(self, n):
        return -(-n // self.bs)

    def _alloc(self):
        b = self.free.popleft()
        if b in self.block_key:
            k = self.block_key.pop(b)
            if self.cache.get(k) == b:
                del self.cache[k]
        self.ref[b] = 1
        return b

    def _acquire(self, b):
        if self.ref[b] == 0:
            self.free.remove(b)
        self.ref[b] += 1

    def _free(self, blocks):
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                (self.free.append if b in self.block_key else self.free.appendleft)(b)

    def _register(self, r):
        full = min(r.computed // self.bs, len(r.blocks))
        for i in range(r.registered, full):
            key, b = tuple(r.tokens[:(i + 1) * self.bs]), r.blocks[i]
            if b not in self.block_key and key not in self.cache:
                self.cache[key], self.block_key[b] = b, key
        r.registered = max(r.registered, full)

    # -- requests
    def add_request(self, rid, prompt, max_tokens, min_tokens=0, priority=0, arrival_time=0.0,
                    eos_token_ids=(), stop_token_ids=(), ignore_eos=False, parent_id=-1):
        total = len(prompt) + max_tokens
        if (rid in self.reqs or not prompt or max_tokens < 1 or not 0 <= min_tokens <= max_tokens
                or total > self.max_len or self._blocks_for(total) > self.nb - 1
                or (not self.chunking and len(prompt) > self.budget_max)):
            raise ValueError("rejected")
        key = (priority if self.policy == "priority" else 0, arrival_time, rid)
        r = SimpleNamespace(id=rid, key=key, prio=priority, tokens=list(prompt), n_prompt=len(prompt), computed=0,
                            blocks=[], registered=0, sent=0, reset=True, awaiting=False, scheduled=False,
                            preempted_at=-1, last_new=0, before=0, state="waiting", max_tokens=max_tokens,
                            min_tokens=min_tokens, eos=set(eos_token_ids), stop=set(stop_token_ids),
                            ignore_eos=ignore_eos, parent=parent_id, drafts=[], last_spec=0, wo_spec=0)
        self.reqs[rid] = r
        self._to_waiting(r)

    def _to_waiting(self, r):
        r.state = "waiting"
        bisect.insort(self.waiting, r, key=lambda q: q.key)

    def _to_running(self, r):
        r.state = "running"
        bisect.insort(self.running, r, key=lambda q: q.key)

    def _drop(self, r, reason, report=True):
        if r in self.waiting:
            self.waiting.remove(r)
        if r in self.running:
            self.running.remove(r)
        if report:
            self.finished.append((r.id, reason))
        if reason != 7:
            self._free(r.blocks)
            r.blocks, r.state = [], "finished"
            del self.reqs[r.id]
        else:
            r.state = "prefill_done"

    def abort(self, rid):
        r = self.reqs.get(rid)
        if r is None:
            return False
        self._drop(r, 6, report=r.state != "prefill_done")
        return True

    def finish(self, rid, reason):
        r = self.reqs.get(rid)
        if r is None or r.state == "prefill_done":
            return False
        self._drop(r, reason)
        return True

    # -- schedule
    def _is_decode(self, r):
        return r.computed >= r.n_prompt and len(r.tokens) - r.computed == 1

    def _chunk(self, r, budget):
        rem = len(r.tokens) - r.computed
        if rem <= budget:
            return rem
        return budget if self.chunking or rem > self.budget_max else 0

    def _trim(self, r, keep):
        if len(r.blocks) > keep:
            self._free(r.blocks[keep:])
            r.blocks, r.reset = r.blocks[:keep], True
            r.registered = min(r.registered, keep)

    def _lookahead(self, r, budget_left):
        n_tok = len(r.tokens)
        k = min(len(r.drafts), budget_left, r.max_tokens - (n_tok - r.n_prompt) - 1, self.max_len - n_tok - 1,
                (len(r.blocks) + len(self.free)) * self.bs - n_tok)
        r.wo_spec = len(r.blocks)
        if k <= 0:
            return 0
        r.blocks += [self._alloc() for _ in range(self._blocks_for(n_tok + k) - len(r.blocks))]
        return k

    def _preempt(self, r):
        self.running.remove(r)
        self._free(r.blocks)
        r.drafts = []
        r.blocks, r.computed, r.registered, r.sent, r.reset = [], 0, 0, 0, True
        r.awaiting = r.scheduled = False
        r.preempted_at = self.step
        self._to_waiting(r)
        self.preempted.append(r.id)
        self.preemptions += 1

    def _alloc_or_preempt(self, r, n_tokens):
        need = self._blocks_for(n_tokens) - len(r.blocks)
        while need > 0 and need > len(self.free):
            self.pre_blocks = True
            later = self.running[self.running.index(r) + 1:]
            victims = [q for q in later if not q.scheduled]
            if not victims:
                self._preempt(r)
                return False
            self._preempt(victims[-1])
        r.blocks += [self._alloc() for _ in range(max(need, 0))]
        return True

    def _run(self, decodes, rows):
        for r in list(self.running):
            if self.budget <= 0:
                break
            if r.state != "running" or r.scheduled or self._is_decode(r) != decodes:
                continue
            n = self._chunk(r, self.budget)
            if n == 0:
                continue
            before = r.computed
            if not self._alloc_or_preempt(r, before + n):
                break
            k = self._lookahead(r, self.budget - n) if r.drafts and self._is_decode(r) else 0
            r.computed += n + k
            r.scheduled, r.before = True, before
            self.budget -= n + k
            rows.append((r, n + k, before, k))

    def _deferred(self, r):
        p = self.reqs.get(r.parent) if r.parent >= 0 and not r.blocks else None
        pending = p is not None and (p.computed < p.n_prompt or (p.scheduled and p.before < p.n_prompt))
        return p is not None and (p.state == "waiting" or (p.state == "running" and pending))

    def _try_admit(self, r, dec, pre):
        static = self.policy == "static"
        if len(self.running) >= self.max_seqs or (self.budget <= 0 and not static):
            return "stop"
        if r.preempted_at == self.step or self._deferred(r):
            return "skip"
        has_blocks, hits, looked = bool(r.blocks), [], False
        if not has_blocks:
            p = self.reqs.get(r.parent) if r.parent >= 0 else None
            if p is not None and p.state == "running":
                share = min((r.n_prompt - 1) // self.bs, len(p.blocks))
                if share > 0 and r.tokens[:share * self.bs] == p.tokens[:share * self.bs]:
                    hits = p.blocks[:share]
            if not hits and self.caching:
                looked = True
                for i in range((len(r.tokens) - 1) // self.bs):
                    b = self.cache.get(tuple(r.tokens[:(i + 1) * self.bs]))
                    if b is None:
                        break
                    hits.append(b)
        start = r.computed if has_blocks else len(hits) * self.bs
        rem = len(r.tokens) - start
        n = rem
        if rem > self.budget:
            if self.chunking or rem > self.budget_max:
                n = self.budget
            elif static:
                n = 0
            else:
                return "stop"
        held = len(r.blocks) if has_blocks else len(hits)
        need = max(0, self._blocks_for(start + n) - held)
        if need + sum(self.ref[b] == 0 for b in hits) > len(self.free):
            return "stop"
        if not has_blocks:
            for b in hits:
                self._acquire(b)
            r.blocks, r.registered, r.computed = list(hits), len(hits), start
            if looked:
                self.queries += len(r.tokens)
                self.hits += start
        r.blocks += [self._alloc() for _ in range(need)]
        self.waiting.remove(r)
        self._to_running(r)
        if n > 0:
            is_dec = self._is_decode(r)
            r.computed += n
            r.scheduled, r.before = True, start
            self.budget -= n
            (dec if is_dec else pre).append((r, n, start, 0))
        return "ok"

    def _admit(self, dec, pre):
        for r in list(self.waiting):
            res = self._try_admit(r, dec, pre)
            if res == "stop":
                break

    def _priority_preempt(self):
        while self.running:
            head = next((w for w in self.waiting if not self._deferred(w)), None)
            victim = self.running[-1]
            if head is None or head.prio >= victim.prio:
                return
            need = max(0, self._blocks_for(min(len(head.tokens), self.budget_max)) - len(head.blocks))
            if len(self.running) < self.max_seqs and need <= len(self.free):
                return
            self._preempt(victim)

    def schedule(self):
        assert not self.last_sample, "update() pending"
        self.last_rows = []
        self.step += 1
        self.preempted, self.pre_blocks, self.budget = [], False, self.budget_max
        for r in self.running:
            r.scheduled = False
        dec, pre, was_empty = [], [], not self.running
        if self.policy == "priority":
            self._priority_preempt()
        if self.policy == "prefill_first":
            self._run(False, pre)
            if not self.pre_blocks:
                self._admit(dec, pre)
            if not pre:
                self._run(True, dec)
        else:
            self._run(True, dec)
            self._run(False, pre)
            if (self.policy != "static" or was_empty) and not self.pre_blocks:
                self._admit(dec, pre)
        out = dict(req_ids=[], num_scheduled_tokens=[], num_computed_tokens=[], input_token_ids=[],
                   spec_offsets=[0], spec_token_ids=[], sample_mask=[], block_table_reset=[], new_block_offsets=[0],
                   new_block_ids=[])
        for r, n, before, k in dec + pre:
            sample = before + n - k == len(r.tokens)
            out["req_ids"].append(r.id)
            out["num_scheduled_tokens"].append(n)
            out["num_computed_tokens"].append(before)
            out["input_token_ids"] += r.tokens[before:before + n - k] + r.drafts[:k]
            out["spec_token_ids"] += r.drafts[:k]
            out["spec_offsets"].append(len(out["spec_token_ids"]))
            r.last_spec = k
            out["sample_mask"].append(sample)
            out["block_table_reset"].append(r.reset)
            if r.reset:
                r.sent, r.reset = 0, False
            out["new_block_ids"] += r.blocks[r.sent:]
            r.sent = len(r.blocks)
            out["new_block_offsets"].append(len(out["new_block_ids"]))
            r.awaiting, r.last_new = sample, n
            self.last_rows.append(r)
            if sample:
                self.last_sample.append(r)
        out["preempted_ids"] = list(self.preempted)
        out["finished_ids"] = [f[0] for f in self.finished]
        out["finish_reasons"] = [f[1] for f in self.finished]
        self.finished = []
        self.pending_update = True
        return out

    def _stop(self, r, tok):
        n_out = len(r.tokens) - r.n_prompt
        if n_out >= r.min_tokens:
            if not r.ignore_eos and tok in r.eos:
                return 1
            if tok in r.stop:
                return 2
        if n_out >= r.max_tokens:
            return 4
        return 5 if len(r.tokens) >= self.max_len else 0

    def update(self, ids, toks, drafts=None):
        """``toks[i]``: an int (one token) or a list (several); ``drafts[i]``: proposals for the next
        step. Returns (finished (id, reason) pairs, tokens appended per row)."""
        rows = [list(t) if isinstance(t, (list, tuple)) else [t] for t in toks]
        given = {rid: j for j, rid in enumerate(ids)}
        appended, done = [0] * len(ids), []
        if any(r.id not in given and r.state == "running" and r.awaiting for r in self.last_sample):
            assert not ids, "a partial update() is a contract error"
            for r in self.last_rows:  # the step did not run: roll all of it back
                if r.state == "running":
                    r.computed -= r.last_new
                    r.awaiting, r.drafts = False, []
                    if r.last_spec:
                        self._trim(r, r.wo_spec)
            self.last_sample = []
            return done, appended
        if self.caching:
            for r in self.last_rows:  # the step ran: full blocks join the prefix cache (rows with
                if r.state == "running" and not r.last_spec:  # proposals: after their rollback)
                    self._register(r)
        for r in self.last_sample:
            if r.id not in given or r.state != "running" or not r.awaiting:
                continue
            j, r.awaiting, reason = given[r.id], False, 0
            for t in rows[j]:
                r.tokens.append(t)
                appended[j] += 1
                reason = self._stop(r, t) or (7 if self.role == "prefill" else 0)
                if reason:
                    break
            if r.last_spec:  # KV holds up to the first appended token unlike its proposal
                valid = 0
                while valid < min(appended[j] - 1, r.last_spec) and rows[j][valid] == r.drafts[valid]:
                    valid += 1
                r.computed = r.before + r.last_new - r.last_spec + valid
                self._trim(r, max(self._blocks_for(r.computed + 1), r.wo_spec))
                if self.caching:
                    self._register(r)
            r.drafts = list(drafts[j]) if drafts is not None and not reason else []
            if reason:
                done.append((r.id, reason))
                self._drop(r, reason)
        self.last_sample = []
        return done, appended

    def stats(self):
        return dict(num_free_blocks=len(self.free), num_cached_blocks=len(self.cache),
                    prefix_cache_queries=self.queries, prefix_cache_hits=self.hits,
                    num_preemptions=self.preemptions, num_waiting=len(self.waiting), num_running=len(self.running))
