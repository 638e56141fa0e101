// SPDX-License-Identifier: Apache-2.0
/// @file scheduler.h
/// @brief The continuous-batching scheduler: one schedule() and one update() per engine step.
/// Decodes first, then prefill chunks (SplitFuse) under a token budget and a sequence cap; prefix
/// caching; preemption by recompute; speculative lookahead slots; the fcfs / priority / static /
/// prefill_first policies and the PD roles are strategy objects (policy.h).
/// All public methods are thread-safe (one internal mutex), so the binding may drop the GIL.
///
/// Speculation (contract 3). update() may store proposals ("drafts") for a request's next tokens.
/// The next schedule() gives that decode row 1 + k tokens: the last sampled token followed by k
/// proposals, k = min(len(drafts), budget left - 1, max_tokens - outputs - 1, max_model_len -
/// tokens - 1, slots of the blocks it can get without preempting anyone). The row's proposals are
/// reported in spec_offsets / spec_token_ids and are the last k tokens of the row in
/// input_token_ids; the blocks for them (lookahead blocks) are allocated with the row.
/// update() then takes 1 <= a <= k + 1 tokens for the row, appends them one at a time with the stop
/// checks on each, and rolls num_computed_tokens back to the KV that holds: the row's first token
/// plus the leading appended tokens equal to the proposals at their positions (at most a - 1). Blocks
/// allocated only for the lookahead past the block of the next token's position are freed, and the row's next
/// schedule() sends block_table_reset = true with its whole (shorter) table: a worker that keeps
/// tables across steps must drop the old row when it sees the reset. Registration in the prefix cache
/// happens after the rollback, so a rejected token never reaches the cache. A step reported failed
/// (an empty update()) rolls the whole row back, frees its lookahead blocks and drops its drafts;
/// preemption and abort free every block, lookahead included, and drop the drafts.
#pragma once

#include "mindie/scheduler/blockManager.h"
#include "mindie/scheduler/common.h"
#include "mindie/scheduler/policy.h"
#include "mindie/scheduler/request.h"

#include <atomic>
#include <memory>
#include <mutex>
#include <set>
#include <utility>
#include <unordered_map>
#include <vector>

namespace mindie::scheduler
{

/// @brief Struct-of-arrays result of one schedule() (contract 2). B rows, T tokens.
struct SchedulerOutput
{
    std::vector<ReqId> reqIds;                ///< [B] batch order: decodes, then prefill chunks
    std::vector<std::int32_t> numScheduledTokens; ///< [B]
    std::vector<std::int32_t> numComputedTokens;  ///< [B] position of the first scheduled token
    std::vector<TokenId> inputTokenIds;       ///< [T]
    std::vector<std::int32_t> specOffsets;    ///< [B+1] CSR offsets into specTokenIds
    std::vector<TokenId> specTokenIds;        ///< [*] proposed tokens: the last ones of each row's tokens
    std::vector<std::uint8_t> sampleMask;     ///< [B] bool
    std::vector<std::uint8_t> blockTableReset; ///< [B] bool: the row's table restarts from its new blocks
    std::vector<std::int32_t> newBlockOffsets; ///< [B+1] CSR offsets into newBlockIds
    std::vector<BlockId> newBlockIds;         ///< [*]
    std::vector<ReqId> preemptedIds;          ///< [*]
    std::vector<ReqId> finishedIds;           ///< [*] finished or aborted since the last schedule()
    std::vector<std::int32_t> finishReasons;  ///< [*] FinishReason of each finishedIds entry
    std::int64_t numBatchedTokens{0};         ///< T

