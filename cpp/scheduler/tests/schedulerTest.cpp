// SPDX-License-Identifier: Apache-2.0
// GoogleTest of the Scheduler, table-driven per iteration (TensorRT-LLM ExpectedState style): each
// row gives one step's expected batch (ids, tokens, start positions, new blocks), preempted and
// finished ids, and queue/block counts. Expected values are worked out by hand from the rules in
// scheduler.h and docs/architecture.md. Every request samples token 5 unless a test says otherwise.
#include "mindie/scheduler/scheduler.h"

#include <gtest/gtest.h>

#include <functional>
#include <numeric>
#include <random>
#include <string>

using namespace mindie::scheduler;

namespace
{
constexpr SizeType32 kSkip = -1;

struct Expect
{
    std::vector<ReqId> scheduled;                 ///< batch order
    std::vector<SizeType32> numTokens;            ///< per row
    std::vector<SizeType32> computed{};           ///< per row (empty: unchecked)
    std::vector<std::vector<BlockId>> blocks{};   ///< new blocks per row (empty: unchecked)
    std::vector<ReqId> preempted{};
    std::vector<ReqId> finished{};
    SizeType32 numRunning{kSkip};
    SizeType32 numWaiting{kSkip};
    SizeType32 numFree{kSkip};
};

SchedulerConfig config(SizeType32 numBlocks, SizeType32 blockSize, SizeType32 budget, SizeType32 maxSeqs,
    SizeType32 maxLen = 128, Policy policy = Policy::kFCFS, Role role = Role::kCOLOCATED, bool caching = true)
{
    SchedulerConfig c;
    c.numBlocks = numBlocks;
    c.blockSize = blockSize;
    c.maxNumBatchedTokens = budget;
    c.maxNumSeqs = maxSeqs;
    c.maxModelLen = maxLen;
    c.policy = policy;
    c.role = role;
    c.enablePrefixCaching = caching;
    return c;
}

std::vector<TokenId> iota(TokenId first, size_t n)
{
    std::vector<TokenId> v(n);
    std::iota(v.begin(), v.end(), first);
    return v;
}

RequestParams params(SizeType32 maxTokens, std::int32_t priority = 0, double arrival = 0.0, ReqId parent = -1)
{
    RequestParams p;
    p.maxTokens = maxTokens;
    p.priority = priority;
    p.arrivalTime = arrival;
    p.parentId = parent;
    return p;
}

/// Runs one step (schedule + update with token 5 for every sampling row) and returns the output.
std::shared_ptr<SchedulerOutput> step(Scheduler& s, TokenId token = 5)
{
    auto out = s.schedule();
    std::vector<ReqId> ids;
    for (size_t i = 0; i < out->reqIds.size(); ++i)
    {
        if (out->sampleMask[i])
        {
            ids.push_back(out->reqIds[i]);
        }
    }
    std::vector<TokenId> tokens(ids.size(), token);
    s.update(ids.data(), tokens.data(), ids.size());
    return out;
}

/// The per-iteration table driver: `before(it)` may add or abort requests before step `it`.
void runTable(Scheduler& s, std::vector<Expect> const& table, std::function<void(size_t)> const& before = {})
{
    for (size_t it = 0; it < table.size(); ++it)
    {
        SCOPED_TRACE("iteration " + std::to_string(it));
        if (before)
        {
            before(it);
        }
        auto out = step(s);
        Expect const& e = table[it];
        EXPECT_EQ(out->reqIds, e.scheduled);
        EXPECT_EQ(out->numScheduledTokens, e.numTokens);
        if (!e.computed.empty())
        {
            EXPECT_EQ(out->numComputedTokens, e.computed);
        }
        if (!e.blocks.empty())
        {
            ASSERT_EQ(out->newBlockOffsets.size(), e.blocks.size() + 1);
            for (size_t r = 0; r < e.blocks.size(); ++r)
            {
                std::vector<BlockId> got(out->newBlockIds.begin() + out->newBlockOffsets[r],
                    out->newBlockIds.begin() + out->newBlockOffsets[r + 1]);
                EXPECT_EQ(got, e.blocks[r]) << "row " << r;
            }
        }
        EXPECT_EQ(out->preemptedIds, e.preempted);
        EXPECT_EQ(out->finishedIds, e.finished);
        std::int64_t const total = std::accumulate(out->numScheduledTokens.begin(), out->numScheduledTokens.end(), 0);
        EXPECT_EQ(out->numBatchedTokens, total);
        EXPECT_LE(total, s.config().maxNumBatchedTokens);
        auto const st = s.stats();
        if (e.numRunning != kSkip)
        {
            EXPECT_EQ(st.numRunning, e.numRunning);
        }
        if (e.numWaiting != kSkip)
        {
            EXPECT_EQ(st.numWaiting, e.numWaiting);
        }
        if (e.numFree != kSkip)
        {
            EXPECT_EQ(st.numFreeBlocks, e.numFree);
        }
    }
}
} // namespace

