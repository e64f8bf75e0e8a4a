// In-place INT8 weight sampling into oneDNN-packed weights, the elementwise ops of INT8 Flipout and the
// residual add on plain uint8 activations (scale and zero point passed beside them).
// Built on first use by qbdl.quant.native (torch.utils.cpp_extension); registered as torch.ops.qbdl.*.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sample_vbmi.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
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

// Counter-based noise (qbdl/quant/noise.py has the torch reference and the why): lowbias32 (C. Wellons) twice,
// the 64-bit key mixed in between; |z| from the 2^15-entry inverse-CDF table, sign from bit 16.
inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

constexpr int64_t kTable = 1 << 15;

void check_noise_args(const at::Tensor& mu, const at::Tensor& sg, const at::Tensor& table, int64_t mu_shift,
                      int64_t shift, const char* op) {
  TORCH_CHECK(mu.scalar_type() == at::kShort && sg.scalar_type() == at::kShort && mu.is_contiguous() &&
                  sg.is_contiguous() && mu.sizes() == sg.sizes(),
              op, ": mu and sg must be contiguous int16 of one shape");
  TORCH_CHECK(table.scalar_type() == at::kByte && table.is_contiguous() && table.numel() == kTable, op,
              ": table must be the contiguous uint8 [32768] of noise.z_table()");
  // |mu16 * 2^mu_shift| + |sg16 * z64| + half < 2^15 * 2^8 + 2^15 * 2^8 + 2^15: fits int32 for these shifts
  TORCH_CHECK(shift >= 1 && shift <= 16 && mu_shift >= 0 && mu_shift <= 8, op, ": bad shifts (", mu_shift, ", ",
              shift, ")");
  TORCH_CHECK(mu.numel() < (int64_t{1} << 32), op, ": more than 2^32 weights");
}

// The sample of weights [begin, end), positions hashed from 0 (wrapping mod 2^32, as the reference does):
//   out[i] = clamp((mu[i] * 2^mu_shift + sg[i] * z(i) + half) >> shift, -127, 127).
// The scalar reference: the kernel as it was before the AVX2 one (sample_plain_kernel(..., "scalar") runs it, so
// tests can compare the kernels bit for bit). Three passes over blocks that stay in L1: the hash (auto-vectorized),
// the table lookup (one byte load a weight), the sign and fixed-point arithmetic (auto-vectorized, branch-free: a
// random sign would mispredict half the time).
void sample_range_scalar(int8_t* __restrict__ out, const int16_t* __restrict__ mu, const int16_t* __restrict__ sg,
                         int64_t begin, int64_t end, uint64_t key, const uint8_t* __restrict__ tbl, int mu_shift,
                         int shift) {
  constexpr int64_t kBlock = 2048;
  uint32_t h[kBlock];
  uint8_t t[kBlock];
  const uint32_t klo = static_cast<uint32_t>(key), khi = static_cast<uint32_t>(key >> 32);
  const int32_t half = 1 << (shift - 1);
  const int32_t mu_mult = 1 << mu_shift;  // mu * 2^k: left-shifting a negative value is undefined before C++20
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t len = std::min(kBlock, end - b0);
    const uint32_t base = static_cast<uint32_t>(b0);
    for (int64_t i = 0; i < len; ++i) h[i] = lowbias32(lowbias32(base + static_cast<uint32_t>(i) + klo) ^ khi);
    for (int64_t i = 0; i < len; ++i) t[i] = tbl[h[i] >> 17];
    const int16_t* __restrict__ m = mu + b0;
    const int16_t* __restrict__ s = sg + b0;
    int8_t* __restrict__ o = out + b0;
    for (int64_t i = 0; i < len; ++i) {
      const int32_t neg = -static_cast<int32_t>((h[i] >> 16) & 1);  // 0 or -1
      const int32_t z = (static_cast<int32_t>(t[i]) ^ neg) - neg;   // +-t
      const int32_t v = (static_cast<int32_t>(m[i]) * mu_mult + static_cast<int32_t>(s[i]) * z + half) >> shift;
      o[i] = static_cast<int8_t>(std::min(127, std::max(-127, v)));
    }
  }
}