    /// @brief Empties every array and keeps its capacity (a reused buffer allocates nothing).
    void clear() noexcept;
};

/// @brief The result message of one step, as update() reads it: S sampling rows in batch order,
/// each with 1..k+1 tokens (CSR) and optional proposals for the next step (CSR). Pointers are
/// borrowed for the call only.
struct UpdateInput
{
    ReqId const* reqIds{nullptr};             ///< [S]
    size_t numRows{0};                        ///< S
    std::int32_t const* tokenOffsets{nullptr}; ///< [S+1], or nullptr: one token per row
    TokenId const* tokenIds{nullptr};         ///< [tokenOffsets[S]] (or [S])
    size_t numTokenIds{0};
    std::int32_t const* draftOffsets{nullptr}; ///< [S+1], or nullptr: no proposals
    TokenId const* draftTokenIds{nullptr};    ///< [draftOffsets[S]]
    size_t numDraftTokenIds{0};
};

/// @brief Requests finished by one update(), and the tokens each row took.
struct UpdateResult
{
    std::vector<ReqId> finishedIds;
    std::vector<std::int32_t> finishReasons;
    std::vector<std::int32_t> numAppended; ///< [S] tokens appended per row (stops at the finishing one)
};

struct SchedulerStats
{
    SizeType32 numBlocks{0};
    SizeType32 numFreeBlocks{0};
    SizeType32 numCachedBlocks{0};
    std::int64_t prefixCacheQueries{0}; ///< prompt tokens looked up
    std::int64_t prefixCacheHits{0};    ///< of which found in the cache
    std::int64_t numPreemptions{0};
    SizeType32 numWaiting{0};
    SizeType32 numRunning{0};
};

class Scheduler
{
public:
    /// @brief Validates `config` (throws ConfigError) and creates the block pool.
    explicit Scheduler(SchedulerConfig const& config);

    /// @brief Admits a request to the waiting queue (throws RequestRejectedError naming the field if
    /// it can never run).
    void addRequest(ReqId id, std::vector<TokenId> promptTokenIds, RequestParams params);
    /// @brief The checks of addRequest on the request's fields (all but the id), without side effects:
    /// callers validate before they assign ids or state (the one place of these rules).
    void checkRequest(std::vector<TokenId> const& promptTokenIds, RequestParams const& params) const;
    /// @brief Plans one step. Advances num_computed_tokens of every scheduled request.
    std::shared_ptr<SchedulerOutput> schedule();
    /// @brief Takes the step's result (see the file comment): appends each row's tokens with stop
    /// checks, rolls back rejected lookahead, stores the drafts. Throws ContractError (nothing
    /// changed) on a malformed message.
    UpdateResult update(UpdateInput const& in);
    /// @brief One sampled token per sampling request of the last schedule(), in batch order.
    UpdateResult update(ReqId const* reqIds, TokenId const* sampledTokenIds, size_t n);
    /// @brief Aborts a live request in any state; false if the id is not live.
    bool abort(ReqId id);
    /// @brief Finishes a live request with `reason` (e.g. a stop string); false if not live.
    bool finish(ReqId id, FinishReason reason);
    /// @brief Prefill role: frees the pinned blocks of a PREFILL_DONE request.
    void release(ReqId id);
    /// @brief Decode role: admits a request prefilled elsewhere and returns the blocks its KV goes to.
    std::vector<BlockId> addPrefilled(
        ReqId id, std::vector<TokenId> promptTokenIds, std::vector<TokenId> const& outputTokenIds, RequestParams params);
    /// @brief Decode role: the KV of an add_prefilled request has arrived; it queues to decode.
    void kvReady(ReqId id);

    [[nodiscard]] std::vector<BlockId> getBlockIds(ReqId id) const;
    [[nodiscard]] SizeType32 getNumComputedTokens(ReqId id) const;
    [[nodiscard]] bool hasUnfinished() const;
    [[nodiscard]] SizeType32 numWaiting() const;
    [[nodiscard]] SizeType32 numRunning() const;
    [[nodiscard]] SchedulerStats stats() const;
    [[nodiscard]] SchedulerConfig const& config() const noexcept { return mConfig; }

    /// @brief Test hooks (see BlockManager).
    void setHashMaskForTesting(BlockHash mask);
    [[nodiscard]] std::vector<BlockId> freeListForTesting() const;

private:
    struct KeyLess
    {
        bool operator()(Request const* a, Request const* b) const noexcept { return a->key < b->key; }
    };
    struct Row
    {
        Request* req;
        SizeType32 numNew; ///< tokens of the row, proposals included
        SizeType32 numComputedBefore;
        SizeType32 numSpec{0}; ///< of which proposals (the last ones)
    };
    class Phases;
    enum class Admit
    {
        kOK,
        kSKIP,
        kSTOP
    };

