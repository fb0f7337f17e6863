// DP token-batch scheduler and robust line fit. See scheduler.hpp.
//
// Floating-point discipline: every expression is written in the order the Python reference
// (src/pipesd/_scheduling_ref.py) evaluates it, and contraction into fused multiply-adds is
// switched off, so C++ and Python produce identical doubles and therefore identical ties.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("-ffp-contract=off")
#endif

#include "scheduler.hpp"

#include <algorithm>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>

namespace pipesd {

namespace {
std::string fmt(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.17g", v);
    return buf;
}
}  // namespace

void check_cost(const char* name, double v) {
    if (!(v >= 0.0) || !std::isfinite(v))
        throw std::invalid_argument(std::string(name) + " must be a finite number >= 0, got " + fmt(v));
}

void check_n_tokens(long long n) {
    if (n < 0 || n > kMaxPlanTokens)
        throw std::invalid_argument("n_tokens must be in [0, " + std::to_string(kMaxPlanTokens) + "], got " +
                                    std::to_string(n));
}

void check_length_probs(const double* probs, std::size_t n) {
    if (n == 0) throw std::invalid_argument("length_probs must not be empty");
    if (n > static_cast<std::size_t>(kMaxExpectedTokens))
        throw std::invalid_argument("length_probs has " + std::to_string(n) + " entries; at most " +
                                    std::to_string(kMaxExpectedTokens));
    double sum = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
        if (!(probs[i] >= 0.0) || !std::isfinite(probs[i]))
            throw std::invalid_argument("length_probs[" + std::to_string(i) + "] must be finite and >= 0, got " +
                                        fmt(probs[i]));
        sum += probs[i];
    }
    if (!(std::fabs(sum - 1.0) <= kProbSumTol))
        throw std::invalid_argument("length_probs must sum to 1 (within 1e-6), got sum " + fmt(sum));
}

// ------------------------------------------------------------------------------ exact plan
//
// Row i of the recurrence in three passes, each free of loop-carried latency chains:
//   1. v[j] = max(F[j], i*g) + s + (i-j)*c for all j < i  (the reference's expression),
//   2. m = min_j v[j]                                       (exact: min never rounds),
//   3. the first j with v[j] == m.
// This is the same choice as the reference's single scan with a strict '<' (the smallest j
// among exact ties), just faster: the scan's compare-and-select chain costs ~4 cycles/j.
namespace {
inline double row_min(const double* v, int len) {
#if defined(__SSE2__)
    __m128d m0 = _mm_set1_pd(std::numeric_limits<double>::infinity()), m1 = m0;
    int j = 0;
    for (; j + 4 <= len; j += 4) {
        m0 = _mm_min_pd(_mm_loadu_pd(v + j), m0);
        m1 = _mm_min_pd(_mm_loadu_pd(v + j + 2), m1);
    }
    m0 = _mm_min_pd(m0, m1);
    double lanes[2];
    _mm_storeu_pd(lanes, m0);
    double m = lanes[0] < lanes[1] ? lanes[0] : lanes[1];
    for (; j < len; ++j) m = v[j] < m ? v[j] : m;
    return m;
#else
    double m = std::numeric_limits<double>::infinity();
    for (int j = 0; j < len; ++j) m = v[j] < m ? v[j] : m;
    return m;
#endif
}
}  // namespace

