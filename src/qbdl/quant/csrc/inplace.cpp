// In-place INT8 weight sampling into oneDNN-packed weights, the elementwise ops of INT8 Flipout and the
// residual add on plain uint8 activations (scale and zero point passed beside them).
// Built on first use by qbdl.quant.native (torch.utils.cpp_extension); registered as torch.ops.qbdl.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
//   data[p] = clamp((mu[p] * 2^mu_shift +- sg[p] * pool[offset + p] + half) >> shift, -127, 127),
//   comp[oc[p]] -= data[p].
// mu / sg / oc are int16 in packed order (padding: mu = sg = 0, so it stays 0): 7 bytes read per weight.
void sample_packed(const at::Tensor& packed, const at::Tensor& mu, const at::Tensor& sg, const at::Tensor& oc,
                   int64_t n_comp, const at::Tensor& pool, int64_t offset, bool negate, int64_t mu_shift,
                   int64_t shift) {
  TORCH_CHECK(packed.is_mkldnn(), "qbdl::sample_packed: expected a oneDNN (mkldnn) packed weight");
  for (const at::Tensor* t : {&mu, &sg, &oc, &pool}) {
    TORCH_CHECK(t->scalar_type() == at::kShort && t->is_contiguous(),
                "qbdl::sample_packed: mu, sg, oc and pool must be contiguous int16");
  }
  const int64_t n = mu.numel();
  TORCH_CHECK(sg.numel() == n && oc.numel() == n, "qbdl::sample_packed: mu, sg and oc must be of one size");
  TORCH_CHECK(n + 4 * n_comp == at::native::nbytes_from_mkldnn(packed),
              "qbdl::sample_packed: layout does not match the packed weight's size");
  TORCH_CHECK(offset >= 0 && offset + n <= pool.numel(), "qbdl::sample_packed: pool window out of range");
  TORCH_CHECK(shift > 0 && shift < 31 && mu_shift >= 0 && mu_shift < 16, "qbdl::sample_packed: bad shifts");
  int8_t* __restrict__ out = static_cast<int8_t*>(at::native::data_ptr_from_mkldnn(packed));
  int32_t* comp = reinterpret_cast<int32_t*>(out + n);  // oneDNN aligns the data size: int32-aligned
  const int16_t* __restrict__ m = mu.data_ptr<int16_t>();
  const int16_t* __restrict__ s = sg.data_ptr<int16_t>();
  const int16_t* __restrict__ c = oc.data_ptr<int16_t>();
  const int16_t* __restrict__ z = pool.data_ptr<int16_t>() + offset;
  const int32_t sign = negate ? -1 : 1;
  const int sh = static_cast<int>(shift), msh = static_cast<int>(mu_shift);
  const int32_t half = 1 << (sh - 1);
  const int32_t mu_mult = 1 << msh;  // mu * 2^msh: left-shifting a negative value is undefined before C++20
  std::fill(comp, comp + n_comp, 0);
  std::mutex merge;
  constexpr int64_t kBlock = 4096;
  // One thread: memory-bound, and on the 2-core machines measured two OpenMP threads ran it 1.5x slower
  // (ResNet-50's 3x3x512x512 layer: 4.1 ms on one, 6.6 ms on two).
  auto body = [&](int64_t begin, int64_t end) {
    std::vector<int32_t> sums(n_comp, 0);
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int64_t b1 = std::min(end, b0 + kBlock);
      // the arithmetic loop has no scatter, so it vectorizes; the channel sums re-read the block from L1
      for (int64_t p = b0; p < b1; ++p) {
        int32_t v = (static_cast<int32_t>(m[p]) * mu_mult + sign * static_cast<int32_t>(s[p]) * z[p] + half) >> sh;
        out[p] = static_cast<int8_t>(std::min(127, std::max(-127, v)));
      }
      if (n_comp) {
        // packed layouts keep runs of one channel (e.g. 4 bytes for VNNI): sum a run in a register, so
        // the read-modify-write of sums[] is not a dependency chain through memory for every byte
        int32_t acc = 0;
        int16_t cur = c[b0];
        for (int64_t p = b0; p < b1; ++p) {
          if (c[p] != cur) {
            sums[cur] -= acc;
            acc = 0;
            cur = c[p];
          }
          acc += out[p];
        }
        sums[cur] -= acc;
      }
    }
    if (!n_comp) return;
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t j = 0; j < n_comp; ++j) comp[j] += sums[j];
  };
  body(0, n);
}

