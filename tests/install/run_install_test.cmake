# Installs the already-built lookback into a scratch prefix, then builds and
# runs two programs against it as a downstream user would:
#   - a CMake project that uses find_package(lookback) and sets no C++
#     standard (the target must carry cxx_std_20 itself);
#   - a C program built with `cc main.c $(pkg-config --cflags --libs lookback)`.
# Inputs: SOURCE_DIR, BUILD_DIR, WORK_DIR, CMAKE_BUILD_TYPE, C_COMPILER, PKG_CONFIG.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "failed (${result}): ${ARGN}\n${output}")
  endif()
endfunction()

run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})

run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/install/consumer -B ${WORK_DIR}/consumer
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer)
run(${WORK_DIR}/consumer/consumer)
message(STATUS "CMake consumer built against ${prefix} and ran")

if(NOT PKG_CONFIG)
  message(FATAL_ERROR "pkg-config not found (scripts/install-deps.sh installs it)")
endif()
# Only the installed tree is searched: no system .pc file may stand in for ours.
file(GLOB pc_dirs ${prefix}/*/pkgconfig ${prefix}/*/*/pkgconfig)
string(REPLACE ";" ":" pc_dirs "${pc_dirs}")
set(ENV{PKG_CONFIG_LIBDIR} "${pc_dirs}")
unset(ENV{PKG_CONFIG_PATH})
execute_process(COMMAND ${PKG_CONFIG} --cflags --libs lookback RESULT_VARIABLE result
                OUTPUT_VARIABLE flags ERROR_VARIABLE flags OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "pkg-config --cflags --libs lookback failed in ${prefix}: ${flags}")
endif()
execute_process(COMMAND ${PKG_CONFIG} --variable=libdir lookback
                OUTPUT_VARIABLE libdir OUTPUT_STRIP_TRAILING_WHITESPACE)
separate_arguments(flag_list UNIX_COMMAND "${flags}")
run(${C_COMPILER} ${SOURCE_DIR}/tests/install/c_consumer.c ${flag_list} -Wl,-rpath,${libdir}
    -o ${WORK_DIR}/c_consumer)
run(${WORK_DIR}/c_consumer)
message(STATUS "pkg-config C consumer built against ${prefix} (${flags}) and ran")
