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

#include <algorithm>
#include <type_traits>

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

// ---------------------------------------------------------------------------------- step arrays
// The step path builds its arrays with numpy's C API directly (no shape vectors, no flag fix-ups):
// read-only views over the C++ buffer, and for the sections that are empty or constant in most
// steps (no preemption, no finish, no proposals, one token per row) shared read-only arrays. Those
// depend only on dtype and length, so sharing them between steps and schedulers is invisible to a
// reader (nobody can write them); they live as long as the process, like the exception types.

using NpyApi = py::detail::npy_api;
constexpr int kReadOnly = NpyApi::NPY_ARRAY_C_CONTIGUOUS_ | NpyApi::NPY_ARRAY_ALIGNED_;

template <typename T>
constexpr int typeNum()
{
    if constexpr (std::is_same_v<T, std::uint8_t>)
    {
        return NpyApi::NPY_BOOL_; // the masks
    }
    else if constexpr (std::is_same_v<T, std::int32_t>)
    {
        return NpyApi::NPY_INT32_;
    }
    else
    {
        static_assert(std::is_same_v<T, std::int64_t>);
        return NpyApi::NPY_INT64_;
    }
}

/// A new 1-D array of `n` elements of `T` over `data` (numpy allocates when `data` is null),
/// read-only when `data` is given. Returns a new reference.
template <typename T>
PyObject* newArray(py::ssize_t n, T* data)
{
    auto& api = NpyApi::get();
    Py_intptr_t dims[1] = {n};
    Py_intptr_t strides[1] = {static_cast<Py_intptr_t>(sizeof(T))};
    PyObject* arr = api.PyArray_NewFromDescr_(api.PyArray_Type_, api.PyArray_DescrFromType_(typeNum<T>()), 1, dims,
        strides, data, data != nullptr ? kReadOnly : 0, nullptr);
    if (arr == nullptr)
    {
        throw py::error_already_set();
    }
    return arr;
}

void setReadOnly(PyObject* arr)
{
    py::detail::array_proxy(arr)->flags &= ~NpyApi::NPY_ARRAY_WRITEABLE_;
}

/// The shared read-only empty array of `T` (a new reference).
template <typename T>
PyObject* emptyArray()
{
    static PyObject* const empty = []
    {
        PyObject* arr = newArray<T>(0, nullptr);
        setReadOnly(arr);
        return arr;
    }();
    Py_INCREF(empty);
    return empty;
}

/// A read-only int32 array of `n` copies of `Value`: the last one made is kept and handed out again
/// while `n` stays the same (steady batches). A new reference.
template <std::int32_t Value>
PyObject* constantArray(py::ssize_t n)
{
    static PyObject* last = nullptr;
    if (last == nullptr || py::detail::array_proxy(last)->dimensions[0] != n)
    {
        PyObject* arr = newArray<std::int32_t>(n, nullptr);
        auto* data = reinterpret_cast<std::int32_t*>(py::detail::array_proxy(arr)->data);
        std::fill(data, data + n, Value);
        setReadOnly(arr);
        Py_XDECREF(last);
        last = arr;
    }
    Py_INCREF(last);
    return last;
}

/// A read-only view of `v` whose base is `owner` (kept alive by it), or the shared empty array.
template <typename T>
PyObject* view(std::vector<T>& v, PyObject* owner)
{
    if (v.empty())
    {
        return emptyArray<T>();
    }
    PyObject* arr = newArray<T>(static_cast<py::ssize_t>(v.size()), v.data());
    Py_INCREF(owner);
    if (NpyApi::get().PyArray_SetBaseObject_(arr, owner) != 0) // steals `owner`, also on failure
    {
        Py_DECREF(arr);
        throw py::error_already_set();
    }
    return arr;
}

/// A new array holding a copy of `v`, or the shared empty array.
template <typename T>
PyObject* copyOf(std::vector<T> const& v)
{
    if (v.empty())
    {
        return emptyArray<T>();
    }
    PyObject* arr = newArray<T>(static_cast<py::ssize_t>(v.size()), nullptr);
    std::copy(v.begin(), v.end(), reinterpret_cast<T*>(py::detail::array_proxy(arr)->data));
    return arr;
}

