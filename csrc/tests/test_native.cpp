// pipesd_native_test: C++ tests (and a small benchmark) of the native core, without Python.
//
//   pipesd_native_test [--records N] [--bench]
//
// Exit status 0 and "ALL PASSED" when every check holds. Built by CMake (target
// pipesd_native_test; -DPIPESD_TSAN=ON for a ThreadSanitizer build) and run by
// tests/test_native_cpp.py.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ring.hpp"
#include "scheduler.hpp"

using namespace pipesd;

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        ++g_checks;                                                                    \
        if (!(cond)) {                                                                 \
            ++g_failures;                                                              \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                              \
    } while (0)

template <class F>
bool throws_invalid(F&& f) {
    try {
        f();
    } catch (const std::invalid_argument&) {
        return true;
    }
    return false;
}

bool close_rel(double a, double b, double rel) { return std::fabs(a - b) <= rel * std::max({std::fabs(a), std::fabs(b), 1e-300}); }

// --------------------------------------------------------------------------- scheduler
double eval_plan(const std::vector<int>& sizes, double g, double s, double c) {
    double t = 0.0;
    int j = 0;
    for (int size : sizes) {
        const int i = j + size;
        t = std::max(t, i * g) + s + (i - j) * c;
        j = i;
    }
    return t;
}

double eval_expected(unsigned cutmask, const std::vector<double>& p, double g, double s, double c) {
    const int n = static_cast<int>(p.size());
    double total = 0.0;
    for (int L = 1; L <= n; ++L) {
        double t = 0.0;
        int j = 0;
        for (int cut = 1; cut < L; ++cut) {
            if (!(cutmask >> (cut - 1) & 1u)) continue;
            t = std::max(t, cut * g) + s + (cut - j) * c;
            j = cut;
        }
        total += p[L - 1] * (std::max(t, L * g) + s + (L - j) * c);
    }
    return total;
}

std::vector<int> sizes_of_mask(unsigned mask, int n) {
    std::vector<int> sizes;
    int j = 0;
    for (int i = 1; i <= n; ++i) {
        if (i == n || (mask >> (i - 1) & 1u)) {
            sizes.push_back(i - j);
            j = i;
        }
    }
    return sizes;
}

void test_plan_brute_force(std::mt19937_64& rng) {
    std::uniform_real_distribution<double> lg(-4.0, -1.0);
    for (int trial = 0; trial < 40; ++trial) {
        const double g = std::pow(10.0, lg(rng)), s = std::pow(10.0, lg(rng)), c = std::pow(10.0, lg(rng));
        for (int n = 1; n <= 12; ++n) {
            const BatchPlan p = plan_batches(n, g, s, c);
            int total = 0;
            for (int x : p.sizes) total += x;
            CHECK(total == n);
            CHECK(eval_plan(p.sizes, g, s, c) == p.finish_s);  // same operations, same order
            double best = std::numeric_limits<double>::infinity();
            for (unsigned mask = 0; mask < (1u << (n - 1)); ++mask) best = std::min(best, eval_plan(sizes_of_mask(mask, n), g, s, c));
            CHECK(close_rel(p.finish_s, best, 1e-12));
        }
    }
    // Degenerate costs: nothing to gain from splitting -> one batch (ties to the smallest j).
    CHECK(plan_batches(7, 0.0, 0.0, 0.0).sizes == std::vector<int>{7});
    CHECK(plan_batches(0, 1.0, 1.0, 1.0).sizes.empty());
    CHECK(plan_batches(0, 1.0, 1.0, 1.0).finish_s == 0.0);
    // Compute-bound (g > s + c, exact dyadic costs): the last token goes alone once drafted.
    const BatchPlan cb = plan_batches(10, 1.0, 0.25, 0.125);
    CHECK(cb.finish_s == 10.0 + 0.25 + 0.125);
}