// [N, P, C] view of a uint8 activation whose channels are innermost (2-D [N, C] or channels-last N-D).
int64_t channels_inner(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kByte, op, ": expected uint8 activations");
  const bool ok = x.dim() == 2 ? x.is_contiguous()
                  : x.dim() == 4 ? x.is_contiguous(at::MemoryFormat::ChannelsLast)
                  : x.dim() == 5 ? x.is_contiguous(at::MemoryFormat::ChannelsLast3d)
                                 : false;
  TORCH_CHECK(ok, op, ": activations must be [N, C] or channels-last (channels innermost)");
  return x.size(1);
}

// Row kernels with unaliased pointers (uint8 may alias anything), so the compiler vectorizes them;
// nearbyint rounds half to even like torch.round (built with -fno-math-errno: one instruction).
void row_flip(const uint8_t* __restrict__ q, uint8_t* __restrict__ o, const float* __restrict__ mult, int64_t C,
              float in_zp, float out_zp) {
  for (int64_t c = 0; c < C; ++c) {
    const float v = std::nearbyint(mult[c] * (static_cast<float>(q[c]) - in_zp)) + out_zp;
    o[c] = static_cast<uint8_t>(static_cast<int32_t>(std::min(255.f, std::max(0.f, v))));
  }
}

void row_add(const uint8_t* __restrict__ a, const uint8_t* __restrict__ b, uint8_t* __restrict__ o,
             const float* __restrict__ mult, int64_t C, float ka, float za, float zb, float zo, float lo) {
  for (int64_t c = 0; c < C; ++c) {
    const float v =
        std::nearbyint(ka * (static_cast<float>(a[c]) - za) + mult[c] * (static_cast<float>(b[c]) - zb)) + zo;
    o[c] = static_cast<uint8_t>(static_cast<int32_t>(std::min(255.f, std::max(lo, v))));
  }
}

// mult[n, c] = k * signs[n, c] as float: the per-example, per-channel factor of Flipout's sign terms.
at::Tensor signed_multipliers(const at::Tensor& signs, int64_t N, int64_t C, double k, const char* op) {
  TORCH_CHECK(signs.scalar_type() == at::kChar && signs.is_contiguous() && signs.numel() == N * C, op,
              ": signs must be contiguous int8 [N, C]");
  return signs.to(at::kFloat).mul_(k).contiguous();
}

// Per-example, per-channel sign flip of a uint8 activation, requantized: Flipout's x * s_in.
//   out = clamp(round(sign[n, c] * (q - in_zp) * ratio) + out_zp, 0, 255)
at::Tensor flip_requant(const at::Tensor& x, const at::Tensor& signs, int64_t in_zp, double ratio, int64_t out_zp) {
  const int64_t C = channels_inner(x, "qbdl::flip_requant"), N = x.size(0), P = x.numel() / (N * C);
  const at::Tensor mult = signed_multipliers(signs, N, C, ratio, "qbdl::flip_requant");
  auto out = at::empty_like(x);
  const uint8_t* q = x.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const float* m = mult.data_ptr<float>();
  at::parallel_for(0, N * P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      row_flip(q + row * C, o + row * C, m + (row / P) * C, C, static_cast<float>(in_zp), static_cast<float>(out_zp));
    }
  });
  return out;
}

// Flipout's output: out = requant(s1 * (q1 - z1) + sign[n, c] * s2 * (q2 - z2)) (+ ReLU), uint8.
at::Tensor signed_add(const at::Tensor& a, double sa, int64_t za, const at::Tensor& b, double sb, int64_t zb,
                      const at::Tensor& signs, double so, int64_t zo, bool relu) {
  const int64_t C = channels_inner(a, "qbdl::signed_add"), N = a.size(0), P = a.numel() / (N * C);
  channels_inner(b, "qbdl::signed_add");
  TORCH_CHECK(a.sizes() == b.sizes() && a.strides() == b.strides(), "qbdl::signed_add: a and b differ in shape");
  const at::Tensor mult = signed_multipliers(signs, N, C, sb / so, "qbdl::signed_add");
  auto out = at::empty_like(a);
  const uint8_t* qa = a.data_ptr<uint8_t>();
  const uint8_t* qb = b.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const float* m = mult.data_ptr<float>();
  const float ka = static_cast<float>(sa / so), lo = relu ? static_cast<float>(zo) : 0.f;
  at::parallel_for(0, N * P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      row_add(qa + row * C, qb + row * C, o + row * C, m + (row / P) * C, C, ka, static_cast<float>(za),
              static_cast<float>(zb), static_cast<float>(zo), lo);
    }
  });
  return out;
}

