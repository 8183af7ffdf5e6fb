// Unit tests of the host/device N:M selection (no torch): ties, NaN, exact-N, double keys, int8 widening.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "../nm_select.h"

static int failures = 0;
#define CHECK_EQ(a, b)                                                                                           \
  do {                                                                                                           \
    auto _a = (a);                                                                                               \
    auto _b = (b);                                                                                               \
    if (_a != _b) {                                                                                              \
      std::printf("FAIL %s:%d: %s = 0x%x, expected 0x%x\n", __FILE__, __LINE__, #a, (unsigned)_a, (unsigned)_b); \
      ++failures;                                                                                                \
    }                                                                                                            \
  } while (0)

static unsigned popcount(unsigned x) {
  unsigned c = 0;
  for (; x; x &= x - 1) ++c;
  return c;
}

int main() {
  using step_kernels::nm_key;
  using step_kernels::nm_select_keys;
  {  // plain top-2 of 4
    float k[4] = {nm_key(0.5f), nm_key(-3.f), nm_key(1.f), nm_key(2.f)};
    CHECK_EQ(nm_select_keys(k, 2, 4), 0b1010u);
  }
  {  // all equal: the lower indices win
    float k[4] = {1.f, 1.f, 1.f, 1.f};
    CHECK_EQ(nm_select_keys(k, 2, 4), 0b0011u);
  }
  {  // -0.0 and +0.0 tie; NaN counts as +inf and beats inf only by index
    float k[4] = {nm_key(-0.0f), nm_key(0.0f), nm_key(NAN), nm_key(INFINITY)};
    CHECK_EQ(nm_select_keys(k, 2, 4), 0b1100u);
    CHECK_EQ(nm_select_keys(k, 1, 4), 0b0100u);
  }
  {  // double keys: 1 + 2^-40 and 1 differ (they would tie as floats); NaN counts as +inf
    double k[4] = {nm_key(1.0), nm_key(-(1.0 + std::ldexp(1.0, -40))), nm_key(static_cast<double>(NAN)), nm_key(0.5)};
    CHECK_EQ(nm_select_keys(k, 2, 4), 0b0110u);
    CHECK_EQ(nm_select_keys(k, 3, 4), 0b0111u);
  }
  {  // int8 -128 widened: the largest magnitude
    int k[4] = {nm_key(int32_t{-128}), nm_key(int32_t{127}), nm_key(int32_t{3}), nm_key(int32_t{-4})};
    CHECK_EQ(nm_select_keys(k, 1, 4), 0b0001u);
  }
  {  // exactly N kept for every N:M on random data with many ties
    std::srand(1234);
    for (int m = 2; m <= 32; m *= 2)
      for (int n = 1; n < m; ++n)
        for (int trial = 0; trial < 50; ++trial) {
          float k[32];
          for (int i = 0; i < m; ++i) k[i] = static_cast<float>(std::rand() % 4);
          CHECK_EQ(popcount(nm_select_keys(k, n, m)), static_cast<unsigned>(n));
        }
  }
  if (failures == 0) std::printf("test_nm_select: all passed\n");
  return failures == 0 ? 0 : 1;
}
