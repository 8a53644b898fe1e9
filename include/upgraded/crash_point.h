#pragma once

// Named crash points for crash-safety tests. In test builds (cmake -DUPGRADED_BUILD_TESTS=ON,
// which defines UPGRADED_CRASH_POINTS), reaching the point named by the environment variable
// UPGRADED_CRASH_AT kills the process with SIGKILL, exactly as a power cut or OOM kill would
// interrupt it. Every other build compiles the points away: a shipped daemon has no hook that
// its environment could trigger.

namespace upgraded {

// Pause points widen a race window on purpose, so that a test can act inside it (cancel a job
// before its point of no return, kill a process mid-way): UPGRADED_PAUSE_AT=name:milliseconds
// sleeps that long each time `name` is reached.
#ifdef UPGRADED_CRASH_POINTS
inline constexpr bool kTestHooks = true;
void crash_point(const char* name);
void pause_point(const char* name);
#else
inline constexpr bool kTestHooks = false;
inline void crash_point(const char*) {}
inline void pause_point(const char*) {}
#endif

}  // namespace upgraded
