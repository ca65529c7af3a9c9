// Reads samples out of shards on background threads into memory the caller owns (numpy arrays,
// pinned torch storage), verifying each sample's xxh64 as it goes. Python never waits here with
// the GIL held: submit() only queues, wait() is called with the GIL released.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace shardio {

// Where one shard's samples live on disk (parsed and validated by the Python side).
struct ShardLayout {
  std::string path;
  std::vector<int64_t> field_offsets;  // absolute file offset of each per-token tensor
  std::vector<int64_t> token_offsets;  // S + 1 sample boundaries, in tokens
  std::vector<uint64_t> checksums;     // S per-sample xxh64 values
};

class Reader {
 public:
  // bytes_per_token[f] is the width in bytes of one token of per-token field f, in the order of
  // ShardLayout::field_offsets. Reads go through the page cache.
  Reader(std::vector<ShardLayout> shards, std::vector<int64_t> bytes_per_token, int num_threads,
         bool verify);
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  int64_t num_samples() const { return static_cast<int64_t>(shard_of_sample_.size()); }
  int64_t sample_tokens(int64_t sample) const;

  // Queues `samples` (dataset-wide indices) to be packed, in order, into dests: dests[f] receives
  // field f of every sample back to back and must hold sum(tokens) * bytes_per_token[f] bytes,
  // valid until wait() on the returned ticket has returned.
  int64_t submit(const std::vector<int64_t>& samples, const std::vector<uint8_t*>& dests);
  // Blocks until the ticket's samples are all in place; throws DataError naming the file and
  // sample on the first failure among them.
  void wait(int64_t ticket);
  // Drops queued work, lets running reads finish, joins the threads. Idempotent.
  void close();

 private:
  struct Batch {
    std::vector<uint8_t*> dests;
    int64_t remaining = 0;
    std::string error;
  };
  struct Job {
    std::shared_ptr<Batch> batch;
    int64_t sample;      // dataset-wide index
    int64_t dest_token;  // where the sample starts inside the batch, in tokens
  };

  void worker();
  void read_sample(const Job& job);
  std::string where(int64_t sample) const;

  std::vector<ShardLayout> shards_;
  std::vector<int64_t> bytes_per_token_;
  std::vector<int32_t> shard_of_sample_;
  std::vector<int32_t> local_of_sample_;
  bool verify_;

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Job> queue_;
  std::unordered_map<int64_t, std::shared_ptr<Batch>> batches_;
  int64_t next_ticket_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace shardio
