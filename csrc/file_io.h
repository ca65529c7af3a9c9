// POSIX file helpers shared by the shard writer and reader: full reads and writes that survive
// EINTR and short transfers, the crash-safe write protocol, and the two error kinds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

namespace shardio {

// The data on disk is wrong (truncated, corrupt, unreadable). Python sees ShardIOError.
struct DataError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The operating system refused an operation (no space, permission, ...). Python sees OSError.
struct SysError : std::runtime_error {
  SysError(int err, const std::string& what) : std::runtime_error(what), err(err) {}
  int err;
};

std::string errno_text(int err);

// Owns a file descriptor and closes it on scope exit, so every error path releases it.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Reads up to len bytes at off; fewer only at end of file. Throws SysError on a read error.
size_t pread_full(int fd, void* buf, size_t len, int64_t off, const std::string& path);

// One piece of a file being written: `len` bytes from `data`, or `len` zero bytes if data is null.
struct Part {
  const uint8_t* data;
  size_t len;
};

struct WriteResult {
  int64_t size;
  uint64_t xxh64;  // of the whole file
};

// Crash-safe write: the parts go to "<dir>/.<name>.tmp", which is fsynced, renamed over
// "<dir>/<name>", and the directory fsynced. A reader sees the old file or the complete new one,
// never a torn one; a crash leaves at most the temp file behind (ShardWriter removes such files
// when it reopens the directory).
WriteResult write_file_atomic(const std::string& path, const std::vector<Part>& parts);

// Size and xxh64 of a whole file, read sequentially.
WriteResult hash_file(const std::string& path);

}  // namespace shardio