#ifdef __AVX2__
// The same integers, 32 weights an iteration in one pass (AVX2; AVX-512 builds run it too).
//
// Why it is shaped so (measured on the AMD EPYC of docs/memory.md, thread CPU time, 2.36 M weights, same
// process): the reference costs ~1.7 ns a weight, this ~0.95, the old pool kernel ~0.4. What is left is the
// hash (4 vpmulld per 8 weights, fixed by the noise's definition) and the lookup. The lookup is done with
// scalar byte loads whose results are combined in a general register: the integer pipes are idle while the
// hash runs on the vector ones. vpgatherdd (aligned dword + variable shift) cost ~1.2 ns a weight here
// (~10 cycles a gather on this Zen 3), and so did storing the indices for a separate scalar pass.
//
// The fixed point is one vpmaddwd: (mu, sg) int16 pairs times (2^mu_shift, z) pairs gives
// mu * 2^mu_shift + sg * z exactly in int32 (|z| <= 255, 2^mu_shift <= 256: no pair overflows). The
// pairs come interleaved per 128-bit lane (vpunpck{l,h}wd), so the two hash vectors are taken at the
// positions that interleaving produces (0-3, 8-11 and 4-7, 12-15) and vpackssdw puts the results back in
// order. The int16/int8 saturations of the packs are monotone, so clamping after them to [-127, 127]
// equals the reference's clamp of the int32.
inline __m256i lowbias32_x8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// (2^mu_shift | z << 16) per lane: the second vpmaddwd operand of the weights hashed to h.
inline __m256i noise_pairs_x8(__m256i h, const uint8_t* __restrict__ tbl, __m256i mult) {
  alignas(32) uint64_t idx[4];  // two table indices (h >> 17) per 64-bit word
  _mm256_store_si256(reinterpret_cast<__m256i*>(idx), _mm256_srli_epi32(h, 17));
  uint64_t bytes = 0;
  for (int k = 0; k < 4; ++k) {
    const uint64_t b0 = tbl[static_cast<uint32_t>(idx[k])], b1 = tbl[idx[k] >> 32];
    bytes |= (b0 | (b1 << 8)) << (16 * k);
  }
  const __m256i t = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes)));
  // sign: bit 16 of h moved to bit 31; the | 1 keeps vpsignd from zeroing a lane
  const __m256i z = _mm256_sign_epi32(t, _mm256_or_si256(_mm256_slli_epi32(h, 15), _mm256_set1_epi32(1)));
  return _mm256_or_si256(_mm256_slli_epi32(z, 16), mult);
}

void sample_range_avx2(int8_t* __restrict__ out, const int16_t* __restrict__ mu, const int16_t* __restrict__ sg,
                       int64_t begin, int64_t end, uint64_t key, const uint8_t* __restrict__ tbl, int mu_shift,
                       int shift) {
  const uint32_t klo = static_cast<uint32_t>(key), khi = static_cast<uint32_t>(key >> 32);
  const __m256i vklo = _mm256_set1_epi32(static_cast<int>(klo)), vkhi = _mm256_set1_epi32(static_cast<int>(khi));
  const __m256i mult = _mm256_set1_epi32(1 << mu_shift), half = _mm256_set1_epi32(1 << (shift - 1));
  const __m128i sh = _mm_cvtsi32_si128(shift);
  const __m256i lo_pos = _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11), hi_pos = _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15);
  const __m256i lowest = _mm256_set1_epi8(-127);
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    __m256i v16[2];  // int16 results of weights i..i+15, i+16..i+31
    for (int g = 0; g < 2; ++g) {
      const int64_t p = i + 16 * g;
      const __m256i base = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(p))), vklo);
      const __m256i h_lo = lowbias32_x8(_mm256_xor_si256(lowbias32_x8(_mm256_add_epi32(base, lo_pos)), vkhi));
      const __m256i h_hi = lowbias32_x8(_mm256_xor_si256(lowbias32_x8(_mm256_add_epi32(base, hi_pos)), vkhi));
      const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mu + p));
      const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + p));
      __m256i a = _mm256_madd_epi16(_mm256_unpacklo_epi16(m, s), noise_pairs_x8(h_lo, tbl, mult));
      __m256i b = _mm256_madd_epi16(_mm256_unpackhi_epi16(m, s), noise_pairs_x8(h_hi, tbl, mult));
      a = _mm256_sra_epi32(_mm256_add_epi32(a, half), sh);
      b = _mm256_sra_epi32(_mm256_add_epi32(b, half), sh);
      v16[g] = _mm256_packs_epi32(a, b);
    }
    // vpacksswb interleaves the two halves per 128-bit lane: vpermq puts the 8-byte groups back in order
    const __m256i v8 = _mm256_permute4x64_epi64(_mm256_packs_epi16(v16[0], v16[1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_max_epi8(v8, lowest));
  }
  if (i < end) sample_range_scalar(out, mu, sg, i, end, key, tbl, mu_shift, shift);
}
#endif

