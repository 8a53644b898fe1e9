#pragma once

// Shared by the fuzz targets (tests/fuzz/*_fuzz.cpp, docs/fuzzing.md). An invariant that does
// not hold aborts: libFuzzer reports it as a crash and saves the input, and the corpus replay
// of the ordinary build (fuzz_corpus_* tests) fails on it.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "upgraded/result.h"

#define FUZZ_CHECK(cond)                                                                 \
  do {                                                                                   \
    if (!(cond)) ::upgraded::fuzz::invariant_failed(#cond, __FILE__, __LINE__, nullptr); \
  } while (false)

/// Like FUZZ_CHECK, with the message of the Result or Error `what` in the report.
#define FUZZ_CHECK_MSG(cond, msg)                                                              \
  do {                                                                                         \
    if (!(cond)) ::upgraded::fuzz::invariant_failed(#cond, __FILE__, __LINE__, (msg).c_str()); \
  } while (false)

namespace upgraded::fuzz {

[[noreturn]] inline void invariant_failed(const char* what, const char* file, int line,
                                          const char* detail) {
  std::fprintf(stderr, "%s:%d: invariant violated: %s%s%s\n", file, line, what, detail ? ": " : "",
               detail ? detail : "");
  std::abort();
}

inline std::string_view as_text(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

inline int sign(int v) {
  return (v > 0) - (v < 0);
}

}  // namespace upgraded::fuzz

/// The entry point every target defines; libFuzzer calls it, and so does replay_main.cpp.
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);
