// Lock-free single-producer single-consumer ring of draft-token records.
//
// The producer (edge compute thread) pushes; the consumer (send thread) pops. Head and tail
// live on separate cache lines; the producer publishes a slot with a release store of tail,
// the consumer frees it with a release store of head. No locks, no allocation after
// construction. Rollback: the producer bumps `epoch`; records are stamped with the epoch in
// force when pushed, and the consumer drops records of older epochs.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

namespace pipesd {

struct TokenRecord {
    int64_t position;
    int32_t token;
    float prob;
    uint32_t epoch;
    int32_t topk_count;
};

class TokenRing {
   public:
    TokenRing(std::size_t capacity, int topk_max)
        : cap_(capacity), mask_(capacity - 1), topk_max_(topk_max), recs_(capacity),
          ids_(capacity * static_cast<std::size_t>(topk_max)), probs_(capacity * static_cast<std::size_t>(topk_max)) {
        if (capacity < 2 || (capacity & (capacity - 1)) != 0)
            throw std::invalid_argument("capacity must be a power of two >= 2");
        if (topk_max < 0 || topk_max > 256) throw std::invalid_argument("topk_max must be in [0, 256]");
    }

    std::size_t capacity() const { return cap_; }
    int topk_max() const { return topk_max_; }
    uint32_t epoch() const { return epoch_.load(std::memory_order_acquire); }
    uint32_t bump_epoch() { return epoch_.fetch_add(1, std::memory_order_acq_rel) + 1; }
    bool closed() const { return closed_.load(std::memory_order_acquire); }
    void close() { closed_.store(true, std::memory_order_release); }
    std::size_t size() const {
        return static_cast<std::size_t>(tail_.load(std::memory_order_acquire) - head_.load(std::memory_order_acquire));
    }

    // Producer only. False when full or closed; never blocks.
    bool push(int64_t position, int32_t token, float prob, const int32_t* ids, const float* probs, int count) {
        if (closed()) return false;
        const uint64_t t = tail_.load(std::memory_order_relaxed);
        if (t - head_.load(std::memory_order_acquire) >= cap_) return false;
        const std::size_t slot = static_cast<std::size_t>(t & mask_);
        TokenRecord& r = recs_[slot];
        r.position = position;
        r.token = token;
        r.prob = prob;
        r.epoch = epoch_.load(std::memory_order_relaxed);
        r.topk_count = count;
        if (count > 0) {
            std::memcpy(&ids_[slot * topk_max_], ids, sizeof(int32_t) * count);
            std::memcpy(&probs_[slot * topk_max_], probs, sizeof(float) * count);
        }
        tail_.store(t + 1, std::memory_order_release);
        return true;
    }

    // Consumer only. Copies up to max_n current-epoch records into the output buffers (topk rows
    // of width topk_max, zero padded); stale records are consumed and dropped. Returns the count.
    std::size_t pop_into(std::size_t max_n, TokenRecord* out, int32_t* out_ids, float* out_probs) {
        const uint64_t h = head_.load(std::memory_order_relaxed);
        const uint64_t t = tail_.load(std::memory_order_acquire);
        const uint64_t avail = t - h;
        const uint32_t cur = epoch_.load(std::memory_order_acquire);
        std::size_t taken = 0;
        uint64_t i = 0;
        for (; i < avail && taken < max_n; ++i) {
            const std::size_t slot = static_cast<std::size_t>((h + i) & mask_);
            const TokenRecord& r = recs_[slot];
            if (r.epoch != cur) continue;  // stale: dropped
            out[taken] = r;
            if (topk_max_ > 0) {
                int32_t* di = out_ids + taken * topk_max_;
                float* dp = out_probs + taken * topk_max_;
                std::memcpy(di, &ids_[slot * topk_max_], sizeof(int32_t) * r.topk_count);
                std::memcpy(dp, &probs_[slot * topk_max_], sizeof(float) * r.topk_count);
                std::memset(di + r.topk_count, 0, sizeof(int32_t) * (topk_max_ - r.topk_count));
                std::memset(dp + r.topk_count, 0, sizeof(float) * (topk_max_ - r.topk_count));
            }
            ++taken;
        }
        head_.store(h + i, std::memory_order_release);
        return taken;
    }

    // Consumer only: wait (spin, then sleep with backoff) until a record arrives, the ring is
    // closed, or the timeout passes. Returns the count popped; -1 when closed and drained.
    long pop_wait(std::size_t max_n, double timeout_s, TokenRecord* out, int32_t* out_ids, float* out_probs) {
        using clock = std::chrono::steady_clock;
        const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(timeout_s));
        int spins = 0;
        auto nap = std::chrono::microseconds(2);
        for (;;) {
            const bool was_closed = closed();
            const std::size_t n = pop_into(max_n, out, out_ids, out_probs);
            if (n > 0) return static_cast<long>(n);
            if (was_closed && size() == 0) return -1;
            if (clock::now() >= deadline) return 0;
            if (++spins < 64) {
                std::this_thread::yield();
            } else {
                std::this_thread::sleep_for(nap);
                if (nap < std::chrono::microseconds(200)) nap *= 2;
            }
        }
    }

   private:
    const std::size_t cap_;
    const uint64_t mask_;
    const int topk_max_;
    std::vector<TokenRecord> recs_;
    std::vector<int32_t> ids_;
    std::vector<float> probs_;
    alignas(64) std::atomic<uint64_t> head_{0};
    alignas(64) std::atomic<uint64_t> tail_{0};
    alignas(64) std::atomic<uint32_t> epoch_{0};
    std::atomic<bool> closed_{false};
};

}  // namespace pipesd
