#pragma once

#include <string>

#include "upgraded/result.h"

namespace upgraded::fs {

/// Removes `dirfd/name` and everything below it, without following symlinks and regardless of
/// read-only modes (directories are made writable before their entries are removed). A missing
/// `name` is not an error.
Result<void> remove_tree(int dirfd, const std::string& name);

}  // namespace upgraded::fs
