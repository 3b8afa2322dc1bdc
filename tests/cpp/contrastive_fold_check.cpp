// Host check of the contrastive engine's grouped fold (fastloss/contrastive.h): lse_group + one lse_fold per
// group of V finite lanes, which only the CUDA epilogues call, must give the record of lane-wise lse_fold
// (HCL or not, growing / shrinking / tied maxima, a rest mass far below the unit roundoff). Built and run by
// tests/test_headers.py.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
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

// The fused GEMM epilogue's partials (fold_line per row and per column of each tile, merged in tile order with
// Acc::merge) against one lane-wise fold of the whole row / column: rows with a positive key anywhere (or out of
// range) and some without their own lane, columns with the diagonal as positive, tiles that do not divide the
// matrix, -inf lanes.
template <typename T>
int check_tiles(double rtol) {
  using fastloss::contrastive::Acc;
  using fastloss::contrastive::acc_of_line;
  using fastloss::contrastive::fold_line;
  using fastloss::contrastive::kLineStats;
  using fastloss::contrastive::store_line;
  std::mt19937 gen(5);
  std::normal_distribution<double> normal(0.0, 3.0);
  int fails = 0;
  const int shapes[][4] = {{37, 53, 8, 16}, {64, 64, 16, 16}, {20, 130, 7, 9}, {9, 9, 128, 128}, {33, 17, 32, 8}};
  for (const auto& sh : shapes) {
    const int R = sh[0], C = sh[1], tr = sh[2], tc = sh[3];
    std::vector<T> x(size_t(R) * C), t(R);
    std::vector<int64_t> pos(R);
    for (auto& v : x) v = T(normal(gen));
    for (int i = 0; i < R; ++i) {
      t[i] = T(0.5 + (gen() % 100) / 25.0);
      pos[i] = i % 5 == 4 ? int64_t(C + 3) : int64_t(gen() % C);  // every 5th row: positive out of range
    }
    if (R > 3 && C > 3) x[3 * C + 2] = -std::numeric_limits<T>::infinity();  // a masked lane
    const T b = T(-1.25);
    // every 3rd row leaves out its own lane (NT-Xent), unless that lane is its positive
    auto self_of = [&](int i) -> int64_t { return i % 3 == 1 && i < C && pos[i] != i ? i : -1; };
    std::vector<T> row_part(size_t((C + tc - 1) / tc) * R * kLineStats);
    std::vector<T> col_part(size_t((R + tr - 1) / tr) * C * kLineStats);
    for (int r0 = 0; r0 < R; r0 += tr)
      for (int c0 = 0; c0 < C; c0 += tc) {
        const int rh = std::min(tr, R - r0), ch = std::min(tc, C - c0);
        for (int r = 0; r < rh; ++r) {
          const T ti = t[r0 + r];
          const int64_t self = self_of(r0 + r);
          auto acc = fold_line<false>(&x[size_t(r0 + r) * C + c0], 1, ch, [ti](int) { return ti; }, b,
                                      pos[r0 + r] - c0, self >= 0 ? self - c0 : -1);
          store_line(acc, &row_part[(size_t(c0 / tc) * R + r0 + r) * kLineStats]);
        }
        for (int c = 0; c < ch; ++c) {
          auto acc = fold_line<false>(&x[size_t(r0) * C + c0 + c], C, rh, [&](int r) { return t[r0 + r]; }, b,
                                      int64_t(c0 + c) - r0);
          store_line(acc, &col_part[(size_t(r0 / tr) * C + c0 + c) * kLineStats]);
        }
      }
    auto same = [&](const Acc<T>& got, const Acc<T>& want, const char* what, int idx) {
      if (got.m == want.m && got.pos == want.pos && close(got.dA, want.dA, rtol) &&
          (got.sum == want.sum || close(got.sum, want.sum, rtol)))  // a -inf lane makes both sums -inf
        return 0;
      std::printf("FAIL tile partials %s %d (%dx%d, tiles %dx%d): m %g/%g dA %.17g/%.17g pos %g/%g sum %g/%g\n", what,
                  idx, R, C, tr, tc, double(got.m), double(want.m), double(got.dA), double(want.dA),
                  double(got.pos), double(want.pos), double(got.sum), double(want.sum));
      return 1;
    };
    for (int i = 0; i < R; ++i) {
      Acc<T> want = Acc<T>::empty(), got = Acc<T>::empty();
      for (int j = 0; j < C; ++j) {
        if (j == self_of(i)) continue;
        const T s = t[i] * x[size_t(i) * C + j] + b;
        want.sum += s;
        if (j == pos[i])
          want.pos = s;
        else
          want.push(s, T(1), T(0), false);
      }
      for (int n = 0; n * tc < C; ++n) got.merge(acc_of_line(&row_part[(size_t(n) * R + i) * kLineStats]), T(1), T(0), false);
      fails += same(got, want, "row", i);
    }
    for (int j = 0; j < C; ++j) {
      Acc<T> want = Acc<T>::empty(), got = Acc<T>::empty();
      for (int i = 0; i < R; ++i) {
        const T s = t[i] * x[size_t(i) * C + j] + b;
        want.sum += s;
        if (i == j)
          want.pos = s;
        else
          want.push(s, T(1), T(0), false);
      }
      for (int m = 0; m * tr < R; ++m) got.merge(acc_of_line(&col_part[(size_t(m) * C + j) * kLineStats]), T(1), T(0), false);
      fails += same(got, want, "column", j);
    }
  }
  return fails;
}

// fp32: both orders round ~300 exps and sums (a few 1e-6 apart); fp64 shows the maths is the same.
int main() {
  const int fails = check_all<float>(1e-5) + check_all<double>(1e-13) + check_tiles<float>(1e-5) +
                    check_tiles<double>(1e-13);
  if (fails) {
    std::printf("%d failures\n", fails);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
