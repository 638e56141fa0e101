// SPDX-License-Identifier: Apache-2.0
// GoogleTest of the multi-token update() and the speculative lookahead slots (scheduler.h, file
// comment). Expected values are worked out by hand from those rules: block ids come from the free
// list in order 1, 2, ...; freed uncached blocks go to its front, last block first.
#include "mindie/scheduler/scheduler.h"

#include <gtest/gtest.h>

#include <numeric>
#include <string>

using namespace mindie::scheduler;

namespace
{

SchedulerConfig specConfig(SizeType32 blockSize = 4, SizeType32 budget = 32, SizeType32 numBlocks = 17)
{
    SchedulerConfig c;
    c.numBlocks = numBlocks; // 16 usable
    c.blockSize = blockSize;
    c.maxNumBatchedTokens = budget;
    c.maxNumSeqs = 4;
    c.maxModelLen = 128;
    return c;
}

RequestParams params(SizeType32 maxTokens, std::vector<TokenId> stop = {}, std::vector<TokenId> eos = {},
    SizeType32 minTokens = 0)
{
    RequestParams p;
    p.maxTokens = maxTokens;
    p.minTokens = minTokens;
    p.stopTokenIds = std::move(stop);
    p.eosTokenIds = std::move(eos);
    return p;
}

std::vector<TokenId> iota(TokenId first, size_t n)
{
    std::vector<TokenId> v(n);
    std::iota(v.begin(), v.end(), first);
    return v;
}

/// update() in CSR form: rows[i] gets tokens[i] and (if given) drafts[i] for the next step.
UpdateResult updateCsr(Scheduler& s, std::vector<ReqId> const& ids, std::vector<std::vector<TokenId>> const& tokens,
    std::vector<std::vector<TokenId>> const& drafts = {})
{
    std::vector<std::int32_t> offsets{0}, draftOffsets{0};
    std::vector<TokenId> flat, flatDrafts;
    for (auto const& t : tokens)
    {
        flat.insert(flat.end(), t.begin(), t.end());
        offsets.push_back(static_cast<std::int32_t>(flat.size()));
    }
    for (auto const& d : drafts)
    {
        flatDrafts.insert(flatDrafts.end(), d.begin(), d.end());
        draftOffsets.push_back(static_cast<std::int32_t>(flatDrafts.size()));
    }
    UpdateInput in;
    in.reqIds = ids.data();
    in.numRows = ids.size();
    in.tokenOffsets = offsets.data();
    in.tokenIds = flat.data();
    in.numTokenIds = flat.size();
    if (!drafts.empty())
    {
        in.draftOffsets = draftOffsets.data();
        in.draftTokenIds = flatDrafts.data();
        in.numDraftTokenIds = flatDrafts.size();
    }
    return s.update(in);
}

std::vector<BlockId> rowBlocks(SchedulerOutput const& out, size_t row)
{
    return std::vector<BlockId>(
        out.newBlockIds.begin() + out.newBlockOffsets[row], out.newBlockIds.begin() + out.newBlockOffsets[row + 1]);
}

std::vector<TokenId> rowSpec(SchedulerOutput const& out, size_t row)
{
    return std::vector<TokenId>(
        out.specTokenIds.begin() + out.specOffsets[row], out.specTokenIds.begin() + out.specOffsets[row + 1]);
}

/// Request 1: prompt 1..6 (blocks 1, 2), first token 10, drafts 11..14; then schedules the step with
/// the four proposals (positions 6..10: block 3 is the lookahead block).
std::shared_ptr<SchedulerOutput> startWithProposals(Scheduler& s, RequestParams p)
{
    s.addRequest(1, iota(1, 6), std::move(p));
    s.schedule();
    auto const first = updateCsr(s, {1}, {{10}}, {{11, 12, 13, 14}});
    EXPECT_EQ(first.numAppended, std::vector<std::int32_t>{1});
    auto out = s.schedule();
    EXPECT_EQ(out->reqIds, std::vector<ReqId>{1});
    EXPECT_EQ(out->numScheduledTokens, std::vector<std::int32_t>{5});
    EXPECT_EQ(out->numComputedTokens, std::vector<std::int32_t>{6});
    EXPECT_EQ(out->inputTokenIds, (std::vector<TokenId>{10, 11, 12, 13, 14}));
    EXPECT_EQ(out->specOffsets, (std::vector<std::int32_t>{0, 4}));
    EXPECT_EQ(rowSpec(*out, 0), (std::vector<TokenId>{11, 12, 13, 14}));
    EXPECT_EQ(out->sampleMask, std::vector<std::uint8_t>{1});
    EXPECT_EQ(rowBlocks(*out, 0), std::vector<BlockId>{3});
    EXPECT_EQ(out->numBatchedTokens, 5);
    return out;
}

struct AcceptCase
{
    std::string name;
    std::vector<TokenId> tokens; ///< what the runner returns for the row
    SizeType32 computedAfter;    ///< num_computed_tokens after update()
    std::vector<BlockId> blocksAfter;
    bool tableReset;             ///< the next schedule() resends the row
    std::vector<BlockId> nextNewBlocks;
    SizeType32 nextNumScheduled;
};

} // namespace

