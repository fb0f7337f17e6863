// pybind11 module pipesd._native: the native core (DP token-batch scheduler, SPSC ring).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <thread>

#include "ring.hpp"
#include "scheduler.hpp"

namespace py = pybind11;
using pipesd::TokenRecord;
using pipesd::TokenRing;

namespace {

struct PyRing {
    TokenRing ring;
    std::vector<TokenRecord> recs;
    std::vector<int32_t> ids;
    std::vector<float> probs;
    PyRing(std::size_t cap, int k) : ring(cap, k) {}

    void reserve(std::size_t n) {
        if (recs.size() < n) {
            recs.resize(n);
            ids.resize(n * std::max(1, ring.topk_max()));
            probs.resize(n * std::max(1, ring.topk_max()));
        }
    }

    bool push(int64_t pos, int32_t token, float prob, py::object ids_o, py::object probs_o) {
        if (ids_o.is_none() != probs_o.is_none()) throw py::value_error("topk_ids and topk_probs go together");
        if (ids_o.is_none()) return ring.push(pos, token, prob, nullptr, nullptr, 0);
        auto a = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(ids_o);
        auto b = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(probs_o);
        if (!a || !b || a.ndim() != 1 || b.ndim() != 1) throw py::value_error("topk_ids/topk_probs must be 1-D arrays");
        if (a.shape(0) != b.shape(0)) throw py::value_error("topk_ids and topk_probs differ in length");
        if (a.shape(0) > ring.topk_max())
            throw py::value_error("topk arrays longer than topk_max (" + std::to_string(ring.topk_max()) + ")");
        return ring.push(pos, token, prob, a.data(), b.data(), static_cast<int>(a.shape(0)));
    }

    py::object pack(long n) {
        if (n < 0) return py::none();
        const int k = ring.topk_max();
        py::array_t<int64_t> position(n);
        py::array_t<int32_t> token(n), count(n);
        py::array_t<float> prob(n);
        py::array_t<uint32_t> epoch(n);
        py::array_t<int32_t> tid({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(k)});
        py::array_t<float> tpr({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(k)});
        auto P = position.mutable_data();
        auto T = token.mutable_data();
        auto C = count.mutable_data();
        auto Q = prob.mutable_data();
        auto E = epoch.mutable_data();
        for (long i = 0; i < n; ++i) {
            P[i] = recs[i].position;
            T[i] = recs[i].token;
            Q[i] = recs[i].prob;
            E[i] = recs[i].epoch;
            C[i] = recs[i].topk_count;
        }
        if (k > 0 && n > 0) {
            std::memcpy(tid.mutable_data(), ids.data(), sizeof(int32_t) * n * k);
            std::memcpy(tpr.mutable_data(), probs.data(), sizeof(float) * n * k);
        }
        return py::make_tuple(position, token, prob, epoch, tid, tpr, count);
    }

    py::object pop_batch(std::size_t max_n, double timeout_s) {
        if (max_n < 1) throw py::value_error("max_n must be >= 1");
        if (!(timeout_s >= 0) || std::isinf(timeout_s)) throw py::value_error("timeout_s must be finite and >= 0");
        reserve(max_n);
        long n;
        {
            py::gil_scoped_release nogil;
            n = ring.pop_wait(max_n, timeout_s, recs.data(), ids.data(), probs.data());
        }
        return pack(n);
    }

