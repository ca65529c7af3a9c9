#include "reader.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <stdexcept>
#include <utility>

#include "file_io.h"
#include "xxhash64.h"

namespace shardio {
namespace {

constexpr size_t kChunk = 1 << 20;  // hash each MiB right after it lands, while cached

std::string hex64(uint64_t v) {
  char buf[19];
  std::snprintf(buf, sizeof buf, "0x%016" PRIx64, v);
  return buf;
}

int64_t file_size(int fd) {
  struct stat st;
  return ::fstat(fd, &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

}  // namespace

Reader::Reader(std::vector<ShardLayout> shards, std::vector<int64_t> bytes_per_token,
               int num_threads, bool verify)
    : shards_(std::move(shards)), bytes_per_token_(std::move(bytes_per_token)), verify_(verify) {
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  for (size_t s = 0; s < shards_.size(); ++s) {
    const ShardLayout& sh = shards_[s];
    if (sh.field_offsets.size() != bytes_per_token_.size())
      throw std::invalid_argument(sh.path + ": field count differs from bytes_per_token");
    if (sh.token_offsets.size() != sh.checksums.size() + 1)
      throw std::invalid_argument(sh.path + ": need len(token_offsets) == len(checksums) + 1");
    for (size_t j = 0; j + 1 < sh.token_offsets.size(); ++j) {
      if (sh.token_offsets[j + 1] <= sh.token_offsets[j])
        throw std::invalid_argument(sh.path + ": token offsets must increase");
      shard_of_sample_.push_back(static_cast<int32_t>(s));
      local_of_sample_.push_back(static_cast<int32_t>(j));
    }
  }
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { worker(); });
}

Reader::~Reader() { close(); }

int64_t Reader::sample_tokens(int64_t sample) const {
  const ShardLayout& sh = shards_[shard_of_sample_.at(sample)];
  const int32_t j = local_of_sample_[sample];
  return sh.token_offsets[j + 1] - sh.token_offsets[j];
}

std::string Reader::where(int64_t sample) const {
  return shards_[shard_of_sample_[sample]].path + ", sample " +
         std::to_string(local_of_sample_[sample]) + " of that shard (dataset sample " +
         std::to_string(sample) + ")";
}

int64_t Reader::submit(const std::vector<int64_t>& samples, const std::vector<uint8_t*>& dests) {
  if (dests.size() != bytes_per_token_.size())
    throw std::invalid_argument("submit: need one destination per field");
  auto batch = std::make_shared<Batch>();
  batch->dests = dests;
  std::vector<Job> jobs;
  int64_t tokens = 0;
  for (int64_t s : samples) {
    if (s < 0 || s >= num_samples())
      throw std::out_of_range("sample index " + std::to_string(s) + " out of range [0, " +
                              std::to_string(num_samples()) + ")");
    jobs.push_back(Job{batch, s, tokens});
    tokens += sample_tokens(s);
  }
  std::lock_guard<std::mutex> lk(mu_);
  if (stop_) throw std::logic_error("reader is closed");
  const int64_t ticket = next_ticket_++;
  batch->remaining = static_cast<int64_t>(jobs.size());
  batches_[ticket] = batch;
  for (Job& job : jobs) queue_.push_back(std::move(job));
  work_cv_.notify_all();
  return ticket;
}

void Reader::wait(int64_t ticket) {
  std::unique_lock<std::mutex> lk(mu_);
  auto it = batches_.find(ticket);
  if (it == batches_.end()) throw std::invalid_argument("unknown or already awaited ticket");
  std::shared_ptr<Batch> batch = it->second;
  done_cv_.wait(lk, [&] { return batch->remaining == 0; });
  batches_.erase(ticket);
  if (!batch->error.empty()) throw DataError(batch->error);
}

void Reader::close() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) return;
    stop_ = true;
    for (Job& job : queue_) {
      if (job.batch->error.empty()) job.batch->error = "reader closed before the batch was read";
      --job.batch->remaining;
    }
    queue_.clear();
  }
  work_cv_.notify_all();
  done_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void Reader::worker() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) break;  // stopping
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    std::string error;
    bool skip;
    {
      std::lock_guard<std::mutex> lk(mu_);
      skip = !job.batch->error.empty();  // an earlier sample of this batch already failed
    }
    if (!skip) {
      try {
        read_sample(job);
      } catch (const std::exception& e) {
        error = e.what();
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error.empty() && job.batch->error.empty()) job.batch->error = error;
      if (--job.batch->remaining == 0) done_cv_.notify_all();
    }
  }
}

void Reader::read_sample(const Job& job) {
  const ShardLayout& sh = shards_[shard_of_sample_[job.sample]];
  const int32_t local = local_of_sample_[job.sample];
  const int64_t t0 = sh.token_offsets[local];
  const int64_t ntok = sh.token_offsets[local + 1] - t0;

  Fd f(::open(sh.path.c_str(), O_RDONLY | O_CLOEXEC));
  if (f.fd < 0) {
    const int err = errno;
    throw DataError("cannot open " + where(job.sample) + ": " + errno_text(err));
  }
  auto truncated = [&](int64_t needed_end) {
    return DataError("truncated shard: " + where(job.sample) + " needs bytes up to " +
                     std::to_string(needed_end) + " but the file has " +
                     std::to_string(file_size(f.fd)));
  };

  Xxh64 hash;
  for (size_t field = 0; field < bytes_per_token_.size(); ++field) {
    const int64_t bpt = bytes_per_token_[field];
    int64_t off = sh.field_offsets[field] + t0 * bpt;
    size_t len = static_cast<size_t>(ntok * bpt);
    const int64_t end = off + static_cast<int64_t>(len);
    uint8_t* dst = job.batch->dests[field] + job.dest_token * bpt;
    try {
      while (len > 0) {
        const size_t want = len < kChunk ? len : kChunk;
        if (pread_full(f.fd, dst, want, off, sh.path) < want) throw truncated(end);
        if (verify_) hash.update(dst, want);
        dst += want;
        off += static_cast<int64_t>(want);
        len -= want;
      }
    } catch (const SysError& e) {
      throw DataError("read failed in " + where(job.sample) + ": " + e.what());
    }
  }
  if (verify_) {
    const uint64_t got = hash.digest();
    const uint64_t want = sh.checksums[local];
    if (got != want)
      throw DataError("checksum mismatch in " + where(job.sample) + ": stored xxh64 " +
                      hex64(want) + ", data read hashes to " + hex64(got) +
                      "; the shard is corrupt (re-capture it or restore a good copy)");
  }
}

}  // namespace shardio
