// Lock-free single-producer single-consumer ring of draft-token records.
//
// The producer (edge compute thread) pushes; the consumer (edge send thread) pops. In PipeSD
// this ring is the only channel from the compute thread to the send thread: besides the
// token payload, each record carries a `flags` word (the meaning of its bits is defined by
// the Python face, pipesd.ring: FLAG_VERIFY, FLAG_STOP, FLAG_HINT; the ring itself never
// interprets them, it only carries them).
//
// Memory ordering. The producer fills a whole slot (the record, flags included, and its
// top-k rows) with plain stores and then publishes it with a release store of `tail`; the
// consumer acquires `tail` before reading any slot below it, so it sees every field of the
// record exactly as written, flags included (no field needs its own atomic). The consumer
// frees slots with a release store of `head`; the producer acquires `head` before reusing a
// slot, so it never overwrites a slot the consumer is still reading. Each side keeps a
// private cached copy of the other's index on its own cache line and refreshes it (acquire)
// only when the cache says full/empty, so in steady state the two cores share no written
// cache line except through the indices themselves and the slots they hand over.
// All storage is allocated in the constructor; push and pop neither lock nor allocate
// (push takes a mutex only to wake a consumer that is asleep; see below).
//
// Blocking without burning CPU. A consumer that finds the ring empty spins briefly, then
// sleeps on a condition variable until a push or close() wakes it. The handshake is a
// Dekker pair of seq_cst operations (all in one total order):
//   consumer: waiting_ = true (seq_cst) ; then load tail_ and closed_ (seq_cst) ; sleep if
//             nothing new
//   producer: tail_ = t+1 (seq_cst)     ; then load waiting_ (seq_cst) ; notify if true
//   close():  closed_ = true (seq_cst)  ; then load waiting_ (seq_cst) ; notify if true
// In the total order one side's store precedes the other side's load, so either the consumer
// sees the new tail/closed (and does not sleep) or the producer sees waiting_ (and notifies).
// The consumer sets waiting_, re-checks and starts waiting all under wake_mu_, and the
// notifier takes wake_mu_ before notifying, so a notify cannot fall between the re-check and
// the wait. When nobody sleeps, push pays one seq_cst store and one load, no lock, no
// syscall. Each sleep is also capped at 1 ms, a backstop that bounds any missed wake; a
// blocked consumer therefore wakes at most ~1000 times a second, costing a few microseconds
// each. Slot contents are still published only by the release/acquire pair on tail_ (a
// seq_cst store is also a release, a seq_cst load also an acquire).
//
// Record layout (TokenRecord, 32 bytes, naturally aligned, no implicit padding):
//   offset  0  int64  position    token position in the sequence
//   offset  8  int32  token       draft token id
//   offset 12  float  prob        draft probability of `token`
//   offset 16  uint32 epoch       epoch in force when pushed (stamped by push)
//   offset 20  int32  topk_count  valid entries in this slot's top-k rows (<= topk_max)
//   offset 24  uint32 flags       caller's bits, carried unchanged from push to pop
//   offset 28  uint32 reserved    always 0 (explicit padding to a 32-byte record)
// The top-k (id int32, prob float32) pairs live in two side arrays, topk_max per slot.
//
// Rollback: `bump_epoch()` advances an atomic epoch (any one thread may call it; in PipeSD it
// is the thread applying a verdict). Each record is stamped with the epoch in force when it
// was pushed, and the consumer drops records whose epoch is older than the current one,
// whatever their flags (a stale FLAG_VERIFY record is dropped like any other).
// Because the consumer reads the epoch *after* acquiring `tail`, every record it can see has
// an epoch <= the one it compares against, so "stale" is exactly "pushed before the bump"
// (modulo the unavoidable race of a push that reads the epoch just before a bump).
//
// Close: `close()` makes later pushes return false and wakes a waiting consumer, which drains
// what is left and then reports -1 (closed and drained). A push racing with close() may land
// after the consumer has reported -1; call close() from the producer after its last push
// when every record must be delivered.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PIPESD_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define PIPESD_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define PIPESD_CPU_RELAX() ((void)0)
#endif

namespace pipesd {

struct TokenRecord {
    int64_t position;
    int32_t token;
    float prob;
    uint32_t epoch;
    int32_t topk_count;
    uint32_t flags;
    uint32_t reserved;
};
static_assert(sizeof(TokenRecord) == 32, "TokenRecord layout");
static_assert(offsetof(TokenRecord, epoch) == 16 && offsetof(TokenRecord, topk_count) == 20 &&
                  offsetof(TokenRecord, flags) == 24 && offsetof(TokenRecord, reserved) == 28,
              "TokenRecord field offsets");

constexpr std::size_t kMaxRingCapacity = std::size_t(1) << 24;
constexpr int kMaxTopk = 256;
constexpr std::size_t kCacheLine = 64;

// Wrap-safe "a is older than b" for 32-bit epochs.
inline bool epoch_before(uint32_t a, uint32_t b) { return static_cast<int32_t>(a - b) < 0; }

class TokenRing {
   public:
    TokenRing(std::size_t capacity, int topk_max)
        : cap_(checked_capacity(capacity)), mask_(cap_ - 1), topk_max_(checked_topk(topk_max)), recs_(cap_),
          ids_(cap_ * static_cast<std::size_t>(topk_max_)), probs_(cap_ * static_cast<std::size_t>(topk_max_)) {}
    TokenRing(const TokenRing&) = delete;
    TokenRing& operator=(const TokenRing&) = delete;

