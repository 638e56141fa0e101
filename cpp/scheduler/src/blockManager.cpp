// SPDX-License-Identifier: Apache-2.0
// Block pool, LRU free list and prefix cache (see blockManager.h).
#include "mindie/scheduler/blockManager.h"

#include <algorithm>
#include <cstring>

namespace mindie::scheduler
{

namespace
{
constexpr BlockHash kFnvPrime = 0x100000001b3ULL;
constexpr BlockHash kSeed = 0xcbf29ce484222325ULL;

BlockHash mix64(BlockHash x) noexcept
{
    // splitmix64 finalizer: spreads FNV's weak low bits.
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}
} // namespace

BlockManager::BlockManager(SizeType32 numBlocks, SizeType32 blockSize, bool enablePrefixCaching)
    : mNumBlocks(numBlocks)
    , mBlockSize(blockSize)
    , mEnableCaching(enablePrefixCaching)
    , mBlocks(static_cast<size_t>(numBlocks))
{
    MINDIE_CHECK(numBlocks >= 2, ConfigError, "num_blocks must be >= 2 (block 0 is the null block), got " << numBlocks);
    MINDIE_CHECK(blockSize >= 1, ConfigError, "block_size must be >= 1, got " << blockSize);
    if (mEnableCaching)
    {
        mTokens.resize(static_cast<size_t>(numBlocks) * static_cast<size_t>(blockSize));
        size_t capacity = 16;
        while (capacity < 2 * static_cast<size_t>(numBlocks))
        {
            capacity <<= 1;
        }
        mSlots.assign(capacity, Slot{});
        mSlotMask = capacity - 1;
    }
    for (BlockId b = 1; b < numBlocks; ++b)
    {
        pushBack(b);
    }
    mBlocks[kNullBlock].refCount = 1; // never freed
}

BlockHash BlockManager::hashBlock(BlockHash parentHash, TokenId const* tokens) const noexcept
{
    BlockHash h = kSeed ^ mix64(parentHash);
    for (SizeType32 i = 0; i < mBlockSize; ++i)
    {
        h = (h ^ static_cast<std::uint32_t>(tokens[i])) * kFnvPrime;
    }
    return mix64(h);
}

void BlockManager::findCachedPrefix(TokenId const* tokens, SizeType32 maxBlocks, std::vector<BlockHash>& hashes,
    std::vector<BlockId>& blocks) const
{
    blocks.clear();
    if (!mEnableCaching)
    {
        return;
    }
    for (SizeType32 i = 0; i < maxBlocks; ++i)
    {
        TokenId const* blockTokens = tokens + static_cast<size_t>(i) * mBlockSize;
        BlockHash const parent = i == 0 ? 0 : hashes[i - 1];
        if (static_cast<SizeType32>(hashes.size()) <= i)
        {
            hashes.push_back(hashBlock(parent, blockTokens));
        }
        BlockId const cached = mSlots[findSlot(hashes[i] & mHashMask)].block;
        if (cached < 0)
        {
            return;
        }
        Block const& blk = mBlocks[cached];
        // NOTE: a hit is confirmed by the full hash, the parent's hash and the token ids, so a
        // collision of the (masked) table key never yields a wrong prefix.
        if (blk.hash != hashes[i] || blk.parentHash != parent
            || std::memcmp(&mTokens[static_cast<size_t>(cached) * mBlockSize], blockTokens,
                   sizeof(TokenId) * mBlockSize)
                != 0)
        {
            return;
        }
        blocks.push_back(cached);
    }
}

SizeType32 BlockManager::numEvictableAmong(std::vector<BlockId> const& blocks) const
{
    SizeType32 n = 0;
    for (BlockId b : blocks)
    {
        n += mBlocks[b].refCount == 0 ? 1 : 0;
    }
    return n;
}

void BlockManager::acquire(BlockId block)
{
    MINDIE_CHECK(block > kNullBlock && block < mNumBlocks, ContractError, "acquire of invalid block " << block);
    Block& blk = mBlocks[block];
    if (blk.refCount == 0)
    {
        unlink(block);
    }
    ++blk.refCount;
}

BlockId BlockManager::allocate()
{
    MINDIE_CHECK(mHead >= 0, ContractError, "allocate() with no free block (query canAllocate first)");
    BlockId const block = mHead;
    unlink(block);
    if (mBlocks[block].isCached)
    {
        evict(block);
    }
    mBlocks[block].refCount = 1;
    return block;
}

void BlockManager::allocate(SizeType32 n, std::vector<BlockId>& out)
{
    if (n <= 0)
    {
        return;
    }
    MINDIE_CHECK(n <= mNumFree, ContractError, "allocate(" << n << ") with " << mNumFree << " free blocks");
    if (mEnableCaching && n > 1)
    {
        // The next n blocks of the free list are the ones taken: fetch the slots of their cache
        // entries (a walk over their entries, which the unlinks below need anyway).
        SizeType32 k = 0;
        for (BlockId b = mHead; b >= 0 && k < n; b = mBlocks[b].next, ++k)
        {
            if (mBlocks[b].isCached)
            {
                __builtin_prefetch(&mSlots[static_cast<size_t>(mix64(mBlocks[b].hash & mHashMask)) & mSlotMask]);
            }
        }
    }
    for (SizeType32 k = 0; k < n; ++k)
    {
        out.push_back(allocate());
    }
}

void BlockManager::prefetchForCache(BlockId block, BlockHash hash) const noexcept
{
    if (!mEnableCaching)
    {
        return;
    }
    __builtin_prefetch(&mSlots[static_cast<size_t>(mix64(hash & mHashMask)) & mSlotMask]);
    __builtin_prefetch(&mBlocks[block], 1);
    __builtin_prefetch(&mTokens[static_cast<size_t>(block) * mBlockSize], 1);
}

void BlockManager::freeBlocks(BlockId const* blocks, size_t n)
{
    for (BlockId const* it = blocks + n; it != blocks;)
    {
        --it;
        Block& blk = mBlocks[*it];
        MINDIE_CHECK(blk.refCount > 0, ContractError, "double free of block " << *it);
        if (--blk.refCount == 0)
        {
            if (blk.isCached)
            {
                pushBack(*it);
            }
            else
            {
                pushFront(*it);
            }
        }
    }
}

bool BlockManager::cacheBlock(BlockId block, BlockHash hash, BlockHash parentHash, TokenId const* tokens)
{
    if (!mEnableCaching || mBlocks[block].isCached)
    {
        return false;
    }
    BlockHash const key = hash & mHashMask;
    size_t const slot = findSlot(key);
    if (mSlots[slot].block >= 0)
    {
        return false; // the key is taken (same content elsewhere, or a collision): keep the first
    }
    mSlots[slot] = Slot{static_cast<std::uint32_t>(key >> 32), block};
    ++mNumCached;
    Block& blk = mBlocks[block];
    blk.isCached = true;
    blk.hash = hash;
    blk.parentHash = parentHash;
    std::memcpy(&mTokens[static_cast<size_t>(block) * mBlockSize], tokens, sizeof(TokenId) * mBlockSize);
    return true;
}

std::vector<BlockId> BlockManager::freeListForTesting() const
{
    std::vector<BlockId> order;
    for (BlockId b = mHead; b >= 0; b = mBlocks[b].next)
    {
        order.push_back(b);
    }
    return order;
}

void BlockManager::evict(BlockId block)
{
    Block& blk = mBlocks[block];
    size_t const slot = findSlot(blk.hash & mHashMask);
    if (mSlots[slot].block == block)
    {
        eraseSlot(slot);
        --mNumCached;
    }
    blk.isCached = false;
}

size_t BlockManager::findSlot(BlockHash key) const noexcept
{
    auto const tag = static_cast<std::uint32_t>(key >> 32);
    size_t slot = static_cast<size_t>(mix64(key)) & mSlotMask;
    for (;; slot = (slot + 1) & mSlotMask)
    {
        Slot const& s = mSlots[slot];
        if (s.block < 0 || (s.tag == tag && (mBlocks[s.block].hash & mHashMask) == key))
        {
            return slot;
        }
    }
}

void BlockManager::eraseSlot(size_t slot) noexcept
{
    // Backward-shift deletion keeps every probe chain unbroken without tombstones.
    size_t hole = slot;
    size_t next = (hole + 1) & mSlotMask;
    while (mSlots[next].block >= 0)
    {
        size_t const home = static_cast<size_t>(mix64(mBlocks[mSlots[next].block].hash & mHashMask)) & mSlotMask;
        // Move `next` into the hole unless its home lies cyclically in (hole, next].
        bool const stays = hole <= next ? (hole < home && home <= next) : (hole < home || home <= next);
        if (!stays)
        {
            mSlots[hole] = mSlots[next];
            hole = next;
        }
        next = (next + 1) & mSlotMask;
    }
    mSlots[hole].block = -1;
}

void BlockManager::pushFront(BlockId block)
{
    Block& blk = mBlocks[block];
    blk.prev = -1;
    blk.next = mHead;
    if (mHead >= 0)
    {
        mBlocks[mHead].prev = block;
    }
    mHead = block;
    if (mTail < 0)
    {
        mTail = block;
    }
    blk.inFreeList = true;
    ++mNumFree;
}

void BlockManager::pushBack(BlockId block)
{
    Block& blk = mBlocks[block];
    blk.next = -1;
    blk.prev = mTail;
    if (mTail >= 0)
    {
        mBlocks[mTail].next = block;
    }
    mTail = block;
    if (mHead < 0)
    {
        mHead = block;
    }
    blk.inFreeList = true;
    ++mNumFree;
}

void BlockManager::unlink(BlockId block)
{
    Block& blk = mBlocks[block];
    if (!blk.inFreeList)
    {
        return;
    }
    if (blk.prev >= 0)
    {
        mBlocks[blk.prev].next = blk.next;
    }
    else
    {
        mHead = blk.next;
    }
    if (blk.next >= 0)
    {
        mBlocks[blk.next].prev = blk.prev;
    }
    else
    {
        mTail = blk.prev;
    }
    blk.prev = blk.next = -1;
    blk.inFreeList = false;
    --mNumFree;
}

} // namespace mindie::scheduler
