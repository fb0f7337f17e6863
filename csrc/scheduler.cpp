#include "scheduler.hpp"

#include <algorithm>
#include <cstddef>
#include <limits>

namespace pipesd {

BatchPlan plan_batches(int n, double g, double s, double c) {
    BatchPlan plan;
    if (n <= 0) return plan;
    std::vector<double> F(n + 1, 0.0);
    std::vector<int> arg(n + 1, 0);
    for (int i = 1; i <= n; ++i) {
        const double ready = i * g;
        double best = std::numeric_limits<double>::infinity();
        int best_j = 0;
        for (int j = 0; j < i; ++j) {
            const double v = std::max(F[j], ready) + s + (i - j) * c;
            if (v < best) {
                best = v;
                best_j = j;
            }
        }
        F[i] = best;
        arg[i] = best_j;
    }
    for (int i = n; i > 0; i = arg[i]) plan.sizes.push_back(i - arg[i]);
    std::reverse(plan.sizes.begin(), plan.sizes.end());
    plan.finish_s = F[n];
    return plan;
}

namespace {
struct Label {
    double acc;  // sum over L <= j of P(L) * finish(L)
    double t;    // time the batch ending at cut j has left
    int prev_j;
    int prev_k;
};
}  // namespace

BatchPlan plan_batches_expected(const std::vector<double>& probs, double g, double s, double c) {
    BatchPlan plan;
    const int n = static_cast<int>(probs.size());
    if (n == 0) return plan;
    // Pareto DP: labels at each cut j are the non-dominated (acc, t) pairs; any future cost is
    // non-decreasing in t and additive in acc, so dominated labels can never win.
    std::vector<std::vector<Label>> front(n);
    front[0].push_back({0.0, 0.0, -1, -1});
    double best = std::numeric_limits<double>::infinity();
    int best_j = -1, best_k = -1;
    for (int j = 0; j < n; ++j) {
        for (std::size_t k = 0; k < front[j].size(); ++k) {
            const Label lab = front[j][k];
            double acc = lab.acc;
            for (int i = j + 1; i <= n; ++i) {
                // Trigger at L = i: the last batch is (j, i].
                const double fin = std::max(lab.t, i * g) + s + (i - j) * c;
                acc += probs[i - 1] * fin;
                if (i == n) {
                    if (acc < best) {
                        best = acc;
                        best_j = j;
                        best_k = static_cast<int>(k);
                    }
                    break;
                }
                // Or cut at i and go on: (acc, fin) is a label at i.
                std::vector<Label>& f = front[i];
                bool dominated = false;
                for (const Label& y : f) {
                    if (y.acc <= acc && y.t <= fin) {
                        dominated = true;
                        break;
                    }
                }
                if (dominated) continue;
                f.erase(std::remove_if(f.begin(), f.end(),
                                       [&](const Label& y) { return acc <= y.acc && fin <= y.t; }),
                        f.end());
                f.push_back({acc, fin, j, static_cast<int>(k)});
            }
        }
    }
    // Cuts: n, best_j, and back through the labels.
    std::vector<int> cuts{n};
    int j = best_j, k = best_k;
    while (j > 0) {
        cuts.push_back(j);
        const Label& lab = front[j][k];
        j = lab.prev_j;
        k = lab.prev_k;
    }
    cuts.push_back(0);
    std::reverse(cuts.begin(), cuts.end());
    for (std::size_t i = 1; i < cuts.size(); ++i) plan.sizes.push_back(cuts[i] - cuts[i - 1]);
    plan.finish_s = best;
    return plan;
}

}  // namespace pipesd
