// pybind11 bindings of the shard I/O core as `specfast._shardio`. No libtorch: every buffer comes
// in through the Python buffer protocol (numpy arrays, bytes, numpy views of torch storage), and
// each is held (Py_buffer) until the C++ side is done with its memory.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "file_io.h"
#include "finite.h"
#include "reader.h"
#include "schedule.h"
#include "writer.h"
#include "xxhash64.h"

namespace py = pybind11;
using namespace shardio;

namespace {

// An exported buffer, released on destruction. Destroy only with the GIL held.
class HeldBuffer {
 public:
  HeldBuffer(py::handle obj, bool writable, const std::string& what) {
    const int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
      PyErr_Clear();
      throw py::type_error(what + ": need a C-contiguous" + (writable ? " writable" : "") +
                           " buffer (numpy array, bytes), got " +
                           std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    }
  }
  ~HeldBuffer() { PyBuffer_Release(&view_); }
  HeldBuffer(const HeldBuffer&) = delete;
  HeldBuffer& operator=(const HeldBuffer&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

using Holds = std::vector<std::unique_ptr<HeldBuffer>>;
// Arrays arrive from numpy in whatever layout; forcecast hands C++ a contiguous copy if needed.
using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

// Parts of a file: each item is a buffer, or an int n meaning n zero bytes (padding).
std::vector<Part> parts_from(const py::list& items, Holds& holds) {
  std::vector<Part> parts;
  for (size_t i = 0; i < items.size(); ++i) {
    py::handle item = items[i];
    if (py::isinstance<py::int_>(item)) {
      const auto n = item.cast<long long>();
      if (n < 0) throw py::value_error("parts[" + std::to_string(i) + "]: negative padding");
      parts.push_back(Part{nullptr, static_cast<size_t>(n)});
    } else {
      const std::string what = "parts[" + std::to_string(i) + "]";
      holds.push_back(std::make_unique<HeldBuffer>(item, false, what));
      parts.push_back(Part{holds.back()->data(), holds.back()->size()});
    }
  }
  return parts;
}

py::tuple result_tuple(const WriteResult& r) { return py::make_tuple(r.size, r.xxh64); }

class PyFileWriter {
 public:
  void start(const std::string& path, const py::list& parts) {
    if (writer_.busy()) throw py::value_error("a write is already in flight; wait() for it first");
    Holds holds;
    std::vector<Part> p = parts_from(parts, holds);
    writer_.start(path, std::move(p));
    holds_ = std::move(holds);
  }
  bool finished() const { return writer_.finished(); }
  py::tuple wait() {
    if (!writer_.busy()) throw py::value_error("no write in flight");
    WriteResult r{};
    try {
      py::gil_scoped_release nogil;
      r = writer_.wait();
    } catch (...) {
      holds_.clear();
      throw;
    }
    holds_.clear();
    return result_tuple(r);
  }
  ~PyFileWriter() {
    if (writer_.busy()) {
      py::gil_scoped_release nogil;
      try {
        writer_.wait();
      } catch (...) {
        // Abandoned write: the temp file is removed by write_file_atomic, nothing to report to.
      }
    }
  }

 private:
  AsyncFileWriter writer_;
  Holds holds_;
};

class PyReader {
 public:
  PyReader(const std::vector<std::string>& paths,
           const std::vector<std::vector<int64_t>>& field_offsets,
           const std::vector<I64Array>& token_offsets, const std::vector<U64Array>& checksums,
           std::vector<int64_t> bytes_per_token, int num_threads, bool verify) {
    const size_t n = paths.size();
    if (field_offsets.size() != n || token_offsets.size() != n || checksums.size() != n)
      throw py::value_error("paths, field_offsets, token_offsets and checksums differ in length");
    std::vector<ShardLayout> shards(n);
    for (size_t s = 0; s < n; ++s) {
      shards[s].path = paths[s];
      shards[s].field_offsets = field_offsets[s];
      const auto& t = token_offsets[s];
      shards[s].token_offsets.assign(t.data(), t.data() + t.size());
      const auto& c = checksums[s];
      shards[s].checksums.assign(c.data(), c.data() + c.size());
    }
    bytes_per_token_ = bytes_per_token;
    reader_ = std::make_unique<Reader>(std::move(shards), std::move(bytes_per_token), num_threads,
                                       verify);
  }
  ~PyReader() { close(); }

  int64_t submit(const I64Array& samples, const py::list& dests) {
    if (dests.size() != bytes_per_token_.size())
      throw py::value_error("need " + std::to_string(bytes_per_token_.size()) +
                            " destination buffers, one per field, got " +
                            std::to_string(dests.size()));
    std::vector<int64_t> ids(samples.data(), samples.data() + samples.size());
    int64_t tokens = 0;
    for (int64_t s : ids) {
      if (s < 0 || s >= reader_->num_samples())
        throw py::index_error("sample " + std::to_string(s) + " out of range [0, " +
                              std::to_string(reader_->num_samples()) + ")");
      tokens += reader_->sample_tokens(s);
    }
    Holds holds;
    std::vector<uint8_t*> ptrs;
    for (size_t f = 0; f < dests.size(); ++f) {
      const std::string what = "dests[" + std::to_string(f) + "]";
      holds.push_back(std::make_unique<HeldBuffer>(dests[f], true, what));
      const size_t need = static_cast<size_t>(tokens * bytes_per_token_[f]);
      if (holds.back()->size() < need)
        throw py::value_error("dests[" + std::to_string(f) + "] holds " +
                              std::to_string(holds.back()->size()) + " bytes, the samples need " +
                              std::to_string(need));
      ptrs.push_back(holds.back()->data());
    }
    const int64_t ticket = reader_->submit(ids, ptrs);
    holds_[ticket] = std::move(holds);
    return ticket;
  }

  void wait(int64_t ticket) {
    try {
      py::gil_scoped_release nogil;
      reader_->wait(ticket);
    } catch (...) {
      holds_.erase(ticket);
      throw;
    }
    holds_.erase(ticket);
  }

  void close() {
    {
      py::gil_scoped_release nogil;
      reader_->close();
    }
    holds_.clear();  // only now, with no thread left writing into them
  }

 private:
  std::unique_ptr<Reader> reader_;
  std::vector<int64_t> bytes_per_token_;
  std::unordered_map<int64_t, Holds> holds_;
};

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_shardio, m) {
  m.doc() =
      "specfast shard I/O core (C++17): checksums, crash-safe writes, threaded verified reads, "
      "and the batch plan's seeded permutation and greedy packing.";

  py::register_exception<DataError>(m, "ShardIOError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const SysError& e) {
      py::tuple args = py::make_tuple(e.err, std::string(e.what()));
      PyErr_SetObject(PyExc_OSError, args.ptr());
    }
  });

