// pybind11 module pipesd._native: the native core (DP token-batch scheduler, SPSC ring).
// Python faces: src/pipesd/scheduling.py and src/pipesd/ring.py. std::invalid_argument
// surfaces as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>

#include "ring.hpp"
#include "scheduler.hpp"

namespace py = pybind11;
using pipesd::TokenRecord;
using pipesd::TokenRing;

namespace {

// Plans this large release the GIL while they run (smaller ones finish before it matters).
constexpr int kReleaseGilTokens = 512;

py::tuple plan_to_tuple(const pipesd::BatchPlan& p) {
    py::list sizes(p.sizes.size());
    for (std::size_t i = 0; i < p.sizes.size(); ++i) sizes[i] = py::int_(p.sizes[i]);
    return py::make_tuple(std::move(sizes), p.finish_s);
}

py::tuple py_plan_batches(long long n, double g, double s, double c) {
    pipesd::check_n_tokens(n);
    if (n >= kReleaseGilTokens) {
        pipesd::BatchPlan p;
        {
            py::gil_scoped_release nogil;
            p = pipesd::plan_batches(static_cast<int>(n), g, s, c);
        }
        return plan_to_tuple(p);
    }
    return plan_to_tuple(pipesd::plan_batches(static_cast<int>(n), g, s, c));
}

using DArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

py::tuple py_plan_batches_expected(const DArray& probs, double g, double s, double c) {
    if (probs.ndim() != 1) throw py::value_error("length_probs must be 1-D");
    const double* p = probs.data();
    const auto n = static_cast<std::size_t>(probs.shape(0));
    pipesd::check_length_probs(p, n);
    pipesd::BatchPlan plan;
    {
        py::gil_scoped_release nogil;  // reads `probs` only; the caller's array outlives the call
        plan = pipesd::plan_batches_expected(p, n, g, s, c);
    }
    return plan_to_tuple(plan);
}

// Seconds per call of the C++ planner alone (no Python), for benchmarks.
double plan_timing(int n, double g, double s, double c, int reps) {
    if (reps < 1) throw py::value_error("reps must be >= 1");
    py::gil_scoped_release nogil;
    double sink = 0.0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) sink += pipesd::plan_batches(n, g, s, c).finish_s;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sink < 0) throw std::runtime_error("unreachable");
    return dt / reps;
}

double expected_timing(const DArray& probs, double g, double s, double c, int reps) {
    if (reps < 1) throw py::value_error("reps must be >= 1");
    const double* p = probs.data();
    const auto n = static_cast<std::size_t>(probs.shape(0));
    py::gil_scoped_release nogil;
    double sink = 0.0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) sink += pipesd::plan_batches_expected(p, n, g, s, c).finish_s;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sink < 0) throw std::runtime_error("unreachable");
    return dt / reps;
}

py::tuple py_robust_line_fit(const DArray& x, const DArray& y, double prior_slope) {
    if (x.ndim() != 1 || y.ndim() != 1 || x.shape(0) != y.shape(0))
        throw py::value_error("x and y must be 1-D arrays of one length");
    const auto f = pipesd::robust_line_fit(x.data(), y.data(), static_cast<std::size_t>(x.shape(0)), prior_slope);
    return py::make_tuple(f.intercept, f.slope, f.iterations);
}

// ----------------------------------------------------------------------------------- ring
class PyRing {
   public:
    PyRing(long long capacity, int topk_max)
        : ring_(TokenRing::checked_capacity(capacity < 0 ? 0 : static_cast<std::size_t>(capacity)),
                TokenRing::checked_topk(topk_max)),
          k_(static_cast<std::size_t>(topk_max)),
          recs_(ring_.capacity()),
          ids_(ring_.capacity() * std::max<std::size_t>(1, k_)),
          probs_(ring_.capacity() * std::max<std::size_t>(1, k_)) {}