    py::object try_pop() {
        reserve(1);
        const std::size_t n = ring.pop_into(1, recs.data(), ids.data(), probs.data());
        if (n == 0) return py::none();
        return pack(1);
    }
};

py::dict ring_selftest(std::size_t n_records, std::size_t capacity, int topk) {
    TokenRing ring(capacity, topk);
    std::vector<TokenRecord> out(256);
    std::vector<int32_t> oi(256 * std::max(1, topk));
    std::vector<float> op(256 * std::max(1, topk));
    bool ok = true;
    std::size_t got = 0;
    double seconds;
    {
        py::gil_scoped_release nogil;
        const auto t0 = std::chrono::steady_clock::now();
        std::thread producer([&] {
            std::vector<int32_t> ids(topk);
            std::vector<float> pr(topk);
            for (std::size_t i = 0; i < n_records; ++i) {
                for (int j = 0; j < topk; ++j) {
                    ids[j] = static_cast<int32_t>(i + j);
                    pr[j] = static_cast<float>(j);
                }
                while (!ring.push(static_cast<int64_t>(i), static_cast<int32_t>(i * 7), 0.5f, ids.data(), pr.data(), topk)) {
                }
            }
            ring.close();
        });
        for (;;) {
            const long n = ring.pop_wait(256, 1.0, out.data(), oi.data(), op.data());
            if (n < 0) break;
            for (long j = 0; j < n; ++j) {
                const int64_t want = static_cast<int64_t>(got);
                if (out[j].position != want || out[j].token != static_cast<int32_t>(want * 7) ||
                    (topk > 0 && oi[j * topk + topk - 1] != static_cast<int32_t>(want + topk - 1)))
                    ok = false;
                ++got;
            }
        }
        producer.join();
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    py::dict d;
    d["ok"] = ok && got == n_records;
    d["records"] = got;
    d["seconds"] = seconds;
    d["records_per_s"] = seconds > 0 ? got / seconds : 0.0;
    return d;
}

pipesd::BatchPlan checked_plan(int n, double g, double s, double c) {
    py::gil_scoped_release nogil;
    return pipesd::plan_batches(n, g, s, c);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "PipeSD native core: DP token-batch scheduler and lock-free SPSC ring";
    m.attr("__version__") = "0.1.0";
    m.attr("MAX_PLAN_TOKENS") = pipesd::kMaxPlanTokens;
    m.attr("MAX_EXPECTED_TOKENS") = pipesd::kMaxExpectedTokens;

    m.def("plan_batches",
          [](int n, double g, double s, double c) {
              auto p = pipesd::plan_batches(n, g, s, c);
              return py::make_tuple(p.sizes, p.finish_s);
          },
          py::arg("n"), py::arg("g"), py::arg("s"), py::arg("c"), "Exact DP plan: (sizes, finish_s). Inputs unchecked.");
    m.def("plan_batches_expected",
          [](const std::vector<double>& probs, double g, double s, double c) {
              auto p = pipesd::plan_batches_expected(probs, g, s, c);
              return py::make_tuple(p.sizes, p.finish_s);
          },
          py::arg("probs"), py::arg("g"), py::arg("s"), py::arg("c"), "Expected-cost plan: (sizes, finish_s).");

    py::class_<PyRing>(m, "TokenRing")
        .def(py::init<std::size_t, int>(), py::arg("capacity"), py::arg("topk_max"))
        .def("push", &PyRing::push, py::arg("position"), py::arg("token"), py::arg("prob"),
             py::arg("topk_ids") = py::none(), py::arg("topk_probs") = py::none())
        .def("pop_batch", &PyRing::pop_batch, py::arg("max_n"), py::arg("timeout_s"))
        .def("try_pop", &PyRing::try_pop)
        .def("close", [](PyRing& r) { r.ring.close(); })
        .def("bump_epoch", [](PyRing& r) { return r.ring.bump_epoch(); })
        .def_property_readonly("epoch", [](const PyRing& r) { return r.ring.epoch(); })
        .def_property_readonly("closed", [](const PyRing& r) { return r.ring.closed(); })
        .def_property_readonly("capacity", [](const PyRing& r) { return r.ring.capacity(); })
        .def_property_readonly("topk_max", [](const PyRing& r) { return r.ring.topk_max(); })
        .def("__len__", [](const PyRing& r) { return r.ring.size(); });

    m.def("ring_selftest", &ring_selftest, py::arg("n_records"), py::arg("capacity") = 1024, py::arg("topk") = 0,
          "Producer and consumer std::threads through one ring; checks order, loss, duplication.");
}
