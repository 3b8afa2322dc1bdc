// Host check of the contrastive engine's grouped fold (fastloss/contrastive.h): lse_group + one lse_fold per
// group of V finite lanes, which only the CUDA epilogues call, must give the record of lane-wise lse_fold
// (HCL or not, growing / shrinking / tied maxima, a rest mass far below the unit roundoff). Built and run by
// tests/test_headers.py.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "fastloss/contrastive.h"

using fastloss::contrastive::lse_fold;
using fastloss::contrastive::lse_group;

template <typename T>
bool close(T a, T b, double rtol) {
  return std::fabs(double(a) - double(b)) <= rtol * (std::fabs(double(b)) + 1e-300);
}

template <typename T, bool kHcl, int V>
int check(const std::vector<T>& row, double rtol, const char* name) {
  const T beta = kHcl ? T(0.7) : T(0), a = T(1) + beta;
  T m1 = fastloss::neg_inf<T>(), a1 = 0, b1 = 0, m2 = m1, a2 = 0, b2 = 0;
  for (T s : row) lse_fold<kHcl>(m1, a1, b1, s, T(1), T(1), a, beta);
  size_t k = 0;
  for (; k + V <= row.size(); k += V) {
    T s[V];
    for (int v = 0; v < V; ++v) s[v] = row[k + v];
    T oA, oB;
    const T gm = lse_group<kHcl, false>(s, a, beta, oA, oB);
    lse_fold<kHcl>(m2, a2, b2, gm, oA, oB, a, beta);
  }
  for (; k < row.size(); ++k) lse_fold<kHcl>(m2, a2, b2, row[k], T(1), T(1), a, beta);
  if (m1 == m2 && close(a2, a1, rtol) && (!kHcl || close(b2, b1, rtol))) return 0;
  std::printf("FAIL %s (%s, hcl=%d, V=%d): lane-wise (m=%.17g A=%.17g B=%.17g) vs grouped (m=%.17g A=%.17g "
              "B=%.17g)\n", name, sizeof(T) == 4 ? "float" : "double", int(kHcl), V, double(m1), double(a1),
              double(b1), double(m2), double(a2), double(b2));
  return 1;
}

template <typename T>
int check_all(double rtol) {
  std::mt19937 gen(11);
  std::normal_distribution<double> normal(0.0, 4.0);
  int fails = 0;
  auto run = [&](const std::vector<T>& row, const char* name) {
    fails += check<T, false, 4>(row, rtol, name) + check<T, true, 4>(row, rtol, name) +
             check<T, false, 2>(row, rtol, name) + check<T, true, 8>(row, rtol, name);
  };
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<T> row(1 + gen() % 300);
    for (auto& x : row) x = T(normal(gen));
    if (trial % 3 == 0)
      for (auto& x : row) x = T(std::round(double(x)));  // many ties
    run(row, "random");
    std::vector<T> up(row), down(row);
    std::sort(up.begin(), up.end());
    std::sort(down.rbegin(), down.rend());
    run(up, "increasing");
    run(down, "decreasing");
  }
  run({0, 0, 0, 0, 0, 0, 0, 0}, "all ties");
  std::vector<T> collapse(64, T(-50));
  collapse[13] = T(30);  // the negatives' mass relative to the max is ~ 63 e^-80: kept exactly, not rounded away
  run(collapse, "collapse");
  std::vector<T> big(40);
  for (size_t i = 0; i < big.size(); ++i) big[i] = T(80) + T(i % 7);  // e^80 would overflow unshifted in fp32
  run(big, "large logits");
  return fails;
}

// fp32: both orders round ~300 exps and sums (a few 1e-6 apart); fp64 shows the maths is the same.
int main() {
  const int fails = check_all<float>(1e-5) + check_all<double>(1e-13);
  if (fails) {
    std::printf("%d failures\n", fails);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