// The sampling kernels, slowest first. Each computes the same integers (tests/test_quant_kernel_vector.py).
enum class Kernel { kScalar, kAvx2, kVbmi };
constexpr const char* kKernelNames[] = {"scalar", "avx2", "avx512vbmi"};
constexpr int kKernels = static_cast<int>(std::size(kKernelNames));

bool kernel_available(Kernel k) {
  switch (k) {
    case Kernel::kScalar:
      return true;
    case Kernel::kAvx2:
#ifdef __AVX2__
      return true;  // native.py passes -mavx2 only for a torch that runs AVX2 kernels on this CPU
#else
      return false;
#endif
    case Kernel::kVbmi:
      return qbdl::vbmi_supported();
  }
  return false;
}

Kernel kernel_named(const std::string& name, const char* op) {
  for (int k = 0; k < kKernels; ++k) {
    if (name == kKernelNames[k]) return static_cast<Kernel>(k);
  }
  TORCH_CHECK(false, op, ": unknown sampling kernel '", name, "'; choose scalar, avx2 or avx512vbmi");
  return Kernel::kScalar;  // not reached: TORCH_CHECK(false) throws
}

// The fastest kernel this CPU runs, at most QBDL_SAMPLE_KERNEL's (read on every call, so a process can compare).
Kernel best_kernel() {
  Kernel cap = Kernel::kVbmi;
  if (const char* env = std::getenv("QBDL_SAMPLE_KERNEL"); env != nullptr && *env != '\0') {
    cap = kernel_named(env, "QBDL_SAMPLE_KERNEL");
  }
  for (int k = static_cast<int>(cap); k > 0; --k) {
    if (kernel_available(static_cast<Kernel>(k))) return static_cast<Kernel>(k);
  }
  return Kernel::kScalar;
}

// The kernel sample_packed and sample_plain run for the z table here: tests and the docs name it.
std::string sample_isa() { return kKernelNames[static_cast<int>(best_kernel())]; }

std::vector<std::string> sample_kernels() {
  std::vector<std::string> out;
  for (int k = 0; k < kKernels; ++k) {
    if (kernel_available(static_cast<Kernel>(k))) out.emplace_back(kKernelNames[k]);
  }
  return out;
}

// All n weights. Positions are hashed absolutely, so any split gives the same bytes: big layers are split over
// torch's intra-op threads (at batch 1 the sampler runs between oneDNN's kernels, with the cores otherwise idle),
// layers under kGrain weights stay on one thread. The VBMI kernel needs the z table's shape (vbmi_tables ok);
// for another table the AVX2 kernel runs instead, or (strict: a kernel asked for by name) the call is refused.
constexpr int64_t kGrain = 1 << 16;

