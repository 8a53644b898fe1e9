#include "support/raw_tar.h"

#include <zstd.h>

#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace upgraded::test {
namespace {

// Writes `value` as width-1 octal digits plus NUL into a tar header field.
void octal(char* field, std::size_t width, std::uint64_t value) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%0*llo", static_cast<int>(width - 1),
                static_cast<unsigned long long>(value));
  std::memcpy(field, buf, width);
}

std::string header(const std::string& name, char type, unsigned mode, std::uint64_t size,
                   const std::string& linkname) {
  char h[512];
  std::memset(h, 0, sizeof h);
  std::memcpy(h, name.data(), std::min<std::size_t>(name.size(), 100));
  octal(h + 100, 8, mode);
  octal(h + 108, 8, 0);
  octal(h + 116, 8, 0);
  octal(h + 124, 12, size);
  octal(h + 136, 12, 1700000000);
  h[156] = type;
  std::memcpy(h + 157, linkname.data(), std::min<std::size_t>(linkname.size(), 100));
  std::memcpy(h + 257,
              "ustar\0"
              "00",
              8);
  std::memset(h + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : h)
    sum += c;
  std::snprintf(h + 148, 7, "%06o", sum);
  h[154] = 0;
  h[155] = ' ';
  return std::string(h, 512);
}

std::string pad(std::string s) {
  s.append((512 - s.size() % 512) % 512, '\0');
  return s;
}

std::string pax_record(const std::string& key, const std::string& value) {
  std::string body = " " + key + "=" + value + "\n";
  std::size_t len = body.size() + 1;
  while (std::to_string(len).size() + body.size() != len)
    len = std::to_string(len).size() + body.size();
  return std::to_string(len) + body;
}

}  // namespace

RawEntry file(std::string name, std::string data, unsigned mode) {
  return RawEntry{std::move(name), '0', std::move(data), mode, {}, {}, false};
}
RawEntry dir(std::string name, unsigned mode) {
  return RawEntry{std::move(name), '5', {}, mode, {}, {}, false};
}
RawEntry symlink_to(std::string name, std::string target) {
  return RawEntry{std::move(name), '2', {}, 0777, std::move(target), {}, false};
}
RawEntry hardlink_to(std::string name, std::string target) {
  return RawEntry{std::move(name), '1', {}, 0644, std::move(target), {}, false};
}

std::string raw_tar(const std::vector<RawEntry>& entries) {
  std::string out;
  for (const auto& e : entries) {
    bool long_name = e.name.size() > 100 || e.linkname.size() > 100;
    if (long_name || e.force_pax) {
      std::string records = pax_record("path", e.name);
      if (!e.linkname.empty()) records += pax_record("linkpath", e.linkname);
      out += header("PaxHeaders/x", 'x', 0644, records.size(), "");
      out += pad(records);
    }
    out += header(e.name, e.type, e.mode, e.declared_size.value_or(e.data.size()), e.linkname);
    out += pad(e.data);
  }
  out.append(1024, '\0');
  return out;
}

std::string zstd_compress(const std::string& data, int level) {
  std::string out(ZSTD_compressBound(data.size()), '\0');
  std::size_t n = ZSTD_compress(out.data(), out.size(), data.data(), data.size(), level);
  if (ZSTD_isError(n)) throw std::runtime_error("zstd compression failed");
  out.resize(n);
  return out;
}

}  // namespace upgraded::test