// ------------------------------------------------------------------------------- chunked prefill

TEST(SchedulerTest, ChunkExactlyABlock)
{
    Scheduler s(config(8, 4, 4, 4));
    s.addRequest(1, iota(1, 8), params(2));
    runTable(s,
        {
            {{1}, {4}, {0}, {{1}}, {}, {}, 1, 0, 6},
            {{1}, {4}, {4}, {{2}}, {}, {}, 1, 0, 5}, // the second chunk samples
            {{1}, {1}, {8}, {{3}}, {}, {}, 0, 0, 7}, // position 8 opens block 3; max_tokens=2 done
            {{}, {}, {}, {}, {}, {1}, 0, 0, 7},
        });
}

TEST(SchedulerTest, PromptOfOneToken)
{
    Scheduler s(config(4, 4, 8, 2));
    s.addRequest(1, {7}, params(1));
    runTable(s, {{{1}, {1}, {0}, {{1}}, {}, {}, 0, 0, 3}, {{}, {}, {}, {}, {}, {1}, 0, 0, 3}});
}

TEST(SchedulerTest, BudgetSmallerThanABlock)
{
    Scheduler s(config(8, 4, 3, 2));
    s.addRequest(1, iota(1, 7), params(3));
    runTable(s,
        {
            {{1}, {3}, {0}, {{1}}},
            {{1}, {3}, {3}, {{2}}}, // positions 3..5 straddle blocks 1 and 2
            {{1}, {1}, {6}, {{}}},  // the last prompt token; samples
            {{1}, {1}, {7}, {{}}},  // decode at position 7, still block 2
            {{1}, {1}, {8}, {{3}}}, // position 8: block 3; third token: LENGTH
            {{}, {}, {}, {}, {}, {1}, 0, 0, 7},
        });
}

TEST(SchedulerTest, LongPromptInManyChunksFusedWithDecodes)
{
    Scheduler s(config(32, 4, 6, 4));
    s.addRequest(1, iota(1, 3), params(10));
    s.addRequest(2, iota(100, 20), params(2));
    runTable(s,
        {
            {{1, 2}, {3, 3}, {0, 0}},  // 1's whole prompt, 2's first chunk
            {{1, 2}, {1, 5}, {3, 3}},  // decodes first, then the next chunk
            {{1, 2}, {1, 5}, {4, 8}},
            {{1, 2}, {1, 5}, {5, 13}},
            {{1, 2}, {1, 2}, {6, 18}}, // 2's last chunk samples
            {{1, 2}, {1, 1}, {7, 20}}, // both decode; 2 reaches max_tokens=2
            {{1}, {1}, {8}, {}, {}, {2}},
        });
}