    bool push(int64_t pos, int32_t token, float prob, const py::object& ids_o, const py::object& probs_o,
              uint32_t flags) {
        if (ids_o.is_none() && probs_o.is_none())
            return ring_.push(pos, token, prob, nullptr, nullptr, 0, flags);
        if (ids_o.is_none() || probs_o.is_none()) throw py::value_error("topk_ids and topk_probs must be given together");
        auto a = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(ids_o);
        if (!a || a.ndim() != 1) {
            PyErr_Clear();
            throw py::value_error("topk_ids must be a 1-D sequence of ints");
        }
        auto b = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(probs_o);
        if (!b || b.ndim() != 1) {
            PyErr_Clear();
            throw py::value_error("topk_probs must be a 1-D sequence of floats");
        }
        if (a.shape(0) != b.shape(0))
            throw py::value_error("topk_ids and topk_probs differ in length (" + std::to_string(a.shape(0)) + " vs " +
                                  std::to_string(b.shape(0)) + ")");
        if (static_cast<std::size_t>(a.shape(0)) > k_)
            throw py::value_error("topk_ids has " + std::to_string(a.shape(0)) + " entries, more than topk_max (" +
                                  std::to_string(k_) + ")");
        return ring_.push(pos, token, prob, a.data(), b.data(), static_cast<int>(a.shape(0)), flags);
    }

    // push as a callable without `self`, bound to this ring (pipesd.ring.TokenRing calls it).
    // Why: pybind11 keeps a call's arguments in a small vector with inline room for 6
    // (pybind11 3.x arg_vector_small_size); the method push has 7 with self and heap-allocates
    // on every call (+~35 ns, a third of a push). Six arguments fit, and the caller skips the
    // self -> PyRing* conversion. The closure holds a reference to the ring object, so `r`
    // cannot dangle.
    static py::cpp_function make_pusher(py::object self) {
        PyRing* r = self.cast<PyRing*>();
        return py::cpp_function(
            [r, keep = std::move(self)](int64_t pos, int32_t token, float prob, const py::object& ids_o,
                                        const py::object& probs_o, uint32_t flags) {
                (void)keep;
                return r->push(pos, token, prob, ids_o, probs_o, flags);
            },
            py::name("push"), py::arg("position"), py::arg("token"), py::arg("prob"),
            py::arg("topk_ids") = py::none(), py::arg("topk_probs") = py::none(), py::arg("flags") = 0u);
    }

    py::object pop_batch(long long max_n, double timeout_s) {
        if (max_n < 1) throw py::value_error("max_n must be >= 1, got " + std::to_string(max_n));
        if (!(timeout_s >= 0.0)) throw py::value_error("timeout_s must be >= 0 (inf waits for data or close)");
        const std::size_t want = std::min<std::size_t>(static_cast<std::size_t>(max_n), ring_.capacity());
        ConsumerGuard guard(busy_);
        long n;
        {
            py::gil_scoped_release nogil;
            n = ring_.pop_wait(want, timeout_s, recs_.data(), ids_.data(), probs_.data());
        }
        if (n < 0) return py::none();
        return pack(static_cast<std::size_t>(n));
    }

    py::object try_pop() {
        ConsumerGuard guard(busy_);
        if (ring_.pop_into(1, recs_.data(), ids_.data(), probs_.data()) == 0) return py::none();
        const TokenRecord& r = recs_[0];
        const Py_intptr_t cnt = r.topk_count;
        auto ids = new_array<int32_t>(1, &cnt);
        auto probs = new_array<float>(1, &cnt);
        if (cnt > 0) {
            std::memcpy(ids.mutable_data(), ids_.data(), sizeof(int32_t) * cnt);
            std::memcpy(probs.mutable_data(), probs_.data(), sizeof(float) * cnt);
        }
        return py::make_tuple(r.position, r.token, r.prob, r.epoch, ids, probs, r.flags);
    }