// ------------------------------------------------------------------------------- accept 0, some, all

TEST(SpeculativeTest, AcceptNoneSomeAllTable)
{
    std::vector<AcceptCase> const table{
        // 0 of 4 accepted: the KV holds position 6 only; block 3 held only rejected lookahead.
        {"accept 0", {20}, 7, {1, 2}, true, {1, 2}, 1},
        // 1 accepted: positions 6, 7 hold; the next token (25) goes to position 8, in block 3: kept.
        {"accept 1", {11, 25}, 8, {1, 2, 3}, false, {}, 1},
        // 2 of 4 accepted (11, 12) plus the correction 30: positions 6..8 hold; block 3 stays.
        {"accept 2", {11, 12, 30}, 9, {1, 2, 3}, false, {}, 1},
        // all 4 plus the bonus token: positions 6..10 hold.
        {"accept all", {11, 12, 13, 14, 40}, 11, {1, 2, 3}, false, {}, 1},
        // tokens unlike the proposals: the KV of position 7 was computed from 11, not 77, so positions
        // 7, 8 are computed again (as a chunk) and take block 3 back.
        {"mismatch", {77, 88}, 7, {1, 2}, true, {1, 2, 3}, 2},
    };
    for (AcceptCase const& c : table)
    {
        SCOPED_TRACE(c.name);
        Scheduler s(specConfig());
        startWithProposals(s, params(20));
        auto const res = updateCsr(s, {1}, {c.tokens});
        EXPECT_EQ(res.numAppended, std::vector<std::int32_t>{static_cast<std::int32_t>(c.tokens.size())});
        EXPECT_TRUE(res.finishedIds.empty());
        EXPECT_EQ(s.getNumComputedTokens(1), c.computedAfter);
        EXPECT_EQ(s.getBlockIds(1), c.blocksAfter);
        EXPECT_EQ(s.stats().numFreeBlocks, 16 - static_cast<SizeType32>(c.blocksAfter.size()));
        auto const next = s.schedule();
        ASSERT_EQ(next->reqIds, std::vector<ReqId>{1});
        EXPECT_EQ(next->blockTableReset, std::vector<std::uint8_t>{static_cast<std::uint8_t>(c.tableReset)});
        EXPECT_EQ(rowBlocks(*next, 0), c.nextNewBlocks);
        EXPECT_EQ(next->numScheduledTokens, std::vector<std::int32_t>{c.nextNumScheduled});
        EXPECT_EQ(next->numComputedTokens, std::vector<std::int32_t>{c.computedAfter});
        EXPECT_EQ(next->specOffsets, (std::vector<std::int32_t>{0, 0})) << "drafts are for one step only";
    }
}

// ------------------------------------------------------------------------------- stops inside the run

TEST(SpeculativeTest, StopTokenInTheMiddleOfTheAcceptedRun)
{
    Scheduler s(specConfig());
    startWithProposals(s, params(20, {12}));
    auto const res = updateCsr(s, {1}, {{11, 12, 13}}, {{1, 2}});
    EXPECT_EQ(res.numAppended, std::vector<std::int32_t>{2}); // 13 is not taken
    EXPECT_EQ(res.finishedIds, std::vector<ReqId>{1});
    EXPECT_EQ(res.finishReasons, std::vector<std::int32_t>{static_cast<std::int32_t>(FinishReason::kSTOP_TOKEN)});
    EXPECT_EQ(s.stats().numFreeBlocks, 16);
    EXPECT_FALSE(s.hasUnfinished());
}

