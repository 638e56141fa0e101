// SPDX-License-Identifier: Apache-2.0
// One scheduling step: running decodes, running prefill chunks, then admissions (see scheduler.h).
#include "mindie/scheduler/scheduler.h"

#include <algorithm>

namespace mindie::scheduler
{

namespace
{
SchedulerConfig const& validated(SchedulerConfig const& config)
{
    config.validate();
    return config;
}
} // namespace

/// The phases a SchedulingPolicy runs, over this step's budget and rows.
class Scheduler::Phases final : public StepPhases
{
public:
    Phases(Scheduler& s, bool runningWasEmpty)
        : mS(s)
        , mRunningWasEmpty(runningWasEmpty)
    {
    }
    void preemptForPriority() override { mS.priorityPreempt(); }
    void scheduleRunningDecodes() override { mS.scheduleRunning(true, mBudget, mS.mDecodeRows); }
    void scheduleRunningPrefills() override { mS.scheduleRunning(false, mBudget, mS.mPrefillRows); }
    void admitWaiting() override { mS.admitWaiting(mBudget, mS.mDecodeRows, mS.mPrefillRows); }
    [[nodiscard]] bool preemptedForBlocks() const override { return mS.mPreemptedForBlocks; }
    [[nodiscard]] bool runningWasEmpty() const override { return mRunningWasEmpty; }
    [[nodiscard]] bool hasPrefillRows() const override { return !mS.mPrefillRows.empty(); }

private:
    Scheduler& mS;
    SizeType32 mBudget{mS.mConfig.maxNumBatchedTokens};
    bool mRunningWasEmpty;
};

Scheduler::Scheduler(SchedulerConfig const& config)
    : mConfig(validated(config))
    , mPolicy(SchedulingPolicy::create(config.policy))
    , mRole(RolePolicy::create(config.role))
    , mBlocks(config.numBlocks, config.blockSize, config.enablePrefixCaching)
{
}

std::shared_ptr<SchedulerOutput> Scheduler::schedule()
{
    std::lock_guard<std::mutex> lock(mMutex);
    MINDIE_CHECK(!mAwaitingUpdate, ContractError, "schedule() called again before update() of the previous step");
    ++mStep;
    mLastRows.clear();
    mGraveyard.clear();
    mPreemptedThisStep.clear();
    mPreemptedForBlocks = false;
    mCandidatesCollected = false;
    mDecodeRows.clear();
    mPrefillRows.clear();
    Phases phases(*this, mRunning.empty());
    mPolicy->planStep(phases);
    auto out = freeOutputBuffer();
    buildOutput(*out, mDecodeRows, mPrefillRows);
    mAwaitingUpdate = true;
    return out;
}

void SchedulerOutput::clear() noexcept
{
    reqIds.clear();
    numScheduledTokens.clear();
    numComputedTokens.clear();
    inputTokenIds.clear();
    specOffsets.clear();
    specTokenIds.clear();
    sampleMask.clear();
    blockTableReset.clear();
    newBlockOffsets.clear();
    newBlockIds.clear();
    preemptedIds.clear();
    finishedIds.clear();
    finishReasons.clear();
    numBatchedTokens = 0;
}

std::shared_ptr<SchedulerOutput> Scheduler::freeOutputBuffer()
{
    // A caller may keep a few recent outputs alive (views of a step in flight); a buffer nobody but
    // the pool holds is refilled. No new holder of a pooled buffer can appear except through here.
    constexpr size_t kPoolSize = 4;
    for (auto const& buf : mOutputPool)
    {
        if (buf.use_count() == 1)
        {
            std::atomic_thread_fence(std::memory_order_acquire); // after the last holder's release
            buf->clear();
            return buf;
        }
    }
    auto buf = std::make_shared<SchedulerOutput>();
    if (mOutputPool.size() < kPoolSize)
    {
        mOutputPool.push_back(buf);
    }
    return buf;
}

bool Scheduler::chunkingOn() const noexcept
{
    return mConfig.enableChunkedPrefill && mPolicy->allowsChunking();
}

bool Scheduler::chunkAllowed(Request const& r) const
{
    // A resumed request longer than the whole budget is chunked even without chunking.
    return chunkingOn() || r.numTokens() - r.numComputedTokens > mConfig.maxNumBatchedTokens;
}

SizeType32 Scheduler::chunkFor(Request const& r, SizeType32 budget) const
{
    SizeType32 const remaining = r.numTokens() - r.numComputedTokens;
    if (remaining <= budget)
    {
        return remaining;
    }
    return chunkAllowed(r) ? budget : 0;
}

bool Scheduler::scheduleOne(Request& r, SizeType32& budget, std::vector<Row>& rows)
{
    SizeType32 const numNew = chunkFor(r, budget);
    if (numNew == 0)
    {
        return true;
    }
    SizeType32 const before = r.numComputedTokens;
    if (!allocateOrPreempt(r, before + numNew))
    {
        return false; // preempted itself: nothing after it is worth more
    }
    SizeType32 const numSpec = r.drafts.empty() || !r.isDecode() ? 0 : scheduleLookahead(r, budget - numNew);
    if (numSpec == 0 && mConfig.numLookaheadSlots > 0 && r.isDecode())
    {
        reserveNextBlock(r, before + numNew + mConfig.numLookaheadSlots);
    }
    r.numComputedTokens += numNew + numSpec;
    r.scheduledAtStep = mStep;
    r.computedBeforeStep = before;
    budget -= numNew + numSpec;
    rows.push_back(Row{&r, numNew + numSpec, before, numSpec});
    return true;
}

void Scheduler::reserveNextBlock(Request& r, SizeType32 numTokens)
{
    // Asynchronous scheduling: the block of the position after this step's token, handed out now
    // (in this step's new_block_ids) so that the next step can be queued before this one's token
    // is known. Only free blocks, never past max_model_len; the next schedule() then needs none.
    // Preemption and finishing free it with the others.
    SizeType32 const want = mBlocks.blocksFor(std::min(numTokens, mConfig.maxModelLen));
    auto const held = static_cast<SizeType32>(r.blocks.size());
    if (want > held && mBlocks.canAllocate(want - held))
    {
        for (SizeType32 n = want - held; n > 0; --n)
        {
            r.blocks.push_back(mBlocks.allocate());
        }
    }
}

SizeType32 Scheduler::scheduleLookahead(Request& r, SizeType32 budgetLeft)
{
    // The decode's own token has its block; the proposals take what is left of the budget and of
    // the free blocks (speculation never preempts), and never pass max_tokens or max_model_len.
    auto const held = static_cast<SizeType32>(r.blocks.size());
    SizeType32 const end = r.numTokens(); // == numComputedTokens + 1
    std::int64_t k = static_cast<std::int64_t>(r.drafts.size());
    k = std::min<std::int64_t>(k, budgetLeft);
    k = std::min<std::int64_t>(k, r.params.maxTokens - r.numOutputTokens() - 1);
    k = std::min<std::int64_t>(k, mConfig.maxModelLen - end - 1);
    k = std::min<std::int64_t>(
        k, static_cast<std::int64_t>(held + mBlocks.numFreeBlocks()) * mBlocks.blockSize() - end);
    r.blocksWithoutSpec = held;
    if (k <= 0)
    {
        return 0;
    }
    auto const numSpec = static_cast<SizeType32>(k);
    mBlocks.allocate(mBlocks.blocksFor(end + numSpec) - held, r.blocks);
    return numSpec;
}

void Scheduler::scheduleRunning(bool decodes, SizeType32& budget, std::vector<Row>& rows)
{
    if (decodes || !mCandidatesCollected)
    {
        // One pass over the running set: decodes are scheduled, the others (prefill chunks) are
        // collected in order for the prefill pass.
        mPrefillCandidates.clear();
        bool stopped = !decodes;
        for (size_t i = 0; i < mRunning.size(); ++i)
        {
            Request* r = mRunning[i];
            if (!r->isDecode())
            {
                mPrefillCandidates.push_back(r);
            }
            else if (!stopped && budget > 0 && r->scheduledAtStep != mStep && !scheduleOne(*r, budget, rows))
            {
                stopped = true;
                --i; // r left the running set
            }
        }
        mCandidatesCollected = true;
        if (decodes)
        {
            return;
        }
    }
    for (Request* r : mPrefillCandidates)
    {
        if (budget <= 0)
        {
            break;
        }
        if (r->state != RequestState::kRUNNING || r->scheduledAtStep == mStep)
        {
            continue; // preempted as a victim, or already scheduled
        }
        if (!scheduleOne(*r, budget, rows))
        {
            break;
        }
    }
}

bool Scheduler::allocateOrPreempt(Request& r, SizeType32 numTokens)
{
    auto const held = static_cast<SizeType32>(r.blocks.size());
    if (numTokens <= held * mBlocks.blockSize())
    {
        return true; // fits the blocks it holds (most decodes)
    }
    SizeType32 const need = mBlocks.blocksFor(numTokens) - held;
    while (need > 0 && !mBlocks.canAllocate(need))
    {
        // Victim: the least valuable running request (largest key, after r) not yet scheduled.
        auto const self = std::lower_bound(mRunning.begin(), mRunning.end(), &r, KeyLess{});
        Request* victim = nullptr;
        for (auto it = mRunning.end(); it != self + 1;)
        {
            --it;
            if ((*it)->scheduledAtStep != mStep)
            {
                victim = *it;
                break;
            }
        }
        mPreemptedForBlocks = true;
        if (victim == nullptr)
        {
            preempt(r);
            return false;
        }
        preempt(*victim);
    }
    mBlocks.allocate(need, r.blocks);
    return true;
}

void Scheduler::admitWaiting(SizeType32& budget, std::vector<Row>& decodes, std::vector<Row>& prefills)
{
    for (auto it = mWaiting.begin(); it != mWaiting.end();)
    {
        Admit const result = tryAdmit(**it, budget, decodes, prefills);
        if (result == Admit::kSTOP)
        {
            break;
        }
        it = result == Admit::kOK ? mWaiting.erase(it) : std::next(it);
    }
}

bool Scheduler::isDeferredChild(Request const& r) const
{
    if (r.params.parentId < 0 || !r.blocks.empty())
    {
        return false;
    }
    auto it = mRequests.find(r.params.parentId);
    if (it == mRequests.end())
    {
        return false;
    }
    // NOTE: the parent's prompt KV must come from an earlier step, not be written in this one.
    Request const& parent = *it->second;
    bool const promptPending = parent.numComputedTokens < parent.numPromptTokens
        || (parent.scheduledAtStep == mStep && parent.computedBeforeStep < parent.numPromptTokens);
    return parent.state == RequestState::kWAITING || (parent.state == RequestState::kRUNNING && promptPending);
}

Scheduler::Admit Scheduler::tryAdmit(Request& r, SizeType32& budget, std::vector<Row>& decodes, std::vector<Row>& prefills)
{
    bool const isStatic = mPolicy->joinsWithoutBudget();
    if (static_cast<SizeType32>(mRunning.size()) >= mConfig.maxNumSeqs || (budget <= 0 && !isStatic))
    {
        return Admit::kSTOP;
    }
    if (r.preemptedAtStep == mStep || isDeferredChild(r))
    {
        return Admit::kSKIP;
    }
    bool const hasBlocks = !r.blocks.empty(); // decode role: KV received into its blocks
    std::vector<BlockId>& hits = mScratchBlocks;
    hits.clear();
    bool looked = false;
    if (!hasBlocks)
    {
        SizeType32 const bs = mBlocks.blockSize();
        auto parentIt = r.params.parentId >= 0 ? mRequests.find(r.params.parentId) : mRequests.end();
        if (parentIt != mRequests.end() && parentIt->second->state == RequestState::kRUNNING)
        {
            // n > 1: share the parent's full prompt blocks, compute the tail (at least one token).
            Request const& parent = *parentIt->second;
            SizeType32 const share = std::min<SizeType32>(
                (r.numPromptTokens - 1) / bs, static_cast<SizeType32>(parent.blocks.size()));
            if (share > 0 && parent.numPromptTokens >= share * bs
                && std::equal(r.tokens.begin(), r.tokens.begin() + share * bs, parent.tokens.begin()))
            {
                hits.assign(parent.blocks.begin(), parent.blocks.begin() + share);
            }
        }
        if (hits.empty() && mBlocks.prefixCachingEnabled())
        {
            mBlocks.findCachedPrefix(r.tokens.data(), (r.numTokens() - 1) / bs, r.hashes, hits);
            looked = true;
        }
    }
    SizeType32 const start = hasBlocks ? r.numComputedTokens : static_cast<SizeType32>(hits.size()) * mBlocks.blockSize();
    SizeType32 const remaining = r.numTokens() - start;
    SizeType32 numNew = remaining;
    if (remaining > budget)
    {
        if (chunkingOn() || remaining > mConfig.maxNumBatchedTokens)
        {
            numNew = budget;
        }
        else if (isStatic)
        {
            numNew = 0; // joins the batch now, computes in a later step
        }
        else
        {
            return Admit::kSTOP;
        }
    }
    SizeType32 const held = hasBlocks ? static_cast<SizeType32>(r.blocks.size()) : static_cast<SizeType32>(hits.size());
    SizeType32 const need = std::max<SizeType32>(0, mBlocks.blocksFor(start + numNew) - held);
    if (!mBlocks.canAllocate(need, mBlocks.numEvictableAmong(hits)))
    {
        return Admit::kSTOP;
    }
    // Commit.
    if (!hasBlocks)
    {
        for (BlockId b : hits)
        {
            mBlocks.acquire(b);
        }
        // The table and the hashes never outgrow the request's whole length: one allocation each.
        auto const maxBlocks = static_cast<size_t>(mBlocks.blocksFor(
            static_cast<SizeType32>(std::min<std::int64_t>(std::int64_t{r.numPromptTokens} + r.params.maxTokens,
                mConfig.maxModelLen))));
        r.blocks.reserve(maxBlocks);
        r.hashes.reserve(maxBlocks);
        r.blocks = hits;
        r.numRegisteredBlocks = static_cast<SizeType32>(hits.size());
        r.numComputedTokens = start;
        if (looked)
        {
            mPrefixQueries += r.numTokens();
            mPrefixHits += start;
        }
    }
    mBlocks.allocate(need, r.blocks);
    r.state = RequestState::kRUNNING;
    insertRunning(&r);
    if (numNew > 0)
    {
        bool const decode = r.isDecode();
        r.numComputedTokens += numNew;
        r.scheduledAtStep = mStep;
        r.computedBeforeStep = start;
        budget -= numNew;
        (decode ? decodes : prefills).push_back(Row{&r, numNew, start});
    }
    return Admit::kOK;
}

void Scheduler::priorityPreempt()
{
    while (!mRunning.empty())
    {
        Request* head = nullptr;
        for (Request* w : mWaiting)
        {
            if (!isDeferredChild(*w))
            {
                head = w;
                break;
            }
        }
        Request* victim = mRunning.back();
        if (head == nullptr || head->params.priority >= victim->params.priority)
        {
            return;
        }
        bool const seqFull = static_cast<SizeType32>(mRunning.size()) >= mConfig.maxNumSeqs;
        SizeType32 const need = std::max<SizeType32>(0,
            mBlocks.blocksFor(std::min(head->numTokens(), mConfig.maxNumBatchedTokens))
                - static_cast<SizeType32>(head->blocks.size()));
        if (!seqFull && mBlocks.canAllocate(need))
        {
            return;
        }
        preempt(*victim);
    }
}

void Scheduler::preempt(Request& r)
{
    eraseRunning(&r);
    mBlocks.freeBlocks(r.blocks);
    r.blocks.clear();
    r.numComputedTokens = 0;
    r.numRegisteredBlocks = 0;
    r.numBlocksSent = 0;
    r.needsTableReset = true;
    r.awaitingSample = false;
    r.drafts.clear();
    r.scheduledAtStep = -1;
    r.preemptedAtStep = mStep;
    r.state = RequestState::kWAITING;
    mWaiting.insert(&r);
    mPreemptedThisStep.push_back(r.id);
    ++mNumPreemptions;
}

void Scheduler::registerFullBlocks(Request& r)
{
    if (!mBlocks.prefixCachingEnabled())
    {
        return;
    }
    SizeType32 const bs = mBlocks.blockSize();
    auto const numBlocks = static_cast<SizeType32>(r.blocks.size());
    SizeType32 const start = r.numRegisteredBlocks;
    // No division on this per-row path: most steps complete no block.
    if (start >= numBlocks || (start + 1) * bs > r.numComputedTokens)
    {
        return;
    }
    SizeType32 const end = std::min(numBlocks, r.numComputedTokens / bs);
    while (static_cast<SizeType32>(r.hashes.size()) < end)
    {
        size_t const k = r.hashes.size();
        BlockHash const parent = k == 0 ? 0 : r.hashes[k - 1];
        r.hashes.push_back(mBlocks.hashBlock(parent, r.tokens.data() + k * bs));
    }
    // A prefill chunk completes many blocks: the table slots and block entries they go to are
    // fetched a few blocks ahead, so the cache misses overlap instead of queueing one by one.
    constexpr SizeType32 kAhead = 8;
    for (SizeType32 i = start; i < std::min(end, start + kAhead); ++i)
    {
        mBlocks.prefetchForCache(r.blocks[i], r.hashes[i]);
    }
    for (SizeType32 i = start; i < end; ++i)
    {
        if (i + kAhead < end)
        {
            mBlocks.prefetchForCache(r.blocks[i + kAhead], r.hashes[i + kAhead]);
        }
        BlockHash const parent = i == 0 ? 0 : r.hashes[i - 1];
        mBlocks.cacheBlock(r.blocks[i], r.hashes[i], parent, r.tokens.data() + static_cast<size_t>(i) * bs);
        r.numRegisteredBlocks = i + 1;
    }
}

void Scheduler::insertRunning(Request* r)
{
    auto pos = std::upper_bound(mRunning.begin(), mRunning.end(), r, KeyLess{});
    mRunning.insert(pos, r);
}

void Scheduler::eraseRunning(Request* r)
{
    auto pos = std::lower_bound(mRunning.begin(), mRunning.end(), r, KeyLess{});
    if (pos != mRunning.end() && *pos == r)
    {
        mRunning.erase(pos);
    }
}

void Scheduler::buildOutput(SchedulerOutput& out, std::vector<Row> const& decodes, std::vector<Row> const& prefills)
{
    size_t const numRows = decodes.size() + prefills.size();
    // Sizes from the rows alone (no request is touched twice): the per-row arrays and the tokens
    // are written by index into buffers that keep their capacity from step to step.
    size_t numTokens = 0;
    bool anySpec = false;
    for (auto const* rows : {&decodes, &prefills})
    {
        for (Row const& row : *rows)
        {
            anySpec |= row.numSpec > 0;
            numTokens += static_cast<size_t>(row.numNew);
        }
    }
    out.reqIds.resize(numRows);
    out.numScheduledTokens.resize(numRows);
    out.numComputedTokens.resize(numRows);
    out.sampleMask.resize(numRows);
    out.blockTableReset.resize(numRows);
    out.newBlockOffsets.resize(numRows + 1);
    out.newBlockOffsets[0] = 0;
    out.inputTokenIds.resize(numTokens);
    out.specOffsets.resize(numRows + 1);
    out.specOffsets[0] = 0;
    mLastRows.resize(numRows);
    mLastSampleReqs.clear();
    mLastSampleIds.clear();
    TokenId* tokens = out.inputTokenIds.data();
    size_t i = 0;
    auto emit = [&](Row const& row)
    {
        Request& r = *row.req;
        out.reqIds[i] = r.id;
        out.numScheduledTokens[i] = row.numNew;
        out.numComputedTokens[i] = row.numComputedBefore;
        if (row.numSpec > 0)
        {
            // A decode with proposals: the last sampled token, then the proposals.
            *tokens++ = r.lastToken;
            tokens = std::copy(r.drafts.begin(), r.drafts.begin() + row.numSpec, tokens);
            out.specTokenIds.insert(out.specTokenIds.end(), r.drafts.begin(), r.drafts.begin() + row.numSpec);
        }
        else if (row.numNew == 1)
        {
            // Decodes: the token is lastToken (no range copy, no touch of the token array).
            *tokens++ = row.numComputedBefore + 1 == r.numTokens() ? r.lastToken : r.tokens[row.numComputedBefore];
        }
        else
        {
            tokens = std::copy(r.tokens.begin() + row.numComputedBefore,
                r.tokens.begin() + row.numComputedBefore + row.numNew, tokens);
        }
        if (anySpec)
        {
            out.specOffsets[i + 1] = static_cast<std::int32_t>(out.specTokenIds.size());
        }
        bool const sample = row.numComputedBefore + row.numNew - row.numSpec == r.numTokens();
        r.awaitingSample = sample;
        r.lastNumScheduled = row.numNew;
        r.lastNumSpec = row.numSpec;
        mLastRows[i] = &r;
        if (sample)
        {
            mLastSampleReqs.push_back(&r);
            mLastSampleIds.push_back(r.id);
        }
        out.sampleMask[i] = sample ? 1 : 0;
        out.blockTableReset[i] = r.needsTableReset ? 1 : 0;
        if (r.needsTableReset)
        {
            r.numBlocksSent = 0;
            r.needsTableReset = false;
        }
        if (static_cast<size_t>(r.numBlocksSent) < r.blocks.size())
        {
            out.newBlockIds.insert(out.newBlockIds.end(), r.blocks.begin() + r.numBlocksSent, r.blocks.end());
            r.numBlocksSent = static_cast<SizeType32>(r.blocks.size());
        }
        out.newBlockOffsets[i + 1] = static_cast<std::int32_t>(out.newBlockIds.size());
        ++i;
    };
    for (Row const& row : decodes)
    {
        emit(row);
    }
    for (Row const& row : prefills)
    {
        emit(row);
    }
    if (!anySpec)
    {
        std::fill(out.specOffsets.begin(), out.specOffsets.end(), 0);
    }
    out.numBatchedTokens = static_cast<std::int64_t>(numTokens);
    out.preemptedIds = mPreemptedThisStep;
    out.finishedIds.swap(mPendingFinishedIds);
    out.finishReasons.swap(mPendingFinishReasons);
}

} // namespace mindie::scheduler
