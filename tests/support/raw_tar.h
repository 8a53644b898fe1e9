#pragma once

// A deliberately permissive tar *writer* for adversarial tests: it writes whatever names, types,
// modes and sizes it is told, including ones no sane archiver would produce.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace upgraded::test {

struct RawEntry {
  std::string name;
  char type = '0';  ///< '0' file, '1' hardlink, '2' symlink, '3' chr, '4' blk, '5' dir, '6' fifo
  std::string data;
  unsigned mode = 0644;
  std::string linkname;
  std::optional<std::uint64_t> declared_size;  ///< lie about the size in the header
  bool force_pax = false;                      ///< put the name in a pax header even if short
};

RawEntry file(std::string name, std::string data, unsigned mode = 0644);
RawEntry dir(std::string name, unsigned mode = 0755);
RawEntry symlink_to(std::string name, std::string target);
RawEntry hardlink_to(std::string name, std::string target);

/// Serializes entries as ustar (pax 'x' headers for long names) followed by two zero blocks.
std::string raw_tar(const std::vector<RawEntry>& entries);

std::string zstd_compress(const std::string& data, int level = 3);

}  // namespace upgraded::test