    static std::size_t checked_capacity(std::size_t capacity) {
        if (capacity < 2 || (capacity & (capacity - 1)) != 0 || capacity > kMaxRingCapacity)
            throw std::invalid_argument("capacity must be a power of two in [2, " + std::to_string(kMaxRingCapacity) +
                                        "], got " + std::to_string(capacity));
        return capacity;
    }
    static int checked_topk(int topk_max) {
        if (topk_max < 0 || topk_max > kMaxTopk)
            throw std::invalid_argument("topk_max must be in [0, " + std::to_string(kMaxTopk) + "], got " +
                                        std::to_string(topk_max));
        return topk_max;
    }

    std::size_t capacity() const { return cap_; }
    int topk_max() const { return topk_max_; }
    uint32_t epoch() const { return epoch_.load(std::memory_order_acquire); }
    uint32_t bump_epoch() { return epoch_.fetch_add(1, std::memory_order_acq_rel) + 1; }
    bool closed() const { return closed_.load(std::memory_order_acquire); }
    // Any thread. Wakes a consumer asleep in pop_wait (seq_cst store, then the waiting_ check:
    // see "Blocking without burning CPU" above).
    void close() {
        closed_.store(true, std::memory_order_seq_cst);
        wake_consumer();
    }
    // Records in the ring (stale ones included). Exact when called by producer or consumer
    // while the other is idle; a snapshot otherwise.
    std::size_t size() const {
        const uint64_t h = head_.load(std::memory_order_acquire);  // head first: then tail >= h
        const uint64_t t = tail_.load(std::memory_order_acquire);
        return static_cast<std::size_t>(std::min<uint64_t>(t - h, cap_));
    }
    // Stale records the consumer has dropped so far.
    uint64_t stale_dropped() const { return stale_.load(std::memory_order_relaxed); }

    // Producer only. False when full or closed; never blocks. `count` <= topk_max. `flags`
    // is carried unchanged to the consumer (pop_into copies it with the record).
    bool push(int64_t position, int32_t token, float prob, const int32_t* ids, const float* probs, int count,
              uint32_t flags = 0) {
        if (count < 0 || count > topk_max_) throw std::invalid_argument("topk count out of range");
        if (closed_.load(std::memory_order_acquire)) return false;
        const uint64_t t = tail_.load(std::memory_order_relaxed);
        if (t - head_cache_ >= cap_) {
            head_cache_ = head_.load(std::memory_order_acquire);
            if (t - head_cache_ >= cap_) return false;
        }
        const std::size_t slot = static_cast<std::size_t>(t & mask_);
        // Plain stores into a slot the consumer cannot see yet (it is at or past tail);
        // published, with its top-k rows, by the release store of tail below.
        recs_[slot] = TokenRecord{position, token, prob, epoch_.load(std::memory_order_acquire), count, flags, 0u};
        if (count > 0) {
            std::memcpy(&ids_[slot * topk_max_], ids, sizeof(int32_t) * count);
            std::memcpy(&probs_[slot * topk_max_], probs, sizeof(float) * count);
        }
        // seq_cst (a release, and ordered before the waiting_ load in wake_consumer).
        tail_.store(t + 1, std::memory_order_seq_cst);
        wake_consumer();
        return true;
    }

