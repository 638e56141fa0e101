// SPDX-License-Identifier: Apache-2.0
/// @file blockManager.h
/// @brief The paged KV block pool: reference counts, an O(1) free list that doubles as the LRU
/// order of evictable cached blocks, and prefix caching by chained block hashes confirmed by token
/// ids. Query-then-commit: callers ask (findCachedPrefix, canAllocate) and then take (acquire,
/// allocate). Knows nothing of requests or Python.
#pragma once

#include "mindie/scheduler/common.h"

#include <vector>

namespace mindie::scheduler
{

/// @brief Fixed pool of `numBlocks` blocks of `blockSize` tokens; block 0 is the null block.
class BlockManager
{
public:
    /// @brief Creates the pool; every block but block 0 starts free and uncached.
    BlockManager(SizeType32 numBlocks, SizeType32 blockSize, bool enablePrefixCaching);

    [[nodiscard]] SizeType32 numBlocks() const noexcept { return mNumBlocks; }
    [[nodiscard]] SizeType32 blockSize() const noexcept { return mBlockSize; }
    [[nodiscard]] bool prefixCachingEnabled() const noexcept { return mEnableCaching; }
    /// @brief Blocks with reference count 0 (uncached, or cached and evictable).
    [[nodiscard]] SizeType32 numFreeBlocks() const noexcept { return mNumFree; }
    /// @brief Blocks registered in the prefix cache (in use or evictable).
    [[nodiscard]] SizeType32 numCachedBlocks() const noexcept { return mNumCached; }
    [[nodiscard]] SizeType32 refCount(BlockId block) const { return mBlocks.at(block).refCount; }
    [[nodiscard]] bool isCached(BlockId block) const { return mBlocks.at(block).isCached; }
    /// @brief Blocks needed to hold `numTokens` tokens.
    [[nodiscard]] SizeType32 blocksFor(SizeType32 numTokens) const noexcept
    {
        return (numTokens + mBlockSize - 1) / mBlockSize;
    }

    /// @brief Chained hash of one full block: H(parentHash, tokens[0:blockSize]).
    [[nodiscard]] BlockHash hashBlock(BlockHash parentHash, TokenId const* tokens) const noexcept;

    /// @brief Query: the longest run of cached blocks matching `tokens` block by block.
    /// @param tokens token ids, at least `maxBlocks * blockSize` of them
    /// @param maxBlocks match at most this many blocks
    /// @param hashes in/out chained hashes of the request's blocks (extended as needed)
    /// @param blocks out: matched block ids (cleared first)
    void findCachedPrefix(TokenId const* tokens, SizeType32 maxBlocks, std::vector<BlockHash>& hashes,
        std::vector<BlockId>& blocks) const;

    /// @brief Query: free blocks that taking `blocks` (prefix hits) would consume.
    [[nodiscard]] SizeType32 numEvictableAmong(std::vector<BlockId> const& blocks) const;

    /// @brief Query: can `numNew` fresh blocks be allocated after reusing `numReusedFree` free hits?
    [[nodiscard]] bool canAllocate(SizeType32 numNew, SizeType32 numReusedFree = 0) const noexcept
    {
        return numNew + numReusedFree <= mNumFree;
    }

    /// @brief Commit: takes one more reference on a (cached or shared) block.
    void acquire(BlockId block);
    /// @brief Commit: takes the least recently used free block (evicting its cache entry).
    BlockId allocate();
    /// @brief Commit: appends `n` blocks to `out`, each as allocate() would take it (the same blocks
    /// in the same order); their table slots are fetched first, so the evictions' misses overlap.
    void allocate(SizeType32 n, std::vector<BlockId>& out);
    /// @brief A hint only: fetches what cacheBlock(block, hash, ...) will touch.
    void prefetchForCache(BlockId block, BlockHash hash) const noexcept;
    /// @brief Drops one reference of each block, last block first; blocks at zero become free
    /// (cached blocks at the most-recently-used end, uncached ones are reused first).
    void freeBlocks(std::vector<BlockId> const& blocks) { freeBlocks(blocks.data(), blocks.size()); }
    /// @brief The same over `n` blocks from `blocks`.
    void freeBlocks(BlockId const* blocks, size_t n);

    /// @brief Registers a full, computed block under `hash`. No-op (returns false) when caching is
    /// off, the block is already cached, or another block already holds that hash key.
    bool cacheBlock(BlockId block, BlockHash hash, BlockHash parentHash, TokenId const* tokens);

    /// @brief Test hook: hash-table keys become `hash & mask`, forcing collisions (0: all collide).
    void setHashMaskForTesting(BlockHash mask)
    {
        MINDIE_CHECK(mNumCached == 0, ContractError, "set the hash mask before anything is cached");
        mHashMask = mask;
    }

    /// @brief Free-list order, least recently used first (for tests).
    [[nodiscard]] std::vector<BlockId> freeListForTesting() const;

private:
    struct Block
    {
        SizeType32 refCount{0};
        BlockId prev{-1}; ///< free-list links (-1: none)
        BlockId next{-1};
        bool inFreeList{false};
        bool isCached{false};
        BlockHash hash{0};       ///< full (unmasked) chained hash
        BlockHash parentHash{0}; ///< full hash of the previous block in the chain
    };

    /// Open-addressing (linear probing) table slot of `key`: holds it, or is the empty slot
    /// where it would go. Never allocates; at most half full (capacity >= 2 * numBlocks).
    [[nodiscard]] size_t findSlot(BlockHash key) const noexcept;
    void eraseSlot(size_t slot) noexcept;
    void pushFront(BlockId block);
    void pushBack(BlockId block);
    void unlink(BlockId block);
    void evict(BlockId block);

    SizeType32 mNumBlocks;
    SizeType32 mBlockSize;
    bool mEnableCaching;
    std::vector<Block> mBlocks;
    std::vector<TokenId> mTokens; ///< [numBlocks, blockSize] contents of cached blocks
    BlockId mHead{-1};
    BlockId mTail{-1};
    SizeType32 mNumFree{0};
    BlockHash mHashMask{~BlockHash{0}};
    struct Slot
    {
        std::uint32_t tag{0}; ///< high 32 bits of the masked hash (the block's own hash confirms)
        BlockId block{-1};    ///< -1: empty
    };
    std::vector<Slot> mSlots; ///< 8 bytes a slot: tag and block share one cache line per probe
    size_t mSlotMask{0};
    SizeType32 mNumCached{0};
};

} // namespace mindie::scheduler
