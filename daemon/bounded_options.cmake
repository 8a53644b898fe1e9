# cmake -DFILE=<generated adaptor header> -P bounded_options.cmake
# Makes the generated adaptor take method options (a{sv} named "options") as
# upgraded::daemon::BusOptions, whose deserializer is bounded (daemon/bus_options.h).
file(READ "${FILE}" text)
set(before "${text}")
string(REPLACE "const std::map<std::string, sdbus::Variant>& options"
  "const upgraded::daemon::BusOptions& options" text "${text}")
string(REPLACE "std::map<std::string, sdbus::Variant> options"
  "upgraded::daemon::BusOptions options" text "${text}")
if(text STREQUAL before AND FILE MATCHES "Manager")
  message(FATAL_ERROR "${FILE}: no options argument found to bound; did the generator change?")
endif()
file(WRITE "${FILE}" "${text}")
