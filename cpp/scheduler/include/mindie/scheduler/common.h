// SPDX-License-Identifier: Apache-2.0
/// @file common.h
/// @brief Shared types of the scheduler core: ids, enums, the POD config and the typed exceptions
/// that the pybind11 layer translates. Depends on the standard library only (never on Python).
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mindie::scheduler
{

using SizeType32 = std::int32_t;
using ReqId = std::int64_t;
using TokenId = std::int32_t;
using BlockId = std::int32_t;
using BlockHash = std::uint64_t;

/// @brief Block 0 is never handed out: block tables are padded with it.
constexpr BlockId kNullBlock = 0;

/// @brief Why a request stopped. Values are part of the Python contract (FinishReason IntEnum).
enum class FinishReason : std::int32_t
{
    kNONE = 0,
    kEOS = 1,
    kSTOP_TOKEN = 2,
    kSTOP_STRING = 3,
    kLENGTH = 4,
    kMAX_MODEL_LEN = 5,
    kABORTED = 6,
    kPREFILL_DONE = 7,
};

/// @brief Admission order and preemption victim choice.
enum class Policy : std::int32_t
{
    kFCFS = 0,         ///< arrival time, then id; priority ignored
    kPRIORITY = 1,     ///< (priority, arrival, id); may preempt a lower-priority running request
    kSTATIC = 2,       ///< benchmark only: a new batch starts when the previous one has finished
    kPREFILL_FIRST = 3 ///< benchmark only: whole prompts, prefill steps before decode steps
};

/// @brief Role of this instance in prefill/decode disaggregation.
enum class Role : std::int32_t
{
    kCOLOCATED = 0,
    kPREFILL = 1,
    kDECODE = 2,
};

/// @brief Plain configuration of the scheduler core: the one struct the Python facade fills field by
/// field (bound with def_readwrite). validate() is the single place its rules live.
struct SchedulerConfig
{
    SizeType32 numBlocks{0};             ///< includes the null block 0
    SizeType32 blockSize{16};            ///< tokens per block
    SizeType32 maxNumBatchedTokens{2048}; ///< token budget of one step
    SizeType32 maxNumSeqs{256};          ///< running requests at most
    SizeType32 maxModelLen{2048};        ///< prompt + output tokens at most
    bool enablePrefixCaching{true};
    bool enableChunkedPrefill{true};
    Policy policy{Policy::kFCFS};
    Role role{Role::kCOLOCATED};
    /// Asynchronous scheduling: a decode row also gets the blocks of its next this-many positions
    /// one step early (when they are free: never by preempting), so that a runner can queue the
    /// next step before this one's tokens are back. 0 (off) or 1.
    SizeType32 numLookaheadSlots{0};

    /// @brief Throws ConfigError naming the first invalid field (snake_case, as in the YAML keys).
    void validate() const;
};

/// @brief Base of every error the scheduler raises; nothing in the core aborts the process.
class SchedulerError : public std::runtime_error
{
public:
    using std::runtime_error::runtime_error;
};

/// @brief A request refused at admission (duplicate id, empty prompt, can never fit, bad field);
/// field() names the request field at fault (snake_case, as in the API; empty: none in particular).
class RequestRejectedError : public SchedulerError
{
public:
    explicit RequestRejectedError(std::string const& msg, std::string field = {})
        : SchedulerError(msg)
        , mField(std::move(field))
    {
    }
    [[nodiscard]] std::string const& field() const noexcept { return mField; }

private:
    std::string mField;
};

/// @brief add_prefilled could not get its blocks now (retry later); a kind of rejection.
class NoFreeBlocksError : public RequestRejectedError
{
public:
    using RequestRejectedError::RequestRejectedError;
};

/// @brief An id that names no live request.
class UnknownRequestError : public SchedulerError
{
public:
    using SchedulerError::SchedulerError;
};

/// @brief The caller broke the step contract (update without schedule, wrong ids, wrong role).
class ContractError : public SchedulerError
{
public:
    using SchedulerError::SchedulerError;
};

/// @brief An invalid SchedulerConfig field.
class ConfigError : public SchedulerError
{
public:
    using SchedulerError::SchedulerError;
};

} // namespace mindie::scheduler

/// @brief Throws RequestRejectedError naming `field` with a streamed message when `cond` is false.
/// The message starts with the field. Usage: MINDIE_REJECT(n >= 1, "max_tokens", "must be >= 1, got " << n);
#define MINDIE_REJECT(cond, field, msg)                                                                     \
    do                                                                                                      \
    {                                                                                                       \
        if (__builtin_expect(!(cond), 0))                                                                   \
        {                                                                                                   \
            std::ostringstream mindieCheckOss_;                                                             \
            mindieCheckOss_ << (field) << " " << msg;                                                       \
            throw ::mindie::scheduler::RequestRejectedError(mindieCheckOss_.str(), (field));                \
        }                                                                                                   \
    } while (0)

/// @brief Throws `ExcType` with a streamed message when `cond` is false (never aborts).
/// Usage: MINDIE_CHECK(n > 0, RequestRejectedError, "max_tokens must be >= 1, got " << n);
#define MINDIE_CHECK(cond, ExcType, msg)                                                                    \
    do                                                                                                      \
    {                                                                                                       \
        if (__builtin_expect(!(cond), 0))                                                                   \
        {                                                                                                   \
            std::ostringstream mindieCheckOss_;                                                             \
            mindieCheckOss_ << msg;                                                                         \
            throw ::mindie::scheduler::ExcType(mindieCheckOss_.str());                                      \
        }                                                                                                   \
    } while (0)
