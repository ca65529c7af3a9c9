#include "file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "xxhash64.h"

namespace shardio {
namespace {

void write_all(int fd, const uint8_t* data, size_t len, const std::string& path) {
  while (len > 0) {
    const ssize_t n = ::write(fd, data, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      throw SysError(err, "writing " + path + ": " + errno_text(err));
    }
    data += n;
    len -= static_cast<size_t>(n);
  }
}

std::string dir_of(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// "<dir>/.<name>.tmp": hidden, and in the same directory so the rename cannot cross file systems.
std::string temp_path_for(const std::string& path) {
  const auto slash = path.rfind('/');
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  return dir + "." + name + ".tmp";
}

}  // namespace

std::string errno_text(int err) { return std::strerror(err); }

size_t pread_full(int fd, void* buf, size_t len, int64_t off, const std::string& path) {
  auto* p = static_cast<uint8_t*>(buf);
  size_t done = 0;
  while (done < len) {
    const ssize_t n = ::pread(fd, p + done, len - done, off + static_cast<int64_t>(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      throw SysError(err, "reading " + path + " at byte " + std::to_string(off + done) + ": " +
                              errno_text(err));
    }
    if (n == 0) break;  // end of file
    done += static_cast<size_t>(n);
  }
  return done;
}

WriteResult write_file_atomic(const std::string& path, const std::vector<Part>& parts) {
  static const uint8_t kZeros[4096] = {};
  const std::string tmp = temp_path_for(path);
  Xxh64 hash;
  int64_t size = 0;
  try {
    Fd f(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (f.fd < 0) {
      const int err = errno;
      throw SysError(err, "creating " + tmp + ": " + errno_text(err));
    }
    for (const Part& part : parts) {
      if (part.data) {
        hash.update(part.data, part.len);
        write_all(f.fd, part.data, part.len, tmp);
      } else {
        for (size_t left = part.len; left > 0;) {
          const size_t n = left < sizeof(kZeros) ? left : sizeof(kZeros);
          hash.update(kZeros, n);
          write_all(f.fd, kZeros, n, tmp);
          left -= n;
        }
      }
      size += static_cast<int64_t>(part.len);
    }
    // The data must be durable before the rename makes it visible under the final name.
    if (::fsync(f.fd) != 0) {
      const int err = errno;
      throw SysError(err, "fsync " + tmp + ": " + errno_text(err));
    }
    const int fd = f.fd;
    f.fd = -1;
    if (::close(fd) != 0) {
      const int err = errno;
      throw SysError(err, "closing " + tmp + ": " + errno_text(err));
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      const int err = errno;
      throw SysError(err, "renaming " + tmp + " to " + path + ": " + errno_text(err));
    }
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  // The rename itself is durable only once the directory entry is.
  const std::string dir = dir_of(path);
  Fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (d.fd < 0 || ::fsync(d.fd) != 0) {
    const int err = errno;
    throw SysError(err, "fsync directory " + dir + ": " + errno_text(err));
  }
  return WriteResult{size, hash.digest()};
}

WriteResult hash_file(const std::string& path) {
  Fd f(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (f.fd < 0) {
    const int err = errno;
    throw SysError(err, "opening " + path + ": " + errno_text(err));
  }
  constexpr size_t kChunk = 1 << 20;
  std::unique_ptr<uint8_t[]> buf(new uint8_t[kChunk]);
  Xxh64 hash;
  int64_t size = 0;
  for (;;) {
    const size_t n = pread_full(f.fd, buf.get(), kChunk, size, path);
    hash.update(buf.get(), n);
    size += static_cast<int64_t>(n);
    if (n < kChunk) break;
  }
  return WriteResult{size, hash.digest()};
}

}  // namespace shardio