    // Consumer only. Copies up to max_n current-epoch records into `out` and, when topk_max >
    // 0, their top-k rows (width topk_max, zero padded past topk_count) into out_ids /
    // out_probs. Stale records are consumed and dropped. Returns the number copied.
    std::size_t pop_into(std::size_t max_n, TokenRecord* out, int32_t* out_ids, float* out_probs) {
        const uint64_t h = head_.load(std::memory_order_relaxed);
        uint64_t avail = tail_cache_ - h;
        if (avail < max_n) {
            tail_cache_ = tail_.load(std::memory_order_acquire);
            avail = tail_cache_ - h;
            if (avail == 0) return 0;
        }
        // Read after acquiring tail: no visible record is newer than `cur`.
        const uint32_t cur = epoch_.load(std::memory_order_acquire);
        const std::size_t k = static_cast<std::size_t>(topk_max_);
        std::size_t taken = 0;
        uint64_t i = 0;
        for (; i < avail && taken < max_n; ++i) {
            const std::size_t slot = static_cast<std::size_t>((h + i) & mask_);
            const TokenRecord& r = recs_[slot];
            if (epoch_before(r.epoch, cur)) continue;  // stale: dropped
            out[taken] = r;  // the whole record, flags included
            if (k > 0) {
                const std::size_t cnt = static_cast<std::size_t>(r.topk_count);
                int32_t* di = out_ids + taken * k;
                float* dp = out_probs + taken * k;
                std::memcpy(di, &ids_[slot * k], sizeof(int32_t) * cnt);
                std::memcpy(dp, &probs_[slot * k], sizeof(float) * cnt);
                std::memset(di + cnt, 0, sizeof(int32_t) * (k - cnt));
                std::memset(dp + cnt, 0, sizeof(float) * (k - cnt));
            }
            ++taken;
        }
        if (i > taken) stale_.fetch_add(i - taken, std::memory_order_relaxed);
        head_.store(h + i, std::memory_order_release);
        return taken;
    }

    // Consumer only: like pop_into, but waits up to timeout_s for a first record: a short
    // spin, then sleeps on a condition variable until a push or close() wakes it (each sleep
    // capped at 1 ms, see "Blocking without burning CPU" above), so a blocked consumer costs
    // almost no CPU and still sees a push or close() at once. Returns the count popped (0 on
    // timeout) or -1 once the ring is closed and drained.
    long pop_wait(std::size_t max_n, double timeout_s, TokenRecord* out, int32_t* out_ids, float* out_probs) {
        using clock = std::chrono::steady_clock;
        if (max_n == 0) return 0;
        if (!(timeout_s >= 0.0)) timeout_s = 0.0;
        const double capped = std::min(timeout_s, 1e7);  // ~115 days; keeps the duration cast finite
        const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(capped));
        for (int round = 0;; ++round) {
            const bool was_closed = closed();  // read before popping: a drained closed ring is final
            const std::size_t n = pop_into(max_n, out, out_ids, out_probs);
            if (n > 0) return static_cast<long>(n);
            if (was_closed && tail_.load(std::memory_order_acquire) == head_.load(std::memory_order_relaxed)) return -1;
            const auto now = clock::now();
            if (now >= deadline) return 0;
            if (round < kSpinRounds) {
                PIPESD_CPU_RELAX();
                continue;
            }
            std::unique_lock<std::mutex> lock(wake_mu_);
            waiting_.store(true, std::memory_order_seq_cst);
            // Re-check after announcing: a push or close ordered before our store is seen here;
            // one ordered after it sees waiting_ and notifies (under wake_mu_, so not before
            // wait_until has released it).
            if (tail_.load(std::memory_order_seq_cst) == head_.load(std::memory_order_relaxed) &&
                !closed_.load(std::memory_order_seq_cst))
                wake_cv_.wait_until(lock, std::min(deadline, now + kMaxSleep));
            waiting_.store(false, std::memory_order_relaxed);
        }
    }

   private:
    static constexpr int kSpinRounds = 32;  // CPU_RELAX rounds before sleeping
    static constexpr std::chrono::milliseconds kMaxSleep{1};  // backstop: bounds any missed wake

    // Producer and close(): wake the consumer if it announced it is going to sleep. The load
    // follows a seq_cst store of tail_ or closed_ (see "Blocking without burning CPU").
    void wake_consumer() {
        // The exchange makes one notifier per sleep: pushes that follow, while the woken
        // consumer is still getting the CPU back, see false and stay lock-free.
        if (waiting_.load(std::memory_order_seq_cst) && waiting_.exchange(false, std::memory_order_seq_cst)) {
            std::lock_guard<std::mutex> g(wake_mu_);
            wake_cv_.notify_one();
        }
    }

    const std::size_t cap_;
    const uint64_t mask_;
    const int topk_max_;
    std::vector<TokenRecord> recs_;
    std::vector<int32_t> ids_;
    std::vector<float> probs_;
    // Producer line: its index and its cached view of the consumer's.
    alignas(kCacheLine) std::atomic<uint64_t> tail_{0};
    uint64_t head_cache_ = 0;
    // Consumer line.
    alignas(kCacheLine) std::atomic<uint64_t> head_{0};
    uint64_t tail_cache_ = 0;
    std::atomic<uint64_t> stale_{0};
    // Rarely written, read by both.
    alignas(kCacheLine) std::atomic<uint32_t> epoch_{0};
    std::atomic<bool> closed_{false};
    char pad_[kCacheLine - sizeof(std::atomic<uint32_t>) - sizeof(std::atomic<bool>)];
    // Sleep/wake: written only when the consumer goes to sleep or is woken; read by every push.
    alignas(kCacheLine) std::atomic<bool> waiting_{false};
    std::mutex wake_mu_;
    std::condition_variable wake_cv_;
};

}  // namespace pipesd