TEST(SpeculativeTest, EosBeforeMinTokensIsTakenAndAfterItStops)
{
    Scheduler s(specConfig());
    // Outputs before this step: 1 (10). EOS 9 as output 2 < min_tokens 3 is kept; as output 4 it stops.
    startWithProposals(s, params(20, {}, {9}, 3));
    auto const res = updateCsr(s, {1}, {{9, 12, 9, 14}});
    EXPECT_EQ(res.numAppended, std::vector<std::int32_t>{3});
    EXPECT_EQ(res.finishReasons, std::vector<std::int32_t>{static_cast<std::int32_t>(FinishReason::kEOS)});
}

TEST(SpeculativeTest, MaxTokensCapsTheProposalsSoTheRunEndsOnIt)
{
    Scheduler s(specConfig());
    s.addRequest(1, iota(1, 6), params(4));
    s.schedule();
    updateCsr(s, {1}, {{10}}, {{11, 12, 13, 14}});
    auto const out = s.schedule();
    // 1 output so far, max_tokens 4: the row may produce 3 tokens, so 2 proposals.
    EXPECT_EQ(out->numScheduledTokens, std::vector<std::int32_t>{3});
    EXPECT_EQ(rowSpec(*out, 0), (std::vector<TokenId>{11, 12}));
    EXPECT_EQ(rowBlocks(*out, 0), std::vector<BlockId>{3}); // position 8 is in block 3
    auto const res = updateCsr(s, {1}, {{11, 12, 50}});
    EXPECT_EQ(res.numAppended, std::vector<std::int32_t>{3});
    EXPECT_EQ(res.finishReasons, std::vector<std::int32_t>{static_cast<std::int32_t>(FinishReason::kLENGTH)});
    EXPECT_EQ(s.stats().numFreeBlocks, 16);
}

TEST(SpeculativeTest, MaxModelLenCapsTheProposals)
{
    SchedulerConfig c = specConfig();
    c.maxModelLen = 9;
    Scheduler s(c);
    s.addRequest(1, iota(1, 6), params(3));
    s.schedule();
    updateCsr(s, {1}, {{10}}, {{11, 12, 13, 14}});
    auto const out = s.schedule(); // 7 tokens, 9 at most: 2 more, so 1 proposal
    EXPECT_EQ(out->numScheduledTokens, std::vector<std::int32_t>{2});
    auto const res = updateCsr(s, {1}, {{11, 60}});
    EXPECT_EQ(res.numAppended, std::vector<std::int32_t>{2});
    EXPECT_EQ(res.finishReasons, std::vector<std::int32_t>{static_cast<std::int32_t>(FinishReason::kLENGTH)});
}

// ------------------------------------------------------------------------------- budget and blocks

TEST(SpeculativeTest, BudgetCountsTheProposals)
{
    Scheduler s(specConfig(4, 4));
    s.addRequest(1, {1, 2, 3}, params(20));
    s.schedule();
    updateCsr(s, {1}, {{10}}, {{11, 12, 13, 14, 15}});
    s.addRequest(2, {7, 7}, params(2));
    auto const out = s.schedule(); // budget 4: the decode and 3 proposals, nothing left for request 2
    EXPECT_EQ(out->reqIds, std::vector<ReqId>{1});
    EXPECT_EQ(out->numScheduledTokens, std::vector<std::int32_t>{4});
    EXPECT_EQ(rowSpec(*out, 0), (std::vector<TokenId>{11, 12, 13}));
    EXPECT_EQ(out->numBatchedTokens, 4);
    updateCsr(s, {1}, {{11, 99}});
    auto const next = s.schedule(); // no drafts now: 1 + the prompt of 2
    EXPECT_EQ(next->reqIds, (std::vector<ReqId>{1, 2}));
    EXPECT_EQ(next->numScheduledTokens, (std::vector<std::int32_t>{1, 2}));
}