TEST(SchedulerTest, MaxNumSeqsCapsTheBatch)
{
    Scheduler s(config(32, 4, 64, 2));
    for (ReqId id = 1; id <= 3; ++id)
    {
        s.addRequest(id, iota(1, 2), params(2, 0, static_cast<double>(id)));
    }
    runTable(s,
        {
            {{1, 2}, {2, 2}, {}, {}, {}, {}, 2, 1},
            {{1, 2}, {1, 1}, {}, {}, {}, {}, 0, 1},
            {{3}, {2}, {0}, {}, {}, {1, 2}, 1, 0},
        });
}

// ------------------------------------------------------------------------------- prefix caching

TEST(SchedulerTest, PrefixHitsOnFullBlocksOnly)
{
    Scheduler s(config(32, 4, 64, 4));
    s.addRequest(1, iota(1, 10), params(1)); // blocks [1..4] [5..8] cached, 2-token tail not
    auto prompt2 = iota(1, 8);               // two full matching blocks + a different tail
    prompt2.insert(prompt2.end(), {50, 51});
    auto prompt3 = iota(1, 6); // one full block + half a block matching
    prompt3.insert(prompt3.end(), {60, 61, 62});
    runTable(s,
        {
            {{1}, {10}, {0}},
            {{2, 3}, {2, 5}, {8, 4}, {}, {}, {1}},
        },
        [&](size_t it)
        {
            if (it == 1)
            {
                s.addRequest(2, prompt2, params(1));
                s.addRequest(3, prompt3, params(1));
            }
        });
    auto const st = s.stats();
    EXPECT_EQ(st.prefixCacheHits, 8 + 4);
    EXPECT_EQ(st.prefixCacheQueries, 10 + 10 + 9);
}

TEST(SchedulerTest, FullPromptHitStillComputesTheLastToken)
{
    Scheduler s(config(32, 4, 64, 4));
    s.addRequest(1, iota(1, 8), params(1));
    runTable(s, {{{1}, {8}}, {{2}, {4}, {4}, {}, {}, {1}}},
        [&](size_t it)
        {
            if (it == 1)
            {
                s.addRequest(2, iota(1, 8), params(1));
            }
        });
}

TEST(SchedulerTest, ForcedHashCollisionGivesNoWrongHit)
{
    Scheduler s(config(32, 4, 64, 4));
    s.setHashMaskForTesting(0);
    s.addRequest(1, iota(1, 9), params(1));
    runTable(s, {{{1}, {9}}, {{2, 3}, {9, 5}, {0, 4}, {}, {}, {1}}},
        [&](size_t it)
        {
            if (it == 1)
            {
                s.addRequest(2, iota(40, 9), params(1)); // collides with everything, matches nothing
                s.addRequest(3, iota(1, 9), params(1));  // its first block is the one cached block
            }
        });
}

TEST(SchedulerTest, EvictionReusesLeastRecentlyUsedCachedBlocks)
{
    Scheduler s(config(6, 2, 64, 4)); // 5 usable blocks
    s.addRequest(1, {1, 2, 3}, params(1)); // caches block 1 ({1,2})
    runTable(s, {{{1}, {3}, {0}, {{1, 2}}}});
    s.addRequest(2, {7, 8, 9}, params(1)); // caches its first block
    // Freed: block 2 (uncached) to the front, block 1 (cached) to the back: [2, 3, 4, 5, 1].
    runTable(s, {{{2}, {3}, {0}, {{2, 3}}, {}, {1}}});
    step(s); // 2 finished the same way: [3, 4, 5, 1, 2]
    EXPECT_EQ(s.freeListForTesting(), (std::vector<BlockId>{3, 4, 5, 1, 2}));
    EXPECT_EQ(s.stats().numCachedBlocks, 2);
    // Needing 5 blocks takes the uncached ones, then evicts 1 (older) before 2.
    s.addRequest(3, iota(20, 9), params(1));
    runTable(s, {{{3}, {9}, {0}, {{3, 4, 5, 1, 2}}}});
    EXPECT_EQ(s.stats().numCachedBlocks, 4); // request 3's own four full blocks
    s.addRequest(4, {1, 2, 3}, params(1));   // the evicted prefix of request 1: no hit
    runTable(s, {{{4}, {3}, {0}, {}, {}, {3}}});
}