void test_plan_validation() {
    CHECK(throws_invalid([] { plan_batches(-1, 1, 1, 1); }));
    CHECK(throws_invalid([] { plan_batches(kMaxPlanTokens + 1, 1, 1, 1); }));
    CHECK(throws_invalid([] { plan_batches(3, -1, 1, 1); }));
    CHECK(throws_invalid([] { plan_batches(3, 1, std::nan(""), 1); }));
    CHECK(throws_invalid([] { plan_batches(3, 1, 1, std::numeric_limits<double>::infinity()); }));
    const std::vector<double> ok{0.5, 0.5}, bad_sum{0.5, 0.4}, neg{1.5, -0.5}, nanp{std::nan(""), 1.0};
    CHECK(!throws_invalid([&] { plan_batches_expected(ok.data(), ok.size(), 1, 1, 1); }));
    CHECK(throws_invalid([&] { plan_batches_expected(bad_sum.data(), bad_sum.size(), 1, 1, 1); }));
    CHECK(throws_invalid([&] { plan_batches_expected(neg.data(), neg.size(), 1, 1, 1); }));
    CHECK(throws_invalid([&] { plan_batches_expected(nanp.data(), nanp.size(), 1, 1, 1); }));
    CHECK(throws_invalid([&] { plan_batches_expected(ok.data(), 0, 1, 1, 1); }));
    CHECK(throws_invalid([&] { plan_batches_expected(ok.data(), ok.size(), 1, -1, 1); }));
}

void test_expected_brute_force(std::mt19937_64& rng) {
    std::uniform_real_distribution<double> lg(-4.0, -1.0);
    std::exponential_distribution<double> ex(1.0);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (int trial = 0; trial < 30; ++trial) {
        const double g = std::pow(10.0, lg(rng)), s = std::pow(10.0, lg(rng)), c = std::pow(10.0, lg(rng));
        for (int n = 1; n <= 10; ++n) {
            std::vector<double> p(n);
            double sum = 0.0;
            for (auto& x : p) {
                x = u(rng) < 0.2 ? 0.0 : ex(rng);  // some impossible lengths
                sum += x;
            }
            if (sum == 0.0) {
                p[n - 1] = 1.0;
                sum = 1.0;
            }
            for (auto& x : p) x /= sum;
            const BatchPlan plan = plan_batches_expected(p.data(), p.size(), g, s, c);
            double best = std::numeric_limits<double>::infinity();
            for (unsigned mask = 0; mask < (1u << (n - 1)); ++mask) best = std::min(best, eval_expected(mask, p, g, s, c));
            CHECK(close_rel(plan.finish_s, best, 1e-12));
            unsigned mask = 0;
            int total = 0;
            for (std::size_t k = 0; k + 1 < plan.sizes.size(); ++k) {
                total += plan.sizes[k];
                mask |= 1u << (total - 1);
            }
            CHECK(close_rel(eval_expected(mask, p, g, s, c), plan.finish_s, 1e-12));
        }
    }
    // A point mass at N is the exact plan for N tokens.
    std::vector<double> point(20, 0.0);
    point.back() = 1.0;
    CHECK(close_rel(plan_batches_expected(point.data(), point.size(), 0.01, 0.004, 0.001).finish_s,
                    plan_batches(20, 0.01, 0.004, 0.001).finish_s, 1e-12));
}

void test_robust_fit() {
    std::vector<double> x, y;
    for (int i = 0; i < 100; ++i) {
        x.push_back(1 + i % 25);
        y.push_back(0.002 + 0.0005 * x.back());
    }
    LineFit f = robust_line_fit(x.data(), y.data(), x.size(), 0.0);
    CHECK(close_rel(f.intercept, 0.002, 1e-9));
    CHECK(close_rel(f.slope, 0.0005, 1e-9));
    for (int i = 0; i < 100; i += 5) y[i] *= 20.0;  // 20% gross outliers
    f = robust_line_fit(x.data(), y.data(), x.size(), 0.0);
    CHECK(close_rel(f.intercept, 0.002, 1e-3));
    CHECK(close_rel(f.slope, 0.0005, 1e-3));
    std::vector<double> x1(10, 4.0), y1(10, 0.01);
    f = robust_line_fit(x1.data(), y1.data(), x1.size(), 0.001);  // one size: slope from the prior
    CHECK(f.slope == 0.001);
    CHECK(close_rel(f.intercept, 0.006, 1e-12));
    CHECK(throws_invalid([] { robust_line_fit(nullptr, nullptr, 0, 0.0); }));
}

// -------------------------------------------------------------------------------- ring
struct Out {
    std::vector<TokenRecord> recs;
    std::vector<int32_t> ids;
    std::vector<float> probs;
    Out(std::size_t n, int k) : recs(n), ids(n * std::max(1, k)), probs(n * std::max(1, k)) {}
};

// Flags that exercise all 32 bits across records (the ring carries them opaquely).
uint32_t flags_for(uint64_t i) { return static_cast<uint32_t>(i * 0x9E3779B1u) ^ static_cast<uint32_t>(i >> 32); }

