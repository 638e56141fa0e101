// SPDX-License-Identifier: Apache-2.0
// GoogleTest of the single sources of truth: SchedulerConfig::validate() names the field, request
// checks throw RequestRejectedError with field(), checkRequest() has no side effect, and each
// policy / role enum value has its strategy object. Expected values follow common.h and policy.h.
#include "mindie/scheduler/policy.h"
#include "mindie/scheduler/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

using namespace mindie::scheduler;

namespace
{
SchedulerConfig small()
{
    SchedulerConfig c;
    c.numBlocks = 9; // 8 usable
    c.blockSize = 4;
    c.maxNumBatchedTokens = 8;
    c.maxNumSeqs = 2;
    c.maxModelLen = 40;
    return c;
}

RequestParams params(SizeType32 maxTokens)
{
    RequestParams p;
    p.maxTokens = maxTokens;
    return p;
}

std::string rejectedField(Scheduler const& s, std::vector<TokenId> const& prompt, RequestParams const& p)
{
    try
    {
        s.checkRequest(prompt, p);
    }
    catch (RequestRejectedError const& e)
    {
        EXPECT_EQ(std::string(e.what()).rfind(e.field(), 0), 0u) << "the message starts with the field";
        return e.field();
    }
    return "";
}
} // namespace

TEST(ContractTest, ConfigValidateNamesTheField)
{
    struct Case
    {
        char const* field;
        void (*bad)(SchedulerConfig&);
    };
    Case const cases[] = {
        {"num_blocks", [](SchedulerConfig& c) { c.numBlocks = 1; }},
        {"block_size", [](SchedulerConfig& c) { c.blockSize = 0; }},
        {"max_num_batched_tokens", [](SchedulerConfig& c) { c.maxNumBatchedTokens = 0; }},
        {"max_num_seqs", [](SchedulerConfig& c) { c.maxNumSeqs = -1; }},
        {"max_model_len", [](SchedulerConfig& c) { c.maxModelLen = 0; }},
        {"policy", [](SchedulerConfig& c) { c.policy = static_cast<Policy>(9); }},
        {"role", [](SchedulerConfig& c) { c.role = static_cast<Role>(-1); }},
    };
    EXPECT_NO_THROW(small().validate());
    for (Case const& k : cases)
    {
        SCOPED_TRACE(k.field);
        SchedulerConfig c = small();
        k.bad(c);
        try
        {
            Scheduler s(c);
            ADD_FAILURE() << "no ConfigError";
        }
        catch (ConfigError const& e)
        {
            EXPECT_EQ(std::string(e.what()).rfind(k.field, 0), 0u) << e.what();
        }
    }
}

TEST(ContractTest, RequestChecksNameTheFieldAndHaveNoSideEffect)
{
    Scheduler s(small());
    RequestParams p = params(4);
    EXPECT_EQ(rejectedField(s, {}, p), "prompt_token_ids");
    EXPECT_EQ(rejectedField(s, {1, -2}, p), "prompt_token_ids");
    EXPECT_EQ(rejectedField(s, {1}, params(0)), "max_tokens");
    EXPECT_EQ(rejectedField(s, std::vector<TokenId>(38, 1), p), "max_tokens");      // 42 > 40
    EXPECT_EQ(rejectedField(s, std::vector<TokenId>(40, 1), params(1)), "prompt_token_ids");
    EXPECT_EQ(rejectedField(s, std::vector<TokenId>(30, 1), p), "max_tokens");      // 34 tokens > 32 slots
    RequestParams q = p;
    q.minTokens = 5;
    EXPECT_EQ(rejectedField(s, {1}, q), "min_tokens");
    q = p;
    q.stopTokenIds = {-1};
    EXPECT_EQ(rejectedField(s, {1}, q), "stop_token_ids");
    q = p;
    q.eosTokenIds = {-3};
    EXPECT_EQ(rejectedField(s, {1}, q), "eos_token_ids");
    EXPECT_EQ(rejectedField(s, {1, 2}, p), "");
    EXPECT_FALSE(s.hasUnfinished());
    s.addRequest(1, {1, 2}, p);
    try
    {
        s.addRequest(1, {1, 2}, p);
        ADD_FAILURE() << "duplicate id admitted";
    }
    catch (RequestRejectedError const& e)
    {
        EXPECT_EQ(e.field(), "req_id");
    }
}

