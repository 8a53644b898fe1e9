#include "trust_root.h"

#include <fcntl.h>

#include <algorithm>

#include "upgraded/fs/durable.h"
#include "upgraded/fs/unique_fd.h"

namespace upgraded::daemon {
namespace {

Result<std::vector<sandbox::PemFile>> read_pem_files(const std::string& dir, bool required) {
  std::vector<sandbox::PemFile> out;
  auto dfd = fs::open_directory(dir);
  if (!dfd) {
    if (!required && dfd.error().code() == ErrorCode::kNotFound) return out;
    return dfd.error();
  }
  auto names = fs::list_names(dfd->get(), ".");
  if (!names) return names.error();
  std::sort(names->begin(), names->end());
  for (const auto& n : *names) {
    if (n.size() <= 4 || !n.ends_with(".pem") || n.front() == '.') continue;
    auto text = fs::read_file(dfd->get(), n, 64 << 10);
    if (!text) return text.error().with_context("reading " + dir + "/" + n);
    out.push_back({dir + "/" + n, std::move(*text)});
  }
  if (required && out.empty())
    return Error(ErrorCode::kNotFound, "no trusted keys (*.pem) in '" + dir + "'");
  return out;
}

}  // namespace

Result<TrustRoot> read_trust_root(const Config& config) {
  auto keys = read_pem_files(config.keys_dir(), true);
  if (!keys) return keys.error();
  auto revoked = read_pem_files(config.revoked_dir(), false);
  if (!revoked) return revoked.error();
  return TrustRoot{std::move(*keys), std::move(*revoked)};
}

}  // namespace upgraded::daemon