void test_ring_record_layout() {
    CHECK(sizeof(TokenRecord) == 32);
    CHECK(alignof(TokenRecord) == 8);
    CHECK(offsetof(TokenRecord, position) == 0);
    CHECK(offsetof(TokenRecord, token) == 8);
    CHECK(offsetof(TokenRecord, prob) == 12);
    CHECK(offsetof(TokenRecord, epoch) == 16);
    CHECK(offsetof(TokenRecord, topk_count) == 20);
    CHECK(offsetof(TokenRecord, flags) == 24);
    CHECK(offsetof(TokenRecord, reserved) == 28);
}

void test_ring_flags() {
    TokenRing r(8, 2);
    Out o(8, 2);
    int32_t ids[2] = {3, 4};
    float pr[2] = {0.75f, 0.25f};
    CHECK(r.push(0, 10, 0.5f, nullptr, nullptr, 0));  // default: 0
    CHECK(r.push(1, 11, 0.5f, ids, pr, 2, 1u));
    CHECK(r.push(2, 12, 0.5f, nullptr, nullptr, 0, 2u | 4u));
    CHECK(r.push(3, 13, 0.5f, ids, pr, 1, 0xFFFFFFFFu));  // every bit survives
    CHECK(r.push(4, 14, 0.5f, nullptr, nullptr, 0, 0x80000000u));
    CHECK(r.pop_into(8, o.recs.data(), o.ids.data(), o.probs.data()) == 5);
    const uint32_t want[5] = {0u, 1u, 6u, 0xFFFFFFFFu, 0x80000000u};
    for (int i = 0; i < 5; ++i) {
        CHECK(o.recs[i].position == i && o.recs[i].token == 10 + i);
        CHECK(o.recs[i].flags == want[i]);
        CHECK(o.recs[i].reserved == 0u);
    }
    CHECK(o.recs[1].topk_count == 2 && o.ids[2] == 3 && o.ids[3] == 4);
    // A slot reused after wrap-around carries the new record's flags, not the old ones.
    for (int round = 0; round < 5; ++round) {
        for (int i = 0; i < 8; ++i) CHECK(r.push(i, 0, 0.f, nullptr, nullptr, 0, (round % 2) ? 0u : flags_for(i + 1)));
        CHECK(!r.push(8, 0, 0.f, nullptr, nullptr, 0, 1u));  // full
        CHECK(r.pop_into(8, o.recs.data(), o.ids.data(), o.probs.data()) == 8);
        for (int i = 0; i < 8; ++i) CHECK(o.recs[i].flags == ((round % 2) ? 0u : flags_for(i + 1)));
    }
    // Stale records are dropped whatever their flags; current ones keep theirs.
    CHECK(r.push(20, 0, 0.f, nullptr, nullptr, 0, 1u));  // VERIFY, then rolled back
    CHECK(r.push(21, 0, 0.f, nullptr, nullptr, 0, 2u));
    r.bump_epoch();
    CHECK(r.push(22, 0, 0.f, nullptr, nullptr, 0, 3u));
    const uint64_t stale_before = r.stale_dropped();
    CHECK(r.pop_into(8, o.recs.data(), o.ids.data(), o.probs.data()) == 1);
    CHECK(o.recs[0].position == 22 && o.recs[0].flags == 3u && o.recs[0].epoch == 1u);
    CHECK(r.stale_dropped() == stale_before + 2);
    // pop_wait carries them too.
    CHECK(r.push(23, 0, 0.f, nullptr, nullptr, 0, 4u));
    CHECK(r.pop_wait(8, 1.0, o.recs.data(), o.ids.data(), o.probs.data()) == 1);
    CHECK(o.recs[0].flags == 4u);
}

void test_ring_validation() {
    CHECK(throws_invalid([] { TokenRing r(0, 0); }));
    CHECK(throws_invalid([] { TokenRing r(1, 0); }));
    CHECK(throws_invalid([] { TokenRing r(6, 0); }));
    CHECK(throws_invalid([] { TokenRing r(kMaxRingCapacity * 2, 0); }));
    CHECK(throws_invalid([] { TokenRing r(8, -1); }));
    CHECK(throws_invalid([] { TokenRing r(8, kMaxTopk + 1); }));
    TokenRing r(2, 2);
    int32_t ids[3] = {1, 2, 3};
    float pr[3] = {0.1f, 0.2f, 0.3f};
    CHECK(throws_invalid([&] { r.push(0, 0, 0.f, ids, pr, 3); }));
}

