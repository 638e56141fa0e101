// SPDX-License-Identifier: Apache-2.0
// Request lifecycle of the Scheduler: admission, update (finish checks), abort/finish, PD hand-over,
// queries and statistics (see scheduler.h).
#include "mindie/scheduler/scheduler.h"

#include <algorithm>
#include <cassert>
#include <cmath>

namespace mindie::scheduler
{

namespace
{
bool contains(std::vector<TokenId> const& ids, TokenId token) noexcept
{
    return std::find(ids.begin(), ids.end(), token) != ids.end();
}
} // namespace

Request& Scheduler::lookup(ReqId id) const
{
    auto it = mRequests.find(id);
    MINDIE_CHECK(it != mRequests.end(), UnknownRequestError, "req_id " << id << " is not a live request");
    return *it->second;
}

void Scheduler::validateNew(ReqId id, std::vector<TokenId> const& prompt, RequestParams const& params) const
{
    MINDIE_REJECT(mRequests.find(id) == mRequests.end(), "req_id", id << " is already live");
    validateFields(prompt, params);
}

void Scheduler::validateFields(std::vector<TokenId> const& prompt, RequestParams const& params) const
{
    MINDIE_REJECT(!prompt.empty(), "prompt_token_ids", "is empty");
    for (TokenId t : prompt)
    {
        MINDIE_REJECT(t >= 0, "prompt_token_ids", "has a negative id " << t);
    }
    MINDIE_REJECT(params.maxTokens >= 1, "max_tokens", "must be >= 1, got " << params.maxTokens);
    MINDIE_REJECT(params.minTokens >= 0 && params.minTokens <= params.maxTokens, "min_tokens",
        "must be in [0, max_tokens], got " << params.minTokens);
    MINDIE_REJECT(std::isfinite(params.arrivalTime), "arrival_time", "must be finite");
    for (TokenId t : params.eosTokenIds)
    {
        MINDIE_REJECT(t >= 0, "eos_token_ids", "has a negative id " << t);
    }
    for (TokenId t : params.stopTokenIds)
    {
        MINDIE_REJECT(t >= 0, "stop_token_ids", "has a negative id " << t);
    }
    auto const numPrompt = static_cast<std::int64_t>(prompt.size());
    std::int64_t const total = numPrompt + params.maxTokens;
    // The prompt is at fault when it alone leaves no room for one output token.
    char const* const lengthField = numPrompt >= mConfig.maxModelLen ? "prompt_token_ids" : "max_tokens";
    MINDIE_REJECT(total <= mConfig.maxModelLen, lengthField,
        "is too large: len(prompt_token_ids) + max_tokens = " << numPrompt << " + " << params.maxTokens
                                                   << " exceeds max_model_len = " << mConfig.maxModelLen);
    MINDIE_REJECT(mBlocks.blocksFor(static_cast<SizeType32>(total)) <= mBlocks.numBlocks() - 1, lengthField,
        "is too large: len(prompt_token_ids) + max_tokens = " << total << " needs "
                                                   << mBlocks.blocksFor(static_cast<SizeType32>(total))
                                                   << " KV blocks, the pool has " << mBlocks.numBlocks() - 1);
    MINDIE_REJECT(chunkingOn() || static_cast<SizeType32>(prompt.size()) <= mConfig.maxNumBatchedTokens,
        "prompt_token_ids",
        "has " << prompt.size() << " tokens; without chunked prefill a prompt must fit max_num_batched_tokens = "
               << mConfig.maxNumBatchedTokens);
}

void Scheduler::checkRequest(std::vector<TokenId> const& promptTokenIds, RequestParams const& params) const
{
    std::lock_guard<std::mutex> lock(mMutex);
    validateFields(promptTokenIds, params);
}

Request& Scheduler::makeRequest(
    ReqId id, std::vector<TokenId>&& tokens, SizeType32 numPromptTokens, RequestParams&& params)
{
    RequestPool::Ptr req = mPool.acquire();
    req->id = id;
    req->params = std::move(params);
    std::int32_t const prio = mPolicy->sortPriority(req->params);
    req->key = SortKey{prio, req->params.arrivalTime, id};
    req->tokens = std::move(tokens);
    req->lastToken = req->tokens.back();
    req->numPromptTokens = numPromptTokens;
    Request& ref = *req;
    mRequests.emplace(id, std::move(req));
    return ref;
}

void Scheduler::addRequest(ReqId id, std::vector<TokenId> promptTokenIds, RequestParams params)
{
    std::lock_guard<std::mutex> lock(mMutex);
    validateNew(id, promptTokenIds, params);
    auto const numPrompt = static_cast<SizeType32>(promptTokenIds.size());
    Request& r = makeRequest(id, std::move(promptTokenIds), numPrompt, std::move(params));
    r.tokens.reserve(static_cast<size_t>(numPrompt) + r.params.maxTokens);
    r.state = RequestState::kWAITING;
    mWaiting.insert(&r);
}

FinishReason Scheduler::checkStop(Request const& r, TokenId token) const
{
    RequestParams const& p = r.params;
    if (r.numOutputTokens() >= p.minTokens)
    {
        if (!p.ignoreEos && contains(p.eosTokenIds, token))
        {
            return FinishReason::kEOS;
        }
        if (contains(p.stopTokenIds, token))
        {
            return FinishReason::kSTOP_TOKEN;
        }
    }
    if (r.numOutputTokens() >= p.maxTokens)
    {
        return FinishReason::kLENGTH;
    }
    if (r.numTokens() >= mConfig.maxModelLen)
    {
        return FinishReason::kMAX_MODEL_LEN;
    }
    return FinishReason::kNONE;
}

UpdateResult Scheduler::update(ReqId const* reqIds, TokenId const* sampledTokenIds, size_t n)
{
    UpdateInput in;
    in.reqIds = reqIds;
    in.numRows = n;
    in.tokenIds = sampledTokenIds;
    in.numTokenIds = n;
    return update(in);
}

void Scheduler::validateUpdate(UpdateInput const& in)
{
    size_t const n = in.numRows;
    if (in.tokenOffsets != nullptr)
    {
        MINDIE_CHECK(in.tokenOffsets[0] == 0, ContractError, "token_offsets[0] must be 0, got " << in.tokenOffsets[0]);
        for (size_t j = 0; j < n; ++j)
        {
            MINDIE_CHECK(in.tokenOffsets[j + 1] > in.tokenOffsets[j], ContractError,
                "token_offsets must increase: row " << j << " (req_id " << in.reqIds[j] << ") has no token");
        }
        MINDIE_CHECK(static_cast<size_t>(in.tokenOffsets[n]) == in.numTokenIds, ContractError,
            "token_offsets[S] = " << in.tokenOffsets[n] << " but len(token_ids) = " << in.numTokenIds);
    }
    else
    {
        MINDIE_CHECK(in.numTokenIds == n, ContractError,
            "update(): " << in.numTokenIds << " token ids for " << n << " rows (one each without token_offsets)");
    }
    TokenId smallest = 0; // a reduction the compiler vectorizes; the error path finds the index
    for (size_t i = 0; i < in.numTokenIds; ++i)
    {
        smallest = std::min(smallest, in.tokenIds[i]);
    }
    for (size_t i = 0; smallest < 0 && i < in.numTokenIds; ++i)
    {
        MINDIE_CHECK(in.tokenIds[i] >= 0, ContractError, "token_ids[" << i << "] = " << in.tokenIds[i] << " is negative");
    }
    if (in.draftOffsets != nullptr)
    {
        MINDIE_CHECK(in.draftOffsets[0] == 0, ContractError, "draft_offsets[0] must be 0, got " << in.draftOffsets[0]);
        for (size_t j = 0; j < n; ++j)
        {
            MINDIE_CHECK(in.draftOffsets[j + 1] >= in.draftOffsets[j], ContractError,
                "draft_offsets must not decrease (row " << j << ")");
        }
        MINDIE_CHECK(static_cast<size_t>(in.draftOffsets[n]) == in.numDraftTokenIds, ContractError,
            "draft_offsets[S] = " << in.draftOffsets[n] << " but len(draft_token_ids) = " << in.numDraftTokenIds);
        for (size_t i = 0; i < in.numDraftTokenIds; ++i)
        {
            MINDIE_CHECK(in.draftTokenIds[i] >= 0, ContractError,
                "draft_token_ids[" << i << "] = " << in.draftTokenIds[i] << " is negative");
        }
    }
    else
    {
        MINDIE_CHECK(in.numDraftTokenIds == 0, ContractError, "draft_token_ids given without draft_offsets");
    }
    // req_ids must be a subsequence, in batch order, of the requests that sampled in the last
    // schedule(); a row takes at most 1 + (its proposals) tokens.
    size_t const numExpected = mLastSampleReqs.size();
    if (n == numExpected && std::equal(in.reqIds, in.reqIds + n, mLastSampleIds.data()))
    {
        // The common step: every sampling row, in order. Only rows with several tokens touch a request.
        mUpdateAllRows = true;
        for (size_t k = 0; in.tokenOffsets != nullptr && k < n; ++k)
        {
            std::int64_t const count = in.tokenOffsets[k + 1] - in.tokenOffsets[k];
            if (count > 1)
            {
                checkRowCount(in, k, count, mLastSampleReqs[k]->lastNumSpec);
            }
        }
        return;
    }
    mUpdateAllRows = false;
    mScratchMatch.assign(numExpected, -1);
    size_t j = 0;
    for (size_t k = 0; k < numExpected && j < n; ++k)
    {
        if (in.reqIds[j] == mLastSampleIds[k])
        {
            std::int64_t const count = in.tokenOffsets ? in.tokenOffsets[j + 1] - in.tokenOffsets[j] : 1;
            if (count > 1) // one token always fits
            {
                checkRowCount(in, j, count, mLastSampleReqs[k]->lastNumSpec);
            }
            mScratchMatch[k] = static_cast<std::int64_t>(j++);
        }
    }
    MINDIE_CHECK(j == n, ContractError,
        "update(): req_ids[" << j << "] = " << (j < n ? in.reqIds[j] : -1)
                             << " did not sample in the last schedule() or is out of batch order");
}

void Scheduler::checkRowCount(UpdateInput const& in, size_t row, std::int64_t count, SizeType32 numSpec) const
{
    MINDIE_CHECK(count <= 1 + numSpec, ContractError,
        "update(): row " << row << " (req_id " << in.reqIds[row] << ") has " << count << " tokens; it was scheduled "
                         << "with " << numSpec << " proposed tokens, so at most " << 1 + numSpec);
}

UpdateResult Scheduler::update(UpdateInput const& message)
{
    std::lock_guard<std::mutex> lock(mMutex);
    MINDIE_CHECK(mAwaitingUpdate, ContractError, "update() called without a preceding schedule()");
    validateUpdate(message); // nothing changes before the whole message is known to be well-formed
    UpdateInput in = message;
    size_t const n = in.numRows;
    if (in.tokenOffsets != nullptr && static_cast<size_t>(in.tokenOffsets[n]) == n)
    {
        in.tokenOffsets = nullptr; // increasing offsets that end at S: exactly one token per row
    }
    size_t const numExpected = mLastSampleReqs.size();
    // A live sampling request left out means the step did not run (e.g. the forward failed):
    // only an empty update() may say so, and then every row of the step is rolled back, so its
    // chunk is computed again and nothing of it reaches the prefix cache.
    bool stepFailed = false;
    for (size_t k = 0; !mUpdateAllRows && k < numExpected; ++k)
    {
        Request const& r = *mLastSampleReqs[k];
        if (mScratchMatch[k] < 0 && r.state == RequestState::kRUNNING && r.awaitingSample)
        {
            stepFailed = true;
            MINDIE_CHECK(n == 0, ContractError,
                "update() has no sampled token for request " << r.id
                                                             << " (sample_mask was true); only an empty update() may "
                                                                "report a step that did not run");
        }
    }
    UpdateResult result;
    result.numAppended.assign(n, 0);
    if (stepFailed)
    {
        for (Request* r : mLastRows)
        {
            if (r->state != RequestState::kRUNNING)
            {
                continue; // finished or aborted since schedule()
            }
            r->numComputedTokens -= r->lastNumScheduled;
            r->awaitingSample = false;
            r->drafts.clear();
            if (r->lastNumSpec > 0)
            {
                trimBlocks(*r, r->blocksWithoutSpec);
            }
        }
    }
    else
    {
        // The step ran: full blocks join the prefix cache, in batch order. A row with proposals
        // joins in appendRow, after its rollback, so that no rejected token is registered.
        for (Request* r : mLastRows)
        {
            if (r->state == RequestState::kRUNNING && r->lastNumSpec == 0)
            {
                registerFullBlocks(*r);
            }
        }
        bool const handsOff = mRole->handsOffAfterSample();
        for (size_t k = 0; k < numExpected; ++k)
        {
            Request& r = *mLastSampleReqs[k];
            std::int64_t const row = mUpdateAllRows ? static_cast<std::int64_t>(k) : mScratchMatch[k];
            if (row < 0 || r.state != RequestState::kRUNNING || !r.awaitingSample)
            {
                continue; // finished or aborted after schedule()
            }
            auto const i = static_cast<size_t>(row);
            FinishReason const reason = appendRow(r, in, i, handsOff, result.numAppended[i]);
            if (reason != FinishReason::kNONE)
            {
                result.finishedIds.push_back(r.id);
                result.finishReasons.push_back(static_cast<std::int32_t>(reason));
                finishRequest(r, reason, false);
            }
        }
    }
    mAwaitingUpdate = false;
    if (!result.finishedIds.empty())
    {
        mRunning.erase(std::remove_if(mRunning.begin(), mRunning.end(),
                           [](Request const* r) { return r->state != RequestState::kRUNNING; }),
            mRunning.end());
        for (ReqId id : result.finishedIds)
        {
            auto it = mRequests.find(id);
            if (it != mRequests.end() && it->second->state == RequestState::kFINISHED)
            {
                dropRequest(id);
            }
        }
    }
    mLastSampleReqs.clear();
    mLastSampleIds.clear();
    mLastRows.clear();
    mGraveyard.clear();
    return result;
}

FinishReason Scheduler::appendRow(Request& r, UpdateInput const& in, size_t row, bool handsOff, std::int32_t& numAppended)
{
    size_t const begin = in.tokenOffsets ? static_cast<size_t>(in.tokenOffsets[row]) : row;
    size_t const end = in.tokenOffsets ? static_cast<size_t>(in.tokenOffsets[row + 1]) : row + 1;
    r.awaitingSample = false;
    FinishReason reason = FinishReason::kNONE;
    SizeType32 appended = 0;
    for (size_t t = begin; t < end && reason == FinishReason::kNONE; ++t)
    {
        TokenId const token = in.tokenIds[t];
        r.tokens.push_back(token);
        r.lastToken = token;
        ++appended;
        reason = checkStop(r, token);
    }
    numAppended = appended;
    if (handsOff && reason == FinishReason::kNONE)
    {
        // A row of the prefill role has no proposals (it never decodes): one token, then the hand-off.
        reason = mRole->afterSample(reason);
    }
    if (r.lastNumSpec > 0)
    {
        // The KV holds the row's first token and each appended token that equals the proposal
        // computed at its position; the last appended token is never computed yet. Blocks past
        // the one the next token goes to held rejected lookahead only.
        SizeType32 valid = 0;
        while (valid < appended - 1 && valid < r.lastNumSpec && in.tokenIds[begin + valid] == r.drafts[valid])
        {
            ++valid;
        }
        r.numComputedTokens = r.computedBeforeStep + r.lastNumScheduled - r.lastNumSpec + valid;
        trimBlocks(r, std::max(mBlocks.blocksFor(r.numComputedTokens + 1), r.blocksWithoutSpec));
        registerFullBlocks(r);
    }
    if (reason == FinishReason::kNONE && in.draftOffsets != nullptr)
    {
        r.drafts.assign(in.draftTokenIds + in.draftOffsets[row], in.draftTokenIds + in.draftOffsets[row + 1]);
    }
    else if (!r.drafts.empty())
    {
        r.drafts.clear();
    }
    return reason;
}

void Scheduler::trimBlocks(Request& r, SizeType32 keep)
{
    auto const held = static_cast<SizeType32>(r.blocks.size());
    if (held <= keep)
    {
        return;
    }
    mBlocks.freeBlocks(r.blocks.data() + keep, static_cast<size_t>(held - keep));
    r.blocks.resize(static_cast<size_t>(keep));
    r.numRegisteredBlocks = std::min(r.numRegisteredBlocks, keep);
    r.needsTableReset = true; // the worker learns of the shorter table from the next full row
}

void Scheduler::dropRequest(ReqId id)
{
    auto it = mRequests.find(id);
    assert(it != mRequests.end());
    it->second->state = RequestState::kFINISHED;
    if (mAwaitingUpdate)
    {
        mGraveyard.push_back(std::move(it->second)); // the last step's rows may still point at it
    }
    mRequests.erase(it);
}

void Scheduler::finishRequest(Request& r, FinishReason reason, bool removeFromQueues)
{
    if (removeFromQueues)
    {
        switch (r.state)
        {
        case RequestState::kWAITING: mWaiting.erase(&r); break;
        case RequestState::kRUNNING: eraseRunning(&r); break;
        case RequestState::kAWAITING_KV: --mNumAwaitingKv; break;
        default: break;
        }
    }
    mPendingFinishedIds.push_back(r.id);
    mPendingFinishReasons.push_back(static_cast<std::int32_t>(reason));
    r.awaitingSample = false;
    if (reason == FinishReason::kPREFILL_DONE)
    {
        r.state = RequestState::kPREFILL_DONE; // blocks stay pinned until release()
        return;
    }
    mBlocks.freeBlocks(r.blocks);
    r.blocks.clear();
    r.state = RequestState::kFINISHED;
}

bool Scheduler::abort(ReqId id)
{
    std::lock_guard<std::mutex> lock(mMutex);
    auto it = mRequests.find(id);
    if (it == mRequests.end())
    {
        return false;
    }
    Request& r = *it->second;
    if (r.state == RequestState::kPREFILL_DONE)
    {
        mBlocks.freeBlocks(r.blocks); // already reported finished: only the pinned blocks remain
        r.blocks.clear();
    }
    else
    {
        finishRequest(r, FinishReason::kABORTED, true);
    }
    dropRequest(id);
    return true;
}

bool Scheduler::finish(ReqId id, FinishReason reason)
{
    std::lock_guard<std::mutex> lock(mMutex);
    auto const value = static_cast<std::int32_t>(reason);
    MINDIE_CHECK(value >= static_cast<std::int32_t>(FinishReason::kEOS)
            && value <= static_cast<std::int32_t>(FinishReason::kABORTED),
        ContractError, "finish(): reason must be a FinishReason from EOS to ABORTED, got " << value);
    auto it = mRequests.find(id);
    if (it == mRequests.end() || it->second->state == RequestState::kPREFILL_DONE)
    {
        return false;
    }
    finishRequest(*it->second, reason, true);
    dropRequest(id);
    return true;
}

void Scheduler::release(ReqId id)
{
    std::lock_guard<std::mutex> lock(mMutex);
    Request& r = lookup(id);
    MINDIE_CHECK(r.state == RequestState::kPREFILL_DONE, ContractError,
        "release(" << id << "): the request is not PREFILL_DONE (release is for the prefill role)");
    mBlocks.freeBlocks(r.blocks);
    r.blocks.clear();
    dropRequest(id);
}

std::vector<BlockId> Scheduler::addPrefilled(
    ReqId id, std::vector<TokenId> promptTokenIds, std::vector<TokenId> const& outputTokenIds, RequestParams params)
{
    std::lock_guard<std::mutex> lock(mMutex);
    MINDIE_CHECK(mRole->admitsPrefilled(), ContractError, "add_prefilled() needs role decode");
    validateNew(id, promptTokenIds, params);
    MINDIE_REJECT(!outputTokenIds.empty(), "output_token_ids", "is empty (the prefill instance samples the first token)");
    MINDIE_REJECT(static_cast<SizeType32>(outputTokenIds.size()) < params.maxTokens, "output_token_ids",
        "already has max_tokens = " << params.maxTokens << " tokens");
    for (TokenId t : outputTokenIds)
    {
        MINDIE_REJECT(t >= 0, "output_token_ids", "has a negative id " << t);
    }
    auto const numPrompt = static_cast<SizeType32>(promptTokenIds.size());
    SizeType32 const numComputed = numPrompt + static_cast<SizeType32>(outputTokenIds.size()) - 1;
    SizeType32 const need = mBlocks.blocksFor(numComputed);
    MINDIE_CHECK(mBlocks.canAllocate(need), NoFreeBlocksError,
        "add_prefilled(" << id << ") needs " << need << " blocks, " << mBlocks.numFreeBlocks() << " are free");
    std::vector<TokenId> tokens = std::move(promptTokenIds);
    tokens.insert(tokens.end(), outputTokenIds.begin(), outputTokenIds.end());
    Request& r = makeRequest(id, std::move(tokens), numPrompt, std::move(params));
    r.numComputedTokens = numComputed;
    for (SizeType32 k = 0; k < need; ++k)
    {
        r.blocks.push_back(mBlocks.allocate());
    }
    r.state = RequestState::kAWAITING_KV;
    ++mNumAwaitingKv;
    return r.blocks;
}

void Scheduler::kvReady(ReqId id)
{
    std::lock_guard<std::mutex> lock(mMutex);
    Request& r = lookup(id);
    MINDIE_CHECK(r.state == RequestState::kAWAITING_KV, ContractError,
        "kv_ready(" << id << "): the request is not awaiting its KV (add_prefilled first)");
    registerFullBlocks(r);
    --mNumAwaitingKv;
    r.state = RequestState::kWAITING;
    mWaiting.insert(&r);
}

std::vector<BlockId> Scheduler::getBlockIds(ReqId id) const
{
    std::lock_guard<std::mutex> lock(mMutex);
    return lookup(id).blocks;
}

SizeType32 Scheduler::getNumComputedTokens(ReqId id) const
{
    std::lock_guard<std::mutex> lock(mMutex);
    return lookup(id).numComputedTokens;
}

bool Scheduler::hasUnfinished() const
{
    std::lock_guard<std::mutex> lock(mMutex);
    return !mWaiting.empty() || !mRunning.empty() || mNumAwaitingKv > 0;
}

SizeType32 Scheduler::numWaiting() const
{
    std::lock_guard<std::mutex> lock(mMutex);
    return static_cast<SizeType32>(mWaiting.size());
}

SizeType32 Scheduler::numRunning() const
{
    std::lock_guard<std::mutex> lock(mMutex);
    return static_cast<SizeType32>(mRunning.size());
}

SchedulerStats Scheduler::stats() const
{
    std::lock_guard<std::mutex> lock(mMutex);
    SchedulerStats s;
    s.numBlocks = mBlocks.numBlocks();
    s.numFreeBlocks = mBlocks.numFreeBlocks();
    s.numCachedBlocks = mBlocks.numCachedBlocks();
    s.prefixCacheQueries = mPrefixQueries;
    s.prefixCacheHits = mPrefixHits;
    s.numPreemptions = mNumPreemptions;
    s.numWaiting = static_cast<SizeType32>(mWaiting.size());
    s.numRunning = static_cast<SizeType32>(mRunning.size());
    return s;
}

void Scheduler::setHashMaskForTesting(BlockHash mask)
{
    std::lock_guard<std::mutex> lock(mMutex);
    mBlocks.setHashMaskForTesting(mask);
}

std::vector<BlockId> Scheduler::freeListForTesting() const
{
    std::lock_guard<std::mutex> lock(mMutex);
    return mBlocks.freeListForTesting();
}

} // namespace mindie::scheduler