TEST(SpeculativeTest, LookaheadNeverPreemptsAndTakesOnlyFreeBlocks)
{
    Scheduler s(specConfig(2, 32, 5)); // 4 usable blocks of 2 tokens
    s.addRequest(1, {1, 2, 3}, params(5));
    s.schedule();                                             // blocks 1, 2
    updateCsr(s, {1}, {{10}}, {{11, 12, 13, 14}});
    s.addRequest(2, {5}, params(2));
    auto const out = s.schedule(); // decode at position 3 + proposals: 2 free blocks -> positions up to 7
    ASSERT_EQ(out->reqIds.front(), 1);
    EXPECT_EQ(out->numScheduledTokens.front(), 4); // 1 + 3 (max_tokens 5 allows 3 too)
    EXPECT_TRUE(out->preemptedIds.empty());
    EXPECT_EQ(out->reqIds.size(), 1u) << "request 2 finds no free block this step";
    EXPECT_EQ(s.stats().numFreeBlocks, 0);
    updateCsr(s, {1}, {{30}}); // rejected: 30 goes to position 4 (block 3); block 4 was lookahead only
    EXPECT_EQ(s.getBlockIds(1), (std::vector<BlockId>{1, 2, 3}));
    EXPECT_EQ(s.stats().numFreeBlocks, 1);
}

TEST(SpeculativeTest, RollbackFreesExactlyTheLookaheadBlocks)
{
    Scheduler s(specConfig(2)); // blocks of 2 tokens
    s.addRequest(1, {1, 2, 3}, params(20));
    s.schedule(); // blocks 1, 2
    updateCsr(s, {1}, {{10}}, {{11, 12, 13, 14, 15}});
    auto const out = s.schedule(); // positions 3..8: blocks 3, 4, 5 are lookahead
    EXPECT_EQ(rowBlocks(*out, 0), (std::vector<BlockId>{3, 4, 5}));
    EXPECT_EQ(s.stats().numFreeBlocks, 11);
    updateCsr(s, {1}, {{11, 70}}); // 1 accepted: positions 3, 4 hold -> 3 blocks (5 tokens)
    EXPECT_EQ(s.getNumComputedTokens(1), 5);
    EXPECT_EQ(s.getBlockIds(1), (std::vector<BlockId>{1, 2, 3}));
    EXPECT_EQ(s.stats().numFreeBlocks, 13);
    auto const free = s.freeListForTesting();
    ASSERT_GE(free.size(), 3u);
    EXPECT_EQ((std::vector<BlockId>(free.begin(), free.begin() + 3)), (std::vector<BlockId>{4, 5, 6}));
}

// ------------------------------------------------------------------------------- abort, failure, preemption

TEST(SpeculativeTest, AbortWithLookaheadAllocatedFreesEverything)
{
    Scheduler s(specConfig());
    startWithProposals(s, params(20));
    EXPECT_EQ(s.stats().numFreeBlocks, 13);
    EXPECT_TRUE(s.abort(1));
    EXPECT_EQ(s.stats().numFreeBlocks, 16);
    auto const res = updateCsr(s, {}, {}); // the aborted row is not owed a token
    EXPECT_TRUE(res.finishedIds.empty());
    auto const next = s.schedule();
    EXPECT_EQ(next->finishedIds, std::vector<ReqId>{1});
    EXPECT_EQ(next->finishReasons, std::vector<std::int32_t>{static_cast<std::int32_t>(FinishReason::kABORTED)});
}

TEST(SpeculativeTest, FailedStepRollsBackTheLookaheadAndDropsTheDrafts)
{
    Scheduler s(specConfig());
    startWithProposals(s, params(20));
    s.update(nullptr, nullptr, 0); // the forward failed
    EXPECT_EQ(s.getNumComputedTokens(1), 6);
    EXPECT_EQ(s.getBlockIds(1), (std::vector<BlockId>{1, 2}));
    auto const next = s.schedule();
    EXPECT_EQ(next->numScheduledTokens, std::vector<std::int32_t>{1});
    EXPECT_EQ(next->blockTableReset, std::vector<std::uint8_t>{1});
    EXPECT_EQ(rowBlocks(*next, 0), (std::vector<BlockId>{1, 2}));
}

