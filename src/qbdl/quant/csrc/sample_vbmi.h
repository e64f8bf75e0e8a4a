// The AVX-512 VBMI sampling kernel (sample_vbmi.cpp): the noise of inplace.cpp's kernels, bit for bit, with the
// inverse-CDF lookup done by byte permutes instead of one scalar load a weight.
#pragma once

#include <cstdint>

namespace qbdl {

// The z table re-expressed for the permutes (see sample_vbmi.cpp); ok is false when a table does not have that shape.
struct VbmiTables {
  alignas(64) uint8_t base1[256];
  alignas(64) uint8_t thr1[256];
  alignas(64) uint8_t base2[256];
  alignas(64) uint8_t thr2[256];
  alignas(64) uint8_t base3[256];
  bool ok;
};

// True when this CPU (and its OS) runs AVX-512F, BW and VBMI instructions.
bool vbmi_supported();

// The tables of z table `tbl` (2^15 bytes), derived on the first call and again whenever its bytes change.
const VbmiTables& vbmi_tables(const uint8_t* tbl);

// Samples weights begin.. in steps of 64 (the same integers as inplace.cpp's sample_range_scalar) and returns
// where it stopped: the caller samples the last < 64 weights. Only with vbmi_supported() and tables.ok.
int64_t sample_range_vbmi(int8_t* out, const int16_t* mu, const int16_t* sg, int64_t begin, int64_t end,
                          uint64_t key, const VbmiTables& tables, int mu_shift, int shift);

}  // namespace qbdl
