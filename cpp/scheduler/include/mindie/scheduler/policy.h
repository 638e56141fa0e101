// SPDX-License-Identifier: Apache-2.0
/// @file policy.h
/// @brief Strategy objects of the Scheduler: the scheduling policy (fcfs, priority, static,
/// prefill_first) decides the order of a step's phases and the admission rules; the PD role
/// (colocated, prefill, decode) decides admission of prefilled requests and the hand-off after a
/// sampled token. The Scheduler calls them; they hold no request state and know nothing of Python.
#pragma once

#include "mindie/scheduler/common.h"
#include "mindie/scheduler/request.h"

#include <memory>

namespace mindie::scheduler
{

/// @brief The phases of one step a SchedulingPolicy may run, in the order it chooses (implemented by
/// the Scheduler over the step's token budget and rows).
class StepPhases
{
public:
    /// @brief priority: preempts running requests valued below the head of the waiting queue.
    virtual void preemptForPriority() = 0;
    /// @brief Schedules the running decodes (collects the running prefill candidates on the way).
    virtual void scheduleRunningDecodes() = 0;
    /// @brief Schedules the next chunks of running prefills.
    virtual void scheduleRunningPrefills() = 0;
    /// @brief Admits waiting requests while budget, sequences and blocks allow.
    virtual void admitWaiting() = 0;
    /// @brief True once this step preempted a request to free blocks (admission then stops).
    [[nodiscard]] virtual bool preemptedForBlocks() const = 0;
    /// @brief True when no request was running at the start of the step.
    [[nodiscard]] virtual bool runningWasEmpty() const = 0;
    /// @brief True when this step has scheduled a prefill chunk.
    [[nodiscard]] virtual bool hasPrefillRows() const = 0;

protected:
    ~StepPhases() = default;
};

/// @brief Admission order, chunking and the phase order of a step.
class SchedulingPolicy
{
public:
    virtual ~SchedulingPolicy() = default;
    /// @brief The policy for `policy` (the config is validated first).
    static std::unique_ptr<SchedulingPolicy> create(Policy policy);

    /// @brief Runs the phases of one step.
    virtual void planStep(StepPhases& phases) const = 0;
    /// @brief The priority field of a request's sort key (0 unless the policy orders by priority).
    [[nodiscard]] virtual std::int32_t sortPriority(RequestParams const& /*params*/) const { return 0; }
    /// @brief False when the policy computes whole prompts (chunking off whatever the config says).
    [[nodiscard]] virtual bool allowsChunking() const { return true; }
    /// @brief True when a request joins the batch even if its prompt does not fit this step's budget
    /// (it computes in a later step), and admission goes on with an exhausted budget.
    [[nodiscard]] virtual bool joinsWithoutBudget() const { return false; }
};

/// @brief What the instance's PD role adds to admission and to the end of a request's prefill.
class RolePolicy
{
public:
    virtual ~RolePolicy() = default;
    static std::unique_ptr<RolePolicy> create(Role role);

    /// @brief True when add_prefilled() (a request prefilled elsewhere) is accepted.
    [[nodiscard]] virtual bool admitsPrefilled() const { return false; }
    /// @brief The finish reason after a sampled token given the stop checks' `reason` (prefill: every
    /// request hands off after its first token).
    [[nodiscard]] virtual FinishReason afterSample(FinishReason reason) const { return reason; }
    /// @brief False when afterSample() returns its argument unchanged (update() then skips the call
    /// per row).
    [[nodiscard]] virtual bool handsOffAfterSample() const { return false; }
};

} // namespace mindie::scheduler