BatchPlan plan_batches(int n, double g, double s, double c) {
    check_n_tokens(n);
    check_cost("gen_s", g);
    check_cost("startup_s", s);
    check_cost("per_token_s", c);
    BatchPlan plan;
    if (n == 0) return plan;
    // Scratch reused across calls on this thread: no allocation but the result's.
    thread_local std::vector<double> F, v, jd;
    thread_local std::vector<int> arg;
    const std::size_t N = static_cast<std::size_t>(n) + 1;
    if (F.size() < N) {
        F.resize(N);
        v.resize(N);
        arg.resize(N);
        jd.resize(N);  // j as a double, so di - jd[j] is exactly the integer i - j
        for (std::size_t j = 0; j < N; ++j) jd[j] = static_cast<double>(j);
    }
    double* Fp = F.data();
    double* vp = v.data();
    const double* jp = jd.data();
    Fp[0] = 0.0;
    for (int i = 1; i <= n; ++i) {
        const double ready = i * g;
        const double di = i;
        // Same evaluation order as Python: (max(F[j], ready) + s) + (i - j) * c, where
        // di - jp[j] is exactly the integer i - j.
        for (int j = 0; j < i; ++j) {
            const double f = Fp[j];
            vp[j] = (f < ready ? ready : f) + s + (di - jp[j]) * c;
        }
        const double best = row_min(vp, i);
        int best_j = 0;
        while (vp[best_j] != best) ++best_j;
        Fp[i] = best;
        arg[i] = best_j;
    }
    int batches = 0;
    for (int i = n; i > 0; i = arg[i]) ++batches;
    plan.sizes.resize(batches);
    for (int i = n; i > 0; i = arg[i]) plan.sizes[--batches] = i - arg[i];
    plan.finish_s = Fp[n];
    return plan;
}

// --------------------------------------------------------------------- expected-cost plan
//
// A label at cut point j is (acc, t, back-pointer): acc = sum over L <= j of P(L) * fin(L)
// for the cuts chosen so far, t = max(T(j), (j+1)*g) with T(j) the time the batch ending at
// j has left. The future cost from j depends on T(j) only through max(T(j), L*g) for
// L >= j+1, so it is a non-decreasing function of t and labels with equal t are
// interchangeable. A label is dominated when another has acc' <= acc and t' <= t; dominated
// labels can never be on a strictly better plan, so keeping the Pareto front (a staircase:
// t ascending, acc strictly descending) is exact. Ties: a new label that equals an existing
// one in both coordinates is dropped (first come wins); fronts are processed in t order.
// Prefixes whose acc already reaches the best complete plan found so far are pruned (they
// cannot be strictly better, and ancestors of the strict winner always have acc < best).
namespace {
struct Label {
    double acc;
    double t;
    int prev_j;
    int prev_k;
};
thread_local ExpectedStats g_stats;

// Insert into a staircase (t ascending, acc strictly descending) unless weakly dominated.
inline void insert_label(std::vector<Label>& f, const Label& lab) {
    // First label with t > lab.t; the one before it has the smallest acc among t <= lab.t.
    auto p = std::upper_bound(f.begin(), f.end(), lab.t, [](double t, const Label& y) { return t < y.t; });
    if (p != f.begin() && std::prev(p)->acc <= lab.acc) return;  // dominated
    // Labels with t >= lab.t and acc >= lab.acc are now dominated: a contiguous run.
    auto q = std::lower_bound(f.begin(), f.end(), lab.t, [](const Label& y, double t) { return y.t < t; });
    auto r = q;
    while (r != f.end() && r->acc >= lab.acc) ++r;
    if (q == r) {
        f.insert(q, lab);
    } else {
        *q = lab;
        f.erase(q + 1, r);
    }
}
}  // namespace

ExpectedStats last_expected_stats() { return g_stats; }

