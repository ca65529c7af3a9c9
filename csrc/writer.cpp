#include "writer.h"

#include <stdexcept>
#include <utility>

namespace shardio {

AsyncFileWriter::~AsyncFileWriter() {
  if (thread_.joinable()) thread_.join();
}

void AsyncFileWriter::start(const std::string& path, std::vector<Part> parts) {
  if (thread_.joinable()) throw std::logic_error("AsyncFileWriter: a write is already in flight");
  parts_ = std::move(parts);
  error_ = nullptr;
  finished_ = false;
  thread_ = std::thread([this, path] {
    try {
      result_ = write_file_atomic(path, parts_);
    } catch (...) {
      error_ = std::current_exception();
    }
    finished_ = true;
  });
}

WriteResult AsyncFileWriter::wait() {
  if (!thread_.joinable()) throw std::logic_error("AsyncFileWriter: no write in flight");
  thread_.join();
  parts_.clear();
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  return result_;
}

}  // namespace shardio
