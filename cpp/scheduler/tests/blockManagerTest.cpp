// SPDX-License-Identifier: Apache-2.0
// GoogleTest of BlockManager: free-list order, reference counts, prefix cache hits confirmed by
// token ids (collisions forced by the hash-mask hook) and LRU eviction. Expected values are
// worked out by hand from the rules in blockManager.h.
#include "mindie/scheduler/blockManager.h"

#include <gtest/gtest.h>

#include <map>
#include <numeric>
#include <random>

using namespace mindie::scheduler;

namespace
{
std::vector<TokenId> iota(TokenId first, size_t n)
{
    std::vector<TokenId> v(n);
    std::iota(v.begin(), v.end(), first);
    return v;
}

/// Caches `blocks` as the chain of `tokens` (one block of tokens each).
void cacheChain(BlockManager& bm, std::vector<BlockId> const& blocks, std::vector<TokenId> const& tokens)
{
    BlockHash parent = 0;
    for (size_t i = 0; i < blocks.size(); ++i)
    {
        BlockHash const h = bm.hashBlock(parent, tokens.data() + i * bm.blockSize());
        bm.cacheBlock(blocks[i], h, parent, tokens.data() + i * bm.blockSize());
        parent = h;
    }
}
} // namespace

TEST(BlockManagerTest, NullBlockIsNeverAllocated)
{
    BlockManager bm(4, 2, true);
    EXPECT_EQ(bm.numFreeBlocks(), 3);
    EXPECT_EQ(bm.allocate(), 1);
    EXPECT_EQ(bm.allocate(), 2);
    EXPECT_EQ(bm.allocate(), 3);
    EXPECT_EQ(bm.numFreeBlocks(), 0);
    EXPECT_THROW(bm.allocate(), ContractError);
}

TEST(BlockManagerTest, UncachedFreedBlocksAreReusedFirst)
{
    BlockManager bm(6, 2, true);
    std::vector<BlockId> a{bm.allocate(), bm.allocate()}; // 1, 2
    std::vector<BlockId> b{bm.allocate()};               // 3
    auto tokens = iota(10, 2);
    cacheChain(bm, b, tokens);
    bm.freeBlocks(b); // cached: to the back (most recently used)
    bm.freeBlocks(a); // uncached: to the front, last block first so block 1 leads
    EXPECT_EQ(bm.freeListForTesting(), (std::vector<BlockId>{1, 2, 4, 5, 3}));
    EXPECT_EQ(bm.numCachedBlocks(), 1);
}

TEST(BlockManagerTest, ReferenceCountsAndDoubleFree)
{
    BlockManager bm(4, 2, true);
    BlockId const b = bm.allocate();
    bm.acquire(b);
    EXPECT_EQ(bm.refCount(b), 2);
    bm.freeBlocks({b});
    EXPECT_EQ(bm.numFreeBlocks(), 2);
    bm.freeBlocks({b});
    EXPECT_EQ(bm.numFreeBlocks(), 3);
    EXPECT_THROW(bm.freeBlocks({b}), ContractError);
    EXPECT_THROW(bm.acquire(0), ContractError);
}

TEST(BlockManagerTest, PrefixHitConfirmedByTokens)
{
    BlockManager bm(8, 4, true);
    auto tokens = iota(1, 12);
    std::vector<BlockId> blocks{bm.allocate(), bm.allocate(), bm.allocate()};
    cacheChain(bm, blocks, tokens);
    std::vector<BlockHash> hashes;
    std::vector<BlockId> hits;
    bm.findCachedPrefix(tokens.data(), 3, hashes, hits);
    EXPECT_EQ(hits, blocks);
    // A different second block: only the first block matches (the chain breaks there).
    auto other = tokens;
    other[5] = 99;
    hashes.clear();
    bm.findCachedPrefix(other.data(), 3, hashes, hits);
    EXPECT_EQ(hits, (std::vector<BlockId>{blocks[0]}));
    // maxBlocks limits the match.
    hashes.clear();
    bm.findCachedPrefix(tokens.data(), 2, hashes, hits);
    EXPECT_EQ(hits.size(), 2u);
}

