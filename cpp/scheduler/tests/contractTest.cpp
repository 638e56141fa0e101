// SPDX-License-Identifier: Apache-2.0
// GoogleTest of the single sources of truth: SchedulerConfig::validate() names the field, request
// checks throw RequestRejectedError with field(), checkRequest() has no side effect, and each
// policy / role enum value has its strategy object. Expected values follow common.h and policy.h.
#include "mindie/scheduler/policy.h"
#include "mindie/scheduler/scheduler.h"

#include <gtest/gtest.h>

#include <string>

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
