// SPDX-License-Identifier: Apache-2.0
// pybind11 module mindie_llm._scheduler: the Scheduler core over ids and numpy arrays only.
// schedule() releases the GIL and returns numpy views over a C++-owned SchedulerOutput; typed C++
// exceptions become the Python exception classes defined here (re-exported by the facade). The
// enums FinishReason, Policy and Role and the SchedulerConfig struct (fields bound one by one) are
// exported so that the Python side derives its copies from them.
#include "mindie/scheduler/scheduler.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
namespace ms = mindie::scheduler;

namespace
{

using Int32Array = py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

PyObject* gSchedulerError = nullptr;
PyObject* gRequestRejectedError = nullptr;
PyObject* gNoFreeBlocksError = nullptr;
PyObject* gUnknownRequestError = nullptr;
PyObject* gContractError = nullptr;
PyObject* gConfigError = nullptr;

PyObject* newException(py::module_& m, char const* name, py::tuple const& bases)
{
    std::string const qualified = std::string("mindie_llm._scheduler.") + name;
    PyObject* cls = PyErr_NewException(qualified.c_str(), bases.ptr(), nullptr);
    if (cls == nullptr)
    {
        throw py::error_already_set();
    }
    m.add_object(name, py::handle(cls)); // the module keeps a reference for the process lifetime
    return cls;
}

/// Raises `type(msg)` with the attribute `field` (the request field at fault, or None).
void setRejected(PyObject* type, ms::RequestRejectedError const& e)
{
    PyObject* exc = PyObject_CallFunction(type, "s", e.what());
    if (exc == nullptr)
    {
        return; // the call's own error stays set
    }
    PyObject* field = Py_None;
    if (e.field().empty())
    {
        Py_INCREF(field);
    }
    else
    {
        field = PyUnicode_FromString(e.field().c_str());
    }
    if (field == nullptr || PyObject_SetAttrString(exc, "field", field) != 0)
    {
        Py_XDECREF(field);
        Py_DECREF(exc);
        return;
    }
    Py_DECREF(field);
    PyErr_SetObject(type, exc);
    Py_DECREF(exc);
}

std::vector<std::int32_t> toVector(Int32Array const& a)
{
    return std::vector<std::int32_t>(a.data(), a.data() + a.size());
}

template <typename T>
py::array view(std::vector<T>& v, py::handle owner, py::dtype const& dtype)
{
    // Zero-copy and read-only: the array's base keeps the SchedulerOutput alive.
    py::array arr(dtype, {static_cast<py::ssize_t>(v.size())}, {static_cast<py::ssize_t>(sizeof(T))}, v.data(), owner);
    py::detail::array_proxy(arr.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    return arr;
}

ms::RequestParams makeParams(std::int32_t maxTokens, std::int32_t minTokens, std::int32_t priority,
    double arrivalTime, Int32Array const& eos, Int32Array const& stop, bool ignoreEos, std::int64_t parentId)
{
    ms::RequestParams p;
    p.maxTokens = maxTokens;
    p.minTokens = minTokens;
    p.priority = priority;
    p.arrivalTime = arrivalTime;
    p.eosTokenIds = toVector(eos);
    p.stopTokenIds = toVector(stop);
    p.ignoreEos = ignoreEos;
    p.parentId = parentId;
    return p;
}

py::tuple schedule(ms::Scheduler& self)
{
    std::shared_ptr<ms::SchedulerOutput> out;
    {
        py::gil_scoped_release release;
        out = self.schedule();
    }
    py::object owner = py::cast(out);
    auto const i32 = py::dtype::of<std::int32_t>();
    auto const i64 = py::dtype::of<std::int64_t>();
    auto const b8 = py::dtype::of<bool>();
    // The order of mindie_llm.contract.SchedulerOutput's fields (SCHEDULE_FIELDS in scheduler/outputs.py).
    return py::make_tuple(view(out->reqIds, owner, i64), view(out->numScheduledTokens, owner, i32),
        view(out->numComputedTokens, owner, i32), view(out->inputTokenIds, owner, i32),
        view(out->sampleMask, owner, b8), view(out->blockTableReset, owner, b8), view(out->newBlockOffsets, owner, i32),
        view(out->newBlockIds, owner, i32), view(out->preemptedIds, owner, i64), view(out->finishedIds, owner, i64),
        view(out->finishReasons, owner, i32), out->numBatchedTokens, view(out->specOffsets, owner, i32),
        view(out->specTokenIds, owner, i32));
}

/// A 1-D int32 array, or nullptr for None; `name` goes into the error.
Int32Array const* optionalArray(py::object const& obj, Int32Array& holder, char const* name)
{
    if (obj.is_none())
    {
        return nullptr;
    }
    holder = Int32Array::ensure(obj);
    if (!holder || holder.ndim() != 1)
    {
        PyErr_Clear();
        throw ms::ContractError(std::string("update(): ") + name + " must be a 1-D int32 array");
    }
    return &holder;
}

py::tuple update(ms::Scheduler& self, Int64Array const& ids, py::object const& tokenOffsets,
    py::object const& tokenIds, py::object const& draftOffsets, py::object const& draftTokenIds)
{
    Int32Array offsetsHolder, tokensHolder, draftOffsetsHolder, draftTokensHolder;
    Int32Array const* offsets = optionalArray(tokenOffsets, offsetsHolder, "token_offsets");
    Int32Array const* tokens = optionalArray(tokenIds, tokensHolder, "token_ids");
    Int32Array const* dOffsets = optionalArray(draftOffsets, draftOffsetsHolder, "draft_offsets");
    Int32Array const* dTokens = optionalArray(draftTokenIds, draftTokensHolder, "draft_token_ids");
    if (ids.ndim() != 1 || tokens == nullptr)
    {
        throw ms::ContractError("update(): req_ids must be 1-D and token_ids given");
    }
    auto const n = static_cast<size_t>(ids.size());
    ms::UpdateInput in;
    in.reqIds = ids.data();
    in.numRows = n;
    if (offsets != nullptr && !(n == 0 && offsets->size() == 0)) // an empty step may send [] for [0]
    {
        if (static_cast<size_t>(offsets->size()) != n + 1)
        {
            throw ms::ContractError("update(): token_offsets must have len(req_ids) + 1 entries");
        }
        in.tokenOffsets = offsets->data();
    }
    in.tokenIds = tokens->data();
    in.numTokenIds = static_cast<size_t>(tokens->size());
    if (dOffsets != nullptr && !(n == 0 && dOffsets->size() == 0))
    {
        if (static_cast<size_t>(dOffsets->size()) != n + 1)
        {
            throw ms::ContractError("update(): draft_offsets must have len(req_ids) + 1 entries");
        }
        in.draftOffsets = dOffsets->data();
    }
    if (dTokens != nullptr)
    {
        in.draftTokenIds = dTokens->data();
        in.numDraftTokenIds = static_cast<size_t>(dTokens->size());
    }
    ms::UpdateResult r;
    {
        py::gil_scoped_release release; // the arrays are held by this frame
        r = self.update(in);
    }
    return py::make_tuple(
        py::array_t<std::int64_t>(static_cast<py::ssize_t>(r.finishedIds.size()), r.finishedIds.data()),
        py::array_t<std::int32_t>(static_cast<py::ssize_t>(r.finishReasons.size()), r.finishReasons.data()),
        py::array_t<std::int32_t>(static_cast<py::ssize_t>(r.numAppended.size()), r.numAppended.data()));
}

} // namespace

PYBIND11_MODULE(_scheduler, m)
{
    m.doc() = "C++ continuous-batching scheduler of mindie_llm (use mindie_llm.scheduler, not this module)";

    gSchedulerError = newException(m, "SchedulerError", py::make_tuple(py::handle(PyExc_RuntimeError)));
    py::handle base(gSchedulerError);
    gRequestRejectedError
        = newException(m, "RequestRejectedError", py::make_tuple(base, py::handle(PyExc_ValueError)));
    gNoFreeBlocksError = newException(m, "NoFreeBlocksError", py::make_tuple(py::handle(gRequestRejectedError)));
    gUnknownRequestError = newException(
        m, "UnknownRequestError", py::make_tuple(base, py::handle(PyExc_KeyError), py::handle(PyExc_ValueError)));
    gContractError = newException(m, "SchedulerContractError", py::make_tuple(base, py::handle(PyExc_ValueError)));
    gConfigError = newException(m, "SchedulerConfigError", py::make_tuple(base, py::handle(PyExc_ValueError)));
    py::register_exception_translator(
        [](std::exception_ptr p)
        {
            try
            {
                if (p)
                {
                    std::rethrow_exception(p);
                }
            }
            catch (ms::NoFreeBlocksError const& e)
            {
                setRejected(gNoFreeBlocksError, e);
            }
            catch (ms::RequestRejectedError const& e)
            {
                setRejected(gRequestRejectedError, e);
            }
            catch (ms::UnknownRequestError const& e)
            {
                PyErr_SetString(gUnknownRequestError, e.what());
            }
            catch (ms::ContractError const& e)
            {
                PyErr_SetString(gContractError, e.what());
            }
            catch (ms::ConfigError const& e)
            {
                PyErr_SetString(gConfigError, e.what());
            }
            catch (ms::SchedulerError const& e)
            {
                PyErr_SetString(gSchedulerError, e.what());
            }
        });

    py::class_<ms::SchedulerOutput, std::shared_ptr<ms::SchedulerOutput>>(m, "_OutputBuffer");

    py::enum_<ms::FinishReason>(m, "FinishReason", "Why a request stopped (the source of the Python FinishReason)")
        .value("NONE", ms::FinishReason::kNONE)
        .value("EOS", ms::FinishReason::kEOS)
        .value("STOP_TOKEN", ms::FinishReason::kSTOP_TOKEN)
        .value("STOP_STRING", ms::FinishReason::kSTOP_STRING)
        .value("LENGTH", ms::FinishReason::kLENGTH)
        .value("MAX_MODEL_LEN", ms::FinishReason::kMAX_MODEL_LEN)
        .value("ABORTED", ms::FinishReason::kABORTED)
        .value("PREFILL_DONE", ms::FinishReason::kPREFILL_DONE);
    py::enum_<ms::Policy>(m, "Policy", "Scheduling policy (YAML scheduler.policy is the lower-case name)")
        .value("FCFS", ms::Policy::kFCFS)
        .value("PRIORITY", ms::Policy::kPRIORITY)
        .value("STATIC", ms::Policy::kSTATIC)
        .value("PREFILL_FIRST", ms::Policy::kPREFILL_FIRST);
    py::enum_<ms::Role>(m, "Role", "PD-disaggregation role (YAML scheduler.role is the lower-case name)")
        .value("COLOCATED", ms::Role::kCOLOCATED)
        .value("PREFILL", ms::Role::kPREFILL)
        .value("DECODE", ms::Role::kDECODE);

    py::class_<ms::SchedulerConfig>(m, "SchedulerConfig", "Configuration of the scheduler core; validate() checks it")
        .def(py::init<>())
        .def_readwrite("num_blocks", &ms::SchedulerConfig::numBlocks)
        .def_readwrite("block_size", &ms::SchedulerConfig::blockSize)
        .def_readwrite("max_num_batched_tokens", &ms::SchedulerConfig::maxNumBatchedTokens)
        .def_readwrite("max_num_seqs", &ms::SchedulerConfig::maxNumSeqs)
        .def_readwrite("max_model_len", &ms::SchedulerConfig::maxModelLen)
        .def_readwrite("enable_prefix_caching", &ms::SchedulerConfig::enablePrefixCaching)
        .def_readwrite("enable_chunked_prefill", &ms::SchedulerConfig::enableChunkedPrefill)
        .def_readwrite("policy", &ms::SchedulerConfig::policy)
        .def_readwrite("role", &ms::SchedulerConfig::role)
        .def_readwrite("num_lookahead_slots", &ms::SchedulerConfig::numLookaheadSlots)
        .def("validate", &ms::SchedulerConfig::validate);

    py::class_<ms::Scheduler>(m, "SchedulerCore")
        .def(py::init<ms::SchedulerConfig const&>(), py::arg("config"))
        .def(
            "add_request",
            [](ms::Scheduler& self, std::int64_t id, Int32Array const& prompt, std::int32_t maxTokens,
                std::int32_t minTokens, std::int32_t priority, double arrivalTime, Int32Array const& eos,
                Int32Array const& stop, bool ignoreEos, std::int64_t parentId)
            {
                self.addRequest(id, toVector(prompt),
                    makeParams(maxTokens, minTokens, priority, arrivalTime, eos, stop, ignoreEos, parentId));
            },
            py::arg("req_id"), py::arg("prompt_token_ids"), py::arg("max_tokens"), py::arg("min_tokens"),
            py::arg("priority"), py::arg("arrival_time"), py::arg("eos_token_ids"), py::arg("stop_token_ids"),
            py::arg("ignore_eos"), py::arg("parent_id"))
        .def(
            "check_request",
            [](ms::Scheduler const& self, Int32Array const& prompt, std::int32_t maxTokens, std::int32_t minTokens,
                std::int32_t priority, double arrivalTime, Int32Array const& eos, Int32Array const& stop,
                bool ignoreEos, std::int64_t parentId)
            {
                self.checkRequest(toVector(prompt),
                    makeParams(maxTokens, minTokens, priority, arrivalTime, eos, stop, ignoreEos, parentId));
            },
            py::arg("prompt_token_ids"), py::arg("max_tokens"), py::arg("min_tokens"), py::arg("priority"),
            py::arg("arrival_time"), py::arg("eos_token_ids"), py::arg("stop_token_ids"), py::arg("ignore_eos"),
            py::arg("parent_id"))
        .def(
            "add_prefilled",
            [](ms::Scheduler& self, std::int64_t id, Int32Array const& prompt, Int32Array const& outputs,
                std::int32_t maxTokens, std::int32_t minTokens, std::int32_t priority, double arrivalTime,
                Int32Array const& eos, Int32Array const& stop, bool ignoreEos, std::int64_t parentId)
            {
                auto blocks = self.addPrefilled(id, toVector(prompt), toVector(outputs),
                    makeParams(maxTokens, minTokens, priority, arrivalTime, eos, stop, ignoreEos, parentId));
                return py::array_t<std::int32_t>(static_cast<py::ssize_t>(blocks.size()), blocks.data());
            },
            py::arg("req_id"), py::arg("prompt_token_ids"), py::arg("output_token_ids"), py::arg("max_tokens"),
            py::arg("min_tokens"), py::arg("priority"), py::arg("arrival_time"), py::arg("eos_token_ids"),
            py::arg("stop_token_ids"), py::arg("ignore_eos"), py::arg("parent_id"))
        .def("schedule", &schedule)
        .def("update", &update, py::arg("req_ids"), py::arg("token_offsets"), py::arg("token_ids"),
            py::arg("draft_offsets") = py::none(), py::arg("draft_token_ids") = py::none())
        .def("abort", &ms::Scheduler::abort, py::arg("req_id"))
        .def(
            "finish",
            [](ms::Scheduler& self, std::int64_t id, std::int32_t reason)
            { return self.finish(id, static_cast<ms::FinishReason>(reason)); },
            py::arg("req_id"), py::arg("reason"))
        .def("release", &ms::Scheduler::release, py::arg("req_id"))
        .def("kv_ready", &ms::Scheduler::kvReady, py::arg("req_id"))
        .def(
            "get_block_ids",
            [](ms::Scheduler const& self, std::int64_t id)
            {
                auto blocks = self.getBlockIds(id);
                return py::array_t<std::int32_t>(static_cast<py::ssize_t>(blocks.size()), blocks.data());
            },
            py::arg("req_id"))
        .def("get_num_computed_tokens", &ms::Scheduler::getNumComputedTokens, py::arg("req_id"))
        .def("has_unfinished", &ms::Scheduler::hasUnfinished)
        .def_property_readonly("num_waiting", &ms::Scheduler::numWaiting)
        .def_property_readonly("num_running", &ms::Scheduler::numRunning)
        .def("stats",
            [](ms::Scheduler const& self)
            {
                ms::SchedulerStats s = self.stats();
                py::dict d;
                d["num_blocks"] = s.numBlocks;
                d["num_free_blocks"] = s.numFreeBlocks;
                d["num_cached_blocks"] = s.numCachedBlocks;
                d["prefix_cache_queries"] = s.prefixCacheQueries;
                d["prefix_cache_hits"] = s.prefixCacheHits;
                d["prefix_cache_hit_rate"] = s.prefixCacheQueries > 0
                    ? static_cast<double>(s.prefixCacheHits) / static_cast<double>(s.prefixCacheQueries)
                    : 0.0;
                d["num_preemptions"] = s.numPreemptions;
                d["num_waiting"] = s.numWaiting;
                d["num_running"] = s.numRunning;
                return d;
            })
        .def("set_hash_mask_for_testing", &ms::Scheduler::setHashMaskForTesting, py::arg("mask"))
        .def("free_list_for_testing", &ms::Scheduler::freeListForTesting);
}
