// DP token-batch scheduler (PipeSD mechanism 1). See src/pipesd/scheduling.py for the maths.
#pragma once
#include <vector>

namespace pipesd {

struct BatchPlan {
    std::vector<int> sizes;  // consecutive batch sizes, summing to n
    double finish_s = 0.0;   // time at which the cloud holds every token (expected, for the expected variant)
};

constexpr int kMaxPlanTokens = 4096;
constexpr int kMaxExpectedTokens = 256;

// Exact optimum of F(0)=0, F(i)=min_{0<=j<i} max(F(j), i*g) + s + (i-j)*c.
// Ties: the smallest j (the largest last batch, i.e. fewer batches) wins.
BatchPlan plan_batches(int n, double g, double s, double c);

// Exact minimum over cut sets of E_L[finish time of the batch that ends at the trigger L],
// with P(L = i+1) = probs[i]; a triggered token is flushed at once with everything unsent.
BatchPlan plan_batches_expected(const std::vector<double>& probs, double g, double s, double c);

}  // namespace pipesd