BatchPlan plan_batches_expected(const double* probs, std::size_t n_sz, double g, double s, double c) {
    check_length_probs(probs, n_sz);
    check_cost("gen_s", g);
    check_cost("startup_s", s);
    check_cost("per_token_s", c);
    const int n = static_cast<int>(n_sz);
    BatchPlan plan;
    // Lower bound on what a prefix (cut j, time t) still has to pay. For every L > j:
    //   fin(L) >= t + s + (L-j)*c   (tokens j+1..L all cross the wire after t), and
    //   fin(L) >= L*g + s + c       (the last batch starts after token L and holds it),
    // so fin(L) >= max(A(L), B(L)) + s with A(L) = (t - j*c) + L*c, B(L) = c + L*g, both linear
    // in L: A wins up to m = floor((t - j*c - c) / (g - c)) (everywhere when g <= c). With
    // prefix sums of P(L) and L*P(L) the sum over L > j is O(1). Any m gives a valid bound (on
    // the wrong side of the crossing it uses the smaller of two lower bounds). A prefix with
    // acc + bound > best*(1+1e-9) cannot win (the margin dwarfs the rounding of the bound),
    // so skipping it changes no result, only the work.
    std::vector<double> PS(n + 1, 0.0), LS(n + 1, 0.0);
    for (int L = 1; L <= n; ++L) {
        PS[L] = PS[L - 1] + probs[L - 1];
        LS[L] = LS[L - 1] + L * probs[L - 1];
    }
    auto bound = [&](int j, double t) {
        const double a0 = t - j * c;
        int m = n;
        if (g > c) {
            const double q = std::floor((a0 - c) / (g - c));
            m = q >= n ? n : (q <= j ? j : static_cast<int>(q));
        }
        return a0 * (PS[m] - PS[j]) + c * (LS[m] - LS[j]) + c * (PS[n] - PS[m]) + g * (LS[n] - LS[m]) +
               s * (PS[n] - PS[j]);
    };
    constexpr double kBoundMargin = 1e-9;
    std::vector<std::vector<Label>> front(n);
    front[0].push_back({0.0, g, -1, -1});  // t = max(T(0)=0, 1*g)
    double best = std::numeric_limits<double>::infinity();
    int best_j = -1, best_k = -1;
    ExpectedStats st;
    for (int j = 0; j < n; ++j) {
        const std::vector<Label>& fj = front[j];
        st.labels += fj.size();
        st.max_front = std::max(st.max_front, fj.size());
        for (std::size_t k = 0; k < fj.size(); ++k) {
            double acc = fj[k].acc;
            const double t = fj[k].t;
            if (acc + bound(j, t) > best * (1.0 + kBoundMargin)) continue;
            for (int i = j + 1; i <= n; ++i) {
                // Trigger at L = i: the last batch is (j, i].
                const double fin = std::max(t, i * g) + s + (i - j) * c;
                acc += probs[i - 1] * fin;
                if (i == n) {
                    if (acc < best) {
                        best = acc;
                        best_j = j;
                        best_k = static_cast<int>(k);
                    }
                    break;
                }
                // acc only grows along a plan: this prefix (and every extension) can no longer
                // beat the best complete plan strictly, so it cannot be chosen. Pruning it
                // changes no result, only the work.
                if (acc >= best) break;
                // Or cut at i and go on.
                insert_label(front[i], {acc, std::max(fin, (i + 1) * g), j, static_cast<int>(k)});
            }
        }
    }
    g_stats = st;
    std::vector<int> cuts{n};
    for (int j = best_j, k = best_k; j > 0;) {
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

// ------------------------------------------------------------------------ robust line fit
namespace {
// Median with the value a sort would give: mean of the two middle elements when even.
double median_inplace(std::vector<double>& v) {
    const std::size_t m = v.size();
    const std::size_t k = m / 2;
    std::nth_element(v.begin(), v.begin() + k, v.end());
    const double hi = v[k];
    if (m % 2) return hi;
    const double lo = *std::max_element(v.begin(), v.begin() + k);
    return 0.5 * (lo + hi);
}

// Weighted least squares line; false when the weights leave the slope unidentified.
bool wls(const double* x, const double* y, const std::vector<double>& w, std::size_t m, double& a, double& b) {
    double sw = 0.0, swx = 0.0, swy = 0.0;
    for (std::size_t i = 0; i < m; ++i) {
        sw += w[i];
        swx += w[i] * x[i];
        swy += w[i] * y[i];
    }
    if (!(sw > 0.0)) return false;
    const double xbar = swx / sw;
    const double ybar = swy / sw;
    double sxx = 0.0, sxy = 0.0;
    for (std::size_t i = 0; i < m; ++i) {
        const double dx = x[i] - xbar;
        sxx += w[i] * dx * dx;
        sxy += w[i] * dx * (y[i] - ybar);
    }
    if (!(sxx > 0.0)) return false;
    b = sxy / sxx;
    a = ybar - b * xbar;
    return true;
}
}  // namespace

LineFit robust_line_fit(const double* x, const double* y, std::size_t m, double prior_slope) {
    if (m == 0) throw std::invalid_argument("robust_line_fit needs at least one point");
    double xmin = x[0], xmax = x[0], xabs = 0.0, yabs = 0.0;
    for (std::size_t i = 0; i < m; ++i) {
        if (!std::isfinite(x[i]) || !std::isfinite(y[i])) throw std::invalid_argument("robust_line_fit: non-finite point");
        xmin = std::min(xmin, x[i]);
        xmax = std::max(xmax, x[i]);
        xabs = std::max(xabs, std::fabs(x[i]));
        yabs = std::max(yabs, std::fabs(y[i]));
    }
    std::vector<double> tmp(m), w(m), r(m);
    LineFit fit;
    if (xmin == xmax) {  // slope not identifiable
        fit.slope = prior_slope;
        for (std::size_t i = 0; i < m; ++i) tmp[i] = y[i] - prior_slope * x[i];
        fit.intercept = median_inplace(tmp);
        return fit;
    }
    // Start: slope between the medians of the two halves split at the median x.
    tmp.assign(x, x + m);
    const double xm = median_inplace(tmp);
    const bool upper_open = xmax > xm;  // split x <= xm | x > xm, else x < xm | x >= xm
    std::vector<double> xl, yl, xr, yr;
    for (std::size_t i = 0; i < m; ++i) {
        const bool right = upper_open ? x[i] > xm : x[i] >= xm;
        (right ? xr : xl).push_back(x[i]);
        (right ? yr : yl).push_back(y[i]);
    }
    double b = (median_inplace(yr) - median_inplace(yl)) / (median_inplace(xr) - median_inplace(xl));
    for (std::size_t i = 0; i < m; ++i) tmp[i] = y[i] - b * x[i];
    double a = median_inplace(tmp);

    const double floor = 1e-9 * yabs + 1e-15;
    auto scale_of = [&](double a0, double b0) {
        for (std::size_t i = 0; i < m; ++i) {
            r[i] = y[i] - (a0 + b0 * x[i]);
            tmp[i] = std::fabs(r[i]);
        }
        const double sc = 1.4826 * median_inplace(tmp);
        return sc < floor ? floor : sc;
    };
    auto converged = [&](double a0, double b0, double a1, double b1) {
        return std::fabs(a1 - a0) + std::fabs(b1 - b0) * xabs <= 1e-10 * (std::fabs(a1) + std::fabs(b1) * xabs) + 1e-300;
    };
    int it = 0;
    // Huber IRLS, scale re-estimated (MAD) every iteration.
    while (it < kMaxFitIters) {
        ++it;
        const double kc = 1.345 * scale_of(a, b);
        for (std::size_t i = 0; i < m; ++i) {
            const double ar = std::fabs(r[i]);
            w[i] = ar <= kc ? 1.0 : kc / ar;
        }
        double a1 = a, b1 = b;
        if (!wls(x, y, w, m, a1, b1)) break;
        const bool done = converged(a, b, a1, b1);
        a = a1;
        b = b1;
        if (done) break;
    }
    // Tukey-biweight polish (redescending: gross outliers get weight 0), scale held fixed.
    const double kb = 4.685 * scale_of(a, b);
    for (int p = 0; p < 10 && it < kMaxFitIters; ++p) {
        ++it;
        for (std::size_t i = 0; i < m; ++i) {
            const double ri = y[i] - (a + b * x[i]);
            const double u = ri / kb;
            w[i] = std::fabs(u) < 1.0 ? (1.0 - u * u) * (1.0 - u * u) : 0.0;
        }
        double a1 = a, b1 = b;
        if (!wls(x, y, w, m, a1, b1)) break;
        const bool done = converged(a, b, a1, b1);
        a = a1;
        b = b1;
        if (done) break;
    }
    fit.intercept = a;
    fit.slope = b;
    fit.iterations = it;
    return fit;
}

}  // namespace pipesd