// ------------------------------------------------------------------------------- preemption

TEST(SchedulerTest, PreemptionByRecomputeAndResume)
{
    Scheduler s(config(5, 4, 16, 4, 16, Policy::kFCFS, Role::kCOLOCATED, false)); // 4 usable blocks
    s.addRequest(1, iota(1, 7), params(5, 0, 0.0));
    s.addRequest(2, iota(8, 6), params(5, 0, 1.0));
    runTable(s,
        {
            {{1, 2}, {7, 6}, {0, 0}, {{1, 2}, {3, 4}}, {}, {}, 2, 0, 0},
            {{1, 2}, {1, 1}, {7, 6}, {{}, {}}, {}, {}, 2, 0, 0},
            // 1 needs a 3rd block: 2 (later arrival) is preempted, its blocks freed as [3, 4].
            {{1}, {1}, {8}, {{3}}, {2}, {}, 1, 1, 1},
            {{1}, {1}, {9}, {}, {}, {}, 1, 1, 1}, // 2 needs 2 blocks, 1 is free: it waits
            {{1}, {1}, {10}, {}, {}, {}, 0, 1, 4}, // 1 samples its 5th token: LENGTH
            {{2}, {8}, {0}, {{1, 2}}, {}, {1}, 1, 0, 2}, // resumed: prompt + its 2 tokens, fresh table
            {{2}, {1}, {8}, {{3}}, {}, {}, 1, 0, 1}, // position 8 opens its 3rd block
        });
}

TEST(SchedulerTest, PriorityPreemptsAtMaxNumSeqs)
{
    Scheduler s(config(32, 4, 64, 2, 128, Policy::kPRIORITY));
    s.addRequest(1, iota(1, 3), params(8, 1, 0.0));
    s.addRequest(2, iota(4, 3), params(8, 2, 1.0));
    runTable(s,
        {
            {{1, 2}, {3, 3}},
            {{1, 3}, {1, 3}, {3, 0}, {}, {2}, {}, 2, 1}, // 3 (priority 0) displaces 2 (priority 2)
            {{3, 1}, {1, 1}, {}, {}, {}, {}, 2, 1}, // both decode: priority order
        },
        [&](size_t it)
        {
            if (it == 1)
            {
                s.addRequest(3, iota(7, 3), params(8, 0, 2.0));
            }
        });
}

TEST(SchedulerTest, StaticPolicyStartsANewBatchOnlyWhenAllFinished)
{
    Scheduler s(config(32, 4, 64, 4, 128, Policy::kSTATIC));
    s.addRequest(1, iota(1, 2), params(1));
    s.addRequest(2, iota(1, 2), params(3));
    runTable(s,
        {
            {{1, 2}, {2, 2}},
            {{2}, {1}, {}, {}, {}, {1}, 1, 1},
            {{2}, {1}, {}, {}, {}, {}, 0, 1},
            {{3}, {2}, {}, {}, {}, {2}, 0, 0}, // the new batch: 3 alone, done after one token
        },
        [&](size_t it)
        {
            if (it == 1)
            {
                s.addRequest(3, iota(1, 2), params(1));
            }
        });
}

// ------------------------------------------------------------------------------- abort / finish

