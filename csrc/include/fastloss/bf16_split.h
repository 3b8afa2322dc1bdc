// An fp32 value as the sum of two bfloat16 values, hi = bf16(v) and lo = bf16(v - hi), so that a product with
// a bf16 operand runs as two bf16 tensor-core GEMMs with fp32 accumulation and keeps about 16 mantissa bits
// (|v - hi - lo| <= 2^-16 |v|). Bit-level rounding (to nearest, ties to even, as torch and the hardware convert),
// so the CPU and CUDA kernels produce the same bits (a NaN stays a quiet NaN with its sign and payload, where
// torch's conversions give their canonical NaN: equal as values, not as bits).
#pragma once
#include "fastloss/macros.h"

namespace fastloss {

FL_HD FL_INLINE uint16_t bf16_bits(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays a quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

FL_HD FL_INLINE float bf16_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

FL_HD FL_INLINE void split_bf16(float v, uint16_t& hi, uint16_t& lo) {
  hi = bf16_bits(v);
  lo = bf16_bits(v - bf16_float(hi));
}

}  // namespace fastloss