TEST(SpeculativeTest, PreemptedRequestDropsItsDrafts)
{
    SchedulerConfig c = specConfig(2, 32, 6); // 5 usable blocks of 2
    Scheduler s(c);
    s.addRequest(1, {1, 2, 3}, params(7));
    s.addRequest(2, {4, 5, 6}, params(7));
    s.schedule(); // 1: blocks 1, 2; 2: blocks 3, 4
    updateCsr(s, {1, 2}, {{10}, {20}}, {{}, {21, 22}});
    // Request 1's decode at position 3 fits block 2; request 2 gets block 5 for its proposals
    // (positions 3..5), nothing is preempted.
    auto const out = s.schedule();
    EXPECT_EQ(out->numScheduledTokens, (std::vector<std::int32_t>{1, 3}));
    updateCsr(s, {1, 2}, {{11}, {21, 22, 23}}, {{}, {24, 25}});
    EXPECT_EQ(s.getBlockIds(2), (std::vector<BlockId>{3, 4, 5}));
    // Now 1 needs a block for position 4 and none is free: request 2 (later) is the victim; its
    // blocks, lookahead included, are freed and its proposals dropped.
    auto const next = s.schedule();
    EXPECT_EQ(next->preemptedIds, std::vector<ReqId>{2});
    EXPECT_EQ(next->reqIds, std::vector<ReqId>{1});
    EXPECT_EQ(next->specTokenIds.size(), 0u);
    EXPECT_EQ(s.stats().numFreeBlocks, 2);
}

// ------------------------------------------------------------------------------- prefix cache

TEST(SpeculativeTest, PrefixCacheNeverRegistersRejectedTokens)
{
    Scheduler s(specConfig(4, 32, 17));
    s.addRequest(1, {1, 2, 3, 4}, params(20));
    s.schedule();                                           // block 1 = [1 2 3 4], registered
    updateCsr(s, {1}, {{10}}, {{11, 12, 13, 14}});
    s.schedule();                                           // positions 4..8: blocks 2 (own), 3 (lookahead)
    updateCsr(s, {1}, {{11, 99}});                          // 12, 13, 14 rejected: [1 2 3 4 10 11 99]
    EXPECT_EQ(s.stats().numCachedBlocks, 1);
    EXPECT_EQ(s.getBlockIds(1), (std::vector<BlockId>{1, 2}));
    // Two plain decodes: 99 at position 6 and 5 at position 7 -> block 2 = [10 11 99 5] is full.
    s.schedule();
    updateCsr(s, {1}, {{5}});
    s.schedule();
    updateCsr(s, {1}, {{6}});
    EXPECT_EQ(s.stats().numCachedBlocks, 2);
    // The rejected content hits one block only; the accepted content hits two.
    s.addRequest(2, {1, 2, 3, 4, 10, 11, 12, 13, 14}, params(1));
    s.addRequest(3, {1, 2, 3, 4, 10, 11, 99, 5, 6}, params(1));
    auto const out = s.schedule();
    ASSERT_EQ(out->reqIds, (std::vector<ReqId>{1, 2, 3}));
    EXPECT_EQ(out->numComputedTokens[1], 4);
    EXPECT_EQ(out->numComputedTokens[2], 8);
}

// ------------------------------------------------------------------------------- the contract

TEST(SpeculativeTest, MalformedUpdatesAreRefusedAndChangeNothing)
{
    Scheduler s(specConfig());
    startWithProposals(s, params(20));
    EXPECT_THROW(updateCsr(s, {1}, {{11, 12, 13, 14, 15, 16}}), ContractError); // > k + 1 tokens
    EXPECT_THROW(updateCsr(s, {1}, {{}}), ContractError);                       // a row without a token
    EXPECT_THROW(updateCsr(s, {1}, {{11, -3}}), ContractError);                 // negative id
    EXPECT_THROW(updateCsr(s, {1}, {{11}}, {{-1}}), ContractError);             // negative draft
    EXPECT_EQ(s.getNumComputedTokens(1), 11);
    auto const res = updateCsr(s, {1}, {{11, 12, 13, 14, 15}});
    EXPECT_EQ(res.numAppended, std::vector<std::int32_t>{5});
    EXPECT_EQ(s.getNumComputedTokens(1), 11);
}

TEST(SpeculativeTest, MultiTokenRowsWithoutProposalsAreRefused)
{
    Scheduler s(specConfig());
    s.addRequest(1, {1, 2, 3}, params(5));
    s.schedule();
    EXPECT_THROW(updateCsr(s, {1}, {{4, 5}}), ContractError);
    auto const res = updateCsr(s, {1}, {{4}});
    EXPECT_EQ(res.numAppended, std::vector<std::int32_t>{1});
}