    TokenRing& ring() { return ring_; }
    const TokenRing& ring() const { return ring_; }

   private:
    // The ring has one consumer; pop_batch drops the GIL, so two Python consumers could
    // otherwise race on the scratch buffers. Refuse instead of corrupting.
    struct ConsumerGuard {
        std::atomic<bool>& f;
        explicit ConsumerGuard(std::atomic<bool>& flag) : f(flag) {
            if (f.exchange(true, std::memory_order_acquire))
                throw std::runtime_error("TokenRing is single-consumer: pop called from two threads at once");
        }
        ~ConsumerGuard() { f.store(false, std::memory_order_release); }
    };

    // A new C-contiguous numpy array straight from the numpy C API. py::array_t(shape) builds
    // std::vector shape and strides on the heap for every array; pop_batch makes eight per
    // call, so this saves a measurable share of a small pop (see docs/native.md).
    template <class T>
    static py::array_t<T> new_array(int nd, const Py_intptr_t* dims) {
        auto& api = py::detail::npy_api::get();
        // NewFromDescr steals the descriptor reference: hand it one of its own.
        PyObject* a = api.PyArray_NewFromDescr_(api.PyArray_Type_, py::dtype::of<T>().release().ptr(), nd, dims,
                                                nullptr, nullptr, 0, nullptr);
        if (!a) throw py::error_already_set();
        return py::reinterpret_steal<py::array_t<T>>(a);
    }

    py::tuple pack(std::size_t n) {
        const Py_intptr_t dims[2] = {static_cast<Py_intptr_t>(n), static_cast<Py_intptr_t>(k_)};
        auto position = new_array<int64_t>(1, dims);
        auto token = new_array<int32_t>(1, dims), count = new_array<int32_t>(1, dims);
        auto prob = new_array<float>(1, dims);
        auto epoch = new_array<uint32_t>(1, dims), flags = new_array<uint32_t>(1, dims);
        auto tid = new_array<int32_t>(2, dims);
        auto tpr = new_array<float>(2, dims);
        int64_t* P = position.mutable_data();
        int32_t* T = token.mutable_data();
        int32_t* C = count.mutable_data();
        float* Q = prob.mutable_data();
        uint32_t* E = epoch.mutable_data();
        uint32_t* F = flags.mutable_data();
        for (std::size_t i = 0; i < n; ++i) {
            P[i] = recs_[i].position;
            T[i] = recs_[i].token;
            Q[i] = recs_[i].prob;
            E[i] = recs_[i].epoch;
            C[i] = recs_[i].topk_count;
            F[i] = recs_[i].flags;
        }
        if (k_ > 0 && n > 0) {
            std::memcpy(tid.mutable_data(), ids_.data(), sizeof(int32_t) * n * k_);
            std::memcpy(tpr.mutable_data(), probs_.data(), sizeof(float) * n * k_);
        }
        return py::make_tuple(position, token, prob, epoch, tid, tpr, count, flags);
    }

    TokenRing ring_;
    std::size_t k_;
    std::vector<TokenRecord> recs_;  // consumer scratch, capacity records: pop never allocates here
    std::vector<int32_t> ids_;
    std::vector<float> probs_;
    std::atomic<bool> busy_{false};
};

// Producer and consumer std::threads through one ring. Record i carries position i, token
// 7*i, flags selftest_flags(i), topk_count i % (topk+1) with ids i+j and probs j; with
// bump_every > 0 the producer bumps the epoch after every bump_every pushes, so record i
// must carry epoch i / bump_every. The consumer checks order (strictly increasing
// positions; consecutive when nothing is bumped), payload, flags, padding and epochs;
// delivered + dropped must equal n.
inline uint32_t selftest_flags(uint64_t i) {
    return static_cast<uint32_t>(i * 0x9E3779B1u) ^ static_cast<uint32_t>(i >> 32);  // all 32 bits vary
}

