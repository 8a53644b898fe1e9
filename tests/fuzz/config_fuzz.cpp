// Fuzz target `config`: upgraded.conf (daemon/config.cpp, toml++). The input is one file's
// text, applied over the defaults as load_config applies each file it reads.
//
// Invariants: only toml++'s parse_error escapes the parser and it becomes kInvalidArgument, as
// do the schema's refusals; a configuration that loads has every setting within the ranges
// docs/configuration.md gives, and app roots that are absolute and free of '..'.

#include <string>

#include "config.h"
#include "fuzz_support.h"
#include "upgraded/policy/names.h"

using namespace upgraded;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  daemon::Config c;
  auto r = daemon::apply_config_text(c, fuzz::as_text(data, size), "upgraded.conf");
  if (!r) {
    FUZZ_CHECK(r.error().code() == ErrorCode::kInvalidArgument);
    FUZZ_CHECK(r.error().message().starts_with("upgraded.conf:"));
    return 0;
  }
  FUZZ_CHECK(c.files.empty());
  FUZZ_CHECK(c.threshold >= 1 && c.threshold <= 64);
  FUZZ_CHECK(c.keep >= 1 && c.keep <= 10000);
  FUZZ_CHECK(!c.max_bytes || (*c.max_bytes >= 1 && *c.max_bytes <= (std::uint64_t(1) << 62)));
  FUZZ_CHECK(c.job_timeout_s >= 1 && c.job_timeout_s <= 86400);
  const auto& l = c.extract.limits;
  FUZZ_CHECK(l.max_entries >= 1 && l.max_total_bytes >= 1 && l.max_file_size >= 1 &&
             l.max_expansion_ratio >= 1);
  FUZZ_CHECK(c.verifications >= 1 && c.verifications <= 64);
  FUZZ_CHECK(c.queued_installs <= 4096);
  FUZZ_CHECK(c.authorizations_per_user >= 1 && c.authorizations_per_user <= 1024);
  FUZZ_CHECK(c.helper_ids >= 1000);
  FUZZ_CHECK(std::uint64_t(c.helper_ids) + daemon::Config::kHelperIds <= 4294967294ULL);
  for (const auto& [app, root] : c.app_roots) {
    FUZZ_CHECK(policy::validate_app_name(app).ok());
    FUZZ_CHECK(!root.empty() && root.front() == '/');
    FUZZ_CHECK(root.find("/../") == std::string::npos && !root.ends_with("/.."));
    // Paths are used as C strings: a NUL would cut off what was checked.
    FUZZ_CHECK(root.find('\0') == std::string::npos);
  }
  // What the daemon derives from it.
  auto so = c.store_options();
  FUZZ_CHECK(so.app_roots.size() == c.app_roots.size());
  return 0;
}