void releaseOutput(PyObject* capsule)
{
    delete static_cast<std::shared_ptr<ms::SchedulerOutput>*>(PyCapsule_GetPointer(capsule, nullptr));
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
    // The views' base: a capsule holding one reference to the buffer (the scheduler reuses the
    // buffer once no capsule holds it).
    auto* holder = new std::shared_ptr<ms::SchedulerOutput>(out);
    PyObject* owner = PyCapsule_New(holder, nullptr, &releaseOutput);
    if (owner == nullptr)
    {
        delete holder;
        throw py::error_already_set();
    }
    py::object ownerRef = py::reinterpret_steal<py::object>(owner);
    ms::SchedulerOutput& o = *out;
    // The order of mindie_llm.contract.SchedulerOutput's fields (SCHEDULE_FIELDS in scheduler/outputs.py).
    py::tuple t(14);
    PyObject* tp = t.ptr();
    PyTuple_SET_ITEM(tp, 0, view(o.reqIds, owner));
    PyTuple_SET_ITEM(tp, 1, view(o.numScheduledTokens, owner));
    PyTuple_SET_ITEM(tp, 2, view(o.numComputedTokens, owner));
    PyTuple_SET_ITEM(tp, 3, view(o.inputTokenIds, owner));
    PyTuple_SET_ITEM(tp, 4, view(o.sampleMask, owner));
    PyTuple_SET_ITEM(tp, 5, view(o.blockTableReset, owner));
    PyTuple_SET_ITEM(tp, 6, view(o.newBlockOffsets, owner));
    PyTuple_SET_ITEM(tp, 7, view(o.newBlockIds, owner));
    PyTuple_SET_ITEM(tp, 8, view(o.preemptedIds, owner));
    PyTuple_SET_ITEM(tp, 9, view(o.finishedIds, owner));
    PyTuple_SET_ITEM(tp, 10, view(o.finishReasons, owner));
    PyObject* numBatched = PyLong_FromLongLong(o.numBatchedTokens);
    if (numBatched == nullptr)
    {
        throw py::error_already_set();
    }
    PyTuple_SET_ITEM(tp, 11, numBatched);
    // No proposals in the step: the offsets are all zero.
    PyTuple_SET_ITEM(tp, 12,
        o.specTokenIds.empty() ? constantArray<0>(static_cast<py::ssize_t>(o.reqIds.size()) + 1)
                               : view(o.specOffsets, owner));
    PyTuple_SET_ITEM(tp, 13, view(o.specTokenIds, owner));
    return t;
}

/// The data of `obj` when it is a 1-D, aligned, C-contiguous numpy array of exactly `T` (no
/// conversion needed), else nullptr; `size` gets its length.
template <typename T>
T const* exactArray(py::handle obj, size_t& size)
{
    if (!py::isinstance<py::array_t<T, py::array::c_style>>(obj))
    {
        return nullptr;
    }
    auto const* proxy = py::detail::array_proxy(obj.ptr());
    if (proxy->nd != 1 || (proxy->flags & NpyApi::NPY_ARRAY_ALIGNED_) == 0)
    {
        return nullptr;
    }
    size = static_cast<size_t>(proxy->dimensions[0]);
    return reinterpret_cast<T const*>(proxy->data);
}

/// update()'s arguments, checked for sizes (the core checks the values): an array given as None
/// stays null. Returns false when some array is not an exact 1-D int64 / int32 array.
bool readUpdateInput(ms::UpdateInput& in, py::handle ids, py::handle tokenOffsets, py::handle tokenIds,
    py::handle draftOffsets, py::handle draftTokenIds)
{
    size_t n = 0;
    size_t numOffsets = 0;
    size_t numDraftOffsets = 0;
    in.reqIds = exactArray<std::int64_t>(ids, n);
    in.tokenIds = exactArray<std::int32_t>(tokenIds, in.numTokenIds);
    if (in.reqIds == nullptr || in.tokenIds == nullptr)
    {
        return false;
    }
    if (!tokenOffsets.is_none() && (in.tokenOffsets = exactArray<std::int32_t>(tokenOffsets, numOffsets)) == nullptr)
    {
        return false;
    }
    if (!draftOffsets.is_none() && (in.draftOffsets = exactArray<std::int32_t>(draftOffsets, numDraftOffsets)) == nullptr)
    {
        return false;
    }
    if (!draftTokenIds.is_none()
        && (in.draftTokenIds = exactArray<std::int32_t>(draftTokenIds, in.numDraftTokenIds)) == nullptr)
    {
        return false;
    }
    in.numRows = n;
    if (in.tokenOffsets != nullptr)
    {
        if (n == 0 && numOffsets == 0)
        {
            in.tokenOffsets = nullptr; // an empty step may send [] for [0]
        }
        else if (numOffsets != n + 1)
        {
            throw ms::ContractError("update(): token_offsets must have len(req_ids) + 1 entries");
        }
    }
    if (in.draftOffsets != nullptr)
    {
        if (n == 0 && numDraftOffsets == 0)
        {
            in.draftOffsets = nullptr;
        }
        else if (numDraftOffsets != n + 1)
        {
            throw ms::ContractError("update(): draft_offsets must have len(req_ids) + 1 entries");
        }
    }
    return true;
}

/// update() over arrays of the exact types (the facade converts other inputs first); None when
/// some array is not one. Returns (finished_ids, finish_reasons, num_appended).
py::object update(ms::Scheduler& self, py::handle ids, py::handle tokenOffsets, py::handle tokenIds,
    py::handle draftOffsets, py::handle draftTokenIds)
{
    ms::UpdateInput in;
    if (!readUpdateInput(in, ids, tokenOffsets, tokenIds, draftOffsets, draftTokenIds))
    {
        return py::none();
    }
    ms::UpdateResult r;
    {
        py::gil_scoped_release release; // the arrays are held by the caller's frame
        r = self.update(in);
    }
    bool const oneEach = std::all_of(r.numAppended.begin(), r.numAppended.end(), [](std::int32_t c) { return c == 1; });
    py::tuple t(3);
    PyTuple_SET_ITEM(t.ptr(), 0, copyOf(r.finishedIds));
    PyTuple_SET_ITEM(t.ptr(), 1, copyOf(r.finishReasons));
    PyTuple_SET_ITEM(t.ptr(), 2,
        oneEach ? constantArray<1>(static_cast<py::ssize_t>(r.numAppended.size())) : copyOf(r.numAppended));
    return std::move(t);
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
            py::arg("draft_offsets"), py::arg("draft_token_ids"))
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