// Residual add of two uint8 activations, requantized (+ ReLU), clamped to 0..qmax. The arithmetic is that of
// ATen's vectorized quantized add: x = fma(q, s, -z * s) per input, c = xa + xb, q = zo + nearbyint(c / so)
// with 1/so as float, so the integers equal torch.ops.quantized.add(_relu)'s.
void row_qadd(const uint8_t* __restrict__ a, const uint8_t* __restrict__ b, uint8_t* __restrict__ o, int64_t n,
              float sa, float pa, float sb, float pb, float inv, float zo, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) {
    float c = std::fma(static_cast<float>(a[i]), sa, pa) + std::fma(static_cast<float>(b[i]), sb, pb);
    const float v = zo + std::nearbyint(c * inv);
    o[i] = static_cast<uint8_t>(static_cast<int32_t>(std::min(hi, std::max(lo, v))));
  }
}

at::Tensor qadd(const at::Tensor& a_in, double sa, int64_t za, const at::Tensor& b_in, double sb, int64_t zb,
                double so, int64_t zo, bool relu, int64_t qmax) {
  TORCH_CHECK(a_in.scalar_type() == at::kByte && b_in.scalar_type() == at::kByte, "qbdl::qadd: expected uint8");
  TORCH_CHECK(a_in.sizes() == b_in.sizes(), "qbdl::qadd: a and b differ in shape");
  const auto fmt = a_in.suggest_memory_format();
  const at::Tensor a = a_in.contiguous(fmt), b = b_in.contiguous(fmt);
  auto out = at::empty_like(a);
  const float fsa = static_cast<float>(sa), fsb = static_cast<float>(sb);
  const float pa = fsa * static_cast<float>(-za), pb = fsb * static_cast<float>(-zb);
  const float inv = 1.0f / static_cast<float>(so);
  // ReLU in the float domain (c >= 0) is q >= zo after requantization
  const float lo = relu ? static_cast<float>(zo) : 0.f, hi = static_cast<float>(qmax);
  const uint8_t* qa = a.data_ptr<uint8_t>();
  const uint8_t* qb = b.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, a.numel(), 16384, [&](int64_t begin, int64_t end) {
    row_qadd(qa + begin, qb + begin, o + begin, end - begin, fsa, pa, fsb, pb, inv, static_cast<float>(zo), lo, hi);
  });
  return out;
}

void row_max(uint8_t* __restrict__ o, const uint8_t* __restrict__ x, int64_t C) {
  for (int64_t c = 0; c < C; ++c) o[c] = std::max(o[c], x[c]);
}

// Max pooling of a uint8 activation, channels innermost ([N, C, H, W] channels-last): every window's
// channel rows are max-ed contiguously (torch's integer max pooling refuses planes of more than 255 values).
at::Tensor max_pool2d_u8(const at::Tensor& x_in, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                         int64_t pw, int64_t dh, int64_t dw, int64_t oh, int64_t ow) {
  TORCH_CHECK(x_in.scalar_type() == at::kByte && x_in.dim() == 4, "qbdl::max_pool2d_u8: expected uint8 [N, C, H, W]");
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto out = at::zeros({N, oh, ow, C}, x.options()).permute({0, 3, 1, 2});  // channels-last [N, C, oh, ow]
  const uint8_t* xp = x.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, N * oh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / oh, y = row % oh;
      for (int64_t xo = 0; xo < ow; ++xo) {
        uint8_t* o = op + ((n * oh + y) * ow + xo) * C;
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t h = y * sh - ph + i * dh;
          if (h < 0 || h >= H) continue;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t w = xo * sw - pw + j * dw;
            if (w < 0 || w >= W) continue;
            row_max(o, xp + ((n * H + h) * W + w) * C, C);
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(qbdl, m) {
  m.def("packed_bytes(Tensor packed) -> Tensor", &packed_bytes);
  m.def("sample_packed(Tensor packed, Tensor mu, Tensor sg, Tensor oc, int n_comp, Tensor pool, int offset, bool negate, int mu_shift, int shift) -> ()",
        &sample_packed);
  m.def("flip_requant(Tensor x, Tensor signs, int in_zp, float ratio, int out_zp) -> Tensor", &flip_requant);
  m.def("signed_add(Tensor a, float sa, int za, Tensor b, float sb, int zb, Tensor signs, float so, int zo, bool relu) -> Tensor",
        &signed_add);
  m.def("qadd(Tensor a, float sa, int za, Tensor b, float sb, int zb, float so, int zo, bool relu, int qmax) -> Tensor",
        &qadd);
  m.def("max_pool2d_u8(Tensor x, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow) -> Tensor",
        &max_pool2d_u8);
}
