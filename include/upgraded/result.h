#pragma once

// Errors as values for the engine library. g++ 12 offers std::expected only with -std=c++23, so
// this is the small stand-in style.md asks for: Result<T> holds either a T or an Error.

#include <cassert>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace upgraded {

/// Stable error categories. The CLI maps them to exit codes and the daemon to D-Bus error names,
/// so a value's meaning must never change once released.
enum class ErrorCode {
  kFailed,              ///< An operation failed (I/O, system call, resource).
  kInvalidArgument,     ///< The caller asked for something malformed.
  kNotFound,            ///< A named thing does not exist.
  kExists,              ///< A thing that must not exist already does.
  kVerificationFailed,  ///< Signature, hash or container structure is wrong: not authentic.
  kPolicyRefused,       ///< Authentic, but refused by install policy (unsafe entry, limit).
  kNoSpace,             ///< The filesystem is (or would become) too full.
  kBusy,                ///< Another operation holds the lock.
  kCanceled,            ///< The caller canceled the operation before it changed anything.
};

/// Human-readable name of an error code ("verification failed").
std::string_view to_string(ErrorCode code);

/// An error shown to users: a category plus a message that names what failed and why.
class Error {
 public:
  Error(ErrorCode code, std::string message) : m_code(code), m_message(std::move(message)) {}

  ErrorCode code() const { return m_code; }
  const std::string& message() const { return m_message; }

  /// Prefixes the message with what the caller was doing: "unpacking 'x.upd': <message>".
  [[nodiscard]] Error with_context(std::string_view context) const& {
    return Error(m_code, std::string(context) + ": " + m_message);
  }

 private:
  ErrorCode m_code;
  std::string m_message;
};

/// Error from errno: "<what>: <strerror(err)>", with ENOSPC/EDQUOT mapped to kNoSpace.
Error system_error(int err, std::string_view what);

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : m_value(std::move(value)) {}      // NOLINT(google-explicit-constructor)
  Result(Error error) : m_value(std::move(error)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const { return m_value.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & {
    assert(ok());
    return std::get<0>(m_value);
  }
  const T& value() const& {
    assert(ok());
    return std::get<0>(m_value);
  }
  T&& value() && {
    assert(ok());
    return std::get<0>(std::move(m_value));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }

  const Error& error() const {
    assert(!ok());
    return std::get<1>(m_value);
  }

 private:
  std::variant<T, Error> m_value;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : m_error(std::move(error)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const { return !m_error.has_value(); }
  explicit operator bool() const { return ok(); }
  const Error& error() const {
    assert(!ok());
    return *m_error;
  }

 private:
  std::optional<Error> m_error;
};

/// Propagates an error from an expression returning Result<...>: UPGRADED_TRY(do_thing());
#define UPGRADED_TRY(expr)                                 \
  do {                                                     \
    if (auto upgraded_try_r_ = (expr); !upgraded_try_r_) { \
      return upgraded_try_r_.error();                      \
    }                                                      \
  } while (false)

}  // namespace upgraded