TEST(BlockManagerTest, ForcedHashCollisionsNeverGiveAWrongHit)
{
    BlockManager bm(8, 2, true);
    bm.setHashMaskForTesting(0); // every key collides
    auto a = iota(1, 4);
    std::vector<BlockId> blocksA{bm.allocate(), bm.allocate()};
    cacheChain(bm, blocksA, a);
    EXPECT_EQ(bm.numCachedBlocks(), 1); // the second block's key was taken by the first
    auto b = iota(50, 4);
    std::vector<BlockHash> hashes;
    std::vector<BlockId> hits;
    bm.findCachedPrefix(b.data(), 2, hashes, hits);
    EXPECT_TRUE(hits.empty());
    hashes.clear();
    bm.findCachedPrefix(a.data(), 2, hashes, hits);
    EXPECT_EQ(hits, (std::vector<BlockId>{blocksA[0]}));
    // Same second-block tokens under another parent: the token check alone would pass, the
    // parent-hash check rejects it.
    BlockManager bm2(8, 2, true);
    bm2.setHashMaskForTesting(0);
    std::vector<TokenId> tail{7, 8};
    BlockId const lone = bm2.allocate();
    bm2.cacheBlock(lone, bm2.hashBlock(12345, tail.data()), 12345, tail.data());
    std::vector<TokenId> probe{7, 8};
    hashes.clear();
    bm2.findCachedPrefix(probe.data(), 1, hashes, hits);
    EXPECT_TRUE(hits.empty());
}

TEST(BlockManagerTest, EvictionIsLeastRecentlyUsedFirst)
{
    BlockManager bm(4, 2, true); // 3 usable blocks
    auto x = iota(1, 2);
    auto y = iota(20, 2);
    BlockId bx = bm.allocate();
    BlockId by = bm.allocate();
    cacheChain(bm, {bx}, x);
    cacheChain(bm, {by}, y);
    bm.freeBlocks({bx}); // x freed first: least recently used
    bm.freeBlocks({by});
    EXPECT_EQ(bm.freeListForTesting(), (std::vector<BlockId>{3, bx, by}));
    EXPECT_EQ(bm.allocate(), 3);  // the never-cached block goes first
    EXPECT_EQ(bm.allocate(), bx); // then x is evicted
    EXPECT_EQ(bm.numCachedBlocks(), 1);
    std::vector<BlockHash> hashes;
    std::vector<BlockId> hits;
    bm.findCachedPrefix(y.data(), 1, hashes, hits);
    EXPECT_EQ(hits, (std::vector<BlockId>{by}));
    hashes.clear();
    bm.findCachedPrefix(x.data(), 1, hashes, hits);
    EXPECT_TRUE(hits.empty());
    // A hit on a free cached block takes it out of the free list.
    EXPECT_EQ(bm.numEvictableAmong({by}), 1);
    bm.acquire(by);
    EXPECT_EQ(bm.numFreeBlocks(), 0);
}

TEST(BlockManagerTest, CachingOffCachesNothing)
{
    BlockManager bm(4, 2, false);
    auto x = iota(1, 2);
    BlockId b = bm.allocate();
    EXPECT_FALSE(bm.cacheBlock(b, bm.hashBlock(0, x.data()), 0, x.data()));
    EXPECT_EQ(bm.numCachedBlocks(), 0);
}

TEST(BlockManagerTest, InvalidConfigThrows)
{
    EXPECT_THROW(BlockManager(1, 2, true), ConfigError);
    EXPECT_THROW(BlockManager(4, 0, true), ConfigError);
}

TEST(BlockManagerTest, RandomizedCacheTableMatchesAModel)
{
    // Oracle: a std::map from token to the block caching it (one-token blocks, chains of one).
    // The open-addressing table is half full at most, so probe chains and backward-shift
    // deletions are exercised on every eviction.
    BlockManager bm(64, 1, true);
    std::map<TokenId, BlockId> model;
    std::vector<BlockId> held;
    std::mt19937 rng(7);
    for (int op = 0; op < 20000; ++op)
    {
        int const kind = static_cast<int>(rng() % 3);
        if (kind == 0 && bm.numFreeBlocks() > 0)
        {
            BlockId const b = bm.allocate(); // may evict a cached block
            for (auto it = model.begin(); it != model.end(); ++it)
            {
                if (it->second == b)
                {
                    model.erase(it);
                    break;
                }
            }
            TokenId const t = static_cast<TokenId>(rng() % 200);
            if (bm.cacheBlock(b, bm.hashBlock(0, &t), 0, &t))
            {
                ASSERT_EQ(model.count(t), 0u);
                model[t] = b;
            }
            held.push_back(b);
        }
        else if (kind == 1 && !held.empty())
        {
            size_t const i = rng() % held.size();
            bm.freeBlocks({held[i]});
            held.erase(held.begin() + static_cast<std::ptrdiff_t>(i));
        }
        else
        {
            TokenId const t = static_cast<TokenId>(rng() % 200);
            std::vector<BlockHash> hashes;
            std::vector<BlockId> hits;
            bm.findCachedPrefix(&t, 1, hashes, hits);
            auto it = model.find(t);
            ASSERT_EQ(hits.size(), it == model.end() ? 0u : 1u) << "op " << op;
            if (it != model.end())
            {
                ASSERT_EQ(hits[0], it->second);
            }
        }
        ASSERT_EQ(bm.numCachedBlocks(), static_cast<SizeType32>(model.size()));
    }
}