void test_ring_edges() {
    TokenRing r(4, 3);
    Out o(8, 3);
    CHECK(r.pop_into(8, o.recs.data(), o.ids.data(), o.probs.data()) == 0);  // empty
    int32_t ids[3] = {7, 8, 9};
    float pr[3] = {0.5f, 0.25f, 0.125f};
    for (int i = 0; i < 4; ++i) CHECK(r.push(i, 10 + i, 0.5f, ids, pr, i % 4));
    CHECK(!r.push(4, 14, 0.5f, ids, pr, 0));  // full
    CHECK(r.size() == 4);
    CHECK(r.pop_into(1, o.recs.data(), o.ids.data(), o.probs.data()) == 1);
    CHECK(o.recs[0].position == 0);
    CHECK(r.push(4, 14, 0.5f, ids, pr, 3));  // room again
    CHECK(r.pop_into(8, o.recs.data(), o.ids.data(), o.probs.data()) == 4);
    for (int i = 0; i < 4; ++i) {
        CHECK(o.recs[i].position == i + 1);
        const int cnt = o.recs[i].topk_count;
        CHECK(cnt == (i + 1) % 4 || (i == 3 && cnt == 3));
        for (int q = 0; q < 3; ++q) {
            CHECK(o.ids[i * 3 + q] == (q < cnt ? ids[q] : 0));
            CHECK(o.probs[i * 3 + q] == (q < cnt ? pr[q] : 0.0f));
        }
    }
    CHECK(r.size() == 0);
    // Wrap-around many times with irregular batches.
    TokenRing w(8, 0);
    Out ow(8, 0);
    int64_t next_push = 0, next_pop = 0;
    std::mt19937 rng(3);
    for (int round = 0; round < 20000; ++round) {
        const int k = rng() % 9;
        for (int i = 0; i < k; ++i)
            if (w.push(next_push, 0, 0.f, nullptr, nullptr, 0)) ++next_push;
        const std::size_t m = w.pop_into(1 + rng() % 8, ow.recs.data(), ow.ids.data(), ow.probs.data());
        for (std::size_t i = 0; i < m; ++i) CHECK(ow.recs[i].position == next_pop++);
    }
    CHECK(next_push > 50000);
}

void test_ring_epoch() {
    CHECK(epoch_before(0u, 1u));
    CHECK(!epoch_before(1u, 1u));
    CHECK(!epoch_before(2u, 1u));
    CHECK(epoch_before(0xFFFFFFFFu, 0u));  // wrap: the epoch before 0 is 2^32-1
    CHECK(!epoch_before(0u, 0xFFFFFFFFu));
    TokenRing r(16, 0);
    Out o(16, 0);
    for (int i = 0; i < 5; ++i) r.push(i, 0, 0.f, nullptr, nullptr, 0);
    CHECK(r.bump_epoch() == 1);
    for (int i = 5; i < 8; ++i) r.push(i, 0, 0.f, nullptr, nullptr, 0);
    CHECK(r.pop_into(16, o.recs.data(), o.ids.data(), o.probs.data()) == 3);
    CHECK(o.recs[0].position == 5 && o.recs[0].epoch == 1);
    CHECK(r.stale_dropped() == 5);
    CHECK(r.size() == 0);
}

void test_ring_close() {
    {  // close drains, then reports -1; push after close is refused
        TokenRing r(8, 0);
        Out o(8, 0);
        r.push(1, 0, 0.f, nullptr, nullptr, 0);
        r.close();
        CHECK(!r.push(2, 0, 0.f, nullptr, nullptr, 0));
        CHECK(r.pop_wait(8, 1.0, o.recs.data(), o.ids.data(), o.probs.data()) == 1);
        CHECK(r.pop_wait(8, 1.0, o.recs.data(), o.ids.data(), o.probs.data()) == -1);
    }
    {  // a blocked consumer wakes on close
        TokenRing r(8, 0);
        Out o(8, 0);
        std::atomic<long> got{-2};
        std::thread t([&] { got = r.pop_wait(8, 30.0, o.recs.data(), o.ids.data(), o.probs.data()); });
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        r.close();
        t.join();
        CHECK(got == -1);
    }
    {  // timeout with nothing: 0
        TokenRing r(8, 0);
        Out o(8, 0);
        CHECK(r.pop_wait(8, 0.001, o.recs.data(), o.ids.data(), o.probs.data()) == 0);
        CHECK(r.pop_wait(8, 0.0, o.recs.data(), o.ids.data(), o.probs.data()) == 0);
    }
}

