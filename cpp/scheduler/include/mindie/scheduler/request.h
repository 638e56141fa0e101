// SPDX-License-Identifier: Apache-2.0
/// @file request.h
/// @brief The state of one request, owned by the Scheduler. Python never sees this type: it
/// holds the int64 id only.
#pragma once

#include "mindie/scheduler/common.h"

#include <cstddef>
#include <memory>
#include <tuple>
#include <vector>

namespace mindie::scheduler
{

enum class RequestState : std::int32_t
{
    kWAITING = 0,     ///< in the waiting queue (new, preempted, or decode-role with KV ready)
    kRUNNING = 1,     ///< in the running set
    kAWAITING_KV = 2, ///< decode role: blocks allocated, KV not yet received
    kPREFILL_DONE = 3, ///< prefill role: finished, blocks pinned until release()
    kFINISHED = 4      ///< transient: finished inside update(), removed before it returns
};

/// @brief Order of admission and of preemption (the largest key is valued least).
struct SortKey
{
    std::int32_t priority;
    double arrivalTime;
    ReqId id;

    bool operator<(SortKey const& o) const noexcept
    {
        return std::tie(priority, arrivalTime, id) < std::tie(o.priority, o.arrivalTime, o.id);
    }
};

/// @brief Per-request parameters given once at admission. The fields of the stop checks come
/// first: inside Request they fill one cache line (what update() reads per token).
struct RequestParams
{
    SizeType32 maxTokens{1};
    SizeType32 minTokens{0};
    bool ignoreEos{false};
    std::vector<TokenId> eosTokenIds;
    std::vector<TokenId> stopTokenIds;
    std::int32_t priority{0};
    double arrivalTime{0.0};
    ReqId parentId{-1}; ///< n > 1: id of sample 0 (-1: none)
};

/// NOTE: field order is hot-first: one pass over a running request reads its first cache line,
/// the step bookkeeping sits in the second; tokens of a decode come from lastToken, so the token
/// array itself is touched only for prefill chunks and appends.
struct alignas(64) Request
{
    // NOTE: the static_asserts below the struct pin the hot fields to cache lines 0-2.
    // Cache line 0: read by every pass over the running set.
    ReqId id{0};
    std::vector<TokenId> tokens;      ///< prompt followed by the sampled tokens
    std::vector<BlockId> blocks;      ///< block table (append-only while running)
    SizeType32 numPromptTokens{0};
    SizeType32 numComputedTokens{0};
    // Cache line 1: step bookkeeping.
    RequestState state{RequestState::kWAITING};
    SizeType32 numRegisteredBlocks{0}; ///< leading blocks already offered to the prefix cache
    SizeType32 numBlocksSent{0};       ///< blocks the runner already knows
    SizeType32 computedBeforeStep{0};  ///< num_computed_tokens before this step's chunk
    SizeType32 lastNumScheduled{0};    ///< tokens of the last schedule() (rolled back if never sampled)
    TokenId lastToken{0};              ///< tokens.back()
    bool needsTableReset{true};        ///< next schedule sends the whole table with reset=true
    bool awaitingSample{false};        ///< scheduled with sample_mask=true, update() pending
    SizeType32 lastNumSpec{0};         ///< proposed tokens (the row's last ones) of the last schedule()
    std::int64_t scheduledAtStep{-1};  ///< the step that last scheduled it (no per-step reset pass)
    std::vector<TokenId> drafts;       ///< proposals for the tokens after tokens.back() (from update())
    // Cache line 2: the stop checks of update().
    RequestParams params;
    // Cold: admission, preemption and lookahead bookkeeping.
    std::int64_t preemptedAtStep{-1};  ///< not re-admitted in the step that preempted it
    SizeType32 blocksWithoutSpec{0};   ///< blocks held before the lookahead blocks of the last schedule()
    SortKey key{};
    std::vector<BlockHash> hashes;     ///< chained hashes of full blocks (content-based, kept across preemption)

    [[nodiscard]] SizeType32 numTokens() const noexcept { return static_cast<SizeType32>(tokens.size()); }
    [[nodiscard]] SizeType32 numOutputTokens() const noexcept { return numTokens() - numPromptTokens; }
    /// @brief A decode computes exactly the last sampled token of a complete prompt (plus, with
    /// speculation, its proposed tokens; between schedule() and update() numComputedTokens then
    /// counts them and may exceed numTokens()).
    [[nodiscard]] bool isDecode() const noexcept
    {
        return numComputedTokens >= numPromptTokens && numTokens() - numComputedTokens == 1;
    }
};

static_assert(offsetof(Request, state) == 64 && offsetof(Request, drafts) + 2 * sizeof(void*) <= 128,
    "line 1: step bookkeeping, drafts' begin/end included");
static_assert(offsetof(Request, params) == 128 && offsetof(Request, params) + offsetof(RequestParams, priority) <= 192,
    "line 2: the stop-check fields of RequestParams");

/// @brief Slab allocator of Requests: live requests sit side by side in memory, so a pass over
/// the running set walks a few pages instead of one heap page per request.
class RequestPool
{
public:
    struct Deleter
    {
        RequestPool* pool;
        void operator()(Request* r) const noexcept { pool->release(r); }
    };
    using Ptr = std::unique_ptr<Request, Deleter>;

    /// @brief A default-constructed Request from the pool.
    Ptr acquire()
    {
        if (mFree.empty())
        {
            grow();
        }
        Request* r = mFree.back();
        mFree.pop_back();
        return Ptr(r, Deleter{this});
    }

private:
    static constexpr size_t kSlabSize = 256;

    void release(Request* r) noexcept
    {
        *r = Request{};
        mFree.push_back(r); // capacity reserved by grow(): never reallocates here
    }

    void grow()
    {
        auto slab = std::make_unique<Request[]>(kSlabSize);
        mFree.reserve((mSlabs.size() + 1) * kSlabSize);
        for (size_t i = kSlabSize; i-- > 0;)
        {
            mFree.push_back(&slab[i]);
        }
        mSlabs.push_back(std::move(slab));
    }

    std::vector<std::unique_ptr<Request[]>> mSlabs;
    std::vector<Request*> mFree;
};

} // namespace mindie::scheduler
