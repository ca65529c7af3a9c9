// Writes one file at a time on a background thread with the crash-safe protocol of
// write_file_atomic, so a capture keeps computing the next shard while this one reaches disk.
#pragma once

#include <atomic>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "file_io.h"

namespace shardio {

class AsyncFileWriter {
 public:
  AsyncFileWriter() = default;
  AsyncFileWriter(const AsyncFileWriter&) = delete;
  AsyncFileWriter& operator=(const AsyncFileWriter&) = delete;
  ~AsyncFileWriter();  // waits for a write in flight; its error, if any, is dropped

  // Starts writing `parts` to `path`. The memory behind the parts must stay valid until wait()
  // returns. Only one write may be in flight.
  void start(const std::string& path, std::vector<Part> parts);
  bool busy() const { return thread_.joinable(); }
  // True once the write in flight has finished (wait() then returns at once).
  bool finished() const { return finished_.load(); }
  // Blocks until the write in flight is durable; rethrows its error.
  WriteResult wait();

 private:
  std::thread thread_;
  std::vector<Part> parts_;
  WriteResult result_{};
  std::exception_ptr error_;
  std::atomic<bool> finished_{false};
};

}  // namespace shardio