// Sleep/wake handshake: a push (or close) must wake a consumer asleep in pop_wait. Ping-pong:
// the consumer waits (long timeout) for record i, then lets the producer push i+1 only once it
// is back inside pop_wait, so most pushes land while it sleeps or is about to. A lost wake
// shows up as a 1 ms backstop nap (too slow overall) rather than a hang; correctness (every
// record, in order) is checked always, the time bound only outside sanitizers.
void test_ring_wake() {
    TokenRing r(8, 0);
    constexpr int kRounds = 2000;
    std::atomic<int> ready{-1};
    std::atomic<bool> bad{false};
    const auto t0 = std::chrono::steady_clock::now();
    std::thread c([&] {
        Out o(8, 0);
        for (int i = 0; i < kRounds; ++i) {
            ready.store(i, std::memory_order_release);
            const long n = r.pop_wait(8, 30.0, o.recs.data(), o.ids.data(), o.probs.data());
            if (n != 1 || o.recs[0].position != i) bad = true;
        }
        ready.store(kRounds, std::memory_order_release);
        if (r.pop_wait(8, 30.0, o.recs.data(), o.ids.data(), o.probs.data()) != -1) bad = true;  // close wakes
    });
    for (int i = 0; i < kRounds; ++i) {
        while (ready.load(std::memory_order_acquire) < i) std::this_thread::yield();
        if (i % 2) std::this_thread::sleep_for(std::chrono::microseconds(50));  // let it fall asleep
        CHECK(r.push(i, 0, 0.f, nullptr, nullptr, 0));
    }
    while (ready.load(std::memory_order_acquire) < kRounds) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    r.close();
    c.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(!bad);
    std::printf("ring_wake: %d ping-pongs in %.3f s\n", kRounds, s);
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PIPESD_TEST_TSAN 1
#endif
#endif
#if !defined(__SANITIZE_THREAD__) && !defined(PIPESD_TEST_TSAN)
    CHECK(s < 1.5);  // ~0.1 s when every wake works; lost wakes would each cost a 1 ms nap
#endif
}

struct StressResult {
    bool ok = true;
    uint64_t delivered = 0, dropped = 0;
    double seconds = 0.0;
};

// Producer and consumer threads; see ring_selftest in bindings.cpp for the record scheme
// (record i also carries flags_for(i), checked on every delivered record).
StressResult stress(uint64_t n, std::size_t capacity, int topk, std::size_t batch, uint64_t bump_every) {
    TokenRing ring(capacity, topk);
    const std::size_t K = static_cast<std::size_t>(topk);
    Out o(batch, topk);
    StressResult res;
    const auto t0 = std::chrono::steady_clock::now();
    std::thread producer([&] {
        std::vector<int32_t> ids(std::max<std::size_t>(1, K));
        std::vector<float> pr(std::max<std::size_t>(1, K));
        for (uint64_t i = 0; i < n; ++i) {
            const int cnt = K ? static_cast<int>(i % (K + 1)) : 0;
            for (int j = 0; j < cnt; ++j) {
                ids[j] = static_cast<int32_t>(i + j);
                pr[j] = static_cast<float>(j);
            }
            for (int spin = 0; !ring.push(static_cast<int64_t>(i), static_cast<int32_t>(i * 7), 0.5f, ids.data(),
                                          pr.data(), cnt, flags_for(i));
                 ++spin) {
                if (spin < 64)
                    PIPESD_CPU_RELAX();
                else
                    std::this_thread::yield();
            }
            if (bump_every && (i + 1) % bump_every == 0) ring.bump_epoch();
        }
        ring.close();
    });
    int64_t last = -1;
    for (;;) {
        const long m = ring.pop_wait(batch, 5.0, o.recs.data(), o.ids.data(), o.probs.data());
        if (m < 0) break;
        for (long j = 0; j < m; ++j) {
            const TokenRecord& r = o.recs[j];
            const int64_t pos = r.position;
            bool good = pos > last && (bump_every || pos == last + 1);
            good = good && r.token == static_cast<int32_t>(static_cast<uint64_t>(pos) * 7);
            good = good && r.flags == flags_for(static_cast<uint64_t>(pos)) && r.reserved == 0u;
            good = good && r.epoch == (bump_every ? static_cast<uint32_t>(pos / static_cast<int64_t>(bump_every)) : 0u);
            const int cnt = K ? static_cast<int>(static_cast<uint64_t>(pos) % (K + 1)) : 0;
            good = good && r.topk_count == cnt;
            for (std::size_t q = 0; good && q < K; ++q) {
                good = o.ids[j * K + q] == (q < static_cast<std::size_t>(cnt) ? static_cast<int32_t>(pos + q) : 0) &&
                       o.probs[j * K + q] == (q < static_cast<std::size_t>(cnt) ? static_cast<float>(q) : 0.0f);
            }
            if (!good && res.ok) {
                std::fprintf(stderr, "stress: bad record at position %lld after %lld\n", static_cast<long long>(pos),
                             static_cast<long long>(last));
                res.ok = false;
            }
            last = pos;
            ++res.delivered;
        }
    }
    producer.join();
    res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    res.dropped = ring.stale_dropped();
    if (res.delivered + res.dropped != n) res.ok = false;
    if (!bump_every && res.delivered != n) res.ok = false;
    return res;
}

