// The fresh-sampling kernel for CPUs with AVX-512 VBMI (Zen 4, Ice Lake and later): 64 weights an iteration, the
// integers of inplace.cpp's kernels bit for bit (tests/test_quant_kernel_vector.py). Chosen at run time
// (vbmi_supported), compiled through target attributes, so one build serves CPUs with and without VBMI.
//
// Why: the AVX2 kernel spends about half its time on the inverse-CDF lookup, one scalar byte load a weight from
// the 32 KiB z table. VBMI's vpermi2b looks up 64 bytes at once in a 128-byte table held in two registers, so the
// z table is re-expressed as a few 256-byte tables. With j = h >> 17 (the table index, 15 bits):
//   R1, j < 29184 (89% of weights): buckets of 128 indices, j >> 7. In each bucket the table takes at most two
//       consecutive values: z = base1[b] + (j & 127 >= thr1[b]).
//   R2, 29184 <= j < 32512: the tail, where the table climbs faster: buckets of 16, the same form (base2, thr2).
//   R3, j >= 32512: the last 256 entries, looked up directly (base3).
// vbmi_tables derives these from the table it is given and checks that every bucket has that form (ok); where one
// does not (a table that is not the z table), the caller runs the AVX2 kernel instead.
#include "sample_vbmi.h"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define QBDL_VBMI 1
#define QBDL_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi")))
#endif

namespace qbdl {
namespace {

constexpr int64_t kTable = 1 << 15;
constexpr int kJ1 = 228 * 128;  // R1 | R2
constexpr int kJ2 = 254 * 128;  // R2 | R3

// base[b] and thr[b] of `count` buckets of `width` indices from `first`; false unless each bucket is one value, or
// one value then that value + 1 (thr: the first index holding it; width: none does).
bool two_level(const uint8_t* tbl, int first, int width, int count, uint8_t* base, uint8_t* thr) {
  std::memset(base, 0, 256);
  std::memset(thr, 0, 256);
  for (int b = 0; b < count; ++b) {
    const uint8_t* s = tbl + first + b * width;
    int k = 0;
    while (k < width && s[k] == s[0]) ++k;
    for (int q = k; q < width; ++q) {
      if (s[q] != s[0] + 1) return false;  // a second step, or a step down
    }
    base[b] = s[0];
    thr[b] = static_cast<uint8_t>(k);
  }
  return true;
}

void derive(const uint8_t* tbl, VbmiTables& t) {
  t.ok = two_level(tbl, 0, 128, kJ1 / 128, t.base1, t.thr1) &&
         two_level(tbl, kJ1, 16, (kJ2 - kJ1) / 16, t.base2, t.thr2);
  std::memcpy(t.base3, tbl + kJ2, kTable - kJ2);
}

}  // namespace

const VbmiTables& vbmi_tables(const uint8_t* tbl) {
  // one z table in practice: compared (32 KiB, ~1 us) rather than derived on every call
  thread_local uint8_t seen[kTable];
  thread_local VbmiTables tables{};
  thread_local bool have = false;
  if (!have || std::memcmp(seen, tbl, kTable) != 0) {
    std::memcpy(seen, tbl, kTable);
    derive(tbl, tables);
    have = true;
  }
  return tables;
}

#ifdef QBDL_VBMI

bool vbmi_supported() {
  // GCC's and clang's checks include the OS's support of the 512-bit state (XCR0)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi");
}

namespace {

QBDL_TARGET inline __m512i lowbias32_x16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// A 256-entry byte table (four registers) at byte indices idx; hi: the indices' bit 7.
QBDL_TARGET inline __m512i lookup256(__m512i idx, __mmask64 hi, const __m512i* t) {
  return _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(t[0], idx, t[1]),
                                _mm512_permutex2var_epi8(t[2], idx, t[3]));
}

QBDL_TARGET inline void load4(const uint8_t* p, __m512i* t) {
  for (int k = 0; k < 4; ++k) t[k] = _mm512_load_si512(p + 64 * k);
}

}  // namespace