    Request& lookup(ReqId id) const;
    Request& makeRequest(ReqId id, std::vector<TokenId>&& tokens, SizeType32 numPromptTokens, RequestParams&& params);
    SizeType32 chunkFor(Request const& r, SizeType32 budget) const;
    void scheduleRunning(bool decodes, SizeType32& budget, std::vector<Row>& rows);
    bool scheduleOne(Request& r, SizeType32& budget, std::vector<Row>& rows);
    SizeType32 scheduleLookahead(Request& r, SizeType32 budgetLeft);
    void reserveNextBlock(Request& r, SizeType32 numTokens);
    void trimBlocks(Request& r, SizeType32 keep);
    void validateUpdate(UpdateInput const& in);
    void checkRowCount(UpdateInput const& in, size_t row, std::int64_t count, SizeType32 numSpec) const;
    bool allocateOrPreempt(Request& r, SizeType32 numTokens);
    Admit tryAdmit(Request& r, SizeType32& budget, std::vector<Row>& decodes, std::vector<Row>& prefills);
    bool chunkAllowed(Request const& r) const;
    void validateNew(ReqId id, std::vector<TokenId> const& prompt, RequestParams const& params) const;
    void validateFields(std::vector<TokenId> const& prompt, RequestParams const& params) const;
    void admitWaiting(SizeType32& budget, std::vector<Row>& decodes, std::vector<Row>& prefills);
    void priorityPreempt();
    bool isDeferredChild(Request const& r) const;
    void preempt(Request& r);
    void registerFullBlocks(Request& r);
    void insertRunning(Request* r);
    void eraseRunning(Request* r);
    void finishRequest(Request& r, FinishReason reason, bool removeFromQueues);
    void dropRequest(ReqId id);
    FinishReason checkStop(Request const& r, TokenId token) const;
    [[nodiscard]] bool chunkingOn() const noexcept;
    void buildOutput(SchedulerOutput& out, std::vector<Row> const& decodes, std::vector<Row> const& prefills);

    SchedulerConfig mConfig;
    std::unique_ptr<SchedulingPolicy> mPolicy;
    std::unique_ptr<RolePolicy> mRole;
    BlockManager mBlocks;
    mutable std::mutex mMutex;
    RequestPool mPool; ///< declared before every holder of its objects, so destroyed after them
    std::unordered_map<ReqId, RequestPool::Ptr> mRequests;
    std::set<Request*, KeyLess> mWaiting;
    std::vector<Request*> mRunning; ///< sorted by key
    SizeType32 mNumAwaitingKv{0};
    std::vector<ReqId> mPendingFinishedIds;
    std::vector<std::int32_t> mPendingFinishReasons;
    std::vector<ReqId> mPreemptedThisStep;
    std::vector<Request*> mLastRows;        ///< rows of the last schedule(), batch order
    std::vector<Request*> mLastSampleReqs;  ///< of which those that sample
    std::vector<ReqId> mLastSampleIds;      ///< their ids (validation touches no request)
    std::vector<RequestPool::Ptr> mGraveyard; ///< dropped while an update() is pending
    std::vector<std::int64_t> mScratchMatch;
    bool mAwaitingUpdate{false};
    bool mUpdateAllRows{false}; ///< validateUpdate: the message has every sampling row in order
    bool mPreemptedForBlocks{false};
    std::int64_t mStep{0};
    std::int64_t mPrefixQueries{0};
    std::int64_t mPrefixHits{0};
    std::int64_t mNumPreemptions{0};
    std::vector<BlockId> mScratchBlocks;
    /// @brief Appends one sampling row's tokens, rolls back its rejected lookahead, stores its drafts;
    /// returns the reason it finished (kNONE: still running).
    __attribute__((always_inline)) inline FinishReason appendRow(
        Request& r, UpdateInput const& in, size_t row, bool handsOff, std::int32_t& numAppended);
    std::vector<BlockId> mScratchFree;
    std::vector<Row> mDecodeRows;  ///< reused across steps (no per-step allocation)
    std::vector<Row> mPrefillRows;
    std::vector<Request*> mPrefillCandidates; ///< running non-decodes of this step, in key order
    bool mCandidatesCollected{false};
    /// @brief Output buffers of recent steps: schedule() refills one that no caller holds any more
    /// (use_count 1), so a step allocates no arrays once their capacities have grown.
    std::vector<std::shared_ptr<SchedulerOutput>> mOutputPool;
    std::shared_ptr<SchedulerOutput> freeOutputBuffer();
};

} // namespace mindie::scheduler