void test_ring_stress(uint64_t records) {
    struct Case {
        uint64_t n;
        std::size_t cap;
        int topk;
        std::size_t batch;
        uint64_t bump;
    };
    const Case cases[] = {
        {records, 1024, 0, 256, 0},       {records / 4, 2, 0, 1, 0},      {records / 4, 64, 8, 7, 0},
        {records / 4, 16, 3, 256, 997},   {records / 8, 4, 64, 3, 13},
    };
    for (const Case& c : cases) {
        const StressResult r = stress(c.n, c.cap, c.topk, c.batch, c.bump);
        std::printf("  stress n=%llu cap=%zu topk=%d batch=%zu bump=%llu: delivered=%llu dropped=%llu %.2f M rec/s %s\n",
                    static_cast<unsigned long long>(c.n), c.cap, c.topk, c.batch, static_cast<unsigned long long>(c.bump),
                    static_cast<unsigned long long>(r.delivered), static_cast<unsigned long long>(r.dropped),
                    r.seconds > 0 ? c.n / r.seconds / 1e6 : 0.0, r.ok ? "ok" : "FAILED");
        CHECK(r.ok);
    }
}

void bench() {
    for (int n : {16, 64, 256, 512}) {
        const int reps = std::max(10, 2000000 / (n * n));
        double sink = 0.0;
        double best = 1e9;
        for (int rep = 0; rep < 5; ++rep) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int r = 0; r < reps; ++r) sink += plan_batches(n, 0.01, 0.004, 0.0005).finish_s;
            best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
        }
        std::printf("bench plan n=%d: %.3f us/plan%s\n", n, best * 1e6, sink < 0 ? "!" : "");
    }
    double best = 0.0;
    for (int rep = 0; rep < 3; ++rep) {
        const StressResult r = stress(10000000, 1024, 0, 256, 0);
        best = std::max(best, 1e7 / r.seconds);
    }
    std::printf("bench ring C++->C++ (cap 1024, batch 256): %.2f M records/s\n", best / 1e6);
}

}  // namespace

int main(int argc, char** argv) {
    uint64_t records = 2000000;
    bool do_bench = false;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--records") && i + 1 < argc)
            records = std::strtoull(argv[++i], nullptr, 10);
        else if (!std::strcmp(argv[i], "--bench"))
            do_bench = true;
        else {
            std::fprintf(stderr, "usage: %s [--records N] [--bench]\n", argv[0]);
            return 2;
        }
    }
    std::mt19937_64 rng(12345);
    const std::pair<const char*, std::function<void()>> tests[] = {
        {"plan_brute_force", [&] { test_plan_brute_force(rng); }},
        {"plan_validation", test_plan_validation},
        {"expected_brute_force", [&] { test_expected_brute_force(rng); }},
        {"robust_fit", test_robust_fit},
        {"ring_record_layout", test_ring_record_layout},
        {"ring_flags", test_ring_flags},
        {"ring_validation", test_ring_validation},
        {"ring_edges", test_ring_edges},
        {"ring_epoch", test_ring_epoch},
        {"ring_close", test_ring_close},
        {"ring_wake", test_ring_wake},
        {"ring_stress", [&] { test_ring_stress(records); }},
    };
    for (const auto& t : tests) {
        const int before = g_failures;
        std::printf("[ RUN  ] %s\n", t.first);
        std::fflush(stdout);
        t.second();
        std::printf("[ %s ] %s\n", g_failures == before ? " OK " : "FAIL", t.first);
        std::fflush(stdout);
    }
    if (do_bench) bench();
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    if (g_failures == 0) std::printf("ALL PASSED\n");
    return g_failures == 0 ? 0 : 1;
}
