// DP token-batch scheduler (PipeSD mechanism 1) and the robust line fit behind the online
// cost model. The maths is documented in src/pipesd/scheduling.py and docs/native.md; the
// pure-Python reference (src/pipesd/_scheduling_ref.py) performs the same floating-point
// operations in the same order, so plans agree bit for bit.
#pragma once
#include <cstddef>
#include <vector>

namespace pipesd {

struct BatchPlan {
    std::vector<int> sizes;  // consecutive batch sizes, summing to n (to N for the expected variant)
    double finish_s = 0.0;   // time the cloud holds every token (expected time, for the expected variant)
};

// Largest n accepted by plan_batches (O(n^2) time, O(n) memory: 4096 -> ~10 ms).
constexpr int kMaxPlanTokens = 4096;
// Largest horizon N accepted by plan_batches_expected (Pareto DP; see scheduler.cpp).
constexpr int kMaxExpectedTokens = 512;
// Tolerance on sum(length_probs) == 1.
constexpr double kProbSumTol = 1e-6;

// Exact optimum of F(0)=0, F(i)=min_{0<=j<i} max(F(j), i*g) + s + (i-j)*c.
// Ties (exact floating-point equality) go to the smallest j: the largest last batch.
// Throws std::invalid_argument (message names the argument) on bad input.
BatchPlan plan_batches(int n, double g, double s, double c);

// Exact minimum over cut sets of E_L[finish time of the batch (j, L]] where j is the plan's
// last cut below the trigger point L, P(L = i+1) = probs[i]. Throws std::invalid_argument.
BatchPlan plan_batches_expected(const double* probs, std::size_t n, double g, double s, double c);

// Statistics of the last plan_batches_expected call on this thread (for docs/benchmarks).
struct ExpectedStats {
    std::size_t labels = 0;     // labels kept over all cut points
    std::size_t max_front = 0;  // largest Pareto front at one cut point
};
ExpectedStats last_expected_stats();

// Robust fit y = a + b*x (see scheduling.py: median-split start, Huber IRLS with MAD scale,
// Tukey-biweight polish). With fewer than two distinct x the slope is not identifiable:
// b = prior_slope, a = median(y - b*x). O(m) per iteration, at most kMaxFitIters iterations.
struct LineFit {
    double intercept = 0.0;
    double slope = 0.0;
    int iterations = 0;
};
constexpr int kMaxFitIters = 50;
LineFit robust_line_fit(const double* x, const double* y, std::size_t m, double prior_slope);

// Validation shared by the bindings (throws std::invalid_argument naming the argument).
void check_cost(const char* name, double v);
void check_n_tokens(long long n);
void check_length_probs(const double* probs, std::size_t n);

}  // namespace pipesd