py::dict ring_selftest(long long n_records, long long capacity, int topk, long long batch, long long bump_every) {
    if (n_records < 0) throw py::value_error("n_records must be >= 0");
    if (batch < 1) throw py::value_error("batch must be >= 1");
    if (bump_every < 0) throw py::value_error("bump_every must be >= 0");
    TokenRing ring(TokenRing::checked_capacity(capacity < 0 ? 0 : static_cast<std::size_t>(capacity)),
                   TokenRing::checked_topk(topk));
    const auto n = static_cast<uint64_t>(n_records);
    const std::size_t B = static_cast<std::size_t>(batch);
    const std::size_t K = static_cast<std::size_t>(topk);
    std::vector<TokenRecord> out(B);
    std::vector<int32_t> oi(B * std::max<std::size_t>(1, K));
    std::vector<float> op(B * std::max<std::size_t>(1, K));
    uint64_t got = 0, errors = 0, full_spins = 0;
    int64_t last = -1;
    uint32_t last_epoch = 0;
    std::string first_error;
    double seconds;
    auto fail = [&](const std::string& what) {
        if (errors++ == 0) first_error = what;
    };
    {
        py::gil_scoped_release nogil;
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
                                              pr.data(), cnt, selftest_flags(i));
                     ++spin) {
                    ++full_spins;
                    if (spin < 64)
                        PIPESD_CPU_RELAX();
                    else
                        std::this_thread::yield();
                }
                if (bump_every > 0 && (i + 1) % static_cast<uint64_t>(bump_every) == 0) ring.bump_epoch();
            }
            ring.close();
        });
        for (;;) {
            const long m = ring.pop_wait(B, 1.0, out.data(), oi.data(), op.data());
            if (m < 0) break;
            for (long j = 0; j < m; ++j) {
                const TokenRecord& r = out[j];
                const int64_t pos = r.position;
                if (pos <= last || (bump_every == 0 && pos != last + 1))
                    fail("order: got position " + std::to_string(pos) + " after " + std::to_string(last));
                if (r.token != static_cast<int32_t>(static_cast<uint64_t>(pos) * 7)) fail("token payload");
                if (r.flags != selftest_flags(static_cast<uint64_t>(pos))) fail("flags");
                const uint32_t want_epoch = bump_every > 0 ? static_cast<uint32_t>(pos / bump_every) : 0u;
                if (r.epoch != want_epoch) fail("epoch stamp");
                if (r.epoch < last_epoch) fail("epoch went backwards");
                const int cnt = K ? static_cast<int>(static_cast<uint64_t>(pos) % (K + 1)) : 0;
                if (r.topk_count != cnt) fail("topk_count");
                for (std::size_t q = 0; q < K; ++q) {
                    const int32_t wi = q < static_cast<std::size_t>(cnt) ? static_cast<int32_t>(pos + q) : 0;
                    const float wp = q < static_cast<std::size_t>(cnt) ? static_cast<float>(q) : 0.0f;
                    if (oi[j * K + q] != wi || op[j * K + q] != wp) {
                        fail("topk payload/padding");
                        break;
                    }
                }
                last = pos;
                last_epoch = r.epoch;
                ++got;
            }
        }
        producer.join();
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    const uint64_t dropped = ring.stale_dropped();
    if (got + dropped != n) fail("delivered + dropped != pushed");
    if (bump_every == 0 && got != n) fail("records lost");
    py::dict d;
    d["ok"] = errors == 0;
    d["errors"] = errors;
    d["first_error"] = first_error;
    d["pushed"] = n;
    d["delivered"] = got;
    d["dropped"] = dropped;
    d["full_spins"] = full_spins;
    d["seconds"] = seconds;
    d["records_per_s"] = seconds > 0 ? static_cast<double>(n) / seconds : 0.0;
    return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "PipeSD native core: DP token-batch scheduler and lock-free SPSC ring";
    m.attr("__version__") = "0.2.0";
    m.attr("MAX_PLAN_TOKENS") = pipesd::kMaxPlanTokens;
    m.attr("MAX_EXPECTED_TOKENS") = pipesd::kMaxExpectedTokens;
    m.attr("PROB_SUM_TOL") = pipesd::kProbSumTol;
    m.attr("MAX_RING_CAPACITY") = pipesd::kMaxRingCapacity;
    m.attr("MAX_TOPK") = pipesd::kMaxTopk;

    m.def("plan_batches", &py_plan_batches, py::arg("n_tokens"), py::arg("gen_s"), py::arg("startup_s"),
          py::arg("per_token_s"), "Exact DP plan -> (sizes, finish_s). Validates; ValueError on bad input.");
    m.def("plan_batches_expected", &py_plan_batches_expected, py::arg("length_probs"), py::arg("gen_s"),
          py::arg("startup_s"), py::arg("per_token_s"), "Expected-cost plan -> (sizes, finish_s). Validates.");
    m.def(
        "expected_stats",
        [] {
            const auto st = pipesd::last_expected_stats();
            py::dict d;
            d["labels"] = st.labels;
            d["max_front"] = st.max_front;
            return d;
        },
        "Pareto-front statistics of this thread's last plan_batches_expected call.");
    m.def("plan_timing", &plan_timing, py::arg("n_tokens"), py::arg("gen_s"), py::arg("startup_s"),
          py::arg("per_token_s"), py::arg("reps"), "Seconds per plan_batches call, timed in C++ (benchmarks).");
    m.def("expected_timing", &expected_timing, py::arg("length_probs"), py::arg("gen_s"), py::arg("startup_s"),
          py::arg("per_token_s"), py::arg("reps"), "Seconds per plan_batches_expected call, timed in C++.");
    m.def("robust_line_fit", &py_robust_line_fit, py::arg("x"), py::arg("y"), py::arg("prior_slope"),
          "Robust fit y = a + b*x -> (a, b, iterations); see pipesd.scheduling.CostModel.");

    py::class_<PyRing>(m, "TokenRing")
        .def(py::init<long long, int>(), py::arg("capacity"), py::arg("topk_max"))
        .def("push", &PyRing::push, py::arg("position"), py::arg("token"), py::arg("prob"),
             py::arg("topk_ids") = py::none(), py::arg("topk_probs") = py::none(), py::arg("flags") = 0u)
        .def("pusher", &PyRing::make_pusher,
             "push(position, token, prob, topk_ids=None, topk_probs=None, flags=0) bound to this ring: "
             "the same call, cheaper (no self; fits pybind11's inline argument storage).")
        .def("pop_batch", &PyRing::pop_batch, py::arg("max_n"), py::arg("timeout_s"))
        .def("try_pop", &PyRing::try_pop)
        .def("close", [](PyRing& r) { r.ring().close(); })
        .def("bump_epoch", [](PyRing& r) { return r.ring().bump_epoch(); })
        .def_property_readonly("epoch", [](const PyRing& r) { return r.ring().epoch(); })
        .def_property_readonly("closed", [](const PyRing& r) { return r.ring().closed(); })
        .def_property_readonly("capacity", [](const PyRing& r) { return r.ring().capacity(); })
        .def_property_readonly("topk_max", [](const PyRing& r) { return r.ring().topk_max(); })
        .def_property_readonly("stale_dropped", [](const PyRing& r) { return r.ring().stale_dropped(); })
        .def("__len__", [](const PyRing& r) { return r.ring().size(); });

    m.def("ring_selftest", &ring_selftest, py::arg("n_records"), py::arg("capacity") = 1024, py::arg("topk") = 0,
          py::arg("batch") = 256, py::arg("bump_every") = 0,
          "Producer and consumer std::threads through one ring; checks order, loss, duplication, epochs, "
          "payload, flags. "
          "Also the C++-to-C++ throughput benchmark (records_per_s).");
}