void sample_block(int8_t* out, const int16_t* mu, const int16_t* sg, int64_t n, uint64_t key, const uint8_t* tbl,
                  int mu_shift, int shift, Kernel kernel, bool strict, const char* op) {
  const qbdl::VbmiTables* tables = nullptr;
  if (kernel == Kernel::kVbmi) {
    tables = &qbdl::vbmi_tables(tbl);
    TORCH_CHECK(tables->ok || !strict, op,
                ": the avx512vbmi kernel needs a table shaped as noise.z_table() (sample_plain runs avx2 for this one)");
    if (!tables->ok) kernel = kernel_available(Kernel::kAvx2) ? Kernel::kAvx2 : Kernel::kScalar;
  }
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    if (kernel == Kernel::kVbmi) {
      b = qbdl::sample_range_vbmi(out, mu, sg, b, e, key, *tables, mu_shift, shift);
    }
#ifdef __AVX2__
    if (kernel == Kernel::kAvx2) return sample_range_avx2(out, mu, sg, b, e, key, tbl, mu_shift, shift);
#endif
    if (b < e) sample_range_scalar(out, mu, sg, b, e, key, tbl, mu_shift, shift);
  });
}

// Sums, per channel slot, of the sampled bytes: int32 partial sums per thread (parts: threads x n_comp), so no
// two threads add to one slot. A slot index is checked before it indexes anything; false if one is out of range.
//
// reps == 1: oc holds each byte's slot. Packed layouts keep runs of one channel (e.g. 4 bytes for VNNI), summed
// in a register so the sums are not a dependency chain through memory for every byte.
// reps > 1: the bytes are [G, reps, block] and oc [G, block] holds the slot of each byte of a block, the same in
// every repetition (oneDNN's blocked layouts: e.g. 64 channels x 4 input bytes, repeated over the inputs). The
// repetitions are added bytewise into block int32 (vectorized), then each block sum into its slot: 2 ms less
// for ResNet-50's 2048 x 1000 linear than the per-byte loop.
bool channel_sums(const int8_t* out, int64_t n, const int16_t* c, int64_t n_oc, int64_t reps, int64_t block,
                  int64_t n_comp, std::vector<int32_t>& part) {
  std::vector<char> bad(at::get_num_threads(), 0);
  if (reps == 1) {
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      const int t = at::get_thread_num();
      int32_t* sums = part.data() + static_cast<size_t>(t) * n_comp;
      int16_t cur = c[b];
      int32_t acc = 0;
      if (cur < 0 || cur >= n_comp) {
        bad[t] = 1;
        return;
      }
      for (int64_t p = b; p < e; ++p) {
        if (c[p] != cur) {
          sums[cur] += acc;
          acc = 0;
          cur = c[p];
          if (cur < 0 || cur >= n_comp) {
            bad[t] = 1;
            return;
          }
        }
        acc += out[p];
      }
      sums[cur] += acc;
    });
  } else {
    const int64_t groups = n_oc / block;
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      const int t = at::get_thread_num();
      int32_t* sums = part.data() + static_cast<size_t>(t) * n_comp;
      std::vector<int32_t> acc(block);
      for (int64_t g = g0; g < g1; ++g) {
        std::fill(acc.begin(), acc.end(), 0);
        int32_t* __restrict__ a = acc.data();
        for (int64_t r = 0; r < reps; ++r) {
          const int8_t* __restrict__ x = out + (g * reps + r) * block;
          for (int64_t q = 0; q < block; ++q) a[q] += x[q];
        }
        const int16_t* slot = c + g * block;
        for (int64_t q = 0; q < block; ++q) {
          if (slot[q] < 0 || slot[q] >= n_comp) {
            bad[t] = 1;
            return;
          }
          sums[slot[q]] += a[q];
        }
      }
    });
  }
  return std::none_of(bad.begin(), bad.end(), [](char v) { return v != 0; });
}

