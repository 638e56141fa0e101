// SPDX-License-Identifier: Apache-2.0
// pybind11 module mindie_llm._cpu_kernels: raw-pointer entry points (addresses as integers). The
// Python wrapper (backends/cpu/kernels.py) checks every shape, dtype, stride and index first.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "ops.h"

namespace py = pybind11;
namespace mk = mindie_kernels;

template <typename T>
static T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

PYBIND11_MODULE(_cpu_kernels, m) {
  m.doc() = "CPU kernels: GGUF-block matmuls, paged decode attention, rotary + KV write, RMSNorm, SiLU-and-mul";
  m.def("set_threads", &mk::set_threads, py::arg("n_threads"), py::arg("spin_us"));
  m.def("num_threads", &mk::num_threads);
  m.def("isa", [] { return std::string(mk::isa()); });
  m.def("set_isa", &mk::set_isa);
  m.def("packed_bytes", &mk::packed_bytes);
  m.def("pack", [](std::uintptr_t raw, int qtype, std::int64_t n, std::int64_t k, std::uintptr_t out) {
    py::gil_scoped_release nogil;
    return mk::pack(ptr<const std::uint8_t>(raw), qtype, n, k, ptr<std::uint8_t>(out));
  });
  m.def("gemm", [](std::uintptr_t x, std::int64_t t, std::int64_t ldx, std::uintptr_t w, int qtype,
                   std::int64_t n, std::int64_t k, std::uintptr_t y, std::int64_t ldy) {
    py::gil_scoped_release nogil;
    mk::gemm(ptr<const float>(x), t, ldx, ptr<const std::uint8_t>(w), qtype, n, k, ptr<float>(y), ldy);
  });
  m.def("dequant_rows", [](std::uintptr_t w, int qtype, std::int64_t n, std::int64_t k, std::uintptr_t ids,
                           std::int64_t n_ids, std::uintptr_t out) {
    mk::dequant_rows(ptr<const std::uint8_t>(w), qtype, n, k, ptr<const std::int64_t>(ids), n_ids,
                     ptr<float>(out));
  });
  m.def("paged_attention", [](std::uintptr_t q, std::uintptr_t cache, std::uintptr_t bt, std::int64_t ldbt,
                              std::int64_t n_reqs, std::uintptr_t token_req, std::uintptr_t token_len,
                              std::uintptr_t out, std::int64_t t, std::int64_t nblocks, std::int64_t bs,
                              std::int64_t hq, std::int64_t hk, std::int64_t d, float scale, std::int64_t window) {
    py::gil_scoped_release nogil;
    return mk::paged_attention(ptr<const float>(q), ptr<const float>(cache), ptr<const std::int32_t>(bt), ldbt,
                               n_reqs, ptr<const std::int32_t>(token_req), ptr<const std::int32_t>(token_len),
                               ptr<float>(out), t, nblocks, bs, hq, hk, d, scale, window);
  });
  m.def("rope_write_kv", [](std::uintptr_t qkv, std::int64_t t, std::int64_t ld, std::uintptr_t pos,
                            std::uintptr_t cos_sin, std::int64_t rot, bool neox, std::int64_t hq,
                            std::int64_t hk, std::int64_t d, std::uintptr_t cache, std::int64_t n_slots,
                            std::uintptr_t slots, std::int64_t max_pos) {
    return mk::rope_write_kv(ptr<float>(qkv), t, ld, ptr<const std::int64_t>(pos), ptr<const float>(cos_sin), rot,
                      neox, hq, hk, d, ptr<float>(cache), n_slots, ptr<const std::int64_t>(slots),
                             max_pos);
  });
  m.def("silu_and_mul", [](std::uintptr_t x, std::int64_t t, std::int64_t i, std::int64_t ldx, std::uintptr_t out) {
    py::gil_scoped_release nogil;
    mk::silu_and_mul(ptr<const float>(x), t, i, ldx, ptr<float>(out));
  });
  m.def("add_rms_norm", [](std::uintptr_t x, std::uintptr_t res, std::uintptr_t w, float eps, std::int64_t t,
                           std::int64_t h, std::uintptr_t out, std::uintptr_t res_out) {
    mk::add_rms_norm(ptr<const float>(x), res ? ptr<const float>(res) : nullptr, ptr<const float>(w), eps, t,
                     h, ptr<float>(out), ptr<float>(res_out));
  });
}