TEST(ContractTest, EveryPolicyAndRoleHasItsStrategy)
{
    for (auto p : {Policy::kFCFS, Policy::kPRIORITY, Policy::kSTATIC, Policy::kPREFILL_FIRST})
    {
        auto const policy = SchedulingPolicy::create(p);
        ASSERT_NE(policy, nullptr);
        RequestParams rp;
        rp.priority = 3;
        EXPECT_EQ(policy->sortPriority(rp), p == Policy::kPRIORITY ? 3 : 0);
        EXPECT_EQ(policy->allowsChunking(), p != Policy::kPREFILL_FIRST);
        EXPECT_EQ(policy->joinsWithoutBudget(), p == Policy::kSTATIC);
    }
    for (auto r : {Role::kCOLOCATED, Role::kPREFILL, Role::kDECODE})
    {
        auto const role = RolePolicy::create(r);
        EXPECT_EQ(role->admitsPrefilled(), r == Role::kDECODE);
        EXPECT_EQ(role->afterSample(FinishReason::kNONE),
            r == Role::kPREFILL ? FinishReason::kPREFILL_DONE : FinishReason::kNONE);
        EXPECT_EQ(role->afterSample(FinishReason::kEOS), FinishReason::kEOS);
    }
}

TEST(ContractTest, HeldOutputsAreNeverRefilled)
{
    // schedule() reuses an output buffer only when no caller holds it: every held plan keeps its
    // values over more steps than the buffers kept, and a dropped one is reused.
    SchedulerConfig c = small();
    c.numBlocks = 33;
    c.maxNumSeqs = 4;
    Scheduler s(c);
    for (ReqId id = 1; id <= 3; ++id)
    {
        s.addRequest(id, {static_cast<TokenId>(id), 2, 3, 4, 5}, params(20));
    }
    std::vector<std::shared_ptr<SchedulerOutput>> held;
    std::vector<std::vector<TokenId>> inputs;
    std::vector<std::vector<ReqId>> ids;
    for (int step = 0; step < 10; ++step)
    {
        auto out = s.schedule();
        std::vector<ReqId> sampled;
        for (size_t i = 0; i < out->reqIds.size(); ++i)
        {
            if (out->sampleMask[i])
            {
                sampled.push_back(out->reqIds[i]);
            }
        }
        std::vector<TokenId> tokens(sampled.size(), 10 + step);
        s.update(sampled.data(), tokens.data(), sampled.size());
        for (auto const& h : held)
        {
            EXPECT_NE(h.get(), out.get()) << "a held buffer was refilled at step " << step;
        }
        if (step != 8) // one dropped: its buffer may be refilled later
        {
            held.push_back(out);
            inputs.push_back(out->inputTokenIds);
            ids.push_back(out->reqIds);
        }
    }
    for (size_t i = 0; i < held.size(); ++i)
    {
        EXPECT_EQ(held[i]->inputTokenIds, inputs[i]) << i;
        EXPECT_EQ(held[i]->reqIds, ids[i]) << i;
    }
}

TEST(ContractTest, UnitOffsetsEqualTheOneTokenForm)
{
    // update() with offsets [0, 1, ..., S] (the runner's CSR of one token each) is the two-argument
    // form: same finishes, same appended counts, same next plan.
    auto run = [](bool csr)
    {
        SchedulerConfig c = small();
        c.numBlocks = 33;
        c.maxNumSeqs = 3;
        Scheduler s(c);
        RequestParams p = params(4);
        p.stopTokenIds = {12};
        for (ReqId id = 1; id <= 3; ++id)
        {
            s.addRequest(id, {static_cast<TokenId>(id), 7, 8}, p);
        }
        std::vector<std::int32_t> log;
        for (int step = 0; step < 5 && s.hasUnfinished(); ++step)
        {
            auto out = s.schedule();
            std::vector<ReqId> sampled;
            for (size_t i = 0; i < out->reqIds.size(); ++i)
            {
                if (out->sampleMask[i])
                {
                    sampled.push_back(out->reqIds[i]);
                }
            }
            std::vector<TokenId> tokens;
            std::vector<std::int32_t> offsets{0};
            for (size_t i = 0; i < sampled.size(); ++i)
            {
                tokens.push_back(static_cast<TokenId>(10 + step + static_cast<int>(i)));
                offsets.push_back(static_cast<std::int32_t>(i + 1));
            }
            UpdateInput in;
            in.reqIds = sampled.data();
            in.numRows = sampled.size();
            in.tokenOffsets = csr ? offsets.data() : nullptr;
            in.tokenIds = tokens.data();
            in.numTokenIds = tokens.size();
            UpdateResult r = s.update(in);
            log.insert(log.end(), out->inputTokenIds.begin(), out->inputTokenIds.end());
            log.push_back(-1);
            for (size_t i = 0; i < r.finishedIds.size(); ++i)
            {
                log.push_back(static_cast<std::int32_t>(r.finishedIds[i]));
                log.push_back(1000 + r.finishReasons[i]);
            }
            log.insert(log.end(), r.numAppended.begin(), r.numAppended.end());
            log.push_back(-2);
        }
        return log;
    };
    std::vector<std::int32_t> const plain = run(false);
    EXPECT_EQ(run(true), plain);
    EXPECT_NE(std::find(plain.begin(), plain.end(), 1000 + static_cast<std::int32_t>(FinishReason::kSTOP_TOKEN)),
        plain.end())
        << "the trace reaches a stop token";
}