  m.def(
      "xxh64",
      [](py::buffer data, uint64_t seed) {
        HeldBuffer b(data, false, "data");
        py::gil_scoped_release nogil;
        return xxh64(b.data(), b.size(), seed);
      },
      py::arg("data"), py::arg("seed") = 0, "XXH64 of one buffer.");
  m.def(
      "xxh64_parts",
      [](const py::list& parts, uint64_t seed) {
        Holds holds;
        std::vector<Part> p = parts_from(parts, holds);
        uint64_t h;
        {
          py::gil_scoped_release nogil;
          Xxh64 hash(seed);
          for (const Part& part : p) hash.update(part.data, part.len);
          h = hash.digest();
        }
        return h;
      },
      py::arg("parts"), py::arg("seed") = 0, "XXH64 of the concatenation of buffers.");
  m.def(
      "hash_file",
      [](const std::string& path) {
        WriteResult r;
        {
          py::gil_scoped_release nogil;
          r = hash_file(path);
        }
        return result_tuple(r);
      },
      py::arg("path"), "(size, xxh64) of a whole file.");
  m.def(
      "write_file_atomic",
      [](const std::string& path, const py::list& parts) {
        Holds holds;
        std::vector<Part> p = parts_from(parts, holds);
        WriteResult r;
        {
          py::gil_scoped_release nogil;
          r = write_file_atomic(path, p);
        }
        return result_tuple(r);
      },
      py::arg("path"), py::arg("parts"),
      "Crash-safe write of buffers / zero-padding ints; returns (size, xxh64).");
  m.def(
      "first_nonfinite",
      [](py::buffer data, const std::string& dtype) {
        HeldBuffer b(data, false, "data");
        const size_t item = dtype == "F32" ? 4 : 2;
        if (b.size() % item)
          throw py::value_error("buffer size is not a multiple of the dtype size");
        py::gil_scoped_release nogil;
        return first_nonfinite(b.data(), b.size() / item, dtype);
      },
      py::arg("data"), py::arg("dtype"),
      "Index of the first NaN/inf element of a BF16/F16/F32 buffer, or -1.");
  m.def(
      "permutation",
      [](int64_t n, uint64_t seed, uint64_t epoch) {
        if (n < 0) throw py::value_error("n must be >= 0");
        std::vector<int64_t> p;
        {
          py::gil_scoped_release nogil;
          p = permutation(n, seed, epoch);
        }
        return to_numpy(p);
      },
      py::arg("n"), py::arg("seed"), py::arg("epoch"));
  m.def(
      "pack_batches",
      [](const I64Array& lengths, int64_t budget) {
        if (budget < 1) throw py::value_error("budget must be >= 1");
        const int64_t* l = lengths.data();
        for (py::ssize_t i = 0; i < lengths.size(); ++i)
          if (l[i] < 1 || l[i] > budget)
            throw py::value_error("lengths[" + std::to_string(i) + "] = " + std::to_string(l[i]) +
                                  " is outside [1, " + std::to_string(budget) + "]");
        return to_numpy(pack_batches(l, lengths.size(), budget));
      },
      py::arg("lengths"), py::arg("budget"));

  py::class_<PyFileWriter>(m, "FileWriter",
                           "One crash-safe file write at a time, on a background thread.")
      .def(py::init<>())
      .def("start", &PyFileWriter::start, py::arg("path"), py::arg("parts"))
      .def("finished", &PyFileWriter::finished)
      .def("wait", &PyFileWriter::wait);

  py::class_<PyReader>(m, "Reader", "Threaded, verified sample reads into caller buffers.")
      .def(py::init<const std::vector<std::string>&, const std::vector<std::vector<int64_t>>&,
                    const std::vector<I64Array>&, const std::vector<U64Array>&,
                    std::vector<int64_t>, int, bool>(),
           py::arg("paths"), py::arg("field_offsets"), py::arg("token_offsets"),
           py::arg("checksums"), py::arg("bytes_per_token"), py::arg("num_threads"),
           py::arg("verify"))
      .def("submit", &PyReader::submit, py::arg("samples"), py::arg("dests"))
      .def("wait", &PyReader::wait, py::arg("ticket"))
      .def("close", &PyReader::close);
}