// One fresh weight sample written into a oneDNN-packed weight (data bytes, then int32 per padded output
// channel: minus the channel's weight sum, the source zero-point compensation). mu / sg are int16 in packed
// order (padding: 0, so it stays 0); oc (int16) gives each byte's channel-sum slot as channel_sums reads it
// (reps, block), used only when there are sums (n_comp > 0). The noise comes from (key, packed position): 4 bytes
// read per weight.
void sample_packed(const at::Tensor& packed, const at::Tensor& mu, const at::Tensor& sg, const at::Tensor& oc,
                   int64_t n_comp, int64_t reps, int64_t block, const at::Tensor& table, int64_t key,
                   int64_t mu_shift, int64_t shift) {
  const char* op = "qbdl::sample_packed";
  TORCH_CHECK(packed.is_mkldnn(), op, ": expected a oneDNN (mkldnn) packed weight");
  check_noise_args(mu, sg, table, mu_shift, shift, op);
  const int64_t n = mu.numel();
  TORCH_CHECK(n_comp >= 0 && n + 4 * n_comp == at::native::nbytes_from_mkldnn(packed), op,
              ": layout does not match the packed weight's size");
  TORCH_CHECK(reps >= 1 && block >= 1, op, ": reps and block must be >= 1, got ", reps, ", ", block);
  TORCH_CHECK(n_comp == 0 || (oc.scalar_type() == at::kShort && oc.is_contiguous() && oc.numel() * reps == n &&
                              (reps == 1 || oc.numel() % block == 0)),
              op, ": oc must be contiguous int16 of mu's size (reps 1) or of size / reps, whole blocks (reps > 1)");
  if (n == 0) return;
  int8_t* out = static_cast<int8_t*>(at::native::data_ptr_from_mkldnn(packed));
  int32_t* comp = reinterpret_cast<int32_t*>(out + n);  // oneDNN aligns the data size: int32-aligned
  sample_block(out, mu.data_ptr<int16_t>(), sg.data_ptr<int16_t>(), n, static_cast<uint64_t>(key),
               table.data_ptr<uint8_t>(), static_cast<int>(mu_shift), static_cast<int>(shift), best_kernel(), false,
               op);
  if (!n_comp) return;
  const int threads = at::get_num_threads();
  std::vector<int32_t> part(static_cast<size_t>(threads) * n_comp, 0);
  if (!channel_sums(out, n, oc.data_ptr<int16_t>(), oc.numel(), reps, block, n_comp, part)) {
    std::memset(out, 0, static_cast<size_t>(n) + 4 * static_cast<size_t>(n_comp));  // a consistent (zero) weight
    TORCH_CHECK(false, op, ": channel slot out of range");
  }
  for (int64_t k = 0; k < n_comp; ++k) {
    int32_t total = 0;
    for (int t = 0; t < threads; ++t) total += part[static_cast<size_t>(t) * n_comp + k];
    comp[k] = -total;
  }
}

// One int8 weight sample in the weights' own order (positions = flat indices): the re-packing path and the
// bank (noise.sample_reference computes the same integers in torch).
at::Tensor sample_plain_impl(const at::Tensor& mu, const at::Tensor& sg, const at::Tensor& table, int64_t key,
                             int64_t mu_shift, int64_t shift, Kernel kernel, bool strict, const char* op) {
  check_noise_args(mu, sg, table, mu_shift, shift, op);
  auto out = at::empty(mu.sizes(), mu.options().dtype(at::kChar));
  // no early return for 0 weights: sample_block does nothing then, but still refuses what strict refuses
  sample_block(out.data_ptr<int8_t>(), mu.data_ptr<int16_t>(), sg.data_ptr<int16_t>(), mu.numel(),
               static_cast<uint64_t>(key), table.data_ptr<uint8_t>(), static_cast<int>(mu_shift),
               static_cast<int>(shift), kernel, strict, op);
  return out;
}

at::Tensor sample_plain(const at::Tensor& mu, const at::Tensor& sg, const at::Tensor& table, int64_t key,
                        int64_t mu_shift, int64_t shift) {
  return sample_plain_impl(mu, sg, table, key, mu_shift, shift, best_kernel(), false, "qbdl::sample_plain");
}

