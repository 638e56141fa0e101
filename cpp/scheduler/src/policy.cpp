// SPDX-License-Identifier: Apache-2.0
// Scheduling policies, PD roles and the validation of SchedulerConfig (see policy.h, common.h).
#include "mindie/scheduler/policy.h"

namespace mindie::scheduler
{

void SchedulerConfig::validate() const
{
    MINDIE_CHECK(numBlocks >= 2, ConfigError, "num_blocks must be >= 2 (block 0 is the null block), got " << numBlocks);
    MINDIE_CHECK(blockSize >= 1, ConfigError, "block_size must be >= 1, got " << blockSize);
    MINDIE_CHECK(maxNumBatchedTokens >= 1, ConfigError, "max_num_batched_tokens must be >= 1, got " << maxNumBatchedTokens);
    MINDIE_CHECK(maxNumSeqs >= 1, ConfigError, "max_num_seqs must be >= 1, got " << maxNumSeqs);
    MINDIE_CHECK(maxModelLen >= 1, ConfigError, "max_model_len must be >= 1, got " << maxModelLen);
    MINDIE_CHECK(numLookaheadSlots >= 0 && numLookaheadSlots <= 1, ConfigError,
        "num_lookahead_slots must be 0 or 1, got " << numLookaheadSlots);
    auto const p = static_cast<std::int32_t>(policy);
    MINDIE_CHECK(p >= 0 && p <= 3, ConfigError, "policy: unknown value " << p);
    auto const r = static_cast<std::int32_t>(role);
    MINDIE_CHECK(r >= 0 && r <= 2, ConfigError, "role: unknown value " << r);
}

namespace
{

/// Decodes first, then running prefill chunks, then admissions; arrival order.
class FcfsPolicy : public SchedulingPolicy
{
public:
    void planStep(StepPhases& phases) const override
    {
        phases.scheduleRunningDecodes();
        phases.scheduleRunningPrefills();
        if (mayAdmit(phases) && !phases.preemptedForBlocks())
        {
            phases.admitWaiting();
        }
    }

protected:
    [[nodiscard]] virtual bool mayAdmit(StepPhases const& /*phases*/) const { return true; }
};

/// fcfs steps ordered by (priority, arrival, id), preempting lower-priority running requests first.
class PriorityPolicy final : public FcfsPolicy
{
public:
    void planStep(StepPhases& phases) const override
    {
        phases.preemptForPriority();
        FcfsPolicy::planStep(phases);
    }
    [[nodiscard]] std::int32_t sortPriority(RequestParams const& params) const override { return params.priority; }
};

/// Benchmark only: a new batch is admitted when the previous one has finished.
class StaticPolicy final : public FcfsPolicy
{
public:
    [[nodiscard]] bool joinsWithoutBudget() const override { return true; }

protected:
    [[nodiscard]] bool mayAdmit(StepPhases const& phases) const override { return phases.runningWasEmpty(); }
};

/// Benchmark only: whole prompts; decodes run only in steps that run no prefill.
class PrefillFirstPolicy final : public SchedulingPolicy
{
public:
    void planStep(StepPhases& phases) const override
    {
        phases.scheduleRunningPrefills();
        if (!phases.preemptedForBlocks())
        {
            phases.admitWaiting();
        }
        if (!phases.hasPrefillRows())
        {
            phases.scheduleRunningDecodes();
        }
    }
    [[nodiscard]] bool allowsChunking() const override { return false; }
};

class ColocatedRole final : public RolePolicy
{
};

/// Prefill instance: every request finishes PREFILL_DONE after its first token; its blocks stay
/// pinned until release() (the KV is handed to a decode instance).
class PrefillRole final : public RolePolicy
{
public:
    [[nodiscard]] FinishReason afterSample(FinishReason reason) const override
    {
        return reason == FinishReason::kNONE ? FinishReason::kPREFILL_DONE : reason;
    }
    [[nodiscard]] bool handsOffAfterSample() const override { return true; }
};

/// Decode instance: admits requests prefilled elsewhere (add_prefilled, then kv_ready).
class DecodeRole final : public RolePolicy
{
public:
    [[nodiscard]] bool admitsPrefilled() const override { return true; }
};

} // namespace

std::unique_ptr<SchedulingPolicy> SchedulingPolicy::create(Policy policy)
{
    switch (policy)
    {
    case Policy::kFCFS: return std::make_unique<FcfsPolicy>();
    case Policy::kPRIORITY: return std::make_unique<PriorityPolicy>();
    case Policy::kSTATIC: return std::make_unique<StaticPolicy>();
    case Policy::kPREFILL_FIRST: return std::make_unique<PrefillFirstPolicy>();
    }
    throw ConfigError("policy: unknown value " + std::to_string(static_cast<std::int32_t>(policy)));
}

std::unique_ptr<RolePolicy> RolePolicy::create(Role role)
{
    switch (role)
    {
    case Role::kCOLOCATED: return std::make_unique<ColocatedRole>();
    case Role::kPREFILL: return std::make_unique<PrefillRole>();
    case Role::kDECODE: return std::make_unique<DecodeRole>();
    }
    throw ConfigError("role: unknown value " + std::to_string(static_cast<std::int32_t>(role)));
}

} // namespace mindie::scheduler
