// Host check of the torch-free online log-sum-exp (fastloss/online_lse.h): the grouped push_n, which only the
// CUDA kernels call, must give the state of element-wise push on adversarial rows (ties, -inf, NaN, +inf, a
// rest mass far below the unit roundoff, growing and shrinking maxima). Built and run by tests/test_headers.py.
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "fastloss/online_lse.h"

using fastloss::LseState;

template <typename T>
bool same_state(const LseState<T>& a, const LseState<T>& b, double rtol) {
  if (std::isnan(a.r) || std::isnan(b.r)) return std::isnan(a.r) && std::isnan(b.r);
  if (a.m != b.m && !(std::isnan(a.m) && std::isnan(b.m))) return false;
  const double scale = std::fabs(double(b.r)) + 1e-300;
  return std::fabs(double(a.r) - double(b.r)) <= rtol * scale;
}

template <typename T, int N>
int check(const std::vector<T>& row, double rtol, const char* name) {
  LseState<T> one = LseState<T>::empty(), grouped = LseState<T>::empty();
  for (T x : row) one.push(x);
  size_t k = 0;
  for (; k + N <= row.size(); k += N) {
    T z[N];
    for (int j = 0; j < N; ++j) z[j] = row[k + j];
    grouped.template push_n<false, N>(z);
  }
  for (; k < row.size(); ++k) grouped.push(row[k]);
  if (same_state(grouped, one, rtol)) return 0;
  std::printf("FAIL %s (%s, N=%d): push (m=%.17g r=%.17g) vs push_n (m=%.17g r=%.17g)\n", name,
              sizeof(T) == 4 ? "float" : "double", N, double(one.m), double(one.r), double(grouped.m),
              double(grouped.r));
  return 1;
}

// push_scaled_n (the CUDA forward's light loop: the maximum of the raw lanes, the scale folded into the exp)
// must give element-wise push's state of the scaled lanes.
template <typename T, int N>
int check_scaled(const std::vector<T>& row, T s, double rtol, const char* name) {
  LseState<T> one = LseState<T>::empty(), grouped = LseState<T>::empty();
  for (T x : row) one.push(s * x);
  size_t k = 0;
  for (; k + N <= row.size(); k += N) {
    T x[N];
    T gx = row[k];
    for (int j = 0; j < N; ++j) {
      x[j] = row[k + j];
      gx = std::fmax(gx, x[j]);
    }
    grouped.template push_scaled_n<false, N>(x, gx, s);
  }
  for (; k < row.size(); ++k) grouped.push(s * row[k]);
  if (same_state(grouped, one, rtol)) return 0;
  std::printf("FAIL scaled %s (%s, N=%d, s=%g): push (m=%.17g r=%.17g) vs push_scaled_n (m=%.17g r=%.17g)\n",
              name, sizeof(T) == 4 ? "float" : "double", N, double(s), double(one.m), double(one.r),
              double(grouped.m), double(grouped.r));
  return 1;
}

// The GPU kernels split a row over threads (strided packs) and merge the threads' states: merging the parts in
// any order must give element-wise push's state, NaN included (a part of only NaN and -inf has maximum -inf).
template <typename T>
int check_merge(const std::vector<T>& row, double rtol, const char* name) {
  LseState<T> one = LseState<T>::empty();
  for (T x : row) one.push(x);
  int fails = 0;
  for (size_t parts : {2, 3, 8}) {
    std::vector<LseState<T>> part(parts, LseState<T>::empty());
    for (size_t k = 0; k < row.size(); ++k) part[k % parts].push(row[k]);
    LseState<T> fwd = part[0], back = part[parts - 1];
    for (size_t j = 1; j < parts; ++j) {
      fwd.merge(part[j]);
      back.merge(part[parts - 1 - j]);
    }
    for (const LseState<T>& merged : {fwd, back}) {
      if (same_state(merged, one, rtol)) continue;
      std::printf("FAIL merge %s (%s, %zu parts): push (m=%.17g r=%.17g) vs merged (m=%.17g r=%.17g)\n", name,
                  sizeof(T) == 4 ? "float" : "double", parts, double(one.m), double(one.r), double(merged.m),
                  double(merged.r));
      ++fails;
    }
  }
  return fails;
}

template <typename T>
int check_all(double rtol) {
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  std::mt19937 gen(7);
  std::normal_distribution<double> normal(0.0, 3.0);
  int fails = 0;
  auto run = [&](const std::vector<T>& row, const char* name) {
    fails += check<T, 8>(row, rtol, name) + check<T, 4>(row, rtol, name) + check<T, 2>(row, rtol, name) +
             check_merge<T>(row, rtol, name);
    for (T s : {T(1), T(0.37), T(3), T(1e-3)})
      fails += check_scaled<T, 32>(row, s, rtol, name) + check_scaled<T, 8>(row, s, rtol, name);
  };
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<T> row(1 + gen() % 300);
    for (auto& x : row) x = T(normal(gen));
    if (trial % 3 == 0)
      for (auto& x : row) x = T(std::round(double(x)));  // many ties
    if (trial % 5 == 0) row[gen() % row.size()] = -inf;
    run(row, "random");
    std::vector<T> up(row), down(row);
    std::sort(up.begin(), up.end());
    std::sort(down.rbegin(), down.rend());
    run(up, "increasing");  // a new maximum in every group
    run(down, "decreasing");
  }
  run({-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf}, "all -inf");
  run({-inf, -inf, -inf, 1, -inf, -inf, -inf, -inf, 2, 2}, "-inf then values");
  run({0, 0, 0, 0, 0, 0, 0, 0}, "all ties");
  std::vector<T> collapse(64, T(-50));
  collapse[13] = T(30);  // rest mass ~ 63 e^-80, far below the unit roundoff: must stay > 0 and exact
  run(collapse, "collapse");
  run({1, 2, nan, 3, 4, 5, 6, 7, 8}, "nan inside");
  run({nan, 2, 3, 4, 5, 6, 7, 8, 9}, "nan first");
  run({-inf, -inf, nan, -inf, -inf, -inf, -inf, -inf}, "nan among -inf");
  run({1, 2, inf, 3, 4, 5, 6, 7, 0}, "+inf");
  run({1, nan}, "nan in the second part");
  run({1, -inf, -inf, 2, nan, -inf, 3, -inf, -inf}, "nan among -inf in one part");
  LseState<T> s = LseState<T>::empty();
  T z[8];
  for (auto& x : z) x = T(-50);
  z[3] = T(30);
  s.template push_n<false, 8>(z);
  if (!(s.r > T(0))) {
    std::printf("FAIL collapse rest mass is %g\n", double(s.r));
    ++fails;
  }
  return fails;
}

int main() {
  const int fails = check_all<float>(3e-5) + check_all<double>(1e-13);
  std::printf(fails ? "%d failures\n" : "ok\n", fails);
  return fails ? 1 : 0;
}