// sample_plain through one named kernel (sample_kernels() lists this CPU's), so tests can compare them bit for
// bit: "scalar" is the reference, the kernel as it was before vectorization.
at::Tensor sample_plain_kernel(const at::Tensor& mu, const at::Tensor& sg, const at::Tensor& table, int64_t key,
                               int64_t mu_shift, int64_t shift, const std::string& name) {
  const char* op = "qbdl::sample_plain_kernel";
  const Kernel kernel = kernel_named(name, op);
  TORCH_CHECK(kernel_available(kernel), op, ": this CPU or build does not run the ", name, " kernel");
  return sample_plain_impl(mu, sg, table, key, mu_shift, shift, kernel, true, op);
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

void check_zero_point(int64_t zp, const char* op, const char* what) {
  TORCH_CHECK(zp >= 0 && zp <= 255, op, ": ", what, " must be in 0..255, got ", zp);
}

void check_scale(double s, const char* op, const char* what) {
  TORCH_CHECK(std::isfinite(s) && s > 0, op, ": ", what, " must be finite and > 0, got ", s);
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
  const char* op = "qbdl::flip_requant";
  const int64_t C = channels_inner(x, op), N = x.size(0);
  check_zero_point(in_zp, op, "in_zp");
  check_zero_point(out_zp, op, "out_zp");
  check_scale(ratio, op, "ratio");
  const at::Tensor mult = signed_multipliers(signs, N, C, ratio, op);
  auto out = at::empty_like(x);
  if (x.numel() == 0) return out;  // a batch of 0 (or an empty image): nothing to divide the rows by
  const int64_t P = x.numel() / (N * C);
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
  const char* op = "qbdl::signed_add";
  const int64_t C = channels_inner(a, op), N = a.size(0);
  channels_inner(b, op);
  TORCH_CHECK(a.sizes() == b.sizes() && a.strides() == b.strides(), "qbdl::signed_add: a and b differ in shape");
  check_scale(sa, op, "sa");
  check_scale(sb, op, "sb");
  check_scale(so, op, "so");
  check_zero_point(za, op, "za");
  check_zero_point(zb, op, "zb");
  check_zero_point(zo, op, "zo");
  const at::Tensor mult = signed_multipliers(signs, N, C, sb / so, op);
  auto out = at::empty_like(a);
  if (a.numel() == 0) return out;  // a batch of 0: nothing to divide the rows by
  const int64_t P = a.numel() / (N * C);
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
  for (double s : {sa, sb, so}) check_scale(s, "qbdl::qadd", "scales");
  for (int64_t z : {za, zb, zo}) check_zero_point(z, "qbdl::qadd", "zero points");
  TORCH_CHECK(qmax >= 1 && qmax <= 255, "qbdl::qadd: qmax must be in 1..255, got ", qmax);
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
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0 && oh >= 0 &&
                  ow >= 0,
              "qbdl::max_pool2d_u8: kernel, stride and dilation must be >= 1, padding and output size >= 0");
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  // windows reaching outside the image (padding, ceil mode) are safe: the loop skips rows/columns outside
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
  m.def("sample_packed(Tensor packed, Tensor mu, Tensor sg, Tensor oc, int n_comp, int reps, int block, Tensor table, int key, int mu_shift, int shift) -> ()",
        &sample_packed);
  m.def("sample_plain(Tensor mu, Tensor sg, Tensor table, int key, int mu_shift, int shift) -> Tensor", &sample_plain);
  m.def("sample_plain_kernel(Tensor mu, Tensor sg, Tensor table, int key, int mu_shift, int shift, str kernel) -> Tensor",
        &sample_plain_kernel);
  m.def("sample_isa() -> str", &sample_isa);
  m.def("sample_kernels() -> str[]", &sample_kernels);
  m.def("flip_requant(Tensor x, Tensor signs, int in_zp, float ratio, int out_zp) -> Tensor", &flip_requant);
  m.def("signed_add(Tensor a, float sa, int za, Tensor b, float sb, int zb, Tensor signs, float so, int zo, bool relu) -> Tensor",
        &signed_add);
  m.def("qadd(Tensor a, float sa, int za, Tensor b, float sb, int zb, float so, int zo, bool relu, int qmax) -> Tensor",
        &qadd);
  m.def("max_pool2d_u8(Tensor x, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw, int oh, int ow) -> Tensor",
        &max_pool2d_u8);
}