// The fixed point is inplace.cpp's sample_range_avx2 at twice the width: one vpmaddwd of (mu, sg) pairs times
// (2^mu_shift, z) pairs. The pairs come interleaved per 128-bit lane, so hash vector 2q hashes the positions
// 0-3, 8-11, 16-19, 24-27 of weights 32q.. and vector 2q + 1 the others; the packs put the results in order.
QBDL_TARGET int64_t sample_range_vbmi(int8_t* __restrict__ out, const int16_t* __restrict__ mu,
                                      const int16_t* __restrict__ sg, int64_t begin, int64_t end, uint64_t key,
                                      const VbmiTables& tables, int mu_shift, int shift) {
  const uint32_t klo = static_cast<uint32_t>(key), khi = static_cast<uint32_t>(key >> 32);
  const __m512i vklo = _mm512_set1_epi32(static_cast<int>(klo)), vkhi = _mm512_set1_epi32(static_cast<int>(khi));
  const __m512i mult = _mm512_set1_epi32(1 << mu_shift), half = _mm512_set1_epi32(1 << (shift - 1));
  const __m128i sh = _mm_cvtsi32_si128(shift);
  const __m512i pos[2] = {_mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                          _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)};
  __m512i base1[4], thr1[4], base2[4], thr2[4], base3[4];
  load4(tables.base1, base1);
  load4(tables.thr1, thr1);
  load4(tables.base2, base2);
  load4(tables.thr2, thr2);
  load4(tables.base3, base3);
  alignas(64) uint8_t sel[64];  // bytes 3 of 32 dwords, then bytes 2
  for (int k = 0; k < 32; ++k) {
    sel[k] = static_cast<uint8_t>(4 * k + 3);
    sel[32 + k] = static_cast<uint8_t>(4 * k + 2);
  }
  const __m512i bytes32 = _mm512_load_si512(sel);
  const __m512i low7 = _mm512_set1_epi8(127), low4 = _mm512_set1_epi8(15), one = _mm512_set1_epi8(1);
  const __m512i top5 = _mm512_set1_epi8(static_cast<char>(0xF8));
  const __m512i r2_first = _mm512_set1_epi8(static_cast<char>(kJ1 / 128)),
                r3_first = _mm512_set1_epi8(static_cast<char>(kJ2 / 128));
  const __m512i sign_bit = _mm512_set1_epi32(1 << 16), zero = _mm512_setzero_si512();
  const __m512i in_order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
  const __m512i lowest = _mm512_set1_epi8(-127);
  int64_t i = begin;
  for (; i + 64 <= end; i += 64) {
    __m512i h[4];
    for (int g = 0; g < 4; ++g) {
      const __m512i p = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(i + 32 * (g >> 1)))),
                                         _mm512_add_epi32(pos[g & 1], vklo));
      h[g] = lowbias32_x16(_mm512_xor_si512(lowbias32_x16(p), vkhi));
    }
    // j = h >> 17 as two bytes per weight, in the order h[0] | h[1] | h[2] | h[3]: jb = j >> 7 (byte 3 of h) and
    // jl = j & 127 (bits 1-7 of byte 2)
    const __m512i a = _mm512_permutex2var_epi8(h[0], bytes32, h[1]), b = _mm512_permutex2var_epi8(h[2], bytes32, h[3]);
    const __m512i jb = _mm512_shuffle_i64x2(a, b, 0x44);
    const __m512i jl = _mm512_and_si512(_mm512_srli_epi16(_mm512_shuffle_i64x2(a, b, 0xEE), 1), low7);
    const __mmask64 hi1 = _mm512_movepi8_mask(jb);
    __m512i t = lookup256(jb, hi1, base1);
    t = _mm512_mask_add_epi8(t, _mm512_cmpge_epu8_mask(jl, lookup256(jb, hi1, thr1)), t, one);
    // R2: bucket ((jb - 228) << 3) | (jl >> 4), offset jl & 15; R3: entry ((jb & 1) << 7) | jl
    const __m512i j2 = _mm512_or_si512(_mm512_and_si512(_mm512_slli_epi16(_mm512_sub_epi8(jb, r2_first), 3), top5),
                                       _mm512_and_si512(_mm512_srli_epi16(jl, 4), low4));
    const __mmask64 hi2 = _mm512_movepi8_mask(j2);
    __m512i t2 = lookup256(j2, hi2, base2);
    t2 = _mm512_mask_add_epi8(t2, _mm512_cmpge_epu8_mask(_mm512_and_si512(jl, low4), lookup256(j2, hi2, thr2)), t2,
                              one);
    const __m512i t3 = lookup256(jl, _mm512_test_epi8_mask(jb, one), base3);
    const __mmask64 r2 = _mm512_cmpge_epu8_mask(jb, r2_first), r3 = _mm512_cmpge_epu8_mask(jb, r3_first);
    t = _mm512_mask_blend_epi8(r2, t, _mm512_mask_blend_epi8(r3, t2, t3));
    __m512i v16[2];
    for (int q = 0; q < 2; ++q) {
      const __m512i m = _mm512_loadu_si512(mu + i + 32 * q), s = _mm512_loadu_si512(sg + i + 32 * q);
      __m512i r[2];
      for (int u = 0; u < 2; ++u) {
        const int g = 2 * q + u;
        __m512i z = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(t, g));
        z = _mm512_mask_sub_epi32(z, _mm512_test_epi32_mask(h[g], sign_bit), zero, z);  // sign: bit 16 of h
        const __m512i pairs = _mm512_or_si512(_mm512_slli_epi32(z, 16), mult);
        const __m512i ms = u ? _mm512_unpackhi_epi16(m, s) : _mm512_unpacklo_epi16(m, s);
        r[u] = _mm512_sra_epi32(_mm512_add_epi32(_mm512_madd_epi16(ms, pairs), half), sh);
      }
      v16[q] = _mm512_packs_epi32(r[0], r[1]);
    }
    // vpacksswb interleaves 8-byte groups of the two halves per 128-bit lane: vpermq puts them back in order
    const __m512i v8 = _mm512_permutexvar_epi64(in_order, _mm512_packs_epi16(v16[0], v16[1]));
    _mm512_storeu_si512(out + i, _mm512_max_epi8(v8, lowest));
  }
  return i;
}

#else

bool vbmi_supported() { return false; }

int64_t sample_range_vbmi(int8_t*, const int16_t*, const int16_t*, int64_t begin, int64_t, uint64_t,
                          const VbmiTables&, int, int) {
  return begin;
}

#endif

}  // namespace qbdl