TEST(SchedulerTest, AbortInEveryState)
{
    Scheduler s(config(32, 4, 8, 4));
    s.addRequest(1, iota(1, 20), params(4)); // running mid-prefill after step 0
    s.addRequest(2, iota(1, 2), params(4));  // waiting: the budget went to 1
    runTable(s, {{{1}, {8}, {}, {}, {}, {}, 1, 1}});
    EXPECT_TRUE(s.abort(2));
    EXPECT_TRUE(s.abort(1));
    EXPECT_FALSE(s.abort(1));
    EXPECT_FALSE(s.abort(77));
    runTable(s, {{{}, {}, {}, {}, {}, {2, 1}, 0, 0, 31}});
    s.addRequest(3, iota(1, 3), params(9));
    step(s);
    auto out = s.schedule(); // aborted between schedule() and update()
    EXPECT_TRUE(s.abort(3));
    ReqId id = 3;
    TokenId tok = 5;
    auto res = s.update(&id, &tok, 1);
    EXPECT_TRUE(res.finishedIds.empty());
    runTable(s, {{{}, {}, {}, {}, {}, {3}, 0, 0, 31}});
    EXPECT_FALSE(s.hasUnfinished());
}

TEST(SchedulerTest, FinishWithStopStringFreesBlocks)
{
    Scheduler s(config(32, 4, 8, 4));
    s.addRequest(1, iota(1, 5), params(9));
    step(s);
    EXPECT_TRUE(s.finish(1, FinishReason::kSTOP_STRING));
    auto out = step(s);
    EXPECT_EQ(out->finishedIds, (std::vector<ReqId>{1}));
    EXPECT_EQ(out->finishReasons, (std::vector<std::int32_t>{3}));
    EXPECT_EQ(s.stats().numFreeBlocks, 31);
    EXPECT_THROW(s.finish(1, FinishReason::kNONE), ContractError);
}

TEST(SchedulerTest, EosStopTokenMinTokensIgnoreEos)
{
    Scheduler s(config(32, 4, 64, 8));
    RequestParams eos = params(5);
    eos.eosTokenIds = {5};
    RequestParams minTok = eos;
    minTok.minTokens = 3;
    RequestParams ignore = eos;
    ignore.ignoreEos = true;
    RequestParams stop = params(5);
    stop.stopTokenIds = {5};
    s.addRequest(1, {1}, eos);
    s.addRequest(2, {1}, minTok);
    s.addRequest(3, {1}, ignore);
    s.addRequest(4, {1}, stop);
    auto finishedAfter = [&](int steps)
    {
        std::vector<std::pair<ReqId, std::int32_t>> done;
        for (int i = 0; i < steps; ++i)
        {
            auto out = s.schedule();
            std::vector<ReqId> ids;
            for (size_t k = 0; k < out->reqIds.size(); ++k)
            {
                if (out->sampleMask[k])
                {
                    ids.push_back(out->reqIds[k]);
                }
            }
            std::vector<TokenId> tokens(ids.size(), 5);
            auto res = s.update(ids.data(), tokens.data(), ids.size());
            for (size_t k = 0; k < res.finishedIds.size(); ++k)
            {
                done.emplace_back(res.finishedIds[k], res.finishReasons[k]);
            }
        }
        return done;
    };
    using P = std::pair<ReqId, std::int32_t>;
    EXPECT_EQ(finishedAfter(1), (std::vector<P>{{1, 1}, {4, 2}}));
    EXPECT_EQ(finishedAfter(2), (std::vector<P>{{2, 1}}));
    EXPECT_EQ(finishedAfter(2), (std::vector<P>{{3, 4}}));
}

// ------------------------------------------------------------------------------- n > 1

