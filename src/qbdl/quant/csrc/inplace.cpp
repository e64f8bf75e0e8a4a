// In-place INT8 weight sampling into oneDNN-packed weights, and zero-copy quint8 <-> uint8 views.
// Built on first use by qbdl.quant.native (torch.utils.cpp_extension); registered as torch.ops.qbdl.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/quantized/QTensorImpl.h>
#include <ATen/quantized/Quantizer.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

namespace at {
namespace native {
// Exported by libtorch_cpu (used by AOTInductor); declared here because their header needs ideep.
TORCH_API void* data_ptr_from_mkldnn(const Tensor& mkldnn_tensor);
TORCH_API int64_t nbytes_from_mkldnn(const Tensor& mkldnn_tensor);
}  // namespace native
}  // namespace at

namespace {

at::Tensor packed_bytes(const at::Tensor& packed) {
  TORCH_CHECK(packed.is_mkldnn(), "qbdl::packed_bytes: expected a oneDNN (mkldnn) packed weight");
  int64_t n = at::native::nbytes_from_mkldnn(packed);
  auto out = at::empty({n}, at::kByte);
  std::memcpy(out.data_ptr(), at::native::data_ptr_from_mkldnn(packed), n);
  return out;
}

// One fresh weight sample written into a oneDNN-packed weight (data bytes, then int32 per padded output
// channel: minus the channel's weight sum, the source zero-point compensation):
//   data[p] = clamp((mu[p] +- sg[p] * pool[offset + p]) >> shift, -127, 127), comp[oc[p]] -= data[p].
// mu / sg / oc are in packed order (padding: mu = 2^(shift-1), sg = 0, so it stays 0).
void sample_packed(const at::Tensor& packed, const at::Tensor& mu, const at::Tensor& sg, const at::Tensor& oc,
                   int64_t n_comp, const at::Tensor& pool, int64_t offset, bool negate, int64_t shift) {
  TORCH_CHECK(packed.is_mkldnn(), "qbdl::sample_packed: expected a oneDNN (mkldnn) packed weight");
  TORCH_CHECK(mu.scalar_type() == at::kInt && sg.scalar_type() == at::kInt && oc.scalar_type() == at::kShort &&
                  pool.scalar_type() == at::kShort,
              "qbdl::sample_packed: mu/sg must be int32, oc and pool int16");
  const int64_t n = mu.numel();
  TORCH_CHECK(mu.is_contiguous() && sg.is_contiguous() && oc.is_contiguous() && pool.is_contiguous() &&
                  sg.numel() == n && oc.numel() == n,
              "qbdl::sample_packed: mu/sg/oc must be contiguous and of one size");
  TORCH_CHECK(n + 4 * n_comp == at::native::nbytes_from_mkldnn(packed),
              "qbdl::sample_packed: layout does not match the packed weight's size");
  TORCH_CHECK(offset >= 0 && offset + n <= pool.numel(), "qbdl::sample_packed: pool window out of range");
  auto* out = static_cast<int8_t*>(at::native::data_ptr_from_mkldnn(packed));
  int32_t* comp = reinterpret_cast<int32_t*>(out + n);  // oneDNN aligns the data size: int32-aligned
  const int32_t* m = mu.data_ptr<int32_t>();
  const int32_t* s = sg.data_ptr<int32_t>();
  const int16_t* c = oc.data_ptr<int16_t>();
  const int16_t* z = pool.data_ptr<int16_t>() + offset;
  const int32_t sign = negate ? -1 : 1;
  const int sh = static_cast<int>(shift);
  std::fill(comp, comp + n_comp, 0);
  std::mutex merge;
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> sums(n_comp, 0);
    for (int64_t p = begin; p < end; ++p) {
      int32_t v = (m[p] + sign * s[p] * static_cast<int32_t>(z[p])) >> sh;
      v = std::min(127, std::max(-127, v));
      out[p] = static_cast<int8_t>(v);
      if (n_comp) sums[c[p]] -= v;
    }
    if (!n_comp) return;
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t j = 0; j < n_comp; ++j) comp[j] += sums[j];
  });
}

at::Tensor as_uint8(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kQUInt8, "qbdl::as_uint8: expected a quint8 tensor");
  at::Tensor keep = q;
  return at::from_blob(q.data_ptr(), q.sizes(), q.strides(), [keep](void*) {}, q.options().dtype(at::kByte));
}

at::Tensor as_quint8(const at::Tensor& u, double scale, int64_t zero_point) {
  TORCH_CHECK(u.scalar_type() == at::kByte, "qbdl::as_quint8: expected a uint8 tensor");
  // shares u's storage; the quantizer keeps the double scale (from_blob_quantized_* rounds it to float)
  auto impl = c10::make_intrusive<at::QTensorImpl>(
      c10::Storage(u.storage()), c10::DispatchKeySet(c10::DispatchKey::QuantizedCPU),
      caffe2::TypeMeta::Make<c10::quint8>(), at::make_per_tensor_affine_quantizer(scale, zero_point, at::kQUInt8));
  impl->set_storage_offset(u.storage_offset());
  impl->set_sizes_and_strides(u.sizes(), u.strides());
  return at::Tensor(std::move(impl));
}

}  // namespace

TORCH_LIBRARY(qbdl, m) {
  m.def("packed_bytes(Tensor packed) -> Tensor", &packed_bytes);
  m.def("sample_packed(Tensor packed, Tensor mu, Tensor sg, Tensor oc, int n_comp, Tensor pool, int offset, bool negate, int shift) -> ()",
        &sample_packed);
  m.def("as_uint8(Tensor q) -> Tensor", &as_uint8);
  m.def("as_quint8(Tensor u, float scale, int zero_point) -> Tensor", &as_quint8);
}