TEST(SchedulerTest, ChildrenShareTheParentPromptBlocks)
{
    Scheduler s(config(32, 4, 64, 4, 128, Policy::kFCFS, Role::kCOLOCATED, false));
    s.addRequest(1, iota(1, 10), params(4));
    s.addRequest(2, iota(1, 10), params(4, 0, 0.0, 1));
    s.addRequest(3, iota(1, 10), params(4, 0, 0.0, 1));
    runTable(s,
        {
            {{1}, {10}, {0}, {{1, 2, 3}}, {}, {}, 1, 2, 28}, // children wait for the parent's KV
            {{1, 2, 3}, {1, 2, 2}, {10, 8, 8}, {{}, {1, 2, 4}, {1, 2, 5}}, {}, {}, 3, 0, 26},
        });
    // Shared blocks are freed only when the last owner finishes.
    EXPECT_TRUE(s.abort(1));
    EXPECT_EQ(s.stats().numFreeBlocks, 27);
    EXPECT_TRUE(s.abort(2));
    EXPECT_TRUE(s.abort(3));
    EXPECT_EQ(s.stats().numFreeBlocks, 31);
}

// ------------------------------------------------------------------------------- PD roles

TEST(SchedulerTest, PrefillToDecodeHandOver)
{
    Scheduler prefill(config(32, 4, 64, 4, 128, Policy::kFCFS, Role::kPREFILL));
    Scheduler decode(config(32, 4, 64, 4, 128, Policy::kFCFS, Role::kDECODE));
    prefill.addRequest(1, iota(1, 9), params(4));
    auto out = prefill.schedule();
    ReqId id = 1;
    TokenId first = 42;
    auto res = prefill.update(&id, &first, 1);
    ASSERT_EQ(res.finishReasons, (std::vector<std::int32_t>{static_cast<std::int32_t>(FinishReason::kPREFILL_DONE)}));
    auto const pinned = prefill.getBlockIds(1);
    EXPECT_EQ(pinned.size(), 3u);
    EXPECT_EQ(prefill.stats().numFreeBlocks, 28);
    EXPECT_FALSE(prefill.hasUnfinished());

    auto const dst = decode.addPrefilled(1, iota(1, 9), {first}, params(4));
    EXPECT_EQ(dst.size(), 3u); // 9 positions of KV
    runTable(decode, {{{}, {}, {}, {}, {}, {}, 0, 0, 28}}); // not before kv_ready
    decode.kvReady(1);
    runTable(decode,
        {
            {{1}, {1}, {9}, {dst}},
            {{1}, {1}, {10}, {{}}},
            {{1}, {1}, {11}, {{}}}, // the 4th output token: LENGTH
            {{}, {}, {}, {}, {}, {1}, 0, 0, 31},
        });
    prefill.release(1);
    EXPECT_EQ(prefill.stats().numFreeBlocks, 31);
    EXPECT_THROW(prefill.release(1), UnknownRequestError);
}

// ------------------------------------------------------------------------------- errors

TEST(SchedulerTest, TypedErrorsNeverAbort)
{
    Scheduler s(config(8, 4, 8, 2, 16));
    EXPECT_THROW(s.addRequest(1, {}, params(1)), RequestRejectedError);
    EXPECT_THROW(s.addRequest(1, iota(1, 14), params(3)), RequestRejectedError); // > max_model_len
    EXPECT_THROW(s.addRequest(1, {-1}, params(1)), RequestRejectedError);
    s.addRequest(1, {1}, params(1));
    EXPECT_THROW(s.addRequest(1, {1}, params(1)), RequestRejectedError);
    EXPECT_THROW(s.getBlockIds(9), UnknownRequestError);
    EXPECT_THROW(s.kvReady(1), ContractError);
    EXPECT_THROW(s.addPrefilled(2, {1}, {2}, params(3)), ContractError); // colocated role
    EXPECT_THROW(s.update(nullptr, nullptr, 0), ContractError);
    s.schedule();
    EXPECT_THROW(s.schedule(), ContractError);
    ReqId bad = 9;
    TokenId tok = 1;
    EXPECT_THROW(s.update(&bad, &tok, 1), ContractError);
    EXPECT_THROW(Scheduler(config(8, 4, 0, 2)), ConfigError);
    EXPECT_THROW(Scheduler(config(8, 4, 8, 0)), ConfigError);
}

// ------------------------------------------------------------------------------- random operations

TEST(SchedulerTest, RandomOperationsKeepTheBlockPoolConsistent)
{
    // Random admissions (some invalid), aborts, finishes, steps (some failed) and PD calls across
    // policies and roles; run under ASan/UBSan by `make test-cpp`. Oracle: typed exceptions only,
    // budget and sequence cap held every step, and every block back in the pool at the end.
    std::mt19937 rng(11);
    for (int round = 0; round < 24; ++round)
    {
        auto const policy = static_cast<Policy>(round % 4);
        auto const role = static_cast<Role>((round / 4) % 3);
        SchedulerConfig c = config(6 + static_cast<SizeType32>(rng() % 40), 1 + static_cast<SizeType32>(rng() % 8),
            1 + static_cast<SizeType32>(rng() % 40), 1 + static_cast<SizeType32>(rng() % 6), 64, policy, role,
            rng() % 2 == 0);
        c.enableChunkedPrefill = rng() % 3 != 0;
        Scheduler s(c);
        if (rng() % 4 == 0)
        {
            s.setHashMaskForTesting(rng() % 2 == 0 ? 0 : 3);
        }
        ReqId nextId = 1;
        for (int op = 0; op < 400; ++op)
        {
            int const kind = static_cast<int>(rng() % 10);
            ReqId const someId = 1 + static_cast<ReqId>(rng() % static_cast<std::uint32_t>(nextId));
            try
            {
                if (kind < 3)
                {
                    std::vector<TokenId> prompt(rng() % 30);
                    for (auto& t : prompt)
                    {
                        t = static_cast<TokenId>(rng() % 5);
                    }
                    RequestParams p = params(1 + static_cast<SizeType32>(rng() % 12),
                        static_cast<std::int32_t>(rng() % 3), static_cast<double>(op),
                        rng() % 4 == 0 ? someId : -1);
                    p.eosTokenIds = {0};
                    if (role == Role::kDECODE && rng() % 2 == 0)
                    {
                        s.addPrefilled(nextId, prompt, {static_cast<TokenId>(rng() % 5)}, p);
                    }
                    else
                    {
                        s.addRequest(nextId, prompt, p);
                    }
                    ++nextId;
                }
                else if (kind == 3)
                {
                    s.abort(someId);
                }
                else if (kind == 4)
                {
                    s.finish(someId, FinishReason::kSTOP_STRING);
                }
                else if (kind == 5)
                {
                    rng() % 2 == 0 ? s.kvReady(someId) : s.release(someId);
                }
                else
                {
                    auto out = s.schedule();
                    std::int64_t total = 0;
                    std::vector<ReqId> ids;
                    for (size_t i = 0; i < out->reqIds.size(); ++i)
                    {
                        total += out->numScheduledTokens[i];
                        if (out->sampleMask[i])
                        {
                            ids.push_back(out->reqIds[i]);
                        }
                    }
                    ASSERT_LE(total, c.maxNumBatchedTokens);
                    ASSERT_LE(static_cast<SizeType32>(out->reqIds.size()), c.maxNumSeqs);
                    if (rng() % 8 == 0)
                    {
                        ids.clear(); // a failed step
                    }
                    std::vector<TokenId> tokens(ids.size());
                    for (auto& t : tokens)
                    {
                        t = static_cast<TokenId>(rng() % 5);
                    }
                    s.update(ids.data(), tokens.data(), ids.size());
                }
            }
            catch (SchedulerError const&)
            {
                // Rejections and contract errors are expected; anything else fails the test.
            }
            ASSERT_LE(s.numRunning(), c.maxNumSeqs);
        }
        for (ReqId id = 1; id < nextId; ++id)
        {
            s.abort(id);
        }
        ASSERT_FALSE(s.hasUnfinished());
        ASSERT_EQ(s.stats().numFreeBlocks, c.numBlocks - 1) << "round " << round;
    }
}
